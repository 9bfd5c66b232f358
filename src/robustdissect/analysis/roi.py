"""E2 (METHODS §5.4, Figs. 4-7): regions of interest of the most and least sensitive neurons.

For the `n_neurons` most sensitive and least sensitive ("vanilla") neurons of a layer: the
`n_images` benign images with the highest activation (spatial max by default, as in Network
Dissection; `rank_by="mean"` as an option), and each image's activation map on the benign and
the adversarial version, bilinearly upsampled to the input size and thresholded at the neuron's
`quantile` (default 0.995, the top-0.005 quantile) of all its benign activation values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from ..errors import UserError
from ..modelutil import eval_mode, model_device
from ..parallel import merged, shard, world
from ..probe import ChannelHistogram, ChannelRange, RunningTopK, record, spatial_reduce
from .sensitivity import top_k_indices

__all__ = ["ROIResult", "regions_of_interest"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class ROIResult:
    """Arrays are indexed [neuron slot, image slot, ...]; slots 0..n-1 are the sensitive
    neurons (most sensitive first), then the vanilla ones (least sensitive first).

    images / images_adv: (M, T, C, H, W); maps / maps_adv: (M, T, H, W) upsampled activations;
    masks / masks_adv: maps > threshold; iou: (M, T) overlap of the two masks (1 if both empty).
    """

    layer: str
    neurons: NDArray[np.int64]
    kinds: list[str]
    sigma: FloatArray
    image_index: NDArray[np.int64]
    scores: FloatArray
    thresholds: FloatArray
    images: NDArray[np.float32]
    images_adv: NDArray[np.float32]
    maps: NDArray[np.float32]
    maps_adv: NDArray[np.float32]
    masks: NDArray[np.bool_]
    masks_adv: NDArray[np.bool_]
    iou: FloatArray
    rank_by: str
    quantile: float

    def rows(self) -> list[dict[str, Any]]:
        """One row per neuron × image: kind, neuron, σ, image id, score, threshold, mask areas
        (fraction of pixels) and IoU between the benign and adversarial regions."""
        out: list[dict[str, Any]] = []
        for i, m in enumerate(self.neurons.tolist()):
            for j, img in enumerate(self.image_index[i].tolist()):
                out.append(
                    {
                        "layer": self.layer,
                        "kind": self.kinds[i],
                        "neuron": m,
                        "sigma": float(self.sigma[i]),
                        "slot": j,
                        "image": img,
                        "score": float(self.scores[i, j]),
                        "threshold": float(self.thresholds[i]),
                        "area_benign": float(self.masks[i, j].mean()),
                        "area_adv": float(self.masks_adv[i, j].mean()),
                        "iou": float(self.iou[i, j]),
                        "rank_by": self.rank_by,
                    }
                )
        return out


def regions_of_interest(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    layer: str,
    sigma: Sequence[float] | NDArray[Any],
    *,
    n_neurons: int = 3,
    n_images: int = 5,
    rank_by: Literal["max", "mean"] = "max",
    quantile: float = 0.995,
    skip_constant: bool = True,
    bins: int = 4096,
    batch_size: int = 256,
) -> ROIResult:
    """E2 data for `layer` given its σ (C,) and aligned benign / adversarial images (N, C, H, W).

    Neurons whose benign activation is constant (e.g. dead ReLUs) are not chosen as vanilla
    neurons when `skip_constant` is set. Two streaming passes over the benign images (range and
    top images; histogram for the quantile), split across the ranks under torchrun and merged
    exactly, and one forward of the chosen images.
    """
    if x.shape != x_adv.shape:
        raise UserError(f"benign {tuple(x.shape)} and adversarial {tuple(x_adv.shape)} differ")
    if x.ndim != 4 or x.shape[0] == 0:
        raise UserError(f"images must be a non-empty (N, C, H, W) tensor, got {tuple(x.shape)}")
    if not 0.0 < quantile < 1.0:
        raise UserError(f"quantile must lie in (0, 1), got {quantile}")
    sig = np.asarray(sigma, dtype=np.float64).ravel()
    device = model_device(model)
    h, w = int(x.shape[2]), int(x.shape[3])

    part = shard(int(x.shape[0]), *world())  # under torchrun each rank streams its share

    def benign_batches() -> Any:
        with eval_mode(model), torch.no_grad(), record(model, [layer]) as rec:
            for s in range(part.start, part.stop, batch_size):
                model(x[s : min(s + batch_size, part.stop)].to(device))
                yield s, rec.outputs[layer]

    rng, top = ChannelRange(), RunningTopK(n_images)
    for s, a in benign_batches():
        if a.ndim != 4:
            raise UserError(f"layer '{layer}' must output (N, C, H, W) maps, got {tuple(a.shape)}")
        if a.shape[1] != sig.size:
            raise UserError(f"σ has {sig.size} values but layer '{layer}' has {a.shape[1]} channels")
        rng.update(a)
        top.update(spatial_reduce(a, rank_by), s)
    rng, top = merged(rng), merged(top)  # exact: min/max and top-k with ties to the smaller index

    c = sig.size
    n_neurons = min(n_neurons, c // 2 if c > 1 else 1)
    sensitive = top_k_indices(sig, n_neurons)
    live = (rng.hi > rng.lo).numpy() if skip_constant else np.ones(c, dtype=bool)
    candidates = np.setdiff1d(np.flatnonzero(live), sensitive)
    if candidates.size < n_neurons:
        candidates = np.setdiff1d(np.arange(c), sensitive)
    vanilla = candidates[top_k_indices(-sig[candidates], n_neurons)]
    neurons = np.concatenate([sensitive, vanilla]).astype(np.int64)
    kinds = ["sensitive"] * len(sensitive) + ["vanilla"] * len(vanilla)
    sel = torch.from_numpy(neurons)

    hist = ChannelHistogram(rng.lo[sel], rng.hi[sel], bins)
    for _, a in benign_batches():
        hist.update(a.index_select(1, sel.to(a.device)))
    hist = merged(hist)  # counts add exactly
    thresholds = hist.quantile(quantile).numpy()

    image_index = top.indices[sel].numpy().astype(np.int64)  # (M, T)
    scores = top.values[sel].numpy().astype(np.float64)
    flat = torch.from_numpy(image_index.ravel())
    with eval_mode(model), torch.no_grad(), record(model, [layer]) as rec:
        model(torch.cat([x[flat], x_adv[flat]]).to(device))
        acts = rec.outputs[layer].float()
    m, t = image_index.shape
    rows_idx = torch.arange(m).repeat_interleave(t)
    ch = sel[rows_idx].to(acts.device)
    pick = torch.arange(m * t, device=acts.device)
    maps_clean = acts[: m * t][pick, ch].unsqueeze(1)
    maps_adv = acts[m * t :][pick, ch].unsqueeze(1)
    up = (
        F.interpolate(torch.cat([maps_clean, maps_adv]), size=(h, w), mode="bilinear", align_corners=False)
        .squeeze(1)
        .cpu()
    )
    up_clean, up_adv = up[: m * t].view(m, t, h, w), up[m * t :].view(m, t, h, w)
    thr = torch.from_numpy(thresholds).float().view(m, 1, 1, 1)
    mask_c, mask_a = up_clean > thr, up_adv > thr
    inter = (mask_c & mask_a).flatten(2).sum(-1).double()
    union = (mask_c | mask_a).flatten(2).sum(-1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    imgs = x[flat].float().view(m, t, *x.shape[1:])
    imgs_adv = x_adv[flat].float().view(m, t, *x.shape[1:])
    return ROIResult(
        layer=layer,
        neurons=neurons,
        kinds=kinds,
        sigma=sig[neurons],
        image_index=image_index,
        scores=scores,
        thresholds=thresholds.astype(np.float64),
        images=imgs.cpu().numpy(),
        images_adv=imgs_adv.cpu().numpy(),
        maps=up_clean.numpy(),
        maps_adv=up_adv.numpy(),
        masks=mask_c.numpy(),
        masks_adv=mask_a.numpy(),
        iou=iou.numpy(),
        rank_by=rank_by,
        quantile=quantile,
    )
