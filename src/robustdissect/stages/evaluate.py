"""Stage `evaluate`: the robustness table (Table III layout) with 95% intervals, accuracy against
eps and PGD steps, per-class robust accuracy, perturbation norms, corruptions, image grids and
gradient-masking warnings."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from ..attacks import Attack, make_attack
from ..attacks.corruptions import noise_scale
from ..config import stage_options
from ..evaluation import (
    QUICK_EVALUATE,
    AttackOutcome,
    Curves,
    EvaluateOptions,
    accuracy_rows,
    black_box_subset,
    clean_predictions,
    per_class_rows,
    perturbation_norms,
    sweep_curves,
    table_attacks,
    worst_cases,
)
from ..report import plots
from ..runs import RunDir
from ..stats import wilson_interval
from .base import STAGES, Context, section

log = logging.getLogger(__name__)


@STAGES.register("evaluate", "robust accuracy under every attack, worst case, curves, per-class, grids, masking checks")
def evaluate_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Every table attack, the worst case, corruptions, curves and masking checks on the run's
    analysed images; `options` already carries the run's budget profile."""
    opts: EvaluateOptions = stage_options(EvaluateOptions, options, "evaluate")
    seed, split = ctx.config.seed, ctx.split
    x, y = split.x, split.y
    index = torch.arange(len(y))

    def attack(a: Attack, idx: torch.Tensor) -> AttackOutcome:
        return ctx.attack(a, x[idx], y[idx], idx)

    clean_correct = clean_predictions(ctx.store, ctx.model, x, index, ctx.images_id, opts.batch_size) == y
    bb_index = black_box_subset(len(y), opts.blackbox_n, seed)
    outcomes = table_attacks(opts.attack_names(), opts, seed, index, bb_index, attack, "evaluate")
    rows = accuracy_rows(clean_correct, outcomes)
    # curves (L-inf PGD) and the gradient-masking checks on a fixed subset; every PGD of the
    # sweeps at the table's eps is an attack of the L-inf threat model and joins its worst case
    curves = sweep_curves(ctx.model, x, y, opts, seed, rows, outcomes, attack)
    # worst case per threat model: the per-image minimum over every attack of that (norm, eps) that
    # the run computed; the cascade's other attacks, then Square, run only on the points still robust
    cases = worst_cases(opts, seed, clean_correct, [*outcomes.items(), *curves.extra], attack)
    cascade_rows = [r for wc in cases for r in wc.cascade]
    rows += [wc.row for wc in cases]
    corruption_rows, scale = _corruptions(ctx, opts, x, y)
    per_class = per_class_rows(ctx.data.classes, y, clean_correct, outcomes, {wc.label: wc.robust for wc in cases})
    norms = [{"attack": name, **perturbation_norms(x[out.index], out.x_adv)} for name, out in outcomes.items()]
    _write_tables(ctx.run, rows, cascade_rows, corruption_rows, curves, per_class, norms)
    figures = _figures(ctx.run, opts, rows, curves, corruption_rows, scale)
    figures += _grid_figure(ctx, opts, outcomes, x, y)
    robust_table = _record_results(ctx, rows, opts.eps)
    return section(
        "Robustness evaluation",
        text=_section_text(len(y), len(bb_index), ctx.config.split, opts),
        summary={r["attack"]: _interval_text(r) for r in rows},
        tables=_table_entries(bool(cascade_rows)),
        figures=figures,
        warnings=[*curves.warnings, *(w for wc in cases for w in wc.warnings)],
        robust_accuracy=robust_table,
        table=rows,
        corruptions=corruption_rows,
        accuracy_vs_eps=curves.accuracy_vs_eps,
        accuracy_vs_steps=curves.accuracy_vs_steps,
        masking=curves.masking,
        attack_settings={name: out.settings for name, out in outcomes.items()},
        options=asdict(opts),
    )


def _corruptions(
    ctx: Context, opts: EvaluateOptions, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[dict[str, Any]], str]:
    """(rows, Gaussian-noise scale): accuracy under every corruption at severities 1..5 on the
    analysed images x (N, C, H, W), labels y (N,), with Wilson intervals."""
    n = len(y)
    scale = noise_scale(opts.noise_scale, ctx.data.image_shape)
    rows: list[dict[str, Any]] = []
    for cname in opts.corruptions:
        for sev in range(1, 6):
            kwargs: dict[str, Any] = {"severity": sev, "seed": ctx.config.seed}
            if cname == "gaussian-noise":
                kwargs["scale"] = scale
            res = ctx.attack(make_attack(cname, **kwargs), x, y, torch.arange(n))
            lo, hi = wilson_interval(int(res.correct.sum()), n)
            rows.append({"corruption": cname, "severity": sev, "accuracy": res.accuracy(), "ci_low": lo, "ci_high": hi})
    return rows, scale


def _write_tables(
    run: RunDir,
    rows: list[dict[str, Any]],
    cascade_rows: list[dict[str, Any]],
    corruption_rows: list[dict[str, Any]],
    curves: Curves,
    per_class: list[dict[str, Any]],
    norms: list[dict[str, Any]],
) -> None:
    """The stage's CSV tables (the worst-case cascade only when a cascade ran)."""
    run.write_table("robust_accuracy", rows)
    if cascade_rows:
        run.write_table("worst_case_cascade", cascade_rows)
    run.write_table("corruptions", corruption_rows)
    run.write_table("accuracy_vs_eps", [{"eps": e, "accuracy": a} for e, a in curves.accuracy_vs_eps.items()])
    run.write_table("accuracy_vs_steps", [{"steps": k, "accuracy": a} for k, a in curves.accuracy_vs_steps.items()])
    run.write_table("robust_accuracy_per_class", per_class)
    run.write_table("perturbation_norms", norms)


def _figures(
    run: RunDir,
    opts: EvaluateOptions,
    rows: list[dict[str, Any]],
    curves: Curves,
    corruption_rows: list[dict[str, Any]],
    scale: str,
) -> list[dict[str, str]]:
    """Saves the accuracy bars, the curves and the corruptions figure; their report entries."""
    run.save_figure("robust_accuracy", plots.accuracy_bars(rows))
    figures = [{"file": "figures/robust_accuracy.png", "caption": "Accuracy under each attack (95% Wilson interval)"}]
    figures += _curve_figures(run, opts, curves)
    figures += _corruption_figure(run, opts, corruption_rows, scale)
    return figures


def _curve_figures(run: RunDir, opts: EvaluateOptions, curves: Curves) -> list[dict[str, str]]:
    """Accuracy against ε and against PGD steps (none when the curves are off)."""
    eps_curve, steps_curve = curves.accuracy_vs_eps, curves.accuracy_vs_steps
    if not eps_curve:
        return []
    run.save_figure(
        "accuracy_vs_eps",
        plots.line_plot(
            list(eps_curve), {"PGD-Linf": list(eps_curve.values())}, "ε (L∞)", "robust accuracy",
            f"PGD-{opts.pgd_steps}, {curves.n} images",
        ),
    )  # fmt: skip
    run.save_figure(
        "accuracy_vs_steps",
        plots.line_plot(
            list(steps_curve), {"PGD-Linf": list(steps_curve.values())}, "PGD steps k", "robust accuracy",
            f"ε = {opts.eps:g}, {curves.n} images",
        ),
    )  # fmt: skip
    return [
        {"file": "figures/accuracy_vs_eps.png", "caption": "Robust accuracy against ε (L∞ PGD)"},
        {"file": "figures/accuracy_vs_steps.png", "caption": "Robust accuracy against the number of PGD steps"},
    ]


def _corruption_figure(
    run: RunDir, opts: EvaluateOptions, corruption_rows: Sequence[Mapping[str, Any]], scale: str
) -> list[dict[str, str]]:
    """Accuracy against severity, one line per corruption (none without corruptions)."""
    if not corruption_rows:
        return []
    series: dict[str, list[float]] = {
        c: [float(r["accuracy"]) for r in corruption_rows if r["corruption"] == c] for c in opts.corruptions
    }
    run.save_figure("corruptions", plots.line_plot([1, 2, 3, 4, 5], series, "severity", "accuracy", f"scale: {scale}"))
    return [{"file": "figures/corruptions.png", "caption": "Accuracy under common corruptions"}]


def _grid_figure(
    ctx: Context, opts: EvaluateOptions, outcomes: Mapping[str, AttackOutcome], x: torch.Tensor, y: torch.Tensor
) -> list[dict[str, str]]:
    """Up to 8 of the images x (N, C, H, W), labels y (N,), attacked by `opts.grid_attack`: clean,
    adversarial and the amplified difference (none when that attack did not run)."""
    if opts.grid_attack not in outcomes:
        return []
    out = outcomes[opts.grid_attack]
    k = min(8, len(out.index))
    shown = out.index[:k]
    ctx.run.save_figure(
        "adversarial_grid", plots.adversarial_grid(x[shown], out.x_adv[:k], ctx.data.classes, y[shown], out.pred[:k])
    )
    return [
        {
            "file": "figures/adversarial_grid.png",
            "caption": f"{opts.grid_attack}: clean (top), adversarial (middle), difference amplified (bottom)",
        }
    ]


def _record_results(ctx: Context, rows: Sequence[Mapping[str, Any]], eps: float) -> dict[str, Any]:
    """Sets the run-level clean accuracy, robust accuracies and headline (the L∞ worst case, else
    PGD, else clean) in `ctx.results`; the robust accuracies {attack: accuracy}."""
    robust_table = {r["attack"]: r["accuracy"] for r in rows if r["kind"] != "clean"}
    headline = next((r for r in rows if r["attack"] == "worst case (L∞)"), None) or next(
        (r for r in rows if r["attack"] == "pgd-linf"), rows[0]
    )
    ctx.results.update(
        clean_accuracy=rows[0]["accuracy"],
        robust_accuracy=robust_table,
        headline={"threat_model": f"L∞ ε={eps:g}", **{k: headline[k] for k in ("attack", "n", "accuracy", "ci_low",
                                                                             "ci_high")}},
    )  # fmt: skip
    return robust_table


def _interval_text(row: Mapping[str, Any]) -> str:
    """A table row's accuracy and 95% interval in percent: "87.5% [80.1, 92.3]"."""
    return f"{100 * row['accuracy']:.1f}% [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


def _section_text(n: int, bb_n: int, split: str, opts: EvaluateOptions) -> str:
    """The section's text: images, budgets and how the worst case is formed."""
    return (
        f"{n} {split} images; L∞ ε = {opts.eps:g}, L2 ε = {opts.eps_l2:g}; black-box attacks on "
        f"{bb_n} images. The worst case of a threat model is the per-image minimum over every attack of "
        "that norm and ε the run computed (table attacks, the PGD runs of the curves, the cascade "
        f"{', '.join(opts.worst_case)} on the points still robust"
        + (f", then Square with {opts.square_queries} queries" if opts.square_queries and opts.square_norms else "")
        + "); no row of the same threat model can lie below it, and it is still only an upper bound of "
        "the true robust accuracy. C&W is unbounded and in no worst case."
    )


def _table_entries(cascade: bool) -> list[dict[str, Any]]:
    """The section's table entries (the cascade's only when a cascade ran)."""
    return [
        {"file": "tables/robust_accuracy.csv", "title": "Accuracy under attack (95% CI)", "show": True},
        *(
            [{"file": "tables/worst_case_cascade.csv", "title": "Worst case: who broke what", "show": True}]
            if cascade
            else []
        ),
        {"file": "tables/robust_accuracy_per_class.csv", "title": "Robust accuracy per class", "show": True},
        {"file": "tables/perturbation_norms.csv", "title": "Perturbation norms", "show": True},
        {"file": "tables/corruptions.csv", "title": "Corruptions", "show": False},
        {"file": "tables/accuracy_vs_eps.csv", "title": "Accuracy vs eps", "show": False},
        {"file": "tables/accuracy_vs_steps.csv", "title": "Accuracy vs steps", "show": False},
    ]


evaluate_stage.options_class = EvaluateOptions  # type: ignore[attr-defined]
evaluate_stage.reduced_options = QUICK_EVALUATE  # type: ignore[attr-defined]
