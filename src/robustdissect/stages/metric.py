"""Stage `metric`: the model-level robustness metric Ψ (METHODS §2.3) of the run's model and of
the compared models, its wall time beside that of a PGD robust-accuracy evaluation of the same
images, and the YU-1 study (§2.4) when one has been run (`python -m robustdissect.studies.yu1`)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import resources
from ..analysis.metric import CALIBRATIONS, DEFAULT_STEPS, MetricResult, robustness_metric
from ..attacks import PGD, Attack
from ..batching import run_batch_size
from ..config import check_ints, parse_budgets, stage_options
from ..errors import UserError
from ..report.plots_metric import psi_histograms, study_scatter
from ..stats import wilson_interval
from .base import STAGES, Context, section

log = logging.getLogger(__name__)

# docs/results/yu1/yu1.json, shipped in the package by `python -m robustdissect.studies.ship`
SHIPPED_STUDY = "yu1-fmnist.json"
STUDY_FILE = "yu1.json"  # in the output folder of the study


@dataclass(frozen=True)
class MetricOptions:
    """Options of the `metric` stage.

    eps, steps (default 5; 20 is METHODS §2.3's K, see analysis/metric.py for K = 5 against 20),
    alpha (None: ε/4), restarts: the KL maximiser; n: images (a prefix of the run's
    analysed split; None = all); calibration: "temperature" (T with mean max-softmax =
    `target_confidence` on `calibration_n` validation images), "logit_norm" (s·Z/‖Z‖₂, s =
    `logit_scale`) or "none"; compare: other models (None: the run's counterparts, `--compare`);
    counterparts: how many of them (None: all; the default run: 1); evaluation: also time a
    PGD-`eval_steps` robust-accuracy evaluation (α = 2.5ε/k, random start, `eval_restarts`) of the
    same images; study: folder of a YU-1 study to show (None: the study shipped in the package,
    results/yu1-fmnist.json, as an appendix of runs on the shipped Fashion-MNIST models only)."""

    eps: float = 0.1
    steps: int = DEFAULT_STEPS
    alpha: float | None = None
    restarts: int = 1
    n: int | None = 1000
    calibration: str = "temperature"
    target_confidence: float = 0.9
    calibration_n: int = 1000
    logit_scale: float = 10.0
    compare: list[str] | None = None
    counterparts: int | None = None
    evaluation: bool = True
    eval_steps: int = 100
    eval_restarts: int = 2
    study: str | None = None

    def __post_init__(self) -> None:
        parse_budgets(self, "eps", stage="metric")
        if self.calibration not in CALIBRATIONS:
            raise UserError(f"metric: calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        ints = ("steps", "restarts", "calibration_n", "eval_steps", "eval_restarts")
        check_ints(self, dict.fromkeys(ints, 1), "metric")
        if self.counterparts is not None and (not isinstance(self.counterparts, int) or self.counterparts < 0):
            raise UserError(f"metric: counterparts must be an integer >= 0 or null, got {self.counterparts!r}")
        if self.n is not None and (not isinstance(self.n, int) or self.n < 1):
            raise UserError(f"metric: n must be an integer >= 1 or null, got {self.n!r}")
        if not 0 < self.target_confidence < 1:
            raise UserError(f"metric: target_confidence must be in (0, 1), got {self.target_confidence}")


# The default run: 100 images, no timed evaluation (the evaluate stage's tables have the accuracies).
QUICK_METRIC: dict[str, Any] = {"n": 100, "calibration_n": 500, "evaluation": False, "counterparts": 1}


def _psi(ctx: Context, model: nn.Module, x: torch.Tensor, index: torch.Tensor, opts: MetricOptions) -> MetricResult:
    """Ψ of `model` on images x (n, C, H, W) at positions `index` (n,), its KL maximiser through the store."""

    def run_attack(wrapped: nn.Module, attack: Attack, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return ctx.attack(attack, xs, ys, index, model=wrapped).x_adv

    cal = ctx.data.val.x[: opts.calibration_n] if len(ctx.data.val) else x
    return robustness_metric(
        model, x, eps=opts.eps, steps=opts.steps, alpha=opts.alpha, restarts=opts.restarts,
        calibration=opts.calibration, calibration_x=cal, target_confidence=opts.target_confidence,
        logit_scale=opts.logit_scale, seed=ctx.config.seed, run_attack=run_attack,
        cache_calibration=False,  # each model is calibrated once here; its time always includes that
    )  # fmt: skip


def _timed_evaluation(ctx: Context, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                      opts: MetricOptions) -> dict[str, Any]:  # fmt: skip
    """PGD robust accuracy of the same images, with its wall time when computed in this call."""
    attack = PGD(opts.eps, steps=opts.eval_steps, step_rule="madry", restarts=opts.eval_restarts,
                 early_stop=True, seed=ctx.config.seed, batch_size=run_batch_size(ctx, 500, model))  # fmt: skip
    before = ctx.store.misses.get("adv", 0)
    t0 = time.perf_counter()
    out = ctx.attack(attack, x, y, index, model=model)
    seconds = time.perf_counter() - t0
    computed = ctx.store.misses.get("adv", 0) > before
    c = int(out.correct.sum())
    lo, hi = wilson_interval(c, len(y))
    return {"pgd_accuracy": c / len(y), "pgd_ci_low": lo, "pgd_ci_high": hi,
            "eval_seconds": seconds if computed else math.nan}  # fmt: skip


def read_study(folder: str | Path) -> dict[str, Any]:
    """The YU-1 study that `python -m robustdissect.studies.yu1` wrote into `folder` (its yu1.json)."""
    return resources.read_study(folder, "YU-1", STUDY_FILE, ("rows",))


def load_study(option: str | None, ctx: Context | None = None) -> dict[str, Any] | None:
    """The YU-1 study in the folder `option`, or (None) the one shipped in the package when the
    run analyses a shipped Fashion-MNIST model on its own data (`ctx`; any run without one)."""
    builtin = ctx is None or ctx.builtin_reference
    return resources.study_or_shipped(option, builtin, "YU-1", STUDY_FILE, ("rows",), SHIPPED_STUDY)


def _study_block(ctx: Context, study: dict[str, Any] | None, tables: list[dict[str, Any]],
                 figures: list[dict[str, str]], warnings: list[str]) -> dict[str, Any] | None:  # fmt: skip
    """Tables and the scatter of the YU-1 study `study` (None: a warning); its summary, or None."""
    if study is None:
        return None
    appendix = "Appendix, reference study on the shipped Fashion-MNIST models — YU-1: "
    rows = study["rows"]
    keep = ["model", "arch", "width", "objective", "clean", "psi_mean", "psi_p90",
            *[c for c in study.get("psi_columns", []) if c != "psi_mean"], "psi_seconds", "psi_k20_seconds",
            "eval_seconds", *study["accuracy_columns"], "boundary_inside_eps", "boundary_median",
            "steepness"]  # fmt: skip
    ctx.run.write_table("metric_yu1_models", rows, columns=[k for k in keep if k in rows[0]])
    corr = [{"accuracy_column": col, **vals} for col, vals in study["correlations"].items()]
    ctx.run.write_table("metric_yu1_correlations", corr)
    stab = study["stability"]
    stab_rows = [{"ranking_by": k, **{m: v for m, v in s.items() if m != "columns"}, "settings": len(s["columns"])}
                 for k, s in stab.items()]  # fmt: skip
    ctx.run.write_table("metric_yu1_stability", stab_rows)
    tables += [
        {"file": "tables/metric_yu1_correlations.csv", "show": True,
         "title": appendix + "Spearman / Kendall between −Ψ and each accuracy column "
                  "(95% bootstrap intervals over models)"},
        {"file": "tables/metric_yu1_stability.csv", "show": True,
         "title": appendix + "how much the model ranking moves across test settings (mean pairwise Kendall τ)"},
        {"file": "tables/metric_yu1_models.csv", "show": True, "title": appendix + "the model family"},
    ]  # fmt: skip
    ctx.run.save_figure("metric_yu1_scatter", study_scatter(rows, study["accuracy_columns"], study["correlations"]))
    caption = appendix + "Ψ against adversarial accuracy per test setting, one point per model"
    figures.append({"file": "figures/metric_yu1_scatter.png", "caption": caption})
    return {"settings": study["settings"], "timing": study["timing"], "stability": stab,
            "correlations": study["correlations"], "models": len(rows),
            "psi_steps_agreement": study.get("psi_steps_agreement")}  # fmt: skip


@STAGES.register("metric", "robustness metric Psi (max KL in the eps-ball, calibrated), its cost, the YU-1 study")
def metric_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Ψ of the run's model and the compared ones (maximiser through the evidence store), the
    optional timed PGD evaluation, and the YU-1 study."""
    opts: MetricOptions = stage_options(MetricOptions, options, "metric")
    yu1 = load_study(opts.study, ctx)  # a wrong folder fails before any work
    split = ctx.split
    n = len(split) if opts.n is None else min(opts.n, len(split))
    models, warnings = ctx.with_counterparts(opts.compare, opts.counterparts)
    rows, psis = _model_rows(ctx, models, split.x[:n], split.y[:n], opts, warnings)
    ctx.run.write_table("metric_psi", rows)
    title = "Ψ = mean ψ(x) and its 90th percentile (lower = more robust)"
    tables: list[dict[str, Any]] = [{"file": "tables/metric_psi.csv", "show": True, "title": title}]
    ctx.run.save_figure("metric_psi_hist", psi_histograms(psis))
    figures: list[dict[str, str]] = [{"file": "figures/metric_psi_hist.png", "caption": "ψ(x) per image and model"}]
    study = _study_block(ctx, yu1, tables, figures, warnings)
    text = _psi_text(rows, n, opts)
    if study is not None:
        text += _study_text(study)
    return section("Robustness metric Ψ", text=text, summary=_summary(rows, opts), tables=tables, figures=figures,
                   warnings=warnings, models=rows, study=study)  # fmt: skip


def _model_rows(
    ctx: Context, models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, opts: MetricOptions,
    warnings: list[str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per model (Ψ's summary, the timed PGD evaluation when asked) on images x (n, C, H, W)
    with labels y (n,), and ψ(x) (n,) per model; an uncalibrated model adds to `warnings`."""
    n = int(y.shape[0])
    index = torch.arange(n)
    rows: list[dict[str, Any]] = []
    psis: dict[str, Any] = {}
    for name, model in models.items():
        log.info("metric: %s on %d images", name, n)
        r = _psi(ctx, model, x, index, opts)
        row: dict[str, Any] = {"model": name, **r.summary()}
        if opts.evaluation:
            row.update(_timed_evaluation(ctx, model, x, y, index, opts))
            row["psi_over_eval_time"] = r.seconds / row["eval_seconds"] if row["eval_seconds"] > 0 else math.nan
        if not r.calibrated:
            warnings.append(f"{name}: no temperature reaches mean max-softmax {opts.target_confidence} "
                            f"(T = {r.temperature:.3g} used)")  # fmt: skip
        rows.append(row)
        psis[name] = r.psi.numpy()
    return rows, psis


def _summary(rows: list[dict[str, Any]], opts: MetricOptions) -> dict[str, Any]:
    """Ψ per model with its wall time, and the PGD accuracy with its time when evaluated."""
    summary: dict[str, Any] = {}
    for row in rows:
        name = row["model"]
        summary[f"Ψ {name}"] = f"{row['psi_mean']:.4g} (p90 {row['psi_p90']:.4g}) in {row['seconds']:.2f} s"
        if opts.evaluation:
            took = row["eval_seconds"]
            ratio = row["psi_over_eval_time"]
            timing = f"in {took:.2f} s (Ψ: {ratio:.2f}× that)" if math.isfinite(took) else "(stored)"
            summary[f"PGD-{opts.eval_steps} accuracy {name}"] = f"{row['pgd_accuracy']:.1%} {timing}"
    return summary


def _psi_text(rows: list[dict[str, Any]], n: int, opts: MetricOptions) -> str:
    """What Ψ is with this run's settings, and its wall time against the PGD evaluation's."""
    text = (
        f"ψ(x) = max KL(p_T(x) ‖ p_T(x+δ)) over the L∞ ball of ε = {opts.eps:g} ∩ [0,1], by PGD on KL "
        f"({opts.steps} steps, {opts.restarts} restart(s)), {opts.calibration} calibration, on {n} images; "
        "no labels are used. Ψ is the mean over images."
    )
    if opts.evaluation:
        ratios = ", ".join(f"{r['model']} {r['psi_over_eval_time']:.2g}" for r in rows
                           if math.isfinite(r.get("psi_over_eval_time", math.nan)))  # fmt: skip
        if ratios:
            text += (
                f" Ψ's wall time (calibration included) over that of PGD-{opts.eval_steps} ({opts.eval_restarts} "
                f"restart(s), early stop per image) on the same images: {ratios}."
            )
    return text


def _study_text(study: dict[str, Any]) -> str:
    """The YU-1 study in sentences: its settings, the rank agreement of −Ψ with accuracy, stability."""
    t = study["timing"]
    sp = study["correlations"]
    st = study["settings"]
    best = max(sp, key=lambda c: sp[c]["spearman"] if not math.isnan(sp[c]["spearman"]) else -2)
    used = [f"{st['n']} test images" if "n" in st else "",
            f"PGD with {st['restarts']} run(s) per setting" if "restarts" in st else "",
            f"main Ψ at K = {st.get('psi_steps', 20)}"]  # fmt: skip
    text = (
        f" YU-1 ({study['models']} models): {', '.join(u for u in used if u)}; Spearman(−Ψ, accuracy) ranges "
        f"{min(v['spearman'] for v in sp.values()):.2f}–{max(v['spearman'] for v in sp.values()):.2f} "
        f"(best {best}); the accuracy ranking across test settings has mean pairwise Kendall τ "
        f"{study['stability']['accuracy']['mean_pairwise_kendall']:.2f}, Ψ's across its settings "
        f"{study['stability']['psi']['mean_pairwise_kendall']:.2f}; the full evaluation took "
        f"{t['full_over_psi']:.1f}× Ψ's time, PGD-100 alone {t['pgd100_over_psi']:.1f}×."
    )
    for col, agr in (study.get("psi_steps_agreement") or {}).items():
        text += (
            f" Ψ's model ranking against {col}: Spearman {agr['spearman']:.2f}, Kendall {agr['kendall']:.2f} "
            f"({len(agr['discordant_pairs'])} discordant pair(s))."
        )
    return text


metric_stage.options_class = MetricOptions  # type: ignore[attr-defined]
metric_stage.reduced_options = QUICK_METRIC  # type: ignore[attr-defined]
