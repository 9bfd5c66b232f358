"""Stage `evaluate`: the robustness table (Table III layout) with 95% intervals, accuracy against
eps and PGD steps, per-class robust accuracy, perturbation norms, corruptions, image grids and
gradient-masking warnings."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..attacks import make_attack
from ..config import parse_eps, stage_options
from ..evaluation import (
    BLACK_BOX,
    QUICK_EVALUATE,
    AttackOutcome,
    EvaluateOptions,
    build_attack,
    masking_warnings,
    options_dict,
    perturbation_norms,
    pgd_curve,
    run_cached,
    wilson_interval,
)
from ..pipeline import STAGES, Context, predict, section
from ..report import plots

log = logging.getLogger(__name__)


def _row(name: str, correct: torch.Tensor, kind: str, settings: str = "") -> dict[str, Any]:
    n, c = len(correct), int(correct.sum())
    lo, hi = wilson_interval(c, n)
    return {
        "attack": name,
        "kind": kind,
        "n": n,
        "accuracy": c / n if n else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "settings": settings,
    }


def _settings_text(s: dict[str, Any]) -> str:
    keep = ("eps", "steps", "alpha", "iterations", "search_steps", "n_samples", "population", "severity")
    return ", ".join(f"{k}={s[k]:.4g}" if isinstance(s[k], float) else f"{k}={s[k]}" for k in keep if k in s)


@STAGES.register("evaluate", "robust accuracy under every attack, curves, per-class, grids, masking checks")
def evaluate_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    if ctx.config.quick:
        options = {**QUICK_EVALUATE, **options}
    opts: EvaluateOptions = stage_options(EvaluateOptions, options, "evaluate")
    seed = ctx.config.seed
    split = ctx.split
    x, y = split.x, split.y
    n = len(y)
    model, run = ctx.model, ctx.run
    classes = ctx.data.classes
    index = torch.arange(n)

    clean_pred = predict(model, x, ctx.device, opts.batch_size)
    clean_correct = clean_pred == y
    rows = [_row("clean", clean_correct, "clean")]
    outcomes: dict[str, AttackOutcome] = {}
    bb_n = min(opts.blackbox_n, n)
    bb_index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:bb_n].sort().values
    names = opts.attack_names()
    for i, name in enumerate(names):
        attack = build_attack(name, opts, seed)
        idx = bb_index if name in BLACK_BOX else index
        log.info("evaluate: %s (%d/%d) on %d images", name, i + 1, len(names), len(idx))
        out = run_cached(attack, model, x[idx], y[idx], idx, run.path / "adv" / f"{name}.safetensors")
        outcomes[name] = out
        kind = "black-box" if name in BLACK_BOX else "white-box"
        rows.append(_row(name, out.correct, kind, _settings_text(out.settings)))

    # worst case over every attack, on the images every attack saw (black-box only on their subset)
    worst = clean_correct.clone()
    for out in outcomes.values():
        worst[out.index] &= out.correct
    if outcomes:
        rows.append(_row("worst case", worst, "worst case", "min over the attacks above, per image"))

    # corruptions at five severities
    scale = opts.noise_scale
    if scale == "auto":
        scale = "fmnist" if ctx.data.image_shape == (1, 28, 28) else "cifar"
    corruption_rows: list[dict[str, Any]] = []
    for cname in opts.corruptions:
        for sev in range(1, 6):
            kwargs: dict[str, Any] = {"severity": sev, "seed": seed}
            if cname == "gaussian-noise":
                kwargs["scale"] = scale
            res = make_attack(cname, **kwargs)(model, x, y)
            lo, hi = wilson_interval(int(res.correct.sum()), n)
            corruption_rows.append(
                {"corruption": cname, "severity": sev, "accuracy": res.robust_accuracy, "ci_low": lo, "ci_high": hi}
            )

    # curves (L-inf PGD) on a fixed subset
    cn = min(opts.curve_n, n)
    eps = parse_eps(opts.eps)
    eps_curve, steps_curve = pgd_curve(
        model, x[:cn], y[:cn], opts.eps_sweep, opts.steps_sweep, opts, seed, fixed_eps=eps, fixed_steps=opts.pgd_steps
    )
    table = {r["attack"]: r["accuracy"] for r in rows if r["kind"] in ("white-box", "black-box")}
    white = {r["attack"]: r["kind"] == "white-box" for r in rows if r["kind"] in ("white-box", "black-box")}
    warnings = masking_warnings(model, x[:cn], y[:cn], table, white, eps_curve, steps_curve, opts, seed)

    # per-class robust accuracy and perturbation norms
    per_class: list[dict[str, Any]] = []
    for c, cls in enumerate(classes):
        row: dict[str, Any] = {"class": cls, "clean": float(clean_correct[y == c].float().mean())}
        for name, out in outcomes.items():
            mask = y[out.index] == c
            row[name] = float(out.correct[mask].float().mean()) if mask.any() else math.nan
        per_class.append(row)
    norms = [{"attack": name, **perturbation_norms(x[out.index], out.x_adv)} for name, out in outcomes.items()]

    # files
    run.write_table("robust_accuracy", rows)
    run.write_table("corruptions", corruption_rows)
    run.write_table("accuracy_vs_eps", [{"eps": e, "accuracy": a} for e, a in eps_curve.items()])
    run.write_table("accuracy_vs_steps", [{"steps": k, "accuracy": a} for k, a in steps_curve.items()])
    run.write_table("robust_accuracy_per_class", per_class)
    run.write_table("perturbation_norms", norms)
    figures = []
    run.save_figure("robust_accuracy", plots.accuracy_bars(rows))
    figures.append(
        {"file": "figures/robust_accuracy.png", "caption": "Accuracy under each attack (95% Wilson interval)"}
    )
    run.save_figure(
        "accuracy_vs_eps",
        plots.line_plot(
            list(eps_curve),
            {"PGD-Linf": list(eps_curve.values())},
            "ε (L∞)",
            "robust accuracy",
            f"PGD-{opts.pgd_steps}",
        ),
    )
    run.save_figure(
        "accuracy_vs_steps",
        plots.line_plot(
            list(steps_curve),
            {"PGD-Linf": list(steps_curve.values())},
            "PGD steps k",
            "robust accuracy",
            f"ε = {eps:g}",
        ),
    )
    figures += [
        {"file": "figures/accuracy_vs_eps.png", "caption": "Robust accuracy against ε (L∞ PGD)"},
        {"file": "figures/accuracy_vs_steps.png", "caption": "Robust accuracy against the number of PGD steps"},
    ]
    if corruption_rows:
        series: dict[str, list[float]] = {
            c: [float(r["accuracy"]) for r in corruption_rows if r["corruption"] == c] for c in opts.corruptions
        }
        run.save_figure(
            "corruptions", plots.line_plot([1, 2, 3, 4, 5], series, "severity", "accuracy", f"scale: {scale}")
        )
        figures.append({"file": "figures/corruptions.png", "caption": "Accuracy under common corruptions"})
    if opts.grid_attack in outcomes:
        out = outcomes[opts.grid_attack]
        k = min(8, len(out.index))
        clean = x[out.index[:k]]
        run.save_figure(
            "adversarial_grid", plots.adversarial_grid(clean, out.x_adv[:k], classes, y[out.index[:k]], out.pred[:k])
        )
        figures.append(
            {
                "file": "figures/adversarial_grid.png",
                "caption": f"{opts.grid_attack}: clean (top), adversarial (middle), difference amplified (bottom)",
            }
        )
    robust = {r["attack"]: r["accuracy"] for r in rows if r["kind"] != "clean"}
    run.update_results(
        clean_accuracy=rows[0]["accuracy"],
        robust_accuracy=robust,
        warnings=run.results().get("warnings", []) + warnings,
    )
    summary = {
        r["attack"]: f"{100 * r['accuracy']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]" for r in rows
    }
    return section(
        "Robustness evaluation",
        text=(
            f"{n} {ctx.config.split} images; L∞ ε = {eps:g}, L2 ε = {parse_eps(opts.eps_l2):g}; black-box attacks on "
            f"{bb_n} images. Adversarial examples are cached in adv/."
        ),
        summary=summary,
        tables=[
            {"file": "tables/robust_accuracy.csv", "title": "Accuracy under attack (95% CI)", "show": True},
            {"file": "tables/robust_accuracy_per_class.csv", "title": "Robust accuracy per class", "show": True},
            {"file": "tables/perturbation_norms.csv", "title": "Perturbation norms", "show": True},
            {"file": "tables/corruptions.csv", "title": "Corruptions", "show": False},
            {"file": "tables/accuracy_vs_eps.csv", "title": "Accuracy vs eps", "show": False},
            {"file": "tables/accuracy_vs_steps.csv", "title": "Accuracy vs steps", "show": False},
        ],
        figures=figures,
        warnings=warnings,
        robust_accuracy=robust,
        table=rows,
        corruptions=corruption_rows,
        accuracy_vs_eps=eps_curve,
        accuracy_vs_steps=steps_curve,
        options=options_dict(opts),
    )
