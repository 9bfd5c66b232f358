"""The notebook API: each analysis of `robustdissect run` as one call on a model and data.

    import robustdissect as rd
    ev = rd.evaluate(model, (x, y), attacks=["fgsm", "pgd-linf"], eps=0.1)
    ev.to_frame()        # the rows of tables/robust_accuracy.csv
    ev.plot()            # the figure of figures/robust_accuracy.png

Every call returns a frozen result with `.to_frame()` (a pandas DataFrame when pandas is
installed, else a list of dict records: the rows the CLI writes to the stage's main table),
`.plot()` (a matplotlib Figure, the stage's figure) and the analysis' own typed result. The calls
run the same library functions as the stages on the same settings, so for the same model, images,
attack settings and seed they give the numbers the run's tables hold (tests/test_api.py checks
this). Images are float (N, C, H, W) in [0, 1], labels int64 (N,); `data` is (x, y), a
`Split`, a `Dataset` (its test split) or an iterable of (x, y) batches such as a DataLoader.
Nothing is cached or written to disk: a call computes what it returns.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from .analysis.concepts import ConceptDissection, dissect, generated_concepts
from .analysis.diagnose import Diagnosis, InversionSettings, OptimisationInverter, diagnosis_layers, layer_sigma_ratio
from .analysis.diagnose import diagnose as _diagnose
from .analysis.features import QUICK_FEATURES, FeatureOptions, FeatureScores, bootstrap_shares, evaluation_attacks
from .analysis.features import score_features as _score_features
from .analysis.landscape import LandscapeResult, landscape_attack
from .analysis.landscape import landscape as _landscape
from .analysis.metric import DEFAULT_STEPS, MetricResult, robustness_metric
from .analysis.sensitivity import SensitivityResult, neuron_sensitivity, sigma_profiles
from .attacks import Attack
from .config import parse_eps, stage_options
from .data.base import Dataset, Split, validate_images
from .data.concepts import ConceptSet
from .errors import UserError
from .evaluation import (
    QUICK_EVALUATE,
    AttackOutcome,
    EvaluateOptions,
    accuracy_rows,
    black_box_subset,
    per_class_rows,
    perturbation_norms,
    sweep_curves,
    table_attacks,
    worst_cases,
)
from .models import default_conv_layers
from .modelutil import model_device, predict
from .report import plots as report_plots
from .report import plots_concepts, plots_diagnose, plots_features, plots_metric, plots_sensitivity

__all__ = [
    "ConceptsReport", "DiagnoseReport", "EvaluateReport", "FeaturesReport", "LandscapeReport", "MetricReport",
    "SensitivityReport", "concepts", "diagnose", "evaluate", "features", "landscape", "metric", "sensitivity",
]  # fmt: skip

Records = list[dict[str, Any]]
Data = tuple[Tensor, Tensor] | Split | Dataset | Iterable[Any]


def frame(records: Sequence[Mapping[str, Any]]) -> Any:
    """A pandas DataFrame of `records` when pandas is installed, else the records as a list of dicts."""
    rows = [dict(r) for r in records]
    try:
        pandas = importlib.import_module("pandas")  # optional: the library never needs it
    except ImportError:
        return rows
    return pandas.DataFrame.from_records(rows)


class _Report:
    """What every result of the API has: its main table as records / a frame, and its figure."""

    def records(self) -> Records:
        """The rows of the stage's main table, one dict per row."""
        raise NotImplementedError

    def to_frame(self) -> Any:
        """`records()` as a pandas DataFrame (pandas installed) or as the list of dicts."""
        return frame(self.records())

    def plot(self) -> Figure:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# inputs


def as_tensors(data: Data, where: str = "data") -> tuple[Tensor, Tensor]:
    """Images x (N, C, H, W) float in [0, 1] and labels y (N,) int64 on the CPU from (x, y), a
    Split, a Dataset (its test split) or an iterable of (x, y) batches (a DataLoader)."""
    if isinstance(data, Dataset):
        x, y = data.test.x, data.test.y
    elif isinstance(data, Split):
        x, y = data.x, data.y
    elif isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data[0], data[1]
    elif isinstance(data, Iterable) and not isinstance(data, Tensor | str | bytes):
        xs, ys = [], []
        for batch in data:
            if not isinstance(batch, tuple | list) or len(batch) < 2:
                raise UserError(f"{where}: a loader must yield (images, labels) batches, got {type(batch).__name__}")
            xs.append(torch.as_tensor(batch[0]).detach().cpu())
            ys.append(torch.as_tensor(batch[1]).detach().cpu())
        if not xs:
            raise UserError(f"{where}: the loader yielded no batches")
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise UserError(f"{where}: give (x, y) tensors, a Split, a Dataset or a DataLoader, got {type(data).__name__}")
    x, y = x.detach().cpu().float(), y.detach().cpu().long()
    validate_images(x, y, where)
    return x, y


def _images(x: Tensor, where: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise UserError(f"{where}: images must be a tensor of shape (N, C, H, W)")
    validate_images(x.detach().cpu().float(), torch.zeros(x.shape[0], dtype=torch.long), where)
    return x.detach().cpu().float()


def _options(cls: type[Any], quick: dict[str, Any] | None, options: Mapping[str, Any] | None,
             given: dict[str, Any], stage: str) -> Any:  # fmt: skip
    """The stage's options: its reduced profile (`quick`), then `options`, then the call's keywords."""
    merged = {**(quick or {}), **dict(options or {}), **{k: v for k, v in given.items() if v is not None}}
    return stage_options(cls, merged, stage)


def _layers(model: nn.Module, layers: Sequence[str] | None, example: Tensor,
            hooks: Sequence[str] = ("conv",)) -> list[str]:  # fmt: skip
    """`layers`, else the model's hook points of each kind in `hooks` ("conv": BN output, "relu"),
    found with one image `example` (1, C, H, W), as the stages take them; none is a UserError."""
    names = list(layers) if layers else [name for hook in hooks for name in default_conv_layers(model, hook, example)]
    if not names:
        raise UserError("the model has no conv layer to hook; name the layers to analyse")
    return names


def _run(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, index: Tensor) -> AttackOutcome:
    """`attack` on x (M, C, H, W), y (M,) at positions `index` (M,): the outcome on the CPU. The
    positions key the images' random streams, as in a run, so subsets give the run's numbers."""
    device = model_device(model, x.device)
    res = attack(model, x.to(device), y.to(device), ids=index)
    return AttackOutcome(attack.name, res.x_adv.detach().cpu(), res.correct.detach().cpu().bool(),
                         res.logits.detach().argmax(1).cpu(), attack.describe(), index)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# evaluate


@dataclass(frozen=True)
class EvaluateReport(_Report):
    """Robust accuracy: `table` (tables/robust_accuracy.csv: clean, each attack, the worst case per
    threat model, 95% Wilson intervals), `cascade` (worst_case_cascade.csv: who broke what),
    `per_class` and `norms` (perturbation norms per attack), the curves (L∞ PGD accuracy against
    ε and steps) with the gradient-masking `warnings` and measurements (`masking`);
    `outcomes[name]` holds each table attack's x_adv (M, C, H, W), correct (M,), pred (M,) and
    image positions index (M,)."""

    table: Records
    cascade: Records
    per_class: Records
    norms: Records
    outcomes: Mapping[str, AttackOutcome]
    accuracy_vs_eps: dict[float, float]
    accuracy_vs_steps: dict[int, float]
    masking: dict[str, Any]
    warnings: list[str]
    options: EvaluateOptions

    def records(self) -> Records:
        return self.table

    @property
    def accuracy(self) -> dict[str, float]:
        """Accuracy per row of the table, by attack name."""
        return {str(r["attack"]): float(r["accuracy"]) for r in self.table}

    def plot(self) -> Figure:
        """Accuracy under each attack with its interval (one axes)."""
        return report_plots.accuracy_bars(self.table)


def evaluate(
    model: nn.Module,
    data: Data,
    attacks: str | Sequence[str] | None = None,
    eps: float | str | None = None,
    *,
    eps_l2: float | str | None = None,
    seed: int = 0,
    quick: bool = True,
    options: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
) -> EvaluateReport:
    """Robust accuracy of `model` on images x (N, C, H, W) with labels y (N,) from `data`.

    attacks: names from the evaluation table ("fgsm", "pgd-linf", "pgd-l2", "cw-l2", "apgd-ce",
    "apgd-dlr", "spsa", "nattack"); eps / eps_l2: the L∞ / L2 budgets; quick: the default run's
    reduced budgets (`--full`: False); options: any other `evaluate` option of the run YAML. As
    the stage: the curves and masking checks on the first `curve_n` images (`curves`), then the
    worst case of each threat model, the per-image minimum over its table and curve attacks, then
    the cascade `worst_case` and Square on the points still robust. Corruptions and image grids
    are the stage's only.
    """
    x, y = as_tensors(data)
    names = attacks.split(",") if isinstance(attacks, str) else (list(attacks) if attacks is not None else None)
    opts: EvaluateOptions = _options(EvaluateOptions, QUICK_EVALUATE if quick else None, options,
                                     {"attacks": names, "eps": eps, "eps_l2": eps_l2}, "evaluate")  # fmt: skip
    index = torch.arange(len(y))

    def run(attack: Attack, idx: Tensor) -> AttackOutcome:
        return _run(model, attack, x[idx], y[idx], idx)

    clean_correct = predict(model, x, opts.batch_size) == y
    bb_index = black_box_subset(len(y), opts.blackbox_n, seed)
    outcomes = table_attacks(opts.attack_names(), opts, seed, index, bb_index, run, "evaluate")
    table = accuracy_rows(clean_correct, outcomes)
    curves = sweep_curves(model, x, y, opts, seed, table, outcomes, run)
    cases = worst_cases(opts, seed, clean_correct, [*outcomes.items(), *curves.extra], run)
    table += [wc.row for wc in cases]
    labels = list(classes) if classes is not None else (
        list(data.classes) if isinstance(data, Dataset) else [str(c) for c in range(int(y.max()) + 1)])  # fmt: skip
    return EvaluateReport(
        table=table, cascade=[r for wc in cases for r in wc.cascade],
        per_class=per_class_rows(labels, y, clean_correct, outcomes, {wc.label: wc.robust for wc in cases}),
        norms=[{"attack": name, **perturbation_norms(x[out.index], out.x_adv)} for name, out in outcomes.items()],
        outcomes=outcomes, accuracy_vs_eps=curves.accuracy_vs_eps, accuracy_vs_steps=curves.accuracy_vs_steps,
        masking=curves.masking, warnings=curves.warnings + [w for wc in cases for w in wc.warnings], options=opts,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# sensitivity


@dataclass(frozen=True)
class SensitivityReport(_Report):
    """Neuron sensitivity σ (Eq. 1) and σ_Ratio per layer and neuron (`result`); `fraction`: the
    top share of neurons per layer called sensitive."""

    result: SensitivityResult
    fraction: float = 0.1

    def records(self) -> Records:
        """Per layer (tables/sigma_layers.csv): mean σ, top-10% gap, mean σ_Ratio of the sensitive."""
        return self.result.summary_rows(fraction=self.fraction)

    def units(self) -> Any:
        """Per layer × neuron (tables/sigma.csv), as a frame or records."""
        return frame(self.result.rows(fraction=self.fraction))

    def plot(self) -> Figure:
        """σ of every neuron sorted, one axes per layer, dashed at the top-`fraction` boundary."""
        return plots_sensitivity.plot_sigma_profiles(sigma_profiles(self.result, fraction=self.fraction))


def sensitivity(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    layers: Sequence[str] | None = None,
    *,
    reduction: str = "eq1",
    fraction: float = 0.1,
    batch_size: int = 250,
) -> SensitivityReport:
    """σ of every channel of `layers` between clean images x (N, C, H, W) and their adversarial
    versions x_adv (N, C, H, W); layers default to every conv hook point (BN output) and every
    ReLU, as the `sensitivity` stage hooks them."""
    x, x_adv = _images(x, "x"), _images(x_adv, "x_adv")
    if x.shape != x_adv.shape:
        raise UserError(f"x {tuple(x.shape)} and x_adv {tuple(x_adv.shape)} must have the same shape")
    names = _layers(model, layers, x[:1], ("conv", "relu"))
    result = neuron_sensitivity(model, (x, x_adv), names, reduction=reduction, batch_size=batch_size)  # type: ignore[arg-type]
    return SensitivityReport(result, fraction)


# ---------------------------------------------------------------------------------------------
# features


@dataclass(frozen=True)
class FeaturesReport(_Report):
    """Feature dissection of one model (`scores`: per unit ρ, γ̂, r, s, quadrant; per sample (N, U)
    tensors) with the quadrant shares' bootstrap intervals (`quadrants`, strict variant
    `quadrants_strict`)."""

    scores: FeatureScores
    quadrants: Records
    quadrants_strict: Records

    def records(self) -> Records:
        """Per layer (tables/feature_layers.csv): quadrant shares and mean scores."""
        return self.scores.layer_rows()

    def units(self) -> Any:
        """Per unit (tables/feature_units.csv), as a frame or records."""
        return frame(self.scores.rows())

    def plot(self) -> Figure:
        """Quadrant shares per layer (one axes)."""
        return plots_features.plot_quadrant_shares(self.records())


def features(
    model: nn.Module,
    data: Data,
    *,
    reference: Tensor | Split | None = None,
    layers: Sequence[str] | None = None,
    eps: float | str | None = None,
    seed: int = 0,
    quick: bool = True,
    options: FeatureOptions | Mapping[str, Any] | None = None,
    attacks: Sequence[Attack] | None = None,
    num_classes: int | None = None,
    name: str = "model",
) -> FeaturesReport:
    """Usefulness ρ, robust usefulness γ̂, retention r, stability s and the quadrant of every unit
    of `layers` (default every conv hook point) on the first `n` images x (N, C, H, W), y (N,)
    of `data`.

    reference: clean training images (M, C, H, W) for μ, s and the percentiles (default, for a
    Dataset: a seeded sample of `reference_n` training images, as the stage takes); attacks: the
    model-level attack set (default the evaluation's L∞ PGD and FGSM at ε, as the stage runs
    them); options: a FeatureOptions or any `features` option of the run YAML."""
    x, y = as_tensors(data)
    given = {"eps": eps, "layers": list(layers) if layers else None}
    if isinstance(options, FeatureOptions):
        opts: FeatureOptions = _options(FeatureOptions, None, vars(options), given, "features")
    else:
        opts = _options(FeatureOptions, QUICK_FEATURES if quick else None, options, given, "features")
    n = len(y) if opts.n is None else min(opts.n, len(y))
    x, y = x[:n], y[:n]
    if isinstance(reference, Split):
        x_ref = reference.x
    elif reference is not None:
        x_ref = _images(reference, "reference")
    elif isinstance(data, Dataset):
        x_ref = data.train.subset(opts.reference_n, seed=seed).x
    else:
        raise UserError("features: give reference= clean training images (M, C, H, W) for the unit statistics")
    names = _layers(model, opts.layers, x[:1])
    model_attacks = list(attacks) if attacks is not None else evaluation_attacks(
        stage_options(EvaluateOptions, {}, "evaluate"), opts.eps, seed)  # fmt: skip
    k = num_classes if num_classes is not None else (data.num_classes if isinstance(data, Dataset) else None)

    def sigma(x_adv: Tensor) -> Tensor:
        res = neuron_sensitivity(model, (x, x_adv), names, batch_size=opts.batch_size)
        return torch.cat([torch.as_tensor(res.layers[ln].sigma, dtype=torch.float32) for ln in names])

    scores = _score_features(
        model, x, y, x_ref, names, opts, model_attacks=model_attacks,
        run_attack=lambda a, xx, yy: _run(model, a, xx, yy, torch.arange(len(yy))).x_adv,
        num_classes=k, seed=seed, model_name=name, sigma_fn=sigma,
    )  # fmt: skip
    return FeaturesReport(scores, bootstrap_shares([scores], opts.bootstrap, seed=seed),
                          bootstrap_shares([scores], opts.bootstrap, seed=seed, strict=True))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# concepts


@dataclass(frozen=True)
class ConceptsReport(_Report):
    """Network Dissection of every unit (`dissection`: per unit its best concept, IoU, null
    percentile, threshold T_k; detectors)."""

    dissection: ConceptDissection

    def records(self) -> Records:
        """Per unit (tables/concept_units.csv)."""
        return self.dissection.unit_rows()

    def labels(self) -> Any:
        """Per layer and concept with detectors (tables/concept_labels.csv)."""
        return frame([r for r in self.dissection.concept_rows() if r["detectors"]])

    def categories(self) -> Any:
        """Per layer and category: detectors and unique concepts (tables/concept_categories.csv)."""
        return frame(self.dissection.category_rows())

    def plot(self) -> Figure:
        """Detector units per layer, stacked by concept category (one axes)."""
        return plots_concepts.plot_label_counts(self.dissection.category_rows())


def concepts(
    model: nn.Module,
    concept_set: ConceptSet | Dataset,
    layers: Sequence[str] | None = None,
    *,
    n: int = 2000,
    quantile: float = 0.005,
    threshold: str = "streaming",
    quantile_on: str = "raw",
    iou_threshold: float = 0.04,
    permutations: int = 100,
    null_percentile: float = 0.99,
    bins: int = 2048,
    top_k: int = 5,
    batch_size: int = 250,
    seed: int = 0,
) -> ConceptsReport:
    """Dissect every unit of `layers` (default every conv hook point) on `concept_set`: a
    ConceptSet (images (T, C, H, W) with label masks; `rd.data.concepts.load_concept_dir`,
    `load_broden`), or a Dataset, for which the stage's generated set of `n` images is made."""
    cset = generated_concepts(concept_set, n, seed=seed) if isinstance(concept_set, Dataset) else concept_set
    if not isinstance(cset, ConceptSet):
        raise UserError(f"concepts: give a ConceptSet or a Dataset, got {type(concept_set).__name__}")
    names = _layers(model, layers, cset.images[:1])
    diss = dissect(model, cset, names, quantile=quantile, threshold=threshold, quantile_on=quantile_on,  # type: ignore[arg-type]
                   iou_threshold=iou_threshold, permutations=permutations, null_percentile=null_percentile,
                   bins=bins, top_k=top_k, batch_size=batch_size, seed=seed)  # fmt: skip
    return ConceptsReport(diss)


# ---------------------------------------------------------------------------------------------
# diagnose


@dataclass(frozen=True)
class DiagnoseReport(_Report):
    """Layer diagnosis (`diagnosis`): per layer d_l, A_l, R_l, IL_l, V_l, V_l^soft and σ_Ratio
    (`rows`), the explanation strips, Spearman(IL_l, V_l)."""

    diagnosis: Diagnosis
    rows: Records
    warnings: list[str] = field(default_factory=list)

    def records(self) -> Records:
        """Per layer, input first (tables/diagnose_layers.csv)."""
        return self.rows

    def per_example(self) -> Any:
        """Per judged adversarial example (tables/diagnose_per_example.csv)."""
        return frame(self.diagnosis.per_example_rows())

    def correlations(self) -> Any:
        """Spearman(IL_l, V_l) and (IL_l, V_l^soft) with intervals (tables/diagnose_correlation.csv)."""
        return frame(self.diagnosis.correlation_rows())

    def plot(self) -> Figure:
        """V_l, V_l^soft, IL_l and A_l per layer (four axes)."""
        return plots_diagnose.layer_bars(self.rows)


def diagnose(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    *,
    adv_pred: Tensor | None = None,
    layers: Sequence[str] | None = None,
    judge: nn.Module | None = None,
    inversion: InversionSettings | None = None,
    x_mean: Tensor | None = None,
    resamples: int = 1000,
    show: int = 4,
    seed: int = 0,
) -> DiagnoseReport:
    """Layer diagnosis of `model` on clean images x (N, C, H, W), labels y (N,) and adversarial
    versions x_adv (N, C, H, W) (adv_pred (N,): the model's classes on them, default predicted
    here). Explanations by optimisation inversion (`inversion`, default 500 Adam steps) from
    x_mean (C, H, W) (default x's mean image; the stage uses the training mean); judge: an
    independent model reading the explanations (default the model itself); layers: default every
    ReLU output and pooling layer."""
    x, x_adv = _images(x, "x"), _images(x_adv, "x_adv")
    y = y.detach().cpu().long()
    validate_images(x, y, "diagnose")
    pred = adv_pred.detach().cpu().long() if adv_pred is not None else predict(model, x_adv)
    names = list(layers) if layers else diagnosis_layers(model, x[:1].to(model_device(model)))
    mean = x_mean.detach().cpu() if x_mean is not None else x.mean(0)
    inverter = OptimisationInverter(model, mean, inversion or InversionSettings())
    diag = _diagnose(model, x, y, x_adv, pred, names, inverter, judge if judge is not None else model, mean,
                     resamples=resamples, seed=seed, show=show)  # fmt: skip
    warnings: list[str] = []
    try:
        ratio = layer_sigma_ratio(model, x, x_adv, names)
    except UserError as e:
        ratio = {}
        warnings.append(f"σ_Ratio not computed for these layers: {e}")
    return DiagnoseReport(diag, diag.layer_rows(ratio), warnings)


# ---------------------------------------------------------------------------------------------
# metric


@dataclass(frozen=True)
class MetricReport(_Report):
    """The robustness metric Ψ of one model (`result`: ψ per image (N,), Ψ, p90, temperature)."""

    result: MetricResult
    name: str = "model"

    def records(self) -> Records:
        """One row (tables/metric_psi.csv without the timed PGD columns)."""
        return [{"model": self.name, **self.result.summary()}]

    def plot(self) -> Figure:
        """Histogram of ψ(x) (one axes)."""
        return plots_metric.psi_histograms({self.name: self.result.psi.numpy()})


def metric(
    model: nn.Module,
    x: Tensor,
    eps: float | str = 0.1,
    *,
    steps: int = DEFAULT_STEPS,
    alpha: float | None = None,
    restarts: int = 1,
    calibration: str = "temperature",
    calibration_x: Tensor | None = None,
    target_confidence: float = 0.9,
    logit_scale: float = 10.0,
    seed: int = 0,
    name: str = "model",
) -> MetricReport:
    """Ψ = mean over images x (N, C, H, W) of the largest KL(p_T(x) ‖ p_T(x+δ)) in the L∞ ball of
    radius eps (no labels needed); calibration_x: held-out images (M, C, H, W) for the temperature
    (default x; the stage uses the first `calibration_n` validation images)."""
    x = _images(x, "x")

    def run_attack(wrapped: nn.Module, attack: Attack, xs: Tensor, ys: Tensor) -> Tensor:
        return _run(wrapped, attack, xs, ys, torch.arange(len(ys))).x_adv

    result = robustness_metric(
        model, x, eps=parse_eps(eps), steps=steps, alpha=alpha, restarts=restarts, calibration=calibration,
        calibration_x=calibration_x, target_confidence=target_confidence, logit_scale=logit_scale, seed=seed,
        run_attack=run_attack, cache_calibration=False,
    )  # fmt: skip
    return MetricReport(result, name)


# ---------------------------------------------------------------------------------------------
# landscape


@dataclass(frozen=True)
class LandscapeReport(_Report):
    """Decision and CE surfaces around N images (`result`: (N, G, G) surfaces, boundary distance
    a*, steepness) with their labels y (N,)."""

    result: LandscapeResult
    y: Tensor
    name: str = "model"

    def records(self) -> Records:
        """One row (tables/landscape_summary.csv): boundary distance and steepness read-outs."""
        return [{"model": self.name, **self.result.summary()}]

    def per_image(self) -> Any:
        """Per image (tables/landscape_per_image.csv)."""
        return frame(self.result.per_image_rows(self.y, self.name))

    def mean_surfaces(self) -> Any:
        """Mean decision and CE surfaces per grid point (tables/landscape_mean_surfaces.csv)."""
        return frame(self.result.mean_surface_rows(self.name))

    def plot(self) -> Figure:
        """Contours of the mean decision surface (one axes and its colour bar)."""
        return plots_metric.landscape_contours({self.name: self.result}, "decision")


def landscape(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | str = 0.1,
    radius: float | None = None,
    grid: int = 41,
    norm: str = "linf",
    direction: str = "pgd",
    x_adv: Tensor | None = None,
    attack_steps: int = 20,
    line_points: int = 201,
    chunk_size: int = 4096,
    seed: int = 0,
    name: str = "model",
) -> LandscapeReport:
    """Surfaces of `model` over a grid×grid plane (half-width radius, default 2ε) around images
    x (N, C, H, W) with labels y (N,), d₁ from x_adv (N, C, H, W) (default: the stage's PGD of
    `attack_steps` steps) or the CE gradient (direction="gradient"), d₂ random."""
    x = _images(x, "x")
    y = y.detach().cpu().long()
    budget = parse_eps(eps)
    if direction == "pgd" and x_adv is None:
        x_adv = _run(model, landscape_attack(budget, norm, attack_steps, seed), x, y, torch.arange(len(y))).x_adv
    result = _landscape(model, x, y, eps=budget, radius=radius, grid=grid, norm=norm, direction=direction,
                        x_adv=x_adv, line_points=line_points, chunk_size=chunk_size, seed=seed)  # fmt: skip
    return LandscapeReport(result, y, name)
