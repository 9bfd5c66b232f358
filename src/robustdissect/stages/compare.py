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
from collections.abc import Mapping, Sequence
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
    QUICK_EVALUATE,
    AttackOutcome,
    EvaluateOptions,
    accuracy_rows,
    black_box_subset,
    clean_predictions,
    table_attacks,
)
from ..report import plots
from ..runs import RunDir
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
        # the attacks and their options are built once here (dry), so a bad one stops the run before any stage
        options = {k: v for k, v in self.attack_options.items() if k != "attacks"}
        stage_options(EvaluateOptions, {**options, "attacks": list(self.attacks)}, "compare (attack_options)")


def _short(name: str) -> str:
    """A model's label: its file stem without the shipped checkpoints' prefix."""
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
    eval_opts = _evaluate_options(ctx, opts)
    split = ctx.split
    n = len(split) if opts.n is None else min(opts.n, len(split))
    x, y = split.x[:n], split.y[:n]
    bb_index = black_box_subset(n, eval_opts.blackbox_n, ctx.config.seed)

    models, cards, warnings = _compared_models(ctx, opts)
    if len(models) < (1 if opts.models is not None else 2):
        text = ctx.no_counterpart("compare with") if opts.models is None else "None of the listed models is available."
        return section("Robust counterparts compared", text, warnings=warnings, unavailable=text)

    wide = _table3(ctx, models, cards, eval_opts, x, y, bb_index)
    tables: list[dict[str, Any]] = [
        {"file": "tables/compare_accuracy.csv", "title": "Table III: accuracy (95% Wilson interval)", "show": True},
        {"file": "tables/compare_accuracy_long.csv", "title": "Table III, one row per model and attack"},
    ]
    figures: list[dict[str, str]] = []
    steps_rows, eps_rows = _pgd_sweeps(ctx, opts, models, x, y, tables, figures)
    sigma = _sigma_block(ctx, opts, models, x, y, tables, figures, warnings)
    _layer_study_block(opts.layer_study, ctx.run, tables, figures, warnings)

    text = (
        f"{len(models)} models on {n} images of the {ctx.config.split} split (black-box attacks on "
        f"{len(bb_index)}); L∞ ε = {eval_opts.eps:g}, L2 ε = {eval_opts.eps_l2:g}. "
        "Accuracies with 95% Wilson intervals; epochs and training seconds from each model's card."
    )
    if opts.layer_study is None and ctx.builtin_reference:
        text += f" E12 (layer selection, Fig. 16): run `{LAYER_STUDY_COMMAND}` and set training.layer_study."
    return section(
        "Robust counterparts compared",
        text,
        summary=_summary(wide, eval_opts.attack_names()),
        tables=tables,
        figures=figures,
        warnings=warnings,
        models=list(models),
        comparison=wide,
        pgd_steps=steps_rows,
        pgd_eps=eps_rows,
        sigma=sigma,
    )


def _evaluate_options(ctx: Context, opts: CompareStageOptions) -> EvaluateOptions:
    """The evaluation settings of the compared attacks: `attack_options` (over the evaluation's
    quick settings in a quick run) with `attacks` as the table's columns."""
    attack_options = {**QUICK_EVALUATE, **opts.attack_options} if ctx.config.quick else dict(opts.attack_options)
    attack_options.pop("attacks", None)
    eval_opts: EvaluateOptions = stage_options(
        EvaluateOptions, {**attack_options, "attacks": list(opts.attacks)}, "compare (attack_options)"
    )
    return eval_opts


def _table3(
    ctx: Context,
    models: dict[str, nn.Module],
    cards: dict[str, dict[str, Any]],
    eval_opts: EvaluateOptions,
    x: torch.Tensor,
    y: torch.Tensor,
    bb_index: torch.Tensor,
) -> list[dict[str, Any]]:
    """Table III on images x (N, C, H, W), labels y (N,) (black-box attacks on bb_index (M,)):
    writes the wide and the long table; the wide rows, one per model."""
    wide: list[dict[str, Any]] = []
    long: list[dict[str, Any]] = []
    index = torch.arange(len(y))
    for short, model in models.items():

        def attack(a: Attack, idx: torch.Tensor, model: nn.Module = model) -> AttackOutcome:
            return ctx.attack(a, x[idx], y[idx], idx, model=model)

        clean = clean_predictions(ctx.store, model, x, index, ctx.images_id, eval_opts.batch_size) == y
        outcomes = table_attacks(eval_opts.attack_names(), eval_opts, ctx.config.seed, index, bb_index, attack,
                                 f"compare: {short}")  # fmt: skip
        row = _card_columns(short, cards[short])
        for r in accuracy_rows(clean, outcomes):
            col = r["attack"]
            row[col], row[f"{col}_ci_low"], row[f"{col}_ci_high"] = r["accuracy"], r["ci_low"], r["ci_high"]
            long.append({"model": short, **{k: r[k] for k in ("attack", "kind", "n", "accuracy", "ci_low", "ci_high")}})
        wide.append(row)
    ctx.run.write_table("compare_accuracy", wide)
    ctx.run.write_table("compare_accuracy_long", long)
    return wide


def _card_columns(short: str, card: dict[str, Any]) -> dict[str, Any]:
    """The first columns of a model's Table III row: its label, objective, epochs and training seconds."""
    objective = card.get("objective", {})
    return {
        "model": short,
        "objective": objective.get("name", "") if isinstance(objective, dict) else str(objective),
        "epochs": card.get("epochs"),
        "train_seconds": card.get("train_seconds"),
    }


def _summary(wide: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, str]:
    """{"<model> <attack>": "87.5% [80.1, 92.3]"} for every model and column of Table III."""
    return {
        f"{r['model']} {a}": f"{100 * r[a]:.1f}% [{100 * r[a + '_ci_low']:.1f}, {100 * r[a + '_ci_high']:.1f}]"
        for r in wide
        for a in ("clean", *names)
        if a in r
    }


def _pgd_sweeps(
    ctx: Context,
    opts: CompareStageOptions,
    models: dict[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    tables: list[dict[str, Any]],
    figures: list[dict[str, str]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """E11: L∞ PGD accuracy of every model against steps k and against ε on the first `curve_n`
    of x (N, C, H, W), y (N,); the tables and figures when both sweeps are set; (steps rows, ε rows)."""
    cn = min(opts.curve_n, len(y))
    index = torch.arange(len(y))
    by_steps: dict[str, Sequence[float]] = {}
    by_eps: dict[str, Sequence[float]] = {}
    for short, model in models.items():

        def accuracy(attack: Attack, model: nn.Module = model) -> float:
            return ctx.attack(attack, x[:cn], y[:cn], index[:cn], model=model).accuracy()

        by_steps[short] = list(
            accuracy_vs_steps(model, x[:cn], y[:cn], opts.curve_eps, opts.steps_sweep, seed=ctx.config.seed,
                              accuracy=accuracy).values()
        )  # fmt: skip
        by_eps[short] = list(
            accuracy_vs_eps(model, x[:cn], y[:cn], opts.eps_sweep, steps=opts.curve_steps, seed=ctx.config.seed,
                            accuracy=accuracy).values()
        )  # fmt: skip
    steps_rows = [{"steps": k, **{m: v[i] for m, v in by_steps.items()}} for i, k in enumerate(opts.steps_sweep)]
    eps_rows = [{"eps": e, **{m: v[i] for m, v in by_eps.items()}} for i, e in enumerate(opts.eps_sweep)]
    if opts.steps_sweep and opts.eps_sweep:
        _sweep_outputs(ctx.run, opts, cn, (steps_rows, by_steps), (eps_rows, by_eps), tables, figures)
    return steps_rows, eps_rows


def _sweep_outputs(
    run: RunDir,
    opts: CompareStageOptions,
    cn: int,
    steps: tuple[list[dict[str, Any]], dict[str, Sequence[float]]],
    eps: tuple[list[dict[str, Any]], dict[str, Sequence[float]]],
    tables: list[dict[str, Any]],
    figures: list[dict[str, str]],
) -> None:
    """E11's tables and figures from the sweeps' (rows, {model: accuracies}) against steps and ε."""
    (steps_rows, by_steps), (eps_rows, by_eps) = steps, eps
    run.write_table("compare_pgd_steps", steps_rows)
    run.write_table("compare_pgd_eps", eps_rows)
    tables += [
        {"file": "tables/compare_pgd_steps.csv", "title": f"L∞ PGD accuracy vs steps (ε = {opts.curve_eps:g})"},
        {"file": "tables/compare_pgd_eps.csv", "title": f"L∞ PGD accuracy vs ε (k = {opts.curve_steps})"},
    ]
    run.save_figure(
        "compare_pgd_steps",
        plots.line_plot(opts.steps_sweep, by_steps, "PGD steps k", "robust accuracy", f"L∞ ε = {opts.curve_eps:g}"),
    )
    run.save_figure(
        "compare_pgd_eps",
        plots.line_plot(opts.eps_sweep, by_eps, "ε (L∞)", "robust accuracy", f"PGD-{opts.curve_steps}"),
    )
    figures += [
        {"file": "figures/compare_pgd_steps.png",
         "caption": f"E11: L∞ PGD accuracy vs steps, ε = {opts.curve_eps:g}, {cn} images"},
        {"file": "figures/compare_pgd_eps.png", "caption": f"E11: L∞ PGD-{opts.curve_steps} accuracy vs ε"},
    ]  # fmt: skip


def _sigma_block(
    ctx: Context,
    opts: CompareStageOptions,
    models: dict[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    tables: list[dict[str, Any]],
    figures: list[dict[str, str]],
    warnings: list[str],
) -> dict[str, Any]:
    """E13: σ of every conv neuron of the vanilla / PAT / SNS models under the same L∞ PGD on the
    first `sigma_n` of x (N, C, H, W), y (N,): mean σ per layer, sorted σ of `sigma_layer`; {} without them."""
    picked = _sigma_models(opts, models)
    if not picked:
        return {}
    sn, seed = min(opts.sigma_n, len(y)), ctx.config.seed
    index = torch.arange(len(y))
    attack = make_attack("pgd-linf", eps=opts.sigma_eps, steps=opts.sigma_steps, step_rule="paper", seed=seed)
    advs = {m: ctx.attack(attack, x[:sn], y[:sn], index[:sn], model=mod).x_adv for m, mod in picked.items()}
    comp = compare_models(picked, x[:sn], y[:sn], advs, seed=seed)
    layer_rows = [{k: r[k] for k in ("model", "layer", "depth", "channels", "sigma_mean", "sigma_top_mean")}
                  for r in comp.summary]  # fmt: skip
    ctx.run.write_table("compare_sigma_layers", layer_rows)
    tables.append({"file": "tables/compare_sigma_layers.csv", "title": "E13: mean σ per conv layer"})
    layers = [r["layer"] for r in comp.summary if r["model"] == next(iter(picked))]
    means: dict[str, Sequence[float]] = {m: [r["sigma_mean"] for r in comp.summary if r["model"] == m] for m in picked}
    ctx.run.save_figure(
        "compare_sigma_layers",
        plots.line_plot(list(range(1, len(layers) + 1)), means, "conv layer (depth)", "mean σ", " / ".join(layers)),
    )
    figures.append({"file": "figures/compare_sigma_layers.png",
                    "caption": f"E13: mean σ per conv layer under L∞ PGD-{opts.sigma_steps} "
                               f"(ε = {opts.sigma_eps:g}, {sn} images)"})  # fmt: skip
    _sorted_sigma(ctx.run, opts, comp.profiles(), figures, warnings)
    if len(picked) < 2:
        warnings.append("E13 needs at least two of vanilla / PAT / SNS to overlay; only " + ", ".join(picked))
    return {"models": list(picked), "layers": layers, "mean": means}


def _sorted_sigma(
    run: RunDir, opts: CompareStageOptions, profiles: Mapping[str, Any], figures: list[dict[str, str]],
    warnings: list[str],
) -> None:  # fmt: skip
    """E13's sorted σ of every `sigma_layer` neuron per model, as a table and a figure (a warning
    when that layer is not among the compared ones)."""
    if not all(opts.sigma_layer in p for p in profiles.values()):
        warnings.append(f"layer '{opts.sigma_layer}' is not among the compared layers; no sorted-σ figure")
        return
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
