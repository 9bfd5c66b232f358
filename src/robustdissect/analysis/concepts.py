"""Network Dissection (METHODS §4.1, §4.3, §6.6): label each unit with the concept its top
activations overlap best, with a per-unit permutation null.

For unit k of a layer, over a `ConceptSet`:

1. T_k: the (1 − quantile) quantile of the unit's activations over every position of every image
   (`quantile=0.005`, NetDissect; 0.01 PNAS). `threshold="exact"` takes `torch.quantile` of all
   values (memory grows with the images); `"streaming"` (default) a one-pass histogram whose error
   is at most its bin width, reported per unit (`probe.quantiles.StreamingQuantile`).
   `quantile_on="raw"` (Lite) thresholds raw maps, `"upsampled"` (PNAS) the upsampled ones.
2. S_k(x): the activation map upsampled bilinearly to the mask size; M_k(x) = S_k(x) > T_k.
3. IoU_{k,c} = Σ_x |M_k(x) ∩ L_c(x)| / Σ_x |M_k(x) ∪ L_c(x)|, intersections and unions summed over
   the set (not averaged per image). Image-level concepts are whole-image masks; the union's
   activation term counts only images annotated for c's category (Lite's `tally_units_cat`).
4. Label = argmax_c IoU_{k,c}. Null (§4.3 item 4): the label masks shuffled across images,
   `permutations` times; the unit is a detector when its IoU > `iou_threshold` (0.04) and > the
   `null_percentile` (99th) percentile of its null, the unit's best IoU over all concepts under
   each shuffle (so choosing the best of many concepts does not pass for a detection).

Two streaming passes over the set (thresholds, then IoU), memory independent of the number of
images: the null is accumulated batch by batch, each permutation a product of within-batch
shuffles (the set comes in a seeded random order, so every batch mixes every kind of image).
Each layer's maps are handled inside its forward hook and dropped (no copies), and a pass stops
the forward at the last dissected layer. The work beside the two forward passes, each step
giving exactly the plain computation's numbers (`tests/test_concepts_reference.py`):

- T_k (streaming): the sketch bins exactly only the top 2·quantile of each unit's values, where
  T_k lies; the rest is compared and counted (`StreamingQuantile(tail=...)`, same T_k).
- M_k: only maps whose maximum reaches T_k, and in them only pixels next to a row-resampled value
  that reaches it, are resampled (a bilinear value is a convex combination of its sources);
  pixels within float rounding of T_k are taken from `F.interpolate` itself.
- Tallies: the active pixels of all units of all layers are listed once per batch; every pixel's
  labels in all planes are one code, so the intersections are one bincount over (unit, code), and
  each shuffle of the null the same bincount with the codes read from the shuffled images.

Also here: `concept_fragility` (§6.6: per concept and category, mean(1 − r) of its units and
their share in the dangerous quadrant, Fisher enrichment tests), `grad_cam` (captum's
LayerGradCam) and the §4.2 unit ablation (`unit_ablation`, `remove_units`, balanced accuracy).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from scipy.stats import fisher_exact
from torch import nn

from ..data.base import Dataset
from ..data.concepts import HIGH_FREQUENCY, ConceptSet, generate_concept_set
from ..errors import UserError
from ..models.layers import resolve_layer
from ..modelutil import eval_mode, model_device
from ..probe import RunningTopK, intervene, record, zero_channels
from ..probe.quantiles import StreamingQuantile, flat_nonzero
from ..stats import wilson_interval

log = logging.getLogger(__name__)

__all__ = [
    "Ablation",
    "ConceptDissection",
    "ConceptFragility",
    "LayerDissection",
    "UnitConcept",
    "balanced_accuracy",
    "cached_dissection",
    "concept_fragility",
    "dissect",
    "grad_cam",
    "iou_from_counts",
    "remove_units",
    "unit_ablation",
    "unit_masks",
]

NULL_REQUIRED_AT = 7  # maps of at most 7×7 make IoU coarse: the null is mandatory there
EXACT_LIMIT = 16_000_000  # torch.quantile's input limit per unit
NULL_CHUNK = 5  # shuffles tallied together (memory: 5 × the batch's label codes and active pixels)
Size = tuple[int, int]
TAIL_FACTOR = 2  # the streaming sketch bins exactly the top TAIL_FACTOR·quantile of each unit's values


@dataclass(frozen=True)
class UnitConcept:
    """The dissection of one unit: `concept` = argmax_c IoU, `iou` its IoU; `null_iou` the null
    percentile of the unit's best IoU under shuffled masks, `p_value` its permutation p-value,
    `margin` = iou − max(iou_threshold, null_iou). `label`/`category` are set only for detectors
    (margin > 0)."""

    layer: str
    unit: int
    label: str | None
    category: str | None
    concept: str
    concept_category: str
    iou: float
    null_iou: float
    p_value: float
    margin: float
    threshold: float
    threshold_error: float
    detector: bool


@dataclass(frozen=True)
class LayerDissection:
    """One layer. thresholds / threshold_error: (U,); iou, null_iou: (U, K) over the K concepts
    (null_iou: each concept's null percentile); null_max, p_value: (U,) the percentile and p-value
    of the unit's best IoU over all concepts under the shuffles (what a detector must beat);
    top_images: (U, T) concept-set indices of each unit's highest spatial maxima."""

    layer: str
    map_size: tuple[int, int]
    thresholds: torch.Tensor
    threshold_error: torch.Tensor
    iou: torch.Tensor
    null_iou: torch.Tensor
    null_max: torch.Tensor
    p_value: torch.Tensor
    top_images: torch.Tensor


@dataclass(frozen=True)
class ConceptDissection:
    """The dissection of every layer; `units` in layer order, then unit order."""

    concepts: list[str]
    categories: list[str]
    concept_category: list[int]
    layers: dict[str, LayerDissection]
    units: list[UnitConcept]
    settings: dict[str, Any]

    def unit(self, layer: str, unit: int) -> UnitConcept:
        for u in self.units:
            if u.layer == layer and u.unit == unit:
                return u
        raise UserError(f"no dissected unit {layer}:{unit}")

    def unit_rows(self) -> list[dict[str, Any]]:
        return [asdict(u) for u in self.units]

    def concept_rows(self) -> list[dict[str, Any]]:
        """Per concept and layer: detectors labelled with it, their mean IoU, and the concept's
        best IoU over all units of the layer."""
        rows: list[dict[str, Any]] = []
        for name, ld in self.layers.items():
            for c, concept in enumerate(self.concepts):
                dets = [u for u in self.units if u.layer == name and u.detector and u.label == concept]
                rows.append({
                    "layer": name,
                    "concept": concept,
                    "category": self.categories[self.concept_category[c]],
                    "detectors": len(dets),
                    "mean_iou": sum(u.iou for u in dets) / len(dets) if dets else None,
                    "best_iou": float(ld.iou[:, c].max()) if ld.iou.numel() else 0.0,
                })  # fmt: skip
        return rows

    def category_rows(self) -> list[dict[str, Any]]:
        """Per layer and category: units, detectors, unique detectors (distinct concepts)."""
        rows: list[dict[str, Any]] = []
        for name, ld in self.layers.items():
            units = [u for u in self.units if u.layer == name]
            for cat in self.categories:
                dets = [u for u in units if u.detector and u.category == cat]
                rows.append({
                    "layer": name,
                    "category": cat,
                    "units": len(units),
                    "detectors": len(dets),
                    "unique_detectors": len({u.label for u in dets}),
                    "share": len(dets) / len(units) if units else 0.0,
                    "map_size": f"{ld.map_size[0]}x{ld.map_size[1]}",
                })  # fmt: skip
        return rows


def iou_from_counts(
    inter: torch.Tensor, act: torch.Tensor, area: torch.Tensor, concept_category: torch.Tensor
) -> torch.Tensor:
    """IoU (..., U, K) from intersections inter (..., U, K), activation counts per category
    act (..., U, G) and concept areas area (K,): inter / (act[g(c)] + area − inter); 0 where the
    union is empty."""
    union = act.index_select(-1, concept_category) + area - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def _maps(model: nn.Module, layers: Sequence[str], x: torch.Tensor, batch_size: int) -> Iterator[
    tuple[int, dict[str, torch.Tensor]]
]:  # fmt: skip
    """(start, {layer: (B, U, h, w) float activations}) per batch, fc outputs as 1×1 maps."""
    device = model_device(model)
    with eval_mode(model), torch.no_grad(), record(model, list(layers)) as rec:
        for s in range(0, x.shape[0], batch_size):
            rec.reset()
            model(x[s : s + batch_size].to(device))
            yield s, {name: _as_map(name, rec.outputs[name]) for name in layers}


def _as_map(name: str, a: torch.Tensor) -> torch.Tensor:
    a = a.float()
    if a.ndim == 2:
        a = a[:, :, None, None]
    if a.ndim != 4:
        raise UserError(f"layer '{name}' outputs {tuple(a.shape)}; dissection needs (N, C, H, W) maps")
    return a


class _Stop(Exception):
    """Raised by the last hook of a batch: the rest of the forward pass is not needed."""


def _stream(
    model: nn.Module, layers: Sequence[str], x: torch.Tensor, batch_size: int,
    on_map: Callable[[int, str, torch.Tensor], None], on_batch: Callable[[int, int], None] | None = None,
) -> None:  # fmt: skip
    """One pass over x in batches: `on_map(start, layer, a)` runs inside each layer's forward hook
    with its (B, U, h, w) float map (valid only during the call: nothing is copied or kept, so a
    later in-place op cannot alter what it sees, and memory stays that of a plain forward), then
    `on_batch(start, B)` after the batch. After the first batch (a whole forward pass, which
    `record` checks for reused modules), each batch stops once every layer has been seen."""
    device = model_device(model)
    names = list(layers)
    seen: set[str] = set()
    start, stop = 0, False

    def hook(name: str, t: torch.Tensor) -> None:
        seen.add(name)
        on_map(start, name, _as_map(name, t))
        if stop and len(seen) == len(names):
            raise _Stop

    with eval_mode(model), torch.no_grad(), record(model, names, hook, keep=False):
        for start in range(0, x.shape[0], batch_size):
            seen.clear()
            xb = x[start : start + batch_size]
            with contextlib.suppress(_Stop):
                model(xb.to(device))
            missing = [n for n in names if n not in seen]
            if missing:
                raise UserError(f"layer '{missing[0]}' did not run in the model's forward pass")
            stop = True
            if on_batch is not None:
                on_batch(start, int(xb.shape[0]))


def _upsample(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(a.shape[2:]) == size:
        return a
    return F.interpolate(a, size=size, mode="bilinear", align_corners=False)


def _taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two source indices (i0, i1) and weights (w0, w1) of each of n_out outputs of bilinear
    resampling from n_in samples (`F.interpolate`, align_corners=False), in float64."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    w1 = (src - i0.double()).clamp(0, 1)
    return i0, i1, 1 - w1, w1


@functools.lru_cache(maxsize=32)
def _resampling(h: int, w: int, hh: int, ww: int) -> tuple[torch.Tensor, ...]:
    """For bilinear resampling of (h, w) maps to (hh, ww): the column matrix (w, ww) float32, the
    rows' taps (y0, y1 long; wy0, wy1 float32, each (hh,)), and per raw row i the output rows
    whose upper tap it is (`upper`, (h, R) padded with -1) and whose distinct lower tap it is
    (`lower`: y1 = i != y0)."""
    y0, y1, wy0, wy1 = _taps(h, hh)
    x0, x1, wx0, wx1 = _taps(w, ww)
    wx = torch.zeros(w, ww, dtype=torch.float64)
    wx.index_put_((x0, torch.arange(ww)), wx0, accumulate=True)
    wx.index_put_((x1, torch.arange(ww)), wx1, accumulate=True)
    rows = torch.arange(hh)

    def table(sel: list[torch.Tensor]) -> torch.Tensor:
        out = torch.full((h, max(1, *(len(r) for r in sel))), -1, dtype=torch.long)
        for i, r in enumerate(sel):
            out[i, : len(r)] = r
        return out

    upper = table([rows[y0 == i] for i in range(h)])
    lower = table([rows[(y1 == i) & (y0 != i)] for i in range(h)])
    return wx.float(), y0, y1, wy0.float(), wy1.float(), upper, lower


# F.interpolate's float32 value and the fast one below each lie within a few float32 ulps of the
# map's largest |value| from the exact bilinear value; pixels whose fast value lies within this
# share of it from T_k are settled by F.interpolate itself
_MARGIN = 2.0**-16


def _active_pixels(a: torch.Tensor, t: torch.Tensor, size: tuple[int, int]) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]:  # fmt: skip
    """The pixels of M_k(x) = upsample(A_k(x)) > T_k for one batch of one layer: a (B, U, h, w),
    t (U,) float32 -> (image, unit, pixel) int64, pixel = y·W + x at the mask size (H, W).

    Exactly the pixels where `F.interpolate(a, size, bilinear) > t`, without upsampling every
    map: a bilinear value is a convex combination of source values, so only maps whose maximum
    reaches T_k, and in them only output pixels next to a row-resampled value that reaches it,
    can be active. Rows are resampled by one matrix product, the candidates' values by their two
    row taps; a pixel whose value lies within `_MARGIN`·max|map| of T_k, where float rounding
    could decide, is taken from `F.interpolate` of its map instead."""
    b, u, h, w = a.shape
    hh, ww = size
    map_max = a.amax((2, 3))  # (B, U)
    if (h, w) == (hh, ww):
        hot = flat_nonzero(map_max > t[None, :])  # maps b·U + u
        hot_u = hot % u
        at = flat_nonzero(a.view(b * u, h * w).index_select(0, hot) > t.index_select(0, hot_u)[:, None])
        im = torch.div(at, h * w, rounding_mode="floor")
        return torch.div(hot.index_select(0, im), u, rounding_mode="floor"), hot_u.index_select(0, im), at % (h * w)
    map_min = a.amin((2, 3))
    if not bool((map_max - map_min).isfinite().all()):
        hb, hu = (map_max > t[None, :]).nonzero(as_tuple=True)  # the plain way: upsample the hot maps
        up = _upsample(a[hb, hu][:, None], size)[:, 0]
        im, iy, ix = (up > t[hu][:, None, None]).nonzero(as_tuple=True)
        return hb[im], hu[im], iy * ww + ix
    margin = _MARGIN * torch.maximum(map_max.abs(), map_min.abs())  # (B, U)
    hot = flat_nonzero(map_max > t[None, :] - margin)
    hu = hot % u
    maps = a.reshape(b * u, h, w).index_select(0, hot)  # (M, h, w)
    th, mg = t.index_select(0, hu), margin.view(-1).index_select(0, hot)  # (M,)
    wx, y0, y1, wy0, wy1, upper, lower = (v.to(a.device) for v in _resampling(h, w, hh, ww))
    horiz = (maps.reshape(-1, w) @ wx).view(-1)  # (M·h·W): every raw row resampled
    # an output pixel is a convex combination of the resampled rows above and below it: only
    # those next to a resampled-row pixel that reaches T_k − margin are candidates, listed once:
    # from their upper row, or from their lower row where the upper one is not hot
    hot_px = horiz.view(-1, h * ww) > (th - mg)[:, None]
    f = flat_nonzero(hot_px)
    hm, hi, hx = torch.div(f, h * ww, rounding_mode="floor"), torch.div(f, ww, rounding_mode="floor") % h, f % ww
    ya, yb = upper.index_select(0, hi), lower.index_select(0, hi)  # (n, R) output rows, -1: none
    upper_of_b = y0.index_select(0, yb.clamp_min(0).view(-1)).view(yb.shape)  # the upper row of each
    above = hot_px.view(-1).index_select(0, ((hm[:, None] * h + upper_of_b) * ww + hx[:, None]).view(-1))
    above = above.view(yb.shape)
    ka, kb = flat_nonzero(ya >= 0), flat_nonzero((yb >= 0) & ~above)
    ra, rb = torch.div(ka, ya.shape[1], rounding_mode="floor"), torch.div(kb, yb.shape[1], rounding_mode="floor")
    cm = torch.cat([hm.index_select(0, ra), hm.index_select(0, rb)])
    cy = torch.cat([ya.view(-1).index_select(0, ka), yb.view(-1).index_select(0, kb)])
    cx = torch.cat([hx.index_select(0, ra), hx.index_select(0, rb)])
    at = cm * (h * ww) + cx
    d = horiz.index_select(0, at + y0.index_select(0, cy) * ww).mul_(wy0.index_select(0, cy))
    d.add_(horiz.index_select(0, at + y1.index_select(0, cy) * ww).mul_(wy1.index_select(0, cy)))
    d.sub_(th.index_select(0, cm))  # value − T_k at the candidates
    m = mg.index_select(0, cm)
    sure = flat_nonzero(d > m)
    mi, iy, ix = cm.index_select(0, sure), cy.index_select(0, sure), cx.index_select(0, sure)
    unsure = d.abs_() <= m
    if bool(unsure.any()):
        redo = torch.unique(cm[unsure])
        up = _upsample(maps.index_select(0, redo)[:, None], size)[:, 0]
        em, ey, ex = (up > th[redo][:, None, None]).nonzero(as_tuple=True)
        keep = ~torch.isin(mi, redo)
        mi, iy, ix = torch.cat([mi[keep], redo[em]]), torch.cat([iy[keep], ey]), torch.cat([ix[keep], ex])
    return torch.div(hot.index_select(0, mi), u, rounding_mode="floor"), hu.index_select(0, mi), iy * ww + ix


class _Labels:
    """A concept set's label planes recoded for tallies, streamed batch by batch.

    Every pixel gets one code per group: where the set has few distinct combinations of labels
    across its planes (the generated sets), one group whose code stands for all of a pixel's
    labels at once (one lookup per pixel instead of one per plane); otherwise one group per
    plane, code = label + 1. `concepts` (n_codes, K) float64 counts each concept in each code,
    `categories` (n_codes, G) whether a code carries a label of each category."""

    KEYS = 1 << 22  # largest table of label combinations

    def __init__(self, cs: ConceptSet, batch_size: int) -> None:
        k, n = len(cs.concepts), len(cs)
        self.cs = cs
        present = torch.zeros(len(cs.planes), k + 1, dtype=torch.bool)
        for s in range(0, n, batch_size):
            for i, p in enumerate(cs.planes):
                present[i] |= torch.bincount(p[s : s + batch_size].reshape(-1) + 1, minlength=k + 1).bool()
        radix = [int(r) + 1 for r in present[:, 1:].sum(1)]
        self.luts: list[torch.Tensor] | None = None
        self.n_codes = k + 1
        concepts = torch.cat([torch.zeros(1, k, dtype=torch.float64), torch.eye(k, dtype=torch.float64)])
        if math.prod(radix) <= self.KEYS:
            ids = [present[i, 1:].nonzero().squeeze(1) for i in range(len(cs.planes))]
            luts, stride = [], 1
            for i, r in enumerate(radix):
                local = torch.zeros(k + 1, dtype=torch.long)
                local[ids[i] + 1] = torch.arange(1, len(ids[i]) + 1) * stride
                luts.append(local)
                stride *= r
            seen = torch.zeros(stride, dtype=torch.bool)
            for s in range(0, n, batch_size):
                seen |= torch.bincount(self._keys(luts, slice(s, s + batch_size)), minlength=stride).bool()
            keys = seen.nonzero().squeeze(1)
            if len(keys) <= len(cs.planes) * (k + 1):
                self.luts = luts
                self.code_of = torch.full((stride,), -1, dtype=torch.long)
                self.code_of[keys] = torch.arange(len(keys))
                self.n_codes = len(keys)
                concepts = torch.zeros(len(keys), k, dtype=torch.float64)
                stride = 1
                for i, r in enumerate(radix):
                    local = (keys // stride) % r
                    has = local > 0
                    ones = torch.ones(int(has.sum()), dtype=torch.float64)
                    concepts.index_put_((has.nonzero().squeeze(1), ids[i][local[has] - 1]), ones, accumulate=True)
                    stride *= r
        self.concepts = concepts
        cat = F.one_hot(torch.tensor(cs.concept_category, dtype=torch.long), len(cs.categories)).double()
        self.categories = (concepts @ cat) > 0
        self.small = torch.int16 if self.n_codes < 2**15 else torch.int32

    def _keys(self, luts: Sequence[torch.Tensor], part: slice) -> torch.Tensor:
        key = luts[0].index_select(0, self.cs.planes[0][part].reshape(-1) + 1)
        for lut, p in zip(luts[1:], self.cs.planes[1:], strict=True):
            key += lut.index_select(0, p[part].reshape(-1) + 1)
        return key

    def codes(self, part: slice) -> list[torch.Tensor]:
        """The codes of the images of `part`: one (B·H·W,) int64 tensor per group."""
        if self.luts is not None:
            return [self.code_of.index_select(0, self._keys(self.luts, part))]
        return [p[part].reshape(-1) + 1 for p in self.cs.planes]

    def histograms(self, codes: Sequence[torch.Tensor], b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(annotated (B, G) bool: image i carries a label of category g (`ConceptSet.annotated`);
        (n_codes,) int64 pixels of each code over the batch)."""
        ann = torch.zeros(b, self.categories.shape[1], dtype=torch.bool)
        hist = torch.zeros(self.n_codes, dtype=torch.int64)
        offset = (torch.arange(b) * self.n_codes)[:, None]
        for c in codes:
            per_image = torch.bincount((c.view(b, -1) + offset).view(-1), minlength=b * self.n_codes).view(b, -1)
            ann |= ((per_image > 0).float() @ self.categories.float()) > 0
            hist += per_image.sum(0)
        return ann, hist


def dissect(
    model: nn.Module,
    concepts: ConceptSet,
    layers: Sequence[str],
    *,
    quantile: float = 0.005,
    threshold: Literal["streaming", "exact"] = "streaming",
    quantile_on: Literal["raw", "upsampled"] = "raw",
    iou_threshold: float = 0.04,
    permutations: int = 100,
    null_percentile: float = 0.99,
    bins: int = 2048,
    top_k: int = 5,
    batch_size: int = 250,
    seed: int = 0,
) -> ConceptDissection:
    """Dissect every unit of `layers` on `concepts` (see the module docstring)."""
    if not 0.0 < quantile < 1.0:
        raise UserError(f"quantile must lie in (0, 1), got {quantile}")
    if threshold not in ("streaming", "exact"):
        raise UserError(f"threshold must be 'streaming' or 'exact', got {threshold!r}")
    if quantile_on not in ("raw", "upsampled"):
        raise UserError(f"quantile_on must be 'raw' or 'upsampled', got {quantile_on!r}")
    if permutations < 0 or not 0.0 < null_percentile < 1.0:
        raise UserError("permutations must be >= 0 and null_percentile in (0, 1)")
    if not layers:
        raise UserError("no layers to dissect")
    if not concepts.planes:
        raise UserError("the concept set has no labels")
    layers = list(dict.fromkeys(layers))
    cat_index = torch.tensor(concepts.concept_category, dtype=torch.long)

    # pass 1: thresholds and top images
    thresholds, errors, top, map_size = _thresholds(
        model, concepts, layers, quantile, threshold, quantile_on, bins, top_k, batch_size
    )
    small = [n for n, m in map_size.items() if min(m) <= NULL_REQUIRED_AT]
    if permutations == 0 and small:
        raise UserError(
            f"layers {', '.join(small)} have maps of at most {NULL_REQUIRED_AT}x{NULL_REQUIRED_AT}: "
            "their IoU needs the permutation null (permutations > 0)"
        )

    # pass 2: intersections and activation counts, observed and under the null
    counts = _tally(model, concepts, layers, thresholds, permutations, batch_size, seed)

    out_layers: dict[str, LayerDissection] = {}
    units: list[UnitConcept] = []
    for name in layers:
        part = counts.units[name]
        iou = iou_from_counts(counts.inter[part], counts.act[part], counts.area, cat_index)
        if permutations:
            null = iou_from_counts(counts.null_inter(part), counts.act_null[:, part], counts.area, cat_index)
            null_q = _upper_quantile(null, null_percentile)  # (P, U, K) -> (U, K)
            null_top = null.amax(2)  # (P, U): the unit's best IoU over all concepts under each shuffle
            null_max = _upper_quantile(null_top, null_percentile)
            p_max = (1 + (null_top >= iou.amax(1)).sum(0).double()) / (1 + permutations)
        else:
            null_q = torch.zeros_like(iou)
            null_max = torch.zeros(iou.shape[0], dtype=torch.float64)
            p_max = torch.full_like(null_max, float("nan"))
        ld = LayerDissection(
            layer=name, map_size=map_size[name], thresholds=thresholds[name], threshold_error=errors[name],
            iou=iou, null_iou=null_q, null_max=null_max, p_value=p_max, top_images=top[name].indices.clone(),
        )  # fmt: skip
        out_layers[name] = ld
        units += _label_units(ld, concepts, iou_threshold)
    settings = {
        "quantile": quantile, "threshold": threshold, "quantile_on": quantile_on, "iou_threshold": iou_threshold,
        "permutations": permutations, "null_percentile": null_percentile, "bins": bins, "images": len(concepts),
        "concept_set": concepts.identity, "seed": seed,
    }  # fmt: skip
    return ConceptDissection(
        concepts=list(concepts.concepts), categories=list(concepts.categories),
        concept_category=list(concepts.concept_category), layers=out_layers, units=units, settings=settings,
    )  # fmt: skip


def _upper_quantile(x: torch.Tensor, q: float, dim: int = 0) -> torch.Tensor:
    """`torch.quantile(x, q, dim=dim)` (linear interpolation) bit for bit, from the top
    n − ⌊q·(n − 1)⌋ values along `dim` instead of a full sort (2 of 100 at q = 0.99, 0.5% of the
    values at q = 0.995)."""
    n = x.shape[dim]
    if n == 0 or bool(x.isnan().any()):
        return torch.quantile(x, q, dim=dim)
    rank = torch.tensor(q, dtype=x.dtype) * (n - 1)
    below = int(rank.long())
    above = int(rank.ceil().long())
    if n - below <= 2:  # the two largest values (with multiplicity) by reductions, no sort
        first = x.amax(dim, keepdim=True)
        second = torch.where(x < first, x, -math.inf).amax(dim)
        second = torch.where((x == first).sum(dim) > 1, first.squeeze(dim), second)
        top = [first.squeeze(dim), second if n > 1 else first.squeeze(dim)]
    else:
        top = list(torch.topk(x, n - below, dim=dim).values.movedim(dim, 0))  # top[j]: the (n − 1 − j)-th smallest
    return top[n - 1 - below].clone().lerp_(top[n - 1 - above], rank - below)


def _thresholds(
    model: nn.Module, concepts: ConceptSet, layers: list[str], quantile: float, threshold: str,
    quantile_on: str, bins: int, top_k: int, batch_size: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, RunningTopK], dict[str, Size]]:  # fmt: skip
    """Pass 1: T_k (float64) and its error bound per layer, the top images, the map sizes.

    The streaming sketch bins exactly only the top TAIL_FACTOR·quantile of each unit's values
    (`StreamingQuantile(tail=...)`), which gives the full sketch's T_k; should T_k fall below that
    part after all (a set whose order drifts), that layer's values are streamed once more into a
    full sketch."""
    x = concepts.images
    size = (int(x.shape[2]), int(x.shape[3]))
    tail = TAIL_FACTOR * quantile if TAIL_FACTOR * quantile < 0.5 else None
    quant = {name: StreamingQuantile(bins, tail=tail) for name in layers}
    exact: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    top: dict[str, RunningTopK] = {name: RunningTopK(top_k) for name in layers}
    map_size: dict[str, Size] = {}

    def values(a: torch.Tensor) -> torch.Tensor:
        return _upsample(a, size) if quantile_on == "upsampled" else a

    def on_map(s: int, name: str, a: torch.Tensor) -> None:
        map_size[name] = (int(a.shape[2]), int(a.shape[3]))
        peak = a.amax((2, 3))
        top[name].update(peak, s)
        v = values(a)
        if threshold == "exact":
            exact[name].append(v.transpose(0, 1).reshape(v.shape[1], -1).cpu())
        else:
            quant[name].update_maps(v, map_max=peak if v is a else None)

    _stream(model, layers, x, batch_size, on_map)
    if threshold == "streaming":
        again = [name for name in layers if not bool(quant[name].covers(1.0 - quantile).all())]
        if again:
            log.info("dissect: T_k of %s lies below the streamed tail; streaming those layers again", ", ".join(again))
            quant.update({name: StreamingQuantile(bins) for name in again})
            _stream(model, again, x, batch_size, lambda _s, name, a: quant[name].update_maps(values(a)))
    thresholds: dict[str, torch.Tensor] = {}
    errors: dict[str, torch.Tensor] = {}
    for name in layers:
        if threshold == "exact":
            vals = torch.cat(exact.pop(name), 1).double()
            if vals.shape[1] > EXACT_LIMIT:
                raise UserError(
                    f"exact thresholds of {name} need {vals.shape[1]} values per unit (limit {EXACT_LIMIT}); "
                    "use threshold='streaming'"
                )
            thresholds[name] = _upper_quantile(vals, 1.0 - quantile, dim=1)  # = torch.quantile
            errors[name] = torch.zeros_like(thresholds[name])
        else:
            thresholds[name] = quant[name].quantile(1.0 - quantile)
            errors[name] = quant[name].width.clone()
    return thresholds, errors, top, map_size


@dataclass
class _Counts:
    """Pass 2's tallies over every layer's units, concatenated in layer order (`units`: each
    layer's slice): inter (U, K), act (U, G), area (K,), act_null (P, U, G); the null's
    intersections are kept per label code and turned into (P, U', K) per slice by `null_inter`."""

    units: dict[str, slice]
    inter: torch.Tensor
    act: torch.Tensor
    area: torch.Tensor
    act_null: torch.Tensor
    inter_null_codes: torch.Tensor  # (P, U, n_codes) int64
    to_concepts: torch.Tensor  # (n_codes, K) float64

    def null_inter(self, part: slice) -> torch.Tensor:
        n = self.inter_null_codes[:, part]
        return (n.reshape(-1, n.shape[2]).double() @ self.to_concepts).view(n.shape[0], n.shape[1], -1)


def _tally(
    model: nn.Module, concepts: ConceptSet, layers: list[str], thresholds: Mapping[str, torch.Tensor],
    permutations: int, batch_size: int, seed: int,
) -> _Counts:  # fmt: skip
    """Pass 2, every layer at once. Per batch the active pixels of every unit are listed once as
    (image, unit, pixel); the observed intersections are one bincount over (unit, label code) and
    the null's, for each shuffle p, the same bincount with the codes read from image perms[p, i]
    instead of image i (the permuted images' codes gathered row by row, NULL_CHUNK shuffles at a
    time). Activation counts under the null are one matrix product over all shuffles."""
    x = concepts.images
    size = (int(x.shape[2]), int(x.shape[3]))
    hw = size[0] * size[1]
    labels = _Labels(concepts, batch_size)
    n_codes, n_cat = labels.n_codes, len(concepts.categories)
    gen = torch.Generator().manual_seed(seed)
    units: dict[str, slice] = {}
    inter = inter_null = torch.zeros(0, dtype=torch.int64)
    act = act_null = torch.zeros(0, dtype=torch.float64)
    code_pixels = torch.zeros(n_codes, dtype=torch.int64)
    t32 = {name: thresholds[name].to(torch.float32) for name in layers}
    found: dict[str, tuple[int, list[torch.Tensor]]] = {}  # layer: (units, [image, unit, pixel])

    def on_map(_s: int, name: str, a: torch.Tensor) -> None:
        found[name] = (int(a.shape[1]), [v.cpu() for v in _active_pixels(a, t32[name].to(a.device), size)])

    def on_batch(s: int, b: int) -> None:
        nonlocal inter, inter_null, act, act_null
        codes = labels.codes(slice(s, s + b))
        ann, hist = labels.histograms(codes, b)
        code_pixels.add_(hist)
        perms = torch.argsort(torch.rand(permutations, b, generator=gen), dim=1) if permutations else None
        img, unit, pix, n_units = [], [], [], 0
        for name in layers:  # every layer's units in one index, in layer order
            k, (i, u, p) = found.pop(name)
            units[name] = slice(n_units, n_units + k)
            img.append(i)
            unit.append(u + n_units)
            pix.append(p)
            n_units += k
        if inter.numel() == 0:
            inter = torch.zeros(n_units, n_codes, dtype=torch.int64)
            act = torch.zeros(n_units, n_cat, dtype=torch.float64)
            inter_null = torch.zeros(permutations, n_units, n_codes, dtype=torch.int64)
            act_null = torch.zeros(permutations, n_units, n_cat, dtype=torch.float64)
        e_img, e_unit = torch.cat(img), torch.cat(unit)
        pos = e_img * hw + torch.cat(pix)
        # (B, U) active pixels per map; float32 sums of at most B·H·W < 2^24 counts are exact
        cnt = torch.bincount(e_img * n_units + e_unit, minlength=b * n_units).view(b, n_units)
        cnt_f = cnt.float() if b * hw < 2**24 else cnt.double()
        ann_f = ann.to(cnt_f.dtype)
        act += (cnt_f.t() @ ann_f).double()
        for c in codes:
            inter.view(-1).add_(torch.bincount(e_unit * n_codes + c.index_select(0, pos), minlength=n_units * n_codes))
        if perms is None:
            return
        # act_null[p, u, g] = Σ_i cnt[i, u] · ann[perms[p, i], g]: one product for all shuffles
        moved_ann = ann_f[perms].transpose(1, 2).reshape(-1, b)  # (P·G, B)
        act_null += (moved_ann @ cnt_f).view(permutations, n_cat, n_units).transpose(1, 2).double()
        chunk = min(NULL_CHUNK, permutations)
        wide = chunk * b * hw >= 2**31 or chunk * n_units * n_codes >= 2**31
        index = torch.int64 if wide else torch.int32
        where = (pos[None, :] + (torch.arange(chunk) * (b * hw))[:, None]).to(index)
        base = ((torch.arange(chunk)[:, None] * n_units + e_unit[None, :]) * n_codes).to(index)
        for c in codes:
            rows = c.to(labels.small).view(b, hw)
            for p0 in range(0, permutations, chunk):
                pc = min(chunk, permutations - p0)
                moved = rows.index_select(0, perms[p0 : p0 + pc].reshape(-1)).view(-1)  # row r: image perms[p, r]
                idx = base[:pc] + moved.index_select(0, where[:pc].view(-1)).view(pc, -1)
                inter_null[p0 : p0 + pc].view(-1).add_(torch.bincount(idx.view(-1), minlength=pc * n_units * n_codes))

    _stream(model, layers, x, batch_size, on_map, on_batch)
    to_concepts = labels.concepts
    return _Counts(
        units=units, inter=inter.double() @ to_concepts, act=act, area=code_pixels.double() @ to_concepts,
        act_null=act_null, inter_null_codes=inter_null, to_concepts=to_concepts,
    )  # fmt: skip


def _label_units(ld: LayerDissection, concepts: ConceptSet, iou_threshold: float) -> list[UnitConcept]:
    units: list[UnitConcept] = []
    for k in range(ld.iou.shape[0]):
        c = int(ld.iou[k].argmax())
        iou, null = float(ld.iou[k, c]), float(ld.null_max[k])
        detector = iou > iou_threshold and iou > null
        cat = concepts.category_of(c)
        units.append(UnitConcept(
            layer=ld.layer, unit=k, label=concepts.concepts[c] if detector else None,
            category=cat if detector else None, concept=concepts.concepts[c], concept_category=cat,
            iou=iou, null_iou=null, p_value=float(ld.p_value[k]), margin=iou - max(iou_threshold, null),
            threshold=float(ld.thresholds[k]), threshold_error=float(ld.threshold_error[k]), detector=detector,
        ))  # fmt: skip
    return units


def unit_masks(
    model: nn.Module, layer: str, unit: int, images: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """For images (T, C, H, W): the unit's upsampled maps (T, H, W) and masks maps > threshold."""
    _, maps = next(_maps(model, [layer], images, max(1, images.shape[0])))
    up = _upsample(maps[layer][:, unit : unit + 1], (int(images.shape[2]), int(images.shape[3])))[:, 0].cpu()
    return up, up > threshold


def generated_concepts(data: Dataset, n: int, *, foreground: float = 0.1, natural: bool = True,
                       seed: int = 0) -> ConceptSet:  # fmt: skip
    """The generated concept set of `n` images shaped like `data`'s, its garment concepts cut from
    a seeded sample of max(n, 1000) training images (the `concepts` stage's default set)."""
    train = data.train.subset(min(len(data.train), max(n, 1000)), seed=seed)
    return generate_concept_set(
        n, data.image_shape, class_images=train.x, class_labels=train.y, class_names=data.classes,
        foreground=foreground, natural=natural, seed=seed,
    )  # fmt: skip


def cached_dissection(
    store: Any, model: nn.Module, concepts: ConceptSet, layers: Sequence[str], **settings: Any
) -> ConceptDissection:
    """`dissect` once per (model weights, concept set, layers, settings) in this run: through
    `store.memo("concepts", ...)` of the run's evidence store, so later stages reuse it."""
    parts: Mapping[str, Any] = {
        "model": store.model_hash(model), "set": concepts.identity, "layers": list(layers), **settings,
    }  # fmt: skip
    result: ConceptDissection = store.memo("concepts", parts, lambda: dissect(model, concepts, layers, **settings))
    return result


# ---------------------------------------------------------------------------------------------
# attack × concept (METHODS §6.6): the concepts of brittle units


@dataclass(frozen=True)
class ConceptFragility:
    """Concepts against the feature quadrants of one model. units: one row per dissected unit
    with its concept and its feature scores (r, quadrant, ...); concepts / categories: per group of
    detectors, Frag = mean(1 − r) (± its standard error) and the share in NRU (95% Wilson);
    enrichment: Fisher exact tests that NRU units carry texture / high-frequency concepts."""

    model: str
    units: list[dict[str, Any]]
    concepts: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    enrichment: list[dict[str, Any]]

    def most_fragile(self, k: int = 3, min_units: int = 2) -> list[dict[str, Any]]:
        """The k concepts with the highest Frag among those carried by at least `min_units` detectors."""
        rows = [r for r in self.concepts if r["units"] >= min_units and r["fragility"] == r["fragility"]]
        return sorted(rows, key=lambda r: (-r["fragility"], r["concept"]))[:k]


def _group(rows: Sequence[Mapping[str, Any]], key: str, model: str) -> list[dict[str, Any]]:


    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    out: list[dict[str, Any]] = []
    for name, members in sorted(groups.items()):
        frag = [1.0 - float(m["r"]) for m in members if math.isfinite(float(m["r"]))]
        mean = sum(frag) / len(frag) if frag else math.nan
        se = math.sqrt(sum((f - mean) ** 2 for f in frag) / (len(frag) - 1) / len(frag)) if len(frag) > 1 else math.nan
        nru = sum(m["quadrant"] == "NRU" for m in members)
        lo, hi = wilson_interval(nru, len(members))
        row: dict[str, Any] = {"model": model, key: name}
        if key == "concept":
            row["category"] = members[0]["category"]
        row.update(
            units=len(members), fragility=mean, fragility_se=se, nru=nru, nru_share=nru / len(members),
            nru_low=lo, nru_high=hi, mean_iou=sum(float(m["iou"]) for m in members) / len(members),
        )  # fmt: skip
        out.append(row)
    return out


def _fisher(units: Sequence[Mapping[str, Any]], is_group: Any, what: str, scope: str, model: str) -> dict[str, Any]:
    a = sum(1 for u in units if u["quadrant"] == "NRU" and is_group(u))
    b = sum(1 for u in units if u["quadrant"] == "NRU" and not is_group(u))
    c = sum(1 for u in units if u["quadrant"] != "NRU" and is_group(u))
    d = sum(1 for u in units if u["quadrant"] != "NRU" and not is_group(u))
    res = fisher_exact([[a, b], [c, d]], alternative="greater")
    return {
        "model": model, "concepts": what, "units": scope, "nru_in_group": a, "nru_outside": b,
        "other_in_group": c, "other_outside": d,
        "nru_share_in_group": a / (a + c) if a + c else float("nan"),
        "nru_share_outside": b / (b + d) if b + d else float("nan"),
        "odds_ratio": float(res.statistic), "p_value": float(res.pvalue),
    }  # fmt: skip


def concept_fragility(
    dissection: ConceptDissection,
    feature_rows: Sequence[Mapping[str, Any]],
    model: str,
    high_frequency: frozenset[str] | None = None,
) -> ConceptFragility:
    """Join the dissection with per-unit feature scores (rows with layer, unit, r, quadrant, ρ, γ,
    s, as `FeatureScores.rows()` gives) on (layer, unit), and group the detectors by concept and by
    category. Enrichment: one-sided Fisher exact tests of "NRU units are more often texture
    (resp. high-frequency) units than the other units", over the detectors and over every unit
    with its best concept."""
    hf = HIGH_FREQUENCY if high_frequency is None else high_frequency
    scores = {(str(r["layer"]), int(r["unit"])): r for r in feature_rows}
    units: list[dict[str, Any]] = []
    for u in dissection.units:
        f = scores.get((u.layer, u.unit))
        if f is None:
            continue
        units.append({
            "model": model, "layer": u.layer, "unit": u.unit, "label": u.label, "category": u.category,
            "concept": u.concept, "concept_category": u.concept_category, "iou": u.iou, "detector": u.detector,
            "quadrant": f["quadrant"], "strict_quadrant": f.get("strict_quadrant"), "rho": f["rho"],
            "gamma": f["gamma"], "r": f["r"], "s": f["s"], "sigma": f.get("sigma"),
        })  # fmt: skip
    if not units:
        raise UserError("no dissected unit has feature scores: dissect the layers the features were scored on")
    dets = [u for u in units if u["detector"]]
    concept_rows = _group([{**u, "concept": u["label"]} for u in dets], "concept", model)
    category_rows = _group(dets, "category", model)
    best = [{**u, "label": u["concept"], "category": u["concept_category"]} for u in units]
    enrichment = []
    for scope, pool in (("detectors", dets), ("all units (best concept)", best)):
        if pool:
            enrichment.append(_fisher(pool, lambda u: u["category"] == "texture", "texture", scope, model))
            enrichment.append(_fisher(pool, lambda u: u["label"] in hf, "high-frequency", scope, model))
    return ConceptFragility(model, units, concept_rows, category_rows, enrichment)


def grad_cam(model: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (captum's LayerGradCam, ReLU'd) of class `target` (N,) at `layer` for images
    x (N, C, H, W), upsampled bilinearly to (N, H, W)."""
    from captum.attr import LayerAttribution, LayerGradCam

    module = dict(model.named_modules())[resolve_layer(model, layer)]
    device = model_device(model)
    with eval_mode(model):
        attr = LayerGradCam(model, module).attribute(
            x.to(device), target=target.to(device).tolist(), relu_attributions=True
        )
    up = LayerAttribution.interpolate(attr.detach(), (int(x.shape[2]), int(x.shape[3])), "bilinear")
    return up[:, 0].cpu()


# ---------------------------------------------------------------------------------------------
# unit ablation (METHODS §4.2, PNAS 2020)


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) float64: per class c, BA_c = (recall_c + TNR_c) / 2 of the decision "argmax = c";
    NaN for a class with no image (or only images) of it. pred, y: (N,) int."""
    p = torch.nn.functional.one_hot(pred.long(), num_classes).bool()
    t = torch.nn.functional.one_hot(y.long(), num_classes).bool()
    pos, neg = t.sum(0).double(), (~t).sum(0).double()
    recall = (p & t).sum(0).double() / pos
    tnr = (~p & ~t).sum(0).double() / neg
    return 0.5 * (recall + tnr)


@dataclass(frozen=True)
class Ablation:
    """Balanced accuracy per class with each unit of `layer` zeroed: baseline (K,), ablated
    (U, K); `drop` = baseline − ablated (the PNAS ranking of units per class)."""

    layer: str
    units: list[int]
    baseline: torch.Tensor
    ablated: torch.Tensor

    @property
    def drop(self) -> torch.Tensor:
        return self.baseline[None, :] - self.ablated

    def ranking(self, cls: int) -> list[int]:
        """Units by decreasing BA drop for class `cls` (ties: the smaller unit first)."""
        d = torch.nan_to_num(self.drop[:, cls], nan=-math.inf)
        order = torch.sort(d, descending=True, stable=True).indices
        return [self.units[i] for i in order.tolist()]


def _predict_with(model: nn.Module, x: torch.Tensor, edits: Sequence[Any], batch_size: int) -> torch.Tensor:
    device = model_device(model)
    out = []
    with eval_mode(model), torch.no_grad(), intervene(model, edits):
        for s in range(0, x.shape[0], batch_size):
            out.append(model(x[s : s + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out)


def unit_ablation(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layer: str,
    units: Sequence[int] | None = None,
    num_classes: int | None = None,
    batch_size: int = 250,
) -> Ablation:
    """Zero each unit's whole feature map in turn (METHODS §4.2) and measure the balanced accuracy
    per class on images x (N, C, H, W) with labels y (N,). One pass over x per unit."""
    k = int(num_classes if num_classes is not None else int(y.max()) + 1)
    base = balanced_accuracy(_predict_with(model, x, [], batch_size), y, k)
    if units is None:
        with eval_mode(model), torch.no_grad(), record(model, [layer]) as rec:
            model(x[:1].to(model_device(model)))
        units = list(range(int(rec.outputs[layer].shape[1])))
    rows = [balanced_accuracy(_predict_with(model, x, [zero_channels(layer, [u])], batch_size), y, k) for u in units]
    return Ablation(layer, list(units), base, torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.float64))


def remove_units(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layer: str,
    ranked: Sequence[int],
    cls: int,
    counts: Sequence[int] = (1, 2, 3, 4, 5, 20, 64, 128, 256),
    keep: bool = False,
    num_classes: int | None = None,
    batch_size: int = 250,
) -> list[dict[str, Any]]:
    """BA of class `cls` after zeroing the first N units of `ranked` (or, with `keep`, every unit
    of the layer but those N), for each N in `counts` not above len(ranked) (PNAS Fig. 3)."""
    k = int(num_classes if num_classes is not None else int(y.max()) + 1)
    with eval_mode(model), torch.no_grad(), record(model, [layer]) as rec:
        model(x[:1].to(model_device(model)))
    all_units = range(int(rec.outputs[layer].shape[1]))
    out = []
    for n in [c for c in counts if c <= len(ranked)]:
        chosen = set(ranked[:n])
        zeroed = [u for u in all_units if u not in chosen] if keep else sorted(chosen)
        pred = _predict_with(model, x, [zero_channels(layer, zeroed)], batch_size)
        out.append({"layer": layer, "class": cls, "n": n, "mode": "keep" if keep else "remove",
                    "balanced_accuracy": float(balanced_accuracy(pred, y, k)[cls])})  # fmt: skip
    return out
