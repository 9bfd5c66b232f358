"""Stage `compare`: the run's model beside its robustly trained counterparts (METHODS §5.4 E9,
E11, E13; §8.3).

The models are the run's model and its `compare` models (`--compare`); with neither given for the
built-in model under `--full`, the shipped checkpoints `fmnist-smallcnn-<objective>` (vanilla, PAT,
PAT-ft, SNS variants, ALP, TRADES, fast AT). A listed checkpoint that is not there is named in
the section's warnings with the command and config that train it. Each model is attacked
white-box (and black-box on a fixed subset) with the evaluation's attack suite on the same images;
adversarial examples are cached per model under `adv/<model>/<attack>.safetensors`.

Outputs:
- Table III: clean and attacked accuracy per model with 95% Wilson intervals, plus the epochs
  and training seconds from each model's card (`compare_accuracy`, long form
  `compare_accuracy_long`);
- E11: L-inf PGD accuracy against the number of steps k (at eps = 0.1) and against eps (at k = 10),
  one line per model;
- E13: σ of every neuron of every conv layer under the same L-inf PGD for vanilla / PAT / SNS
  (via `analysis.compare_models`): mean σ per layer and the sorted σ of one layer (conv5);
- E12 (Fig. 16): accuracy of SNS with the top-k layers, from a finished
  `python -m robustdissect.studies.sns_layers` folder given as `layer_study`.

Tensor shapes: images x (N, C, H, W) in [0, 1], labels y (N,).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis import compare_models
from ..attacks import Attack, accuracy_vs_eps, accuracy_vs_steps, make_attack
from ..config import parse_budgets, stage_options
from ..errors import UserError
from ..evaluation import (
    BLACK_BOX,
    QUICK_EVALUATE,
    EvaluateOptions,
    black_box_subset,
    build_attack,
    clean_predictions,
)
from ..report import plots
from ..runs import RunDir
from ..stats import proportion_interval
from .base import STAGES, Context, section

log = logging.getLogger(__name__)

PREFIX = "fmnist-smallcnn-"
# pat-ft is SNS's control (the same fine-tuning of PAT with λ = 0); sns-from-vanilla is SNS fine-tuned
# from the vanilla model, the paper's literal recipe.
DEFAULT_MODELS = [
    f"{PREFIX}{m}"
    for m in ("vanilla", "pat", "pat-ft", "alp", "trades", "fast", "sns", "sns-dyn", "sns-rand", "sns-all",
              "sns-from-vanilla")
]  # fmt: skip
TABLE3 = ["cw-l2", "pgd-l2", "pgd-linf", "fgsm", "spsa", "nattack"]  # the paper's Table III columns
SIGMA_ROLES = ("vanilla", "pat", "sns")  # E13 overlays

# The default run (`quick: true`): vanilla / PAT / SNS under the evaluation's L-inf attacks on the
# run's images (vanilla's attacks are the evaluate stage's, reused from the store); the sweeps and
# the σ overlays (also in the sensitivity stage) only with `--full`.
QUICK_COMPARE: dict[str, Any] = {
    "attacks": ["pgd-linf", "fgsm"],
    "steps_sweep": [],
    "eps_sweep": [],
    "sigma_models": [],
}


@dataclass(frozen=True)
class CompareStageOptions:
    """Options of the `compare` stage.

    models: checkpoints to compare (shipped names or .safetensors paths with a card; None: the
    run's model and its `compare` models); the first
    whose name ends in "vanilla", "pat" and "sns" are the E13 overlays unless `sigma_models` is set.
    n: images evaluated (a prefix of the run's analysed split; None = all of it).
    attacks: Table III columns; attack_options: EvaluateOptions settings (eps, pgd_steps, cw_steps,
    blackbox_n, spsa_iterations, ...); `quick` in the run config applies the evaluation's quick
    settings first.
    curve_*: E11 sweeps on the first `curve_n` images; sigma_*: E13 settings.
    layer_study: output folder of `python -m robustdissect.studies.sns_layers` (its
    layer_selection.json) to show as E12 / Fig. 16; None lists the command that makes one.
    """

    models: list[str] | None = None
    n: int | None = None
    attacks: list[str] = field(default_factory=lambda: list(TABLE3))
    attack_options: dict[str, Any] = field(default_factory=dict)
    curve_n: int = 1000
    curve_eps: float = 0.1
    curve_steps: int = 10
    steps_sweep: list[int] = field(default_factory=lambda: list(range(1, 11)))
    eps_sweep: list[float] = field(default_factory=lambda: [0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2])
    sigma_models: list[str] | None = None
    sigma_n: int = 500
    sigma_eps: float = 0.1
    sigma_steps: int = 10
    sigma_layer: str = "conv5"
    layer_study: str | None = None

    def __post_init__(self) -> None:
        parse_budgets(self, "curve_eps", "sigma_eps", stage="compare")


def _ci(correct: torch.Tensor) -> tuple[int, float, float, float]:
    """(n, accuracy, Wilson low, Wilson high) of a boolean vector (N,)."""
    n = len(correct)
    return (n, *proportion_interval(int(correct.sum()), n))


def _short(name: str) -> str:
    stem = Path(name).stem
    return stem[len(PREFIX) :] if stem.startswith(PREFIX) else stem


def _compared_models(
    ctx: Context, opts: CompareStageOptions
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]], list[str]]:
    """({label: model}, {label: card}, warnings): the listed `models`, or the run's model and its
    counterparts; the paper's full set of shipped checkpoints for the built-in model under --full."""
    names = opts.models
    if names is None and not ctx.config.quick and ctx.config.compare is None and ctx.config.model == DEFAULT_MODELS[0]:
        names = DEFAULT_MODELS
    if names is None:
        models = {ctx.label: ctx.model, **{k: m for k, (m, _c) in ctx.compared.items()}}
        cards = {ctx.label: ctx.card, **{k: c for k, (_m, c) in ctx.compared.items()}}
        return models, cards, []
    models, cards, warnings = {}, {}, []
    for name in names:
        got = ctx.load_model(name)
        if isinstance(got, str):
            warnings.append(got)
            continue
        label = _short(name) if name not in (ctx.label, *ctx.compared) else name
        models[label], cards[label] = got
    return models, cards, warnings


@STAGES.register("compare", "the model beside its robust counterparts: Table III with intervals, PGD sweeps, σ")
def compare_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Table III for the run's model and its counterparts (attacks from the evidence store), the
    E11 sweeps, the E13 σ overlays and the E12 layer study, as `options` asks."""
    opts: CompareStageOptions = stage_options(CompareStageOptions, options, "compare")
    attack_options = {**QUICK_EVALUATE, **opts.attack_options} if ctx.config.quick else dict(opts.attack_options)
    attack_options.pop("attacks", None)
    eval_opts: EvaluateOptions = stage_options(
        EvaluateOptions, {**attack_options, "attacks": list(opts.attacks)}, "compare (attack_options)"
    )
    names = eval_opts.attack_names()
    seed, run = ctx.config.seed, ctx.run
    split = ctx.split
    n = len(split) if opts.n is None else min(opts.n, len(split))
    x, y = split.x[:n], split.y[:n]
    index = torch.arange(n)
    bb_index = black_box_subset(n, eval_opts.blackbox_n, seed)
    bb_n = len(bb_index)

    models, cards, warnings = _compared_models(ctx, opts)
    if len(models) < (1 if opts.models is not None else 2):
        text = ctx.no_counterpart("compare with") if opts.models is None else "None of the listed models is available."
        return section("Robust counterparts compared", text, warnings=warnings, unavailable=text)

    # Table III
    wide: list[dict[str, Any]] = []
    long: list[dict[str, Any]] = []
    for short, model in models.items():
        card = cards[short]
        objective = card.get("objective", {})
        row: dict[str, Any] = {
            "model": short,
            "objective": objective.get("name", "") if isinstance(objective, dict) else str(objective),
            "epochs": card.get("epochs"),
            "train_seconds": card.get("train_seconds"),
        }
        clean = clean_predictions(ctx.store, model, x, index, ctx.images_id, eval_opts.batch_size) == y
        results = [("clean", clean, "clean")]
        for attack_name in names:
            idx = bb_index if attack_name in BLACK_BOX else index
            log.info("training: %s / %s on %d images", short, attack_name, len(idx))
            out = ctx.attack(build_attack(attack_name, eval_opts, seed), x[idx], y[idx], idx, model=model)
            results.append((attack_name, out.correct, "black-box" if attack_name in BLACK_BOX else "white-box"))
        for col, correct, kind in results:
            cn, acc, lo, hi = _ci(correct)
            row[col], row[f"{col}_ci_low"], row[f"{col}_ci_high"] = acc, lo, hi
            long.append({"model": short, "attack": col, "kind": kind, "n": cn, "accuracy": acc,
                         "ci_low": lo, "ci_high": hi})  # fmt: skip
        wide.append(row)
    run.write_table("compare_accuracy", wide)
    run.write_table("compare_accuracy_long", long)
    tables: list[dict[str, Any]] = [
        {"file": "tables/compare_accuracy.csv", "title": "Table III: accuracy (95% Wilson interval)", "show": True},
        {"file": "tables/compare_accuracy_long.csv", "title": "Table III, one row per model and attack"},
    ]
    figures: list[dict[str, str]] = []

    # E11: PGD sweeps
    cn = min(opts.curve_n, n)
    curve_eps = opts.curve_eps
    by_steps: dict[str, Sequence[float]] = {}
    by_eps: dict[str, Sequence[float]] = {}
    for short, model in models.items():

        def accuracy(attack: Attack, model: nn.Module = model) -> float:
            return ctx.attack(attack, x[:cn], y[:cn], index[:cn], model=model).accuracy()

        by_steps[short] = list(
            accuracy_vs_steps(model, x[:cn], y[:cn], curve_eps, opts.steps_sweep, seed=seed, accuracy=accuracy).values()
        )
        by_eps[short] = list(
            accuracy_vs_eps(model, x[:cn], y[:cn], opts.eps_sweep, steps=opts.curve_steps, seed=seed,
                            accuracy=accuracy).values()
        )  # fmt: skip
    steps_rows = [{"steps": k, **{m: v[i] for m, v in by_steps.items()}} for i, k in enumerate(opts.steps_sweep)]
    eps_rows = [{"eps": e, **{m: v[i] for m, v in by_eps.items()}} for i, e in enumerate(opts.eps_sweep)]
    if opts.steps_sweep and opts.eps_sweep:
        run.write_table("compare_pgd_steps", steps_rows)
        run.write_table("compare_pgd_eps", eps_rows)
        tables += [
            {"file": "tables/compare_pgd_steps.csv", "title": f"L∞ PGD accuracy vs steps (ε = {curve_eps:g})"},
            {"file": "tables/compare_pgd_eps.csv", "title": f"L∞ PGD accuracy vs ε (k = {opts.curve_steps})"},
        ]
        run.save_figure(
            "compare_pgd_steps",
            plots.line_plot(opts.steps_sweep, by_steps, "PGD steps k", "robust accuracy", f"L∞ ε = {curve_eps:g}"),
        )
        run.save_figure(
            "compare_pgd_eps",
            plots.line_plot(opts.eps_sweep, by_eps, "ε (L∞)", "robust accuracy", f"PGD-{opts.curve_steps}"),
        )
        figures += [
            {"file": "figures/compare_pgd_steps.png",
             "caption": f"E11: L∞ PGD accuracy vs steps, ε = {curve_eps:g}, {cn} images"},
            {"file": "figures/compare_pgd_eps.png", "caption": f"E11: L∞ PGD-{opts.curve_steps} accuracy vs ε"},
        ]  # fmt: skip

    # E13: sigma overlays
    sigma: dict[str, Any] = {}
    picked = _sigma_models(opts, models)
    if picked:
        sn = min(opts.sigma_n, n)
        s_eps = opts.sigma_eps
        attack = make_attack("pgd-linf", eps=s_eps, steps=opts.sigma_steps, step_rule="paper", seed=seed)
        advs = {m: ctx.attack(attack, x[:sn], y[:sn], index[:sn], model=mod).x_adv for m, mod in picked.items()}
        comp = compare_models(picked, x[:sn], y[:sn], advs, seed=seed)
        layer_rows = [{k: r[k] for k in ("model", "layer", "depth", "channels", "sigma_mean", "sigma_top_mean")}
                      for r in comp.summary]  # fmt: skip
        run.write_table("compare_sigma_layers", layer_rows)
        tables.append({"file": "tables/compare_sigma_layers.csv", "title": "E13: mean σ per conv layer"})
        layers = [r["layer"] for r in comp.summary if r["model"] == next(iter(picked))]
        means: dict[str, Sequence[float]] = {
            m: [r["sigma_mean"] for r in comp.summary if r["model"] == m] for m in picked
        }
        run.save_figure(
            "compare_sigma_layers",
            plots.line_plot(list(range(1, len(layers) + 1)), means, "conv layer (depth)", "mean σ",
                            " / ".join(layers)),
        )  # fmt: skip
        figures.append({"file": "figures/compare_sigma_layers.png",
                        "caption": f"E13: mean σ per conv layer under L∞ PGD-{opts.sigma_steps} "
                                   f"(ε = {s_eps:g}, {sn} images)"})  # fmt: skip
        profiles = comp.profiles()
        if all(opts.sigma_layer in p for p in profiles.values()):
            sorted_sigma: dict[str, Sequence[float]] = {
                m: [float(v) for v in p[opts.sigma_layer].sorted_sigma] for m, p in profiles.items()
            }
            width = max(len(v) for v in sorted_sigma.values())
            run.write_table(
                "compare_sigma_sorted",
                [{"rank": i + 1, **{m: (v[i] if i < len(v) else math.nan) for m, v in sorted_sigma.items()}}
                 for i in range(width)],
            )  # fmt: skip
            run.save_figure(
                "compare_sigma_sorted",
                plots.line_plot(list(range(1, width + 1)), sorted_sigma, "neuron (sorted)", "σ", opts.sigma_layer),
            )
            figures.append({"file": "figures/compare_sigma_sorted.png",
                            "caption": f"E13: σ of every {opts.sigma_layer} neuron, sorted"})  # fmt: skip
        else:
            warnings.append(f"layer '{opts.sigma_layer}' is not among the compared layers; no sorted-σ figure")
        sigma = {"models": list(picked), "layers": layers, "mean": means}
        if len(picked) < 2:
            warnings.append("E13 needs at least two of vanilla / PAT / SNS to overlay; only " + ", ".join(picked))

    _layer_study_block(opts.layer_study, run, tables, figures, warnings)

    summary = {
        f"{r['model']} {a}": f"{100 * r[a]:.1f}% [{100 * r[a + '_ci_low']:.1f}, {100 * r[a + '_ci_high']:.1f}]"
        for r in wide
        for a in ("clean", *names)
        if a in r
    }
    text = (
        f"{len(models)} models on {n} images of the {ctx.config.split} split (black-box attacks on {bb_n}); "
        f"L∞ ε = {eval_opts.eps:g}, L2 ε = {eval_opts.eps_l2:g}. "
        "Accuracies with 95% Wilson intervals; epochs and training seconds from each model's card."
    )
    if opts.layer_study is None and ctx.builtin_reference:
        text += f" E12 (layer selection, Fig. 16): run `{LAYER_STUDY_COMMAND}` and set training.layer_study."
    return section(
        "Robust counterparts compared",
        text,
        summary=summary,
        tables=tables,
        figures=figures,
        warnings=warnings,
        models=list(models),
        comparison=wide,
        pgd_steps=steps_rows,
        pgd_eps=eps_rows,
        sigma=sigma,
    )


LAYER_STUDY_COMMAND = (
    "python -m robustdissect.studies.sns_layers --config fmnist-smallcnn-sns-layers --out runs/layer-study"
)


def read_layer_study(folder: str | Path) -> list[dict[str, Any]]:
    """The rows a finished layer-selection study wrote to `folder`/layer_selection.json."""
    path = Path(folder) / "layer_selection.json"
    if not path.is_file():
        raise UserError(f"no layer-selection study in {folder} (missing {path.name})")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "k" in r for r in rows):
        raise UserError(f"{path} holds no study rows (a list of objects with 'k')")
    return rows


def _layer_study_block(
    folder: str | None,
    run: RunDir,
    tables: list[dict[str, Any]],
    figures: list[dict[str, str]],
    warnings: list[str],
) -> None:
    """E12 / Fig. 16 from a finished layer-selection study: its rows as a table, accuracy vs k."""
    if folder is None:
        return
    rows = read_layer_study(folder)
    run.write_table("compare_layer_selection", rows)
    tables.append({"file": "tables/compare_layer_selection.csv",
                   "title": "E12: SNS with the top-k layers (95% Wilson intervals)", "show": True})  # fmt: skip
    run.save_figure("compare_layer_selection", plots.layer_study_figure(rows))
    figures.append({"file": "figures/compare_layer_selection.png",
                    "caption": "E12 (Fig. 16): accuracy of SNS with the top-k conv layers as S"})  # fmt: skip


def _sigma_models(opts: CompareStageOptions, models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The E13 models: `sigma_models` (short or full names) or the first vanilla / pat / sns."""
    if opts.sigma_models is not None:
        wanted = [_short(m) for m in opts.sigma_models]
        return {m: models[m] for m in wanted if m in models}
    picked: dict[str, nn.Module] = {}
    for role in SIGMA_ROLES:
        for short, model in models.items():
            if short == role or short.endswith(f"-{role}") or short.startswith(f"{role}-"):
                picked[short] = model
                break
    return picked


compare_stage.options_class = CompareStageOptions  # type: ignore[attr-defined]
compare_stage.reduced_options = QUICK_COMPARE  # type: ignore[attr-defined]
