"""Stage `pushback` (METHODS §6.5, §6.6, §3.4): test-time purification by back-perturbation
against a non-adaptive and an adaptive (BPDA) attacker, the D_bp success criterion, the reliance
shift RS of the run's model beside PAT and SNS, unit transitions between quadrants for fine-tuned
models, and the Ilyas-style table when models trained on the built datasets are shipped.

On the shipped vanilla smallcnn and its own test data, the default run's budget shows the shipped
results (`results/pushback-fmnist.json`, computed by this stage under `--full` on that model)
instead of recomputing them; on any other model or data it computes them for the run's own model
(`compute: auto`). `--full` (or `compute: true`) always computes; `compute: reliance` recomputes
only the reliance shift and the transitions (the part that changes when a model is added) and shows
the shipped purification and D_bp results beside them.

Reliance shift RS (§6.6) with both importances, imp = mean |φ| and imp = ablation BA drop, each
with a bootstrap interval over the analysed images and the paired difference to the run's model,
for the run's model and its counterparts (`--compare`; beside the shipped vanilla smallcnn: PAT,
SNS, the fine-tuned SNS and PAT, the SNS bridge, the models trained on D_bp and D̂_R); an absent
one is skipped with a warning. A transition matrix (units moving between quadrants) needs unit k to be the same channel
in both models, so it is drawn only for a model of `transitions` fine-tuned (its card's `init`)
from the run's model or from another analysed model, from that model to it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure

from ..analysis.features import QUADRANTS, QUICK_FEATURES, FeatureOptions
from ..analysis.pushback import (
    UnitSets,
    ablation_predictions,
    back_perturb,
    dbp_criterion,
    evaluate_purification,
    reliance_bootstrap,
    reliance_rows,
    transition_matrix,
)
from ..attacks import PGD
from ..config import check_ints, parse_budgets, stage_options
from ..errors import UserError
from ..models import shipped_checkpoints
from ..models.resolve import resolve_model
from ..resources import shipped_result
from ..stats import wilson_interval
from .base import STAGES, AnalysisUnavailable, Context, retrain_hint, section
from .common import feature_scores, model_level_attacks, stage_feature_options

log = logging.getLogger(__name__)

SHIPPED = "pushback-fmnist.json"
# models whose reliance shift is shown beside the run's model, when shipped
COMPARE = ["fmnist-smallcnn-pat", "fmnist-smallcnn-sns", "fmnist-smallcnn-sns-from-vanilla", "fmnist-smallcnn-pat-ft",
           "fmnist-smallcnn-bridge", "fmnist-smallcnn-data-bp", "fmnist-smallcnn-data-r"]  # fmt: skip
# fine-tuned models (same units as their init): transition matrices from the init model
TRANSITIONS = ["fmnist-smallcnn-sns-from-vanilla", "fmnist-smallcnn-pat-ft", "fmnist-smallcnn-bridge"]
# models trained on the built datasets (§3.4 analogue); shown when shipped
DATA_MODELS = {
    "D (the same 2,000 original images)": "fmnist-smallcnn-data-d",
    "D_bp": "fmnist-smallcnn-data-bp",
    "D_R": "fmnist-smallcnn-data-r",
    "D_NR": "fmnist-smallcnn-data-nr",
    "D_rand": "fmnist-smallcnn-data-rand",
    "D_det": "fmnist-smallcnn-data-det",
}


@dataclass(frozen=True)
class PushbackOptions:
    """Options of the `pushback` stage.

    compute: True computes for the run's model; False shows the shipped results (refused on any
    other model or data); "auto" shows them when they are the run's model's, else computes;
    "reliance": see the module docstring; eps_bp, lambda_r: the back-perturbation (§6.5/§8.3);
    steps, alpha: the back-perturbation's steps and step size (the paper's 50 of 0.01; the default
    run's profile: 10 of 0.025 = 2.5·ε_bp/10, since the back-perturbation, run again inside every
    step of the adaptive attacker, is most of a computed section's cost); feature_n: analysed images
    of the feature dissection that gives B and R (the `features` stage's options when it is part of
    the run); purify_n: images of the purification
    table; eps: the attacker's ℓ∞ budget; adaptive_steps: BPDA PGD steps (α = 2.5ε/k, random
    start); keep: the share of ρ that R units must keep; compare: models whose reliance shift is
    shown (None: the run's counterparts; the shipped set beside the shipped vanilla smallcnn);
    transitions: fine-tuned models whose units are compared with their init model's (None: the
    shipped fine-tuned models beside the shipped vanilla smallcnn); bootstrap: resamples of the
    images for the RS intervals;
    reliance_n: the first reliance_n of the dissection's images for the reliance shift, both importances
    and their intervals (None: all; the default run's profile: 100, the ablation importance costs one
    forward pass per analysed unit and image for every model);
    data_n: the first data_n of the run's images for the table of models trained on built datasets
    (None: all; the default run's profile: 200, the PGD on each shipped model is its main cost)."""

    compute: bool | str = True
    eps_bp: float = 0.1
    steps: int = 50
    alpha: float = 0.01
    lambda_r: float = 1.0
    feature_n: int = 200
    purify_n: int = 64
    eps: float = 0.1
    adaptive_steps: int = 5
    keep: float = 0.8
    compare: list[str] | None = None
    transitions: list[str] | None = None
    bootstrap: int = 1000
    reliance_n: int | None = None
    data_n: int | None = None

    def __post_init__(self) -> None:
        parse_budgets(self, "eps_bp", "eps", stage="pushback")
        if self.compute not in (True, False, "auto", "reliance"):
            raise UserError(f"pushback: compute must be true, false, 'auto' or 'reliance', got {self.compute!r}")
        check_ints(self, {"data_n": 1, "reliance_n": 2}, "pushback", optional=True)
        check_ints(self, {"bootstrap": 0, "steps": 1, "feature_n": 1, "purify_n": 1, "adaptive_steps": 1}, "pushback")
        if not 0 < self.keep <= 1:
            raise UserError(f"pushback: keep must lie in (0, 1], got {self.keep}")
        if not self.alpha > 0 or self.lambda_r < 0:
            raise UserError("pushback: alpha must be > 0 and lambda_r >= 0")


# The default run: on a model other than the shipped vanilla smallcnn the section is computed, and the
# back-perturbation (D_bp on the dissection's images, then the purification table with a BPDA attacker
# that back-perturbs in each of its steps) and the ablation importance are most of its time.
QUICK_PUSHBACK: dict[str, Any] = {"compute": "auto", "steps": 10, "alpha": 0.025, "data_n": 200, "purify_n": 32,
                                  "bootstrap": 200, "reliance_n": 100}


def _builtin(ctx: Context) -> bool:
    """Whether the run analyses the shipped vanilla smallcnn on its own data (the shipped results'
    model, and the model the shipped comparison set was trained beside)."""
    return ctx.builtin_reference and ctx.config.model == "fmnist-smallcnn-vanilla"


def _compare(ctx: Context, opts: PushbackOptions) -> list[str]:
    """The models whose reliance shift is shown beside the run's model."""
    if opts.compare is not None:
        return list(opts.compare)
    return list(COMPARE) if _builtin(ctx) and ctx.config.compare is None else list(ctx.compared)


def _transitions(ctx: Context, opts: PushbackOptions) -> list[str]:
    """The fine-tuned models whose transition matrices are drawn."""
    if opts.transitions is not None:
        return list(opts.transitions)
    return list(TRANSITIONS) if _builtin(ctx) and ctx.config.compare is None else []


def _feature_options(ctx: Context, n: int) -> FeatureOptions:
    """The dissection giving B and R: the `features` stage's options, else the reduced ones on n images."""
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
    bp: dict[str, Any] = {"eps": opts.eps_bp, "steps": opts.steps, "alpha": opts.alpha,
                          "lambda_r": opts.lambda_r}  # fmt: skip
    n = fs.f_clean.shape[0]
    x, y = ctx.split.x[:n], ctx.split.y[:n]
    k = len(ctx.data.classes)
    x_bp = back_perturb(ctx.model, x, sets, **bp)
    crit = dbp_criterion(ctx.model, x, x_bp, y, sets, fs.scores.tau_rho, k, keep=opts.keep)

    eps = opts.eps
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

    reliance, transitions, warnings = compute_reliance(ctx, opts, fopts, fs)
    return {
        "model": ctx.label,
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
        "reliance_warnings": warnings,
    }


def _ablation(ctx: Context, model: torch.nn.Module, fs: Any, n: int) -> torch.Tensor:
    """Ablation predictions (U + 1, n) of `model` on the first n of the dissection's images, once per run."""
    parts = {"model": ctx.store.model_hash(model), "images": ctx.images_id, "n": n, "layers": fs.layers}
    return ctx.store.memo("pushback-ablation", parts,
                          lambda: ablation_predictions(model, ctx.split.x[:n], fs.layers, fs.channels))  # fmt: skip


def compute_reliance(
    ctx: Context, opts: PushbackOptions, fopts: FeatureOptions, fs: Any
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[str]]:
    """Reliance rows (RS with both importances, intervals, paired differences to the run's model,
    |B|, |R|, quadrant shares) for the run's model and each shipped model of `compare`; the
    transition matrices of the fine-tuned models of `transitions`; warnings for what is skipped."""
    k = len(ctx.data.classes)
    n = fs.f_clean.shape[0] if opts.reliance_n is None else min(opts.reliance_n, fs.f_clean.shape[0])
    y = fs.y[:n]
    warnings: list[str] = []
    analysed: dict[str, tuple[Any, dict[str, Any]]] = {ctx.label: (fs, {})}
    estimates: list[tuple[str, dict[str, Any]]] = []

    def estimate(name: str, model: torch.nn.Module, scores: Any) -> None:
        est = reliance_bootstrap(scores.phi[:n], _ablation(ctx, model, scores, n), y, scores.scores.quadrant, k,
                                 opts.bootstrap, ctx.config.seed)  # fmt: skip
        estimates.append((name, est))

    estimate(ctx.label, ctx.model, fs)
    for name in _compare(ctx, opts):
        if name == ctx.label:
            continue
        got = ctx.load_model(name)
        if isinstance(got, str):
            warnings.append(f"reliance shift: {got}")
            continue
        net, card = got
        other = feature_scores(ctx, model=net, options=fopts, model_name=name)
        analysed[name] = (other, card)
        estimate(name, net, other)
    rows = reliance_rows(estimates)
    for row in rows:
        scores = analysed[row["model"]][0]
        quads = scores.scores.quadrant
        row.update({"B": quads.count("NRU"), "R": quads.count("RU"), **scores.shares(), "n": int(y.shape[0]),
                    "bootstrap": opts.bootstrap})  # fmt: skip
    transitions = _transition_matrices(ctx, opts, analysed, warnings)
    return rows, transitions, warnings


def _transition_matrices(
    ctx: Context, opts: PushbackOptions, analysed: dict[str, tuple[Any, dict[str, Any]]], warnings: list[str]
) -> dict[str, dict[str, Any]]:
    """{name: {"from": init, "matrix": 4×4 counts}} for each model of `transitions` fine-tuned from
    an analysed model (`analysed`: name -> (feature dissection, card)); the others add to `warnings`."""
    transitions: dict[str, dict[str, Any]] = {}
    for name in _transitions(ctx, opts):
        if name not in analysed or name == ctx.label:
            continue
        scores, card = analysed[name]
        init = (card.get("train_config") or {}).get("init")
        if init not in analysed:
            why = f"fine-tuned from {init}, which is not analysed here" if init else "trained from scratch"
            warnings.append(f"no transition matrix for {name}: it was {why} (unit k is the same unit only in a "
                            "model fine-tuned from the other)")  # fmt: skip
            continue
        before = analysed[init][0]
        if before.channels != scores.channels or before.layers != scores.layers:
            warnings.append(f"no transition matrix for {name}: its units differ from {init}'s")
            continue
        matrix = transition_matrix(before.scores.quadrant, scores.scores.quadrant)
        transitions[name] = {"from": init, "matrix": matrix.tolist()}
    return transitions


def shipped_pushback() -> dict[str, Any] | None:
    """The shipped pushback results (computed on the shipped vanilla smallcnn), or None."""
    return shipped_result(SHIPPED)


def _data_models(ctx: Context, n: int | None = None) -> list[dict[str, Any]]:
    """Clean and PGD accuracy (Wilson intervals) on the first n of the run's images (None: all) of
    the models trained on the built datasets, when shipped (the §3.4 table on Fashion-MNIST)."""
    rows: list[dict[str, Any]] = []
    if not _builtin(ctx) or ctx.config.compare is not None:  # they were built from the shipped vanilla model
        return rows
    attack = model_level_attacks(ctx, 0.1)[0]
    x, y = ctx.split.x[:n], ctx.split.y[:n]
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
                     "pgd": rob / len(y), "pgd_lo": rlo, "pgd_hi": rhi, "n": len(y)})  # fmt: skip
    return rows


def transition_figure(matrices: dict[str, Any], source: str) -> Figure:
    """Heat maps of unit counts moving between quadrants (rows: the model fine-tuned from, columns:
    the fine-tuned model); a value is {"from": NAME, "matrix": 4×4} (or a bare 4×4 from `source`)."""
    fig = Figure(figsize=(4.2 * len(matrices), 3.8))
    for i, (name, entry) in enumerate(matrices.items()):
        m = entry["matrix"] if isinstance(entry, dict) else entry
        origin = entry["from"] if isinstance(entry, dict) else source
        ax = fig.add_subplot(1, len(matrices), i + 1)
        ax.imshow(m, cmap="Blues")
        for r in range(4):
            for c in range(4):
                ax.text(c, r, str(m[r][c]), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(4), QUADRANTS)
        ax.set_yticks(range(4), QUADRANTS)
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel(origin, fontsize=8)
    fig.tight_layout()
    return fig


@STAGES.register("pushback", "back-perturbation: purification vs an adaptive attacker, D_bp criterion, reliance shift")
def pushback_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Purification, the D_bp criterion and the reliance shift: computed for the run's model, or the
    shipped results (with the reliance shift recomputed under `compute: reliance`)."""
    opts: PushbackOptions = stage_options(PushbackOptions, options, "pushback")
    warnings: list[str] = []
    payload, origin = _payload(ctx, opts, warnings)
    warnings += list(payload.get("reliance_warnings", []))
    tables, figures = _write_artefacts(ctx, payload)
    data_rows = _data_models(ctx, opts.data_n)
    if data_rows:
        ctx.run.write_table("pushback_datasets", data_rows)
        tables.append({"file": "tables/pushback_datasets.csv", "title": f"Models trained on built datasets: clean "
                       f"and {data_rows[0]['n']} images under PGD (Wilson 95% intervals)", "show": True})  # fmt: skip
    elif _builtin(ctx) and ctx.config.compare is None:
        warnings.append("no model trained on D_bp / D_R / D_NR / D_rand / D_det is shipped; build the sets with "
                        "`robustdissect robust-data` and train on --data robust-data:PATH")  # fmt: skip
    crit = payload["criterion"]
    text = (f"{origin}. Purification verdict: {payload['verdict']}. {crit['summary']}. "
            "Reliance shift RS (mean |phi|; ablation BA drop): "
            + "; ".join(_rs_text(r) for r in payload["reliance"]) + ".")  # fmt: skip
    return section("Pushing back: purification, D_bp and reliance shift", text=text, summary=_summary(payload),
                   tables=tables, figures=figures, warnings=warnings, pushback=payload)  # fmt: skip


def _payload(ctx: Context, opts: PushbackOptions, warnings: list[str]) -> tuple[dict[str, Any], str]:
    """The section's numbers (computed, shipped, or shipped with the reliance shift recomputed) and
    one sentence saying where they come from; refuses the shipped results of another model."""
    shipped = shipped_pushback()
    own = (shipped is not None and ctx.builtin_reference
           and shipped.get("model_hash") == ctx.store.model_hash(ctx.model))  # fmt: skip
    if opts.compute is not True and not own and (opts.compute is False or opts.compute == "reliance"):
        raise AnalysisUnavailable("the shipped pushback results belong to the shipped vanilla smallcnn on "
                                  "Fashion-MNIST, not to this run's model and data; set pushback.compute to true")
    if opts.compute is True or (opts.compute == "auto" and not own):
        return compute_pushback(ctx, opts), "Computed in this run"
    assert shipped is not None
    origin = (f"Shipped results for {shipped['model']} on Fashion-MNIST (computed by this stage with --full; "
              "not recomputed in this run)")  # fmt: skip
    if opts.compute == "reliance":
        fopts = _feature_options(ctx, opts.feature_n)
        fs = feature_scores(ctx, options=fopts)
        reliance, transitions, rel_warnings = compute_reliance(ctx, opts, fopts, fs)
        payload = {**shipped, "reliance": reliance, "transitions": transitions, "reliance_warnings": rel_warnings,
                   "model_hash": ctx.store.model_hash(ctx.model), "model": ctx.label}  # fmt: skip
        return payload, ("reliance shift and transitions computed in this run; purification and D_bp criterion: "
                         f"{origin}")
    warnings += _shipped_gaps(ctx, opts, shipped)
    payload = {**shipped, "reliance_warnings": [w for w in shipped.get("reliance_warnings", [])
                                                if w.startswith("no transition")]}  # fmt: skip
    return payload, origin


def _shipped_gaps(ctx: Context, opts: PushbackOptions, shipped: dict[str, Any]) -> list[str]:
    """Warnings for the compared models the shipped results lack now (not when they were computed)."""
    have = {r["model"] for r in shipped["reliance"]}
    absent = [m for m in _compare(ctx, opts) if m not in have and m != shipped["model"]]
    late = [m for m in absent if m in shipped_checkpoints()]
    warnings: list[str] = []
    if late:
        warnings.append(f"{', '.join(late)} {'is' if len(late) == 1 else 'are'} shipped but not in the shipped "
                        "pushback results; recompute them with the stage option compute: reliance "
                        "(python -m robustdissect.studies.pushback --reliance)")  # fmt: skip
    warnings += [f"reliance shift: checkpoint '{m}' is not shipped; skipped (train it with: {retrain_hint(m)})"
                 for m in absent if m not in late]  # fmt: skip
    return warnings


def _write_artefacts(ctx: Context, payload: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The purification and reliance tables and the transition figure (when there are matrices)."""
    tables: list[dict[str, Any]] = []
    ctx.run.write_table("pushback_purification", payload["purification"])
    tables.append({"file": "tables/pushback_purification.csv", "title": "Purification (Wilson 95% intervals)",
                   "show": True})  # fmt: skip
    ctx.run.write_table("pushback_reliance", payload["reliance"])
    n_rel = payload["reliance"][0].get("n", "the analysed")
    tables.append({"file": "tables/pushback_reliance.csv",
                   "title": f"Reliance shift RS = share of importance on robust & useful units, imp = mean |phi| "
                            f"and imp = ablation BA drop; 95% bootstrap intervals over {n_rel} images; diff = "
                            f"paired difference to {payload['model']}; quadrant shares", "show": True})  # fmt: skip
    figures: list[dict[str, str]] = []
    if payload.get("transitions"):
        ctx.run.save_figure("pushback_transitions", transition_figure(payload["transitions"], payload["model"]))
        figures.append({"file": "figures/pushback_transitions.png",
                        "caption": "Units moving between quadrants from the model each one was fine-tuned from "
                                   "(rows) to the fine-tuned model (columns)"})  # fmt: skip
    return tables, figures


def _summary(payload: dict[str, Any]) -> dict[str, Any]:
    """Verdict, criterion, accuracies per purification setting and RS per model."""
    crit = payload["criterion"]
    pur = {r["setting"]: r["accuracy"] for r in payload["purification"]}
    return {"verdict": payload["verdict"], "dbp_criterion_holds": crit["holds"],
            "share_brittle_neutralised": crit["share_b_ok"], "share_robust_kept": crit["share_r_ok"],
            **{f"acc: {k}": v for k, v in pur.items()},
            **{f"RS {r['model']}": r["rs_phi"] for r in payload["reliance"]},
            **{f"RS ablation {r['model']}": r["rs_ablation"] for r in payload["reliance"]
               if "rs_ablation" in r}}  # fmt: skip


def _rs_text(row: dict[str, Any]) -> str:
    """'model 0.49 [0.45, 0.53]; 0.40 [...]' from a reliance row (either importance may be absent)."""
    parts = []
    for imp in ("phi", "ablation"):
        v = row.get(f"rs_{imp}")
        if v is None:
            continue
        lo, hi = row.get(f"rs_{imp}_lo"), row.get(f"rs_{imp}_hi")
        finite = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
        parts.append(f"{v:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if finite else ""))
    return f"{row['model']} " + " / ".join(parts)


pushback_stage.options_class = PushbackOptions  # type: ignore[attr-defined]
pushback_stage.reduced_options = QUICK_PUSHBACK  # type: ignore[attr-defined]
