"""Stage `pushback` (METHODS §6.5, §6.6, §3.4): test-time purification by back-perturbation
against a non-adaptive and an adaptive (BPDA) attacker, the D_bp success criterion, the reliance
shift RS of the run's model beside PAT and SNS, unit transitions between quadrants for fine-tuned
models, and the Ilyas-style table when models trained on the built datasets are shipped.

The default run's budget shows the shipped results (`results/pushback-fmnist.json`, computed by
this stage under `--full` on the shipped vanilla smallcnn) instead of recomputing them; `--full`
(or `compute: true`) computes everything for the run's own model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from matplotlib.figure import Figure

from ..analysis.features import QUADRANTS, QUICK_FEATURES, FeatureOptions, feature_scores, model_level_attacks
from ..analysis.pushback import (
    UnitSets,
    back_perturb,
    dbp_criterion,
    evaluate_purification,
    reliance_shift_of,
    transition_matrix,
)
from ..attacks import PGD
from ..config import parse_eps
from ..errors import UserError
from ..evaluation import wilson_interval
from ..models import shipped_checkpoints
from ..models.resolve import resolve_model
from ..pipeline import STAGES, AnalysisUnavailable, Context, section
from ..resources import resource
from .training import _load

log = logging.getLogger(__name__)

SHIPPED = ("results", "pushback-fmnist.json")
# models trained on the built datasets (§3.4 analogue); shown when shipped
DATA_MODELS = {"D_bp": "fmnist-smallcnn-data-bp", "D_R": "fmnist-smallcnn-data-r", "D_NR": "fmnist-smallcnn-data-nr",
               "D_rand": "fmnist-smallcnn-data-rand", "D_det": "fmnist-smallcnn-data-det"}  # fmt: skip


@dataclass(frozen=True)
class PushbackOptions:
    """Options of the `pushback` stage.

    compute: False shows the shipped results; eps_bp, steps, alpha, lambda_r: the back-perturbation
    (§6.5/§8.3); feature_n: analysed images of the feature dissection that gives B and R (the
    `features` stage's options when it is part of the run); purify_n: images of the purification
    table; eps: the attacker's ℓ∞ budget; adaptive_steps: BPDA PGD steps (α = 2.5ε/k, random
    start); keep: the share of ρ that R units must keep; compare: models whose reliance shift is
    shown; transitions: fine-tuned models (same units as the run's model) for the transition matrix."""

    compute: bool = True
    eps_bp: float | str = 0.1
    steps: int = 50
    alpha: float = 0.01
    lambda_r: float = 1.0
    feature_n: int = 200
    purify_n: int = 64
    eps: float | str = 0.1
    adaptive_steps: int = 5
    keep: float = 0.8
    compare: list[str] = field(
        default_factory=lambda: ["fmnist-smallcnn-pat", "fmnist-smallcnn-sns", "fmnist-smallcnn-sns-from-vanilla"]
    )
    transitions: list[str] = field(default_factory=lambda: ["fmnist-smallcnn-sns-from-vanilla"])

    def __post_init__(self) -> None:
        for name in ("steps", "feature_n", "purify_n", "adaptive_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"pushback: {name} must be an integer >= 1, got {v!r}")
        if not 0 < self.keep <= 1:
            raise UserError(f"pushback: keep must lie in (0, 1], got {self.keep}")
        if not self.alpha > 0 or self.lambda_r < 0:
            raise UserError("pushback: alpha must be > 0 and lambda_r >= 0")


QUICK_PUSHBACK: dict[str, Any] = {"compute": False}


def _feature_options(ctx: Context, n: int) -> FeatureOptions:
    from ..analysis.features import stage_feature_options

    if "features" in ctx.config.stages:
        return stage_feature_options(ctx)
    return FeatureOptions(**{**QUICK_FEATURES, "n": n})


def compute_pushback(ctx: Context, opts: PushbackOptions) -> dict[str, Any]:
    """Every number of the section for the run's model, as a JSON-able payload."""
    fopts = _feature_options(ctx, opts.feature_n)
    fs = feature_scores(ctx, options=fopts)
    sets = UnitSets.from_scores(fs)
    if len(sets.brittle) == 0:
        raise AnalysisUnavailable("the feature dissection found no brittle (NRU) unit to push back")
    bp: dict[str, Any] = {"eps": parse_eps(opts.eps_bp), "steps": opts.steps, "alpha": opts.alpha,
                          "lambda_r": opts.lambda_r}  # fmt: skip
    n = fs.f_clean.shape[0]
    x, y = ctx.split.x[:n], ctx.split.y[:n]
    k = len(ctx.data.classes)
    x_bp = back_perturb(ctx.model, x, sets, **bp)
    crit = dbp_criterion(ctx.model, x, x_bp, y, sets, fs.scores.tau_rho, k, keep=opts.keep)

    eps = parse_eps(opts.eps)
    npur = min(opts.purify_n, len(ctx.split))
    xp, yp, index = ctx.split.x[:npur], ctx.split.y[:npur], torch.arange(npur)
    attack = model_level_attacks(ctx, eps)[0]
    x_adv = ctx.attack(attack, xp, yp, index).x_adv
    adaptive = PGD(eps, steps=opts.adaptive_steps, step_rule="madry", random_start=True, seed=ctx.config.seed)
    parts = {"model": ctx.store.model_hash(ctx.model), "images": ctx.images_id, "n": npur, "bp": bp,
             "adaptive": adaptive.describe(), "attack": attack.describe(), "units": fs.options,
             "seed": ctx.config.seed}  # fmt: skip
    pur = ctx.store.memo("pushback-purification", parts,
                         lambda: evaluate_purification(ctx.model, xp, yp, x_adv, adaptive, sets, **bp))  # fmt: skip

    reliance = [{"model": ctx.config.model, **reliance_shift_of(fs), "B": len(sets.brittle), "R": len(sets.robust)}]
    transitions: dict[str, list[list[int]]] = {}
    for name in opts.compare:
        got = _load(name, ctx.data.name)
        if isinstance(got, str):
            log.warning(got)
            continue
        other = feature_scores(ctx, model=got[0], options=fopts, model_name=name)
        reliance.append({"model": name, **reliance_shift_of(other),
                         "B": other.scores.quadrant.count("NRU"), "R": other.scores.quadrant.count("RU")})  # fmt: skip
        if name in opts.transitions and other.channels == fs.channels:
            transitions[name] = transition_matrix(fs.scores.quadrant, other.scores.quadrant).tolist()
    return {
        "model": ctx.config.model,
        "model_hash": ctx.store.model_hash(ctx.model),
        "settings": {**bp, "attack_eps": eps, "adaptive_steps": opts.adaptive_steps, "feature_n": n,
                     "purify_n": npur, "attack": attack.describe()},
        "purification": pur.rows(),
        "verdict": pur.verdict,
        "criterion": {"tau_rho": crit.tau_rho, "keep": crit.keep, "share_b_ok": crit.share_b_ok,
                      "share_r_ok": crit.share_r_ok, "holds": crit.holds, "summary": crit.summary(),
                      "rho_b_mean": float(crit.rho_b.abs().mean()), "rho_b_bp_mean": float(crit.rho_b_bp.abs().mean()),
                      "rho_r_mean": float(crit.rho_r.mean()) if len(crit.rho_r) else math.nan,
                      "rho_r_bp_mean": float(crit.rho_r_bp.mean()) if len(crit.rho_r) else math.nan,
                      "B": len(sets.brittle), "R": len(sets.robust)},
        "reliance": reliance,
        "transitions": transitions,
    }


def shipped_pushback() -> dict[str, Any] | None:
    node = resource(*SHIPPED)
    if not node.is_file():
        return None
    payload: dict[str, Any] = json.loads(node.read_text())
    return payload


def _data_models(ctx: Context) -> list[dict[str, Any]]:
    """Clean and PGD accuracy (Wilson intervals) on the run's images of the models trained on the
    built datasets, when shipped (the §3.4 table on Fashion-MNIST)."""
    rows = []
    attack = model_level_attacks(ctx, 0.1)[0]
    x, y = ctx.split.x, ctx.split.y
    index = torch.arange(len(y))
    for data, name in DATA_MODELS.items():
        if name not in shipped_checkpoints():
            continue
        net = resolve_model(name)[0].eval()  # trained on robust-data:..., evaluated on the run's images
        out = ctx.attack(attack, x, y, index, model=net)
        with torch.no_grad():
            clean = int((net(x).argmax(1) == y).sum())
        rob = int(out.correct.sum())
        lo, hi = wilson_interval(clean, len(y))
        rlo, rhi = wilson_interval(rob, len(y))
        rows.append({"training set": data, "model": name, "clean": clean / len(y), "clean_lo": lo, "clean_hi": hi,
                     "pgd": rob / len(y), "pgd_lo": rlo, "pgd_hi": rhi})  # fmt: skip
    return rows


def transition_figure(matrices: dict[str, list[list[int]]], source: str) -> Figure:
    """Heat maps of unit counts moving between quadrants (rows: `source`, columns: each model)."""
    fig = Figure(figsize=(4.2 * len(matrices), 3.8))
    for i, (name, m) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, len(matrices), i + 1)
        ax.imshow(m, cmap="Blues")
        for r in range(4):
            for c in range(4):
                ax.text(c, r, str(m[r][c]), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(4), QUADRANTS)
        ax.set_yticks(range(4), QUADRANTS)
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel(source, fontsize=8)
    fig.tight_layout()
    return fig


@STAGES.register("pushback", "back-perturbation: purification vs an adaptive attacker, D_bp criterion, reliance shift")
def pushback_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    from ..config import stage_options

    opts: PushbackOptions = stage_options(PushbackOptions, options, "pushback")
    warnings: list[str] = []
    if opts.compute:
        payload = compute_pushback(ctx, opts)
        origin = "computed in this run"
    else:
        shipped = shipped_pushback()
        if shipped is None:
            raise AnalysisUnavailable("no shipped pushback results; run with --full (compute: true)")
        payload = shipped
        origin = f"shipped results for {payload['model']} (computed with --full; not recomputed in this run)"
        if payload.get("model_hash") != ctx.store.model_hash(ctx.model):
            warnings.append(f"the shipped pushback results are for {payload['model']}, not the run's model")
    tables = []
    ctx.run.write_table("pushback_purification", payload["purification"])
    tables.append({"file": "tables/pushback_purification.csv", "title": "Purification (Wilson 95% intervals)",
                   "show": True})  # fmt: skip
    ctx.run.write_table("pushback_reliance", payload["reliance"])
    tables.append({"file": "tables/pushback_reliance.csv",
                   "title": "Reliance shift RS (imp = mean |phi|) and quadrant shares", "show": True})  # fmt: skip
    figures = []
    if payload.get("transitions"):
        ctx.run.save_figure("pushback_transitions", transition_figure(payload["transitions"], payload["model"]))
        figures.append({"file": "figures/pushback_transitions.png",
                        "caption": "Units moving between quadrants, run's model to fine-tuned models"})  # fmt: skip
    data_rows = _data_models(ctx)
    if data_rows:
        ctx.run.write_table("pushback_datasets", data_rows)
        tables.append({"file": "tables/pushback_datasets.csv", "title": "Models trained on built datasets",
                       "show": True})  # fmt: skip
    else:
        warnings.append("no model trained on D_bp / D_R / D_NR / D_rand / D_det is shipped; build the sets with "
                        "`robustdissect robust-data` and train on --data robust-data:PATH")  # fmt: skip
    crit = payload["criterion"]
    rel = {r["model"]: r["rs_phi"] for r in payload["reliance"]}
    text = (f"{origin}. Purification verdict: {payload['verdict']}. {crit['summary']}. "
            f"Reliance shift RS: " + ", ".join(f"{m} {v:.3f}" for m, v in rel.items()) + ".")  # fmt: skip
    pur = {r["setting"]: r["accuracy"] for r in payload["purification"]}
    summary = {"verdict": payload["verdict"], "dbp_criterion_holds": crit["holds"],
               "share_brittle_neutralised": crit["share_b_ok"], "share_robust_kept": crit["share_r_ok"],
               **{f"acc: {k}": v for k, v in pur.items()}, **{f"RS {m}": v for m, v in rel.items()}}  # fmt: skip
    return section("Pushing back: purification, D_bp and reliance shift", text=text, summary=summary, tables=tables,
                   figures=figures, warnings=warnings, pushback=payload)  # fmt: skip


pushback_stage.options_class = PushbackOptions  # type: ignore[attr-defined]
pushback_stage.reduced_options = QUICK_PUSHBACK  # type: ignore[attr-defined]
