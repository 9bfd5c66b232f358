"""Stage `evaluate`: the robustness table (Table III layout) with 95% intervals, accuracy against
eps and PGD steps, per-class robust accuracy, perturbation norms, corruptions, image grids and
gradient-masking warnings."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import torch

from ..attacks import make_attack
from ..attacks.corruptions import noise_scale
from ..config import stage_options
from ..evaluation import (
    BLACK_BOX,
    QUICK_EVALUATE,
    AttackOutcome,
    EvaluateOptions,
    accuracy_row,
    black_box_subset,
    build_attack,
    clean_predictions,
    per_class_rows,
    perturbation_norms,
    settings_text,
    sweep_curves,
    worst_cases,
)
from ..report import plots
from ..stats import wilson_interval
from .base import STAGES, Context, section

log = logging.getLogger(__name__)


@STAGES.register("evaluate", "robust accuracy under every attack, worst case, curves, per-class, grids, masking checks")
def evaluate_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Every table attack, the worst case, corruptions, curves and masking checks on the run's
    analysed images; `options` already carries the run's budget profile."""
    opts: EvaluateOptions = stage_options(EvaluateOptions, options, "evaluate")
    seed = ctx.config.seed
    split = ctx.split
    x, y = split.x, split.y
    n = len(y)
    model, run = ctx.model, ctx.run
    classes = ctx.data.classes
    index = torch.arange(n)
    eps = opts.eps

    clean_correct = clean_predictions(ctx.store, model, x, index, ctx.images_id, opts.batch_size) == y
    rows = [accuracy_row("clean", clean_correct, "clean")]
    outcomes: dict[str, AttackOutcome] = {}
    bb_index = black_box_subset(n, opts.blackbox_n, seed)
    bb_n = len(bb_index)
    names = opts.attack_names()
    for i, name in enumerate(names):
        attack = build_attack(name, opts, seed)
        idx = bb_index if name in BLACK_BOX else index
        log.info("evaluate: %s (%d/%d) on %d images", name, i + 1, len(names), len(idx))
        out = ctx.attack(attack, x[idx], y[idx], idx)
        outcomes[name] = out
        kind = "black-box" if name in BLACK_BOX else "white-box"
        rows.append(accuracy_row(name, out.correct, kind, settings_text(out.settings)))

    # curves (L-inf PGD) and the gradient-masking checks on a fixed subset; every PGD of the
    # sweeps at the table's eps is an attack of the L-inf threat model and joins its worst case
    curves = sweep_curves(model, x, y, opts, seed, rows, outcomes,
                          lambda attack, idx: ctx.attack(attack, x[idx], y[idx], idx))  # fmt: skip
    cn, eps_curve, steps_curve = curves.n, curves.accuracy_vs_eps, curves.accuracy_vs_steps
    warnings, masking, extra_runs = list(curves.warnings), curves.masking, curves.extra

    # worst case per threat model: the per-image minimum over every attack of that (norm, eps) that
    # the run computed; the cascade's other attacks, then Square, run only on the points still robust
    cases = worst_cases(opts, seed, clean_correct, [*outcomes.items(), *extra_runs],
                        lambda attack, idx: ctx.attack(attack, x[idx], y[idx], idx))  # fmt: skip
    cascade_rows = [r for wc in cases for r in wc.cascade]
    cascade_warnings = [w for wc in cases for w in wc.warnings]
    rows += [wc.row for wc in cases]
    worst_robust = {wc.label: wc.robust for wc in cases}

    # corruptions at five severities
    scale = noise_scale(opts.noise_scale, ctx.data.image_shape)
    corruption_rows: list[dict[str, Any]] = []
    for cname in opts.corruptions:
        for sev in range(1, 6):
            kwargs: dict[str, Any] = {"severity": sev, "seed": seed}
            if cname == "gaussian-noise":
                kwargs["scale"] = scale
            res = ctx.attack(make_attack(cname, **kwargs), x, y, index)
            lo, hi = wilson_interval(int(res.correct.sum()), n)
            corruption_rows.append(
                {"corruption": cname, "severity": sev, "accuracy": res.accuracy(), "ci_low": lo, "ci_high": hi}
            )

    # per-class robust accuracy and perturbation norms
    per_class = per_class_rows(classes, y, clean_correct, outcomes, worst_robust)
    norms = [{"attack": name, **perturbation_norms(x[out.index], out.x_adv)} for name, out in outcomes.items()]

    # files
    run.write_table("robust_accuracy", rows)
    if cascade_rows:
        run.write_table("worst_case_cascade", cascade_rows)
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
    if eps_curve:
        run.save_figure(
            "accuracy_vs_eps",
            plots.line_plot(
                list(eps_curve), {"PGD-Linf": list(eps_curve.values())}, "ε (L∞)", "robust accuracy",
                f"PGD-{opts.pgd_steps}, {cn} images",
            ),
        )  # fmt: skip
        run.save_figure(
            "accuracy_vs_steps",
            plots.line_plot(
                list(steps_curve), {"PGD-Linf": list(steps_curve.values())}, "PGD steps k", "robust accuracy",
                f"ε = {eps:g}, {cn} images",
            ),
        )  # fmt: skip
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
    warnings += cascade_warnings
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
    summary = {
        r["attack"]: f"{100 * r['accuracy']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]" for r in rows
    }
    return section(
        "Robustness evaluation",
        text=(
            f"{n} {ctx.config.split} images; L∞ ε = {eps:g}, L2 ε = {opts.eps_l2:g}; black-box attacks on "
            f"{bb_n} images. The worst case of a threat model is the per-image minimum over every attack of "
            "that norm and ε the run computed (table attacks, the PGD runs of the curves, the cascade "
            f"{', '.join(opts.worst_case)} on the points still robust"
            + (f", then Square with {opts.square_queries} queries" if opts.square_queries and opts.square_norms else "")
            + "); no row of the same threat model can lie below it, and it is still only an upper bound of "
            "the true robust accuracy. C&W is unbounded and in no worst case."
        ),
        summary=summary,
        tables=[
            {"file": "tables/robust_accuracy.csv", "title": "Accuracy under attack (95% CI)", "show": True},
            *(
                [{"file": "tables/worst_case_cascade.csv", "title": "Worst case: who broke what", "show": True}]
                if cascade_rows
                else []
            ),
            {"file": "tables/robust_accuracy_per_class.csv", "title": "Robust accuracy per class", "show": True},
            {"file": "tables/perturbation_norms.csv", "title": "Perturbation norms", "show": True},
            {"file": "tables/corruptions.csv", "title": "Corruptions", "show": False},
            {"file": "tables/accuracy_vs_eps.csv", "title": "Accuracy vs eps", "show": False},
            {"file": "tables/accuracy_vs_steps.csv", "title": "Accuracy vs steps", "show": False},
        ],
        figures=figures,
        warnings=warnings,
        robust_accuracy=robust_table,
        table=rows,
        corruptions=corruption_rows,
        accuracy_vs_eps=eps_curve,
        accuracy_vs_steps=steps_curve,
        masking=masking,
        attack_settings={name: out.settings for name, out in outcomes.items()},
        options=asdict(opts),
    )


evaluate_stage.options_class = EvaluateOptions  # type: ignore[attr-defined]
evaluate_stage.reduced_options = QUICK_EVALUATE  # type: ignore[attr-defined]
