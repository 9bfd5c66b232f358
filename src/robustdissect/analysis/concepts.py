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

Also here: `concept_fragility` (§6.6: per concept and category, mean(1 − r) of its units and
their share in the dangerous quadrant, Fisher enrichment tests), `grad_cam` (captum's
LayerGradCam) and the §4.2 unit ablation (`unit_ablation`, `remove_units`, balanced accuracy).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.concepts import ConceptSet
from ..errors import UserError
from ..modelutil import eval_mode, model_device
from ..probe import RunningTopK, record
from ..probe.quantiles import StreamingQuantile

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
_CHUNK = 10  # permutations tallied together (memory: 10 × active pixels)


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
            out = {}
            for name in layers:
                a = rec.outputs[name].float()
                if a.ndim == 2:
                    a = a[:, :, None, None]
                if a.ndim != 4:
                    raise UserError(f"layer '{name}' outputs {tuple(a.shape)}; dissection needs (N, C, H, W) maps")
                out[name] = a
            yield s, out


def _upsample(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(a.shape[2:]) == size:
        return a
    return F.interpolate(a, size=size, mode="bilinear", align_corners=False)


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
    x = concepts.images
    size = (int(x.shape[2]), int(x.shape[3]))
    hw = size[0] * size[1]
    layers = list(dict.fromkeys(layers))
    k_concepts = len(concepts.concepts)
    cat_index = torch.tensor(concepts.concept_category, dtype=torch.long)
    if not concepts.planes:
        raise UserError("the concept set has no labels")
    area = torch.zeros(k_concepts, dtype=torch.float64)  # |L_c|, summed batch by batch in pass 2

    # pass 1: thresholds and top images
    quant: dict[str, StreamingQuantile] = {name: StreamingQuantile(bins) for name in layers}
    exact: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    top: dict[str, RunningTopK] = {name: RunningTopK(top_k) for name in layers}
    map_size: dict[str, tuple[int, int]] = {}
    for s, maps in _maps(model, layers, x, batch_size):
        for name, a in maps.items():
            map_size[name] = (int(a.shape[2]), int(a.shape[3]))
            top[name].update(a.amax((2, 3)), s)
            v = _upsample(a, size) if quantile_on == "upsampled" else a
            flat = v.transpose(0, 1).reshape(v.shape[1], -1)
            if threshold == "exact":
                exact[name].append(flat.cpu())
            else:
                quant[name].update(flat)
    small = [n for n, m in map_size.items() if min(m) <= NULL_REQUIRED_AT]
    if permutations == 0 and small:
        raise UserError(
            f"layers {', '.join(small)} have maps of at most {NULL_REQUIRED_AT}x{NULL_REQUIRED_AT}: "
            "their IoU needs the permutation null (permutations > 0)"
        )
    thresholds: dict[str, torch.Tensor] = {}
    errors: dict[str, torch.Tensor] = {}
    for name in layers:
        if threshold == "exact":
            values = torch.cat(exact.pop(name), 1).double()
            if values.shape[1] > EXACT_LIMIT:
                raise UserError(
                    f"exact thresholds of {name} need {values.shape[1]} values per unit (limit {EXACT_LIMIT}); "
                    "use threshold='streaming'"
                )
            thresholds[name] = torch.quantile(values, 1.0 - quantile, dim=1)
            errors[name] = torch.zeros_like(thresholds[name])
        else:
            thresholds[name] = quant[name].quantile(1.0 - quantile)
            errors[name] = quant[name].width.clone()

    # pass 2: intersections and activation counts, observed and under the null
    gen = torch.Generator().manual_seed(seed)
    n_cat = len(concepts.categories)
    inter = {n: torch.zeros(0, dtype=torch.float64) for n in layers}
    act = {n: torch.zeros(0, dtype=torch.float64) for n in layers}
    inter_null = {n: torch.zeros(0, dtype=torch.float64) for n in layers}
    act_null = {n: torch.zeros(0, dtype=torch.float64) for n in layers}
    for s, maps in _maps(model, layers, x, batch_size):
        b = next(iter(maps.values())).shape[0]
        part = slice(s, s + b)
        ann = concepts.annotated(part).double()  # (B, G)
        area += concepts.areas(part)
        # (n_planes, B·H·W) int32 labels: half the memory traffic of int64 in the gathers below
        lab = torch.stack([p[part].reshape(-1) for p in concepts.planes]).to(torch.int32)
        perms = torch.argsort(torch.rand(permutations, b, generator=gen), dim=1) if permutations else None
        for name, a in maps.items():
            u = a.shape[1]
            if inter[name].numel() == 0:
                inter[name] = torch.zeros(u, k_concepts, dtype=torch.float64)
                act[name] = torch.zeros(u, n_cat, dtype=torch.float64)
                inter_null[name] = torch.zeros(permutations, u, k_concepts, dtype=torch.float64)
                act_null[name] = torch.zeros(permutations, u, n_cat, dtype=torch.float64)
            t = thresholds[name].to(a.device, torch.float32)
            # bilinear values are convex combinations of the raw map, so only maps whose raw
            # maximum exceeds T_k can have active pixels: upsample those alone
            hot_b, hot_u = (a.amax((2, 3)) > t[None, :]).nonzero(as_tuple=True)
            maps_hot = _upsample(a[hot_b, hot_u][:, None], size)[:, 0]  # (M, H, W)
            im, iy, ix = (maps_hot > t[hot_u][:, None, None]).cpu().nonzero(as_tuple=True)
            ib, iu = hot_b.cpu()[im], hot_u.cpu()[im]
            pix = iy * size[1] + ix
            cnt = torch.bincount(ib * u + iu, minlength=b * u).view(b, u).double()  # (B, U) active pixels
            act[name] += cnt.t() @ ann
            iu32 = iu.to(torch.int32)
            inter[name] += _tally(iu32, _gather(lab, ib * hw + pix), u, k_concepts)
            if perms is not None:
                act_null[name] += torch.einsum("bu,pbg->pug", cnt, ann[perms])
                for chunk in range(0, permutations, _CHUNK):
                    # (n_planes, P', nnz): the labels each active pixel meets when the masks are shuffled
                    where = perms[chunk : chunk + _CHUNK][:, ib] * hw + pix
                    inter_null[name][chunk : chunk + _CHUNK] += _tally(iu32, _gather(lab, where), u, k_concepts)

    out_layers: dict[str, LayerDissection] = {}
    units: list[UnitConcept] = []
    for name in layers:
        iou = iou_from_counts(inter[name], act[name], area, cat_index)
        if permutations:
            null = iou_from_counts(inter_null[name], act_null[name], area, cat_index)  # (P, U, K)
            null_q = torch.quantile(null, null_percentile, dim=0)
            null_top = null.amax(2)  # (P, U): the unit's best IoU over all concepts under each shuffle
            null_max = torch.quantile(null_top, null_percentile, dim=0)
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


def _gather(planes: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """planes (n_planes, M) at flat positions `where` (any shape) -> (n_planes, *where.shape);
    `take` per plane is the fastest gather on the CPU here."""
    return torch.stack([p.take(where) for p in planes])


def _tally(units: torch.Tensor, labels: torch.Tensor, u: int, k: int) -> torch.Tensor:
    """Counts of (unit, concept) over active pixels. units: (nnz,) int32; labels: (n_planes, nnz)
    -> (U, K), or (n_planes, P, nnz) under P permutations -> (P, U, K); label -1 (none) falls in a
    dropped extra column."""
    perm = labels.ndim == 3
    p = labels.shape[1] if perm else 1
    width = u * (k + 1)
    if p * width >= 2**31:
        raise UserError(f"{u} units x {k} concepts x {p} permutations exceed the counter range; use fewer")
    base = units * (k + 1) + 1
    if perm:
        base = base + (torch.arange(p, dtype=torch.int32) * width).unsqueeze(1)
    counts = torch.bincount((base + labels).flatten(), minlength=p * width).double()
    return counts.view(p, u, k + 1)[..., 1:] if perm else counts.view(u, k + 1)[:, 1:]


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

    from ..evaluation import wilson_interval

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
    from scipy.stats import fisher_exact

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
    from ..data.concepts import HIGH_FREQUENCY

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

    from ..models.layers import resolve_layer

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
    from ..probe import intervene

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
    from ..probe import zero_channels

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
    from ..probe import zero_channels

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
