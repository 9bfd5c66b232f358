"""What several stages share: the run's feature dissection, memoized, and its attack set.

`feature_scores(ctx)` is the one entry point of the stages (features, concepts, explorer,
pushback) to the feature dissection: the same (model weights, analysed images, options) is
computed once per run (`ctx.store.memo("features", ...)`), and every adversarial example comes
from `ctx.attack` (model-level PGD and FGSM with the evaluate stage's settings, so they are store
hits). Its options default to the `features` stage's options of this run (budget profile applied),
so any stage gets the result the features stage reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..analysis.features import QUICK_FEATURES, FeatureOptions, FeatureScores, evaluation_attacks, score_features
from ..attacks import Attack
from ..config import stage_options
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
