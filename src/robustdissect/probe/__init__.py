"""Record and intervene on named layers with forward hooks; streaming, mergeable statistics.

    with record(model, ["conv1", "relu1"]) as rec:
        model(x)
    rec.outputs["relu1"]                       # (B, C, H, W), a detached copy

    stats = probe_pairs(model, (x, x_adv), ["conv1", "relu1"])
    stats["conv1"].sigma()                     # (C,) Eq. 1 of the neuron-sensitivity paper

    with intervene(model, [scale_channels("relu3", [4, 9], beta=0.8)]):
        model(x)                               # channels 4 and 9 of relu3 scaled by 0.8

Layers are named by alias (zoo models: conv1, relu1, pool1, gap, fc1, ...) or by
`named_modules()` path. A *neuron* is one channel (dim 1) of a layer output of shape
(B, C, *spatial); fc outputs (B, C) have no spatial part (dim = 1).

Every reducer here keeps per-channel sums whose size does not depend on the number of images,
and `merge` combines two shards into the statistics of their union (exactly for counts and
top-k, up to float64 rounding for sums), so sharded runs combine with `functools.reduce`.

Modules: `hooks` (recording, interventions, call counts), `reducers` (generic per-channel
reducers), `pairs` (clean/adversarial pair statistics).
"""

from __future__ import annotations

from ..modelutil import eval_mode, model_device
from .hooks import (
    ChannelEdit,
    LayerCallback,
    Recording,
    call_counts,
    forward_order,
    gated,
    intervene,
    record,
    replace_channels,
    scale_channels,
    spatial_reduce,
    zero_channels,
)
from .pairs import PairBatch, PairBatchStats, Pairs, PairStats, SelectFn, iter_pair_batches, probe_pairs
from .reducers import (
    ActivationStats,
    ChannelHistogram,
    ChannelRange,
    RunningTopK,
    Welford,
    activation_stats,
    channel_quantiles,
)

__all__ = [
    "ActivationStats",
    "ChannelEdit",
    "ChannelHistogram",
    "ChannelRange",
    "LayerCallback",
    "PairBatch",
    "PairBatchStats",
    "PairStats",
    "Pairs",
    "Recording",
    "RunningTopK",
    "SelectFn",
    "Welford",
    "activation_stats",
    "call_counts",
    "channel_quantiles",
    "eval_mode",
    "forward_order",
    "gated",
    "intervene",
    "iter_pair_batches",
    "model_device",
    "probe_pairs",
    "record",
    "replace_channels",
    "scale_channels",
    "spatial_reduce",
    "zero_channels",
]
