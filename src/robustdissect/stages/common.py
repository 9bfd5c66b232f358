"""What several stages share: the run's feature dissection, memoized, and its attack set; the
concepts stage's options and its concept dissection of the run's model.

`feature_scores(ctx)` is the one entry point of the stages (features, concepts, explorer,
pushback) to the feature dissection: the same (model weights, analysed images, options) is
computed once per run (`ctx.store.memo("features", ...)`), and every adversarial example comes
from `ctx.attack` (model-level PGD and FGSM with the evaluate stage's settings, so they are store
hits). Its options default to the `features` stage's options of this run (budget profile applied),
so any stage gets the result the features stage reports. `stage_dissection(ctx)` is the same
for the Network Dissection: the concepts stage's (memoized) result, which the explorer reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..analysis.concepts import ConceptDissection, cached_dissection, generated_concepts
from ..analysis.features import QUICK_FEATURES, FeatureOptions, FeatureScores, evaluation_attacks, score_features
from ..attacks import Attack
from ..config import check_ints, parse_budgets, stage_options
from ..data.concepts import ConceptSet, concept_dir_identity, load_broden, load_concept_dir
from ..errors import UserError
from ..evaluation import EvaluateOptions
from ..models import default_conv_layers
from .base import STAGES, AnalysisUnavailable, Context, stage_settings


def stage_feature_options(ctx: Context) -> FeatureOptions:
    """The `features` stage's options of this run (profile applied); when the run has no `features`
    stage, the reduced budgets whatever the profile: a stage that only joins the quadrants (e.g.
    `concepts` alone) should not start the full per-unit attack budget (hours on a CPU); add a
    `features` stage with its options to choose them."""
    if "features" in ctx.config.stages and "features" in STAGES:
        return stage_settings("features", ctx.config)
    return stage_options(FeatureOptions, dict(QUICK_FEATURES), "features")


def model_level_attacks(ctx: Context, eps: float) -> list[Attack]:
    """Model-level PGD and FGSM with the evaluate stage's settings of this run (ε replaced by the
    features' ε when they differ), so the examples are store hits when evaluate ran on the same
    images."""
    if "evaluate" in ctx.config.stages:
        eopts: EvaluateOptions = stage_settings("evaluate", ctx.config)
    else:
        eopts = stage_options(EvaluateOptions, {}, "evaluate")
    return evaluation_attacks(eopts, eps, ctx.config.seed)


def feature_scores(
    ctx: Context,
    model: nn.Module | None = None,
    options: FeatureOptions | None = None,
    model_name: str | None = None,
) -> FeatureScores:
    """The feature dissection of `model` (default the run's model) on the run's analysed images
    (the first `options.n`), computed once per run: memoized under (model weights, image set,
    options), every adversarial example through `ctx.attack` (the evidence store)."""
    m = model if model is not None else ctx.model
    opts = options or stage_feature_options(ctx)
    split = ctx.split
    n = len(split) if opts.n is None else min(opts.n, len(split))
    x, y = split.x[:n], split.y[:n]
    index = torch.arange(n)
    layers = list(opts.layers) if opts.layers else default_conv_layers(m, "conv", x[:1])
    if not layers:
        raise AnalysisUnavailable("the model has no conv layer with channels that can be hooked once per forward")
    seed = ctx.config.seed
    opt_parts = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("compare",)}
    parts = {"model": ctx.store.model_hash(m), "images": ctx.images_id, "n": n, "layers": layers,
             "options": opt_parts, "seed": seed}  # fmt: skip
    eps = opts.eps
    name = model_name or (ctx.label if m is ctx.model else type(m).__name__)

    def compute() -> FeatureScores:
        ref_split = ctx.data.train.subset(opts.reference_n, seed=seed)
        attacks = model_level_attacks(ctx, eps)
        outcome_key: dict[str, Any] = {}

        def run(attack: Attack, xx: Tensor, yy: Tensor) -> Tensor:
            out = ctx.attack(attack, xx, yy, index, model=m)
            if attack is attacks[0]:
                outcome_key["pgd"] = out
            return out.x_adv

        def sigma(_x_adv: Tensor) -> Tensor:
            res = ctx.sensitivity(outcome_key["pgd"], x, layers, model=m, batch_size=opts.batch_size)
            return torch.cat([torch.as_tensor(res.layers[ln].sigma, dtype=torch.float32) for ln in layers])

        return score_features(
            m, x, y, ref_split.x, layers, opts, model_attacks=attacks, run_attack=run,
            num_classes=len(ctx.data.classes), seed=seed, model_name=name, sigma_fn=sigma,
        )  # fmt: skip

    return ctx.store.memo("features", parts, compute)


# the concepts stage's options live here: `stage_dissection` (the explorer's) reads them too
@dataclass(frozen=True)
class ConceptsOptions:
    """Defaults: METHODS §4.1 (quantile 0.005, IoU 0.04), §4.3 (100-permutation null, 99th
    percentile), §8.3 "§4" row (generated grayscale / RGB concept sets)."""

    layers: list[str] | None = None  # default: the features' layers (every conv hook point)
    n: int = 2000  # generated concept images
    quantile: float = 0.005  # top share of activations (PNAS: 0.01)
    threshold: str = "streaming"  # or "exact" (torch.quantile of every value)
    quantile_on: str = "raw"  # or "upsampled" (PNAS)
    iou_threshold: float = 0.04
    permutations: int = 100
    null_percentile: float = 0.99
    bins: int = 2048
    foreground: float = 0.1  # garment pixels
    natural_textures: bool = True  # scikit-image's brick, grass, gravel
    broden: str | None = None  # a Broden directory instead of the generated set
    broden_max_images: int | None = None
    concept_dir: str | None = None  # the user's images/, masks/ (label PNGs) and labels.txt|csv
    # attack × concept with the feature quadrants; None: when the run has a features stage (its
    # scores are reused), True: always (scores the features if no stage did)
    join: bool | None = None
    compare: list[str] | None = None  # other checkpoints (None: PAT and SNS beside a shipped smallcnn)
    eps: float = 0.1  # L-inf PGD of the adversarial rows
    steps: int = 10
    figure_concepts: int = 4  # concepts shown with their top unit's images
    top_images: int = 5
    gradcam_images: int = 4
    top_units: int = 5  # units listed beside each Grad-CAM
    batch_size: int = 250

    def __post_init__(self) -> None:
        parse_budgets(self, "eps", maximum=1.0, stage="concepts")
        check_ints(self, {"n": 1, "permutations": 0, "bins": 2, "figure_concepts": 0, "top_images": 1,
                          "gradcam_images": 0, "top_units": 1, "batch_size": 1, "steps": 1}, "concepts")  # fmt: skip
        if not 0.0 < self.quantile < 1.0:
            raise UserError(f"concepts: quantile must lie in (0, 1), got {self.quantile}")
        if not 0.0 < self.null_percentile < 1.0:
            raise UserError(f"concepts: null_percentile must lie in (0, 1), got {self.null_percentile}")
        if self.threshold not in ("streaming", "exact"):
            raise UserError(f"concepts: threshold must be streaming or exact, got {self.threshold!r}")
        if self.quantile_on not in ("raw", "upsampled"):
            raise UserError(f"concepts: quantile_on must be raw or upsampled, got {self.quantile_on!r}")
        if self.broden and self.concept_dir:
            raise UserError("concepts: give a Broden directory or a concept directory, not both")


def concept_set(ctx: Context, opts: ConceptsOptions) -> ConceptSet:
    """The concept images and masks `opts` name: the user's concept directory, a Broden directory or
    the generated set (memoized in the evidence store)."""
    seed = ctx.config.seed
    if opts.concept_dir:
        folder, shape = opts.concept_dir, ctx.data.image_shape
        key: dict[str, Any] = {"concept_dir": folder, "shape": list(shape), "files": concept_dir_identity(folder)}
        return ctx.store.memo("concept_set", key, lambda: load_concept_dir(folder, shape))
    if opts.broden:
        where = {"broden": opts.broden, "max": opts.broden_max_images, "shape": list(ctx.data.image_shape)}
        return ctx.store.memo(
            "concept_set", where, lambda: load_broden(opts.broden or "", ctx.data.image_shape,
                                                      max_images=opts.broden_max_images),
        )  # fmt: skip
    parts: dict[str, Any] = {"n": opts.n, "data": ctx.data.name, "seed": seed, "foreground": opts.foreground,
                             "natural": opts.natural_textures}  # fmt: skip

    def make() -> ConceptSet:
        return generated_concepts(ctx.data, opts.n, foreground=opts.foreground, natural=opts.natural_textures,
                                  seed=seed)  # fmt: skip

    return ctx.store.memo("concept_set", parts, make)


def dissection_settings(opts: ConceptsOptions, seed: int) -> dict[str, Any]:
    """The keyword settings of `cached_dissection` that `opts` and the run's seed give."""
    return {"quantile": opts.quantile, "threshold": opts.threshold, "quantile_on": opts.quantile_on,
            "iou_threshold": opts.iou_threshold, "permutations": opts.permutations,
            "null_percentile": opts.null_percentile, "bins": opts.bins, "top_k": opts.top_images,
            "batch_size": opts.batch_size, "seed": seed}  # fmt: skip


def dissected_layers(ctx: Context, opts: ConceptsOptions) -> tuple[bool, FeatureOptions | None, list[str]]:
    """(join, the features' options when joined, the dissected layers): `opts.layers`, else the
    features' layers when joined, else every conv hook point."""
    join = opts.join if opts.join is not None else "features" in ctx.config.stages
    fopts = None
    if join and not opts.layers:
        fopts = stage_feature_options(ctx)
    layers = list(opts.layers or (fopts.layers if fopts is not None and fopts.layers else [])) or default_conv_layers(
        ctx.model, "conv", ctx.split.x[:1]
    )
    if not layers:
        raise AnalysisUnavailable("the model has no conv layer with channels that can be hooked once per forward")
    return join, fopts, layers


def stage_dissection(ctx: Context) -> ConceptDissection:
    """The dissection of the run's model exactly as the `concepts` stage of this run computes it
    (its options, profile applied): memoized in the evidence store, so a hit once that stage ran
    in this process (the unit explorer reads labels, IoU and thresholds T_k from it)."""
    opts: ConceptsOptions = stage_settings("concepts", ctx.config)
    cset = concept_set(ctx, opts)
    layers = dissected_layers(ctx, opts)[2]
    return cached_dissection(ctx.store, ctx.model, cset, layers, **dissection_settings(opts, ctx.config.seed))
