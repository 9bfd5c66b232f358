"""The unit explorer: `units.html`, one self-contained page with every analysed unit of the run's
model as a row — layer, unit, concept and IoU, category, quadrant, preferred class, ρ, γ̂, r, s,
σ — sortable and filterable in the browser; opening a unit shows its top images (highest clean
response f among the analysed images) with the region above its threshold T_k, the clean row
above the same images after the run's PGD, with f, the label and the prediction under each.

The page is one file: inline CSS and JS (no library), the data as JSON in a
`<script type="application/json">` block in which every `<`, `>` and `&` is escaped (no string can
close the block), images as PNG data URIs: one atlas of the distinct top images, clean and
attacked, stored once however many units share them, and per unit one small strip of its masks
(transparent outside the region), laid over the atlas's cells in the browser. The images are
decoded only when a unit is opened. Strings reach the page through `textContent` only, never as
HTML, and a Content-Security-Policy forbids every network request.

Nothing here attacks or scores: the `explorer` stage hands over the features' scores (f on the
clean and the attacked images), the run's PGD examples from the evidence store and the
dissection's thresholds. What is computed here is one forward pass over each unit's top images,
clean and attacked, for the maps its masks are cut from.

    rows = explorer_rows(scores, dissection, sigma, classes)
    images = unit_images(model, layers, x, x_adv, top_images(scores.f_clean, 5), thresholds)
    atlas = build_atlas(x, x_adv, images, cell_size(28, 28, 64), labels)
    strips = [png_uri(mask_png(images.masks[i], images.masks_adv[i])) for i in range(len(rows))]
    units = attach_images(rows, images, strips, atlas["positions"], f_clean, f_adv)
    page = render_explorer(units, {**meta, "atlas": atlas})
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jinja2 import Environment, FunctionLoader, select_autoescape
from markupsafe import Markup
from PIL import Image
from torch import Tensor, nn

from .. import resources
from ..analysis.concepts import ConceptDissection
from ..analysis.features import FeatureScores
from ..errors import UserError
from ..modelutil import eval_mode, model_device
from ..probe import record
from ..probe.quantiles import StreamingQuantile

__all__ = [
    "COLUMNS",
    "UnitImages",
    "as_number",
    "atlas_png",
    "attach_images",
    "build_atlas",
    "cell_size",
    "explorer_rows",
    "map_thresholds",
    "mask_png",
    "png_uri",
    "render_explorer",
    "script_json",
    "top_images",
    "unit_images",
]

PAGE = "units.html"
# (key, header, type, tooltip); type: layer / quadrant (their own order), int, num, text
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("layer", "layer", "layer", "analysed layer (hook point), in depth order"),
    ("unit", "unit", "int", "channel index"),
    ("concept", "concept", "text", "best concept by IoU (Network Dissection); grey: not a detector"),
    ("iou", "IoU", "num", "IoU of the best concept, summed over the concept set"),
    ("category", "category", "text", "category of the best concept"),
    ("quadrant", "quadrant", "quadrant", "RU robust & useful, NRU non-robust & useful (dangerous), RL robust & "
     "useless, NL non-robust & useless (noise)"),
    ("class", "class c*", "text", "the class the unit is most useful for (argmax of ρ^bal)"),
    ("rho", "ρ", "num", "balanced usefulness ρ = max_c ½(E[f | y=c] − E[f | y≠c])"),
    ("gamma", "γ̂", "num", "robust usefulness under the attack set (an upper bound of the true γ)"),
    ("r", "r", "num", "retention r = γ̂ / ρ"),
    ("s", "s", "num", "stability s = E|f(x + δ*) − f(x)| under the model-level PGD"),
    ("sigma", "σ", "num", "neuron sensitivity σ (Eq. 1) from the sensitivity stage; blank where it did not "
     "analyse the layer"),
)  # fmt: skip
QUADRANT_COLOURS = {"RU": "#2a9d8f", "NRU": "#e63946", "RL": "#8d99ae", "NL": "#f4a261"}
TINT = (1.0, 1.0, 0.0)  # the concepts figures' mask colour (matplotlib's autumn at 1), alpha 0.55
TINT_ALPHA = 0.55


def as_number(v: Any) -> float | None:
    """A finite number as the tables write it (6 significant digits), else None (blank)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return float(f"{f:.6g}") if math.isfinite(f) else None


# ---------------------------------------------------------------------------------------------
# the table


def explorer_rows(
    scores: FeatureScores,
    dissection: ConceptDissection | None = None,
    sigma: Mapping[tuple[str, int], float] | None = None,
    classes: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """One row per analysed unit of `scores` (its order: layers in depth order, then units): the
    features' ρ, γ̂, r, s, quadrants and preferred class, the dissection's best concept, IoU,
    category and detector flag where it dissected the unit (else None), σ from `sigma`
    ({(layer, unit): σ}) where given (else None). Numbers as the CSV tables write them."""
    dissected = {(u.layer, u.unit): u for u in dissection.units} if dissection is not None else {}
    sig = sigma or {}
    out = []
    for row in scores.rows():
        layer, unit = str(row["layer"]), int(row["unit"])
        d = dissected.get((layer, unit))
        cls = int(row["class"])
        out.append({
            "id": f"{layer}:{unit}", "layer": layer, "unit": unit,
            "concept": d.concept if d is not None else None,
            "detector": bool(d.detector) if d is not None else None,
            "iou": as_number(d.iou) if d is not None else None,
            "category": d.concept_category if d is not None else None,
            "quadrant": str(row["quadrant"]), "strict_quadrant": str(row["strict_quadrant"]),
            "class": str(classes[cls]) if 0 <= cls < len(classes) else str(cls),
            "rho": as_number(row["rho"]), "gamma": as_number(row["gamma"]), "r": as_number(row["r"]),
            "s": as_number(row["s"]),
            "sigma": as_number(sig.get((layer, unit))),
            "feature_attacked": bool(row["feature_attacked"]),
            "threshold": None,
        })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# top images and their masks


def top_images(f_clean: Tensor, k: int) -> Tensor:
    """(U, k') positions of each unit's k highest clean responses in f (N, U), highest first,
    ties to the smaller position; k' = min(k, N)."""
    kk = min(int(k), int(f_clean.shape[0]))
    score = torch.nan_to_num(f_clean.t().double(), nan=-math.inf)
    return torch.sort(score, dim=1, descending=True, stable=True).indices[:, :kk]


def _forward(
    model: nn.Module, layers: Sequence[str], x: Tensor, batch_size: int
) -> Iterator[tuple[int, Tensor, dict[str, Tensor]]]:
    """(start, logits, {layer: (B, C, h, w) maps}) per batch of x (fc outputs as 1×1 maps)."""
    device = model_device(model)
    with eval_mode(model), torch.no_grad(), record(model, list(layers)) as rec:
        for s in range(0, x.shape[0], batch_size):
            rec.reset()
            logits = model(x[s : s + batch_size].to(device)).float().cpu()
            maps = {}
            for name in layers:
                a = rec.outputs[name].float()
                if a.ndim == 2:
                    a = a[:, :, None, None]
                if a.ndim != 4:
                    raise UserError(f"layer '{name}' outputs {tuple(a.shape)}; the explorer needs (N, C, H, W) maps")
                maps[name] = a
            yield s, logits, maps


def map_thresholds(
    model: nn.Module, layers: Sequence[str], x: Tensor, quantile: float = 0.005, bins: int = 2048,
    batch_size: int = 250,
) -> Tensor:  # fmt: skip
    """T_k by the dissection's rule (the (1 − quantile) quantile of the unit's raw map values, one
    streaming pass, error ≤ one bin width) over images x, for every unit of `layers`: (U,)
    float64, the layers' units concatenated. For units that no dissection covers."""
    quant = {name: StreamingQuantile(bins) for name in layers}
    for _s, _logits, maps in _forward(model, layers, x, batch_size):
        for name, a in maps.items():
            quant[name].update(a.transpose(0, 1).reshape(a.shape[1], -1))
    return torch.cat([quant[name].quantile(1.0 - quantile) for name in layers])


def cell_size(h: int, w: int, cell: int) -> tuple[int, int]:
    """The displayed cell of an h × w image: native size up to `cell` pixels a side, else shrunk."""
    if max(h, w) <= cell:
        return h, w
    f = cell / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


@dataclass(frozen=True)
class UnitImages:
    """Each unit's top images among the analysed ones. top: (U, k) positions; masks / masks_adv:
    (U, k, h, w) bool, the region where the unit's upsampled map exceeds its threshold (at the cell
    size, see `cell_size`); share / share_adv (U, k): the region's share of the image (full
    resolution); response / response_adv (U, k): the spatial mean of the unit's map (the features'
    response a); pred / pred_adv (U, k): the model's prediction."""

    top: Tensor
    masks: Tensor
    masks_adv: Tensor
    share: Tensor
    share_adv: Tensor
    response: Tensor
    response_adv: Tensor
    pred: Tensor
    pred_adv: Tensor


def unit_images(
    model: nn.Module,
    layers: Sequence[str],
    x: Tensor,
    x_adv: Tensor,
    top: Tensor,
    thresholds: Tensor,
    cell: int = 64,
    batch_size: int = 250,
) -> UnitImages:
    """Masks of every unit (the layers' units concatenated, U = Σ C_l) on its top images `top`
    (U, k) — positions in x (N, C, H, W) and in its attacked copy x_adv — cut at `thresholds`
    (U,): one forward pass over the distinct top images, clean and attacked, in batches; the maps
    are upsampled bilinearly to the image size as in the dissection, and only the (image, unit)
    pairs shown are kept, so memory does not grow with the layers' sizes."""
    u_all, k = int(top.shape[0]), int(top.shape[1])
    h_img, w_img = int(x.shape[2]), int(x.shape[3])
    ch, cw = cell_size(h_img, w_img, cell)
    uniq, inv = torch.unique(top, return_inverse=True)  # inv (U, k): position in uniq
    thr = thresholds.to(torch.float32)
    out = {}
    for which, images in (("clean", x), ("adv", x_adv)):
        masks = torch.zeros(u_all, k, ch, cw, dtype=torch.bool)
        share = torch.zeros(u_all, k, dtype=torch.float64)
        response = torch.zeros(u_all, k, dtype=torch.float64)
        pred = torch.zeros(u_all, k, dtype=torch.long)
        offset = 0
        for s, logits, maps in _forward(model, layers, images[uniq], batch_size):
            b = int(logits.shape[0])
            here = (inv >= s) & (inv < s + b)  # (U, k) pairs whose image is in this batch
            pred[here] = logits.argmax(1)[inv[here] - s]
            offset = 0
            for name in layers:
                a = maps[name]
                c = int(a.shape[1])
                uu, jj = here[offset : offset + c].nonzero(as_tuple=True)
                if uu.numel():
                    m = a[(inv[offset + uu, jj] - s).to(a.device), uu.to(a.device)]  # (M, h, w)
                    response[offset + uu, jj] = m.mean((1, 2)).double().cpu()
                    up = F.interpolate(m[:, None], size=(h_img, w_img), mode="bilinear", align_corners=False)
                    full = (up[:, 0] > thr[offset + uu].to(up.device)[:, None, None]).cpu()
                    share[offset + uu, jj] = full.double().mean((1, 2))
                    if (ch, cw) != (h_img, w_img):
                        full = F.interpolate(full[:, None].float(), size=(ch, cw), mode="area")[:, 0] > 0.5
                    masks[offset + uu, jj] = full
                offset += c
        if offset != u_all:
            raise UserError(f"the layers have {offset} units, the top images cover {u_all}")
        out[which] = (masks, share, response, pred)
    (m, sh, r, p), (ma, sha, ra, pa) = out["clean"], out["adv"]
    return UnitImages(top.clone(), m, ma, sh, sha, r, ra, p, pa)


# ---------------------------------------------------------------------------------------------
# PNGs: one atlas of the shown images, one mask strip per unit

ATLAS_COLUMNS = 20


def _to_cells(images: Tensor, h: int, w: int) -> Tensor:
    """(M, C, H, W) in [0, 1] -> (M, 1 or 3, h, w): shrunk when larger ("area"), channels other
    than 1 or 3 shown as their mean."""
    a = images.detach().float().cpu().clamp(0, 1)
    if tuple(a.shape[2:]) != (h, w):
        a = F.interpolate(a, size=(h, w), mode="area")
    if a.shape[1] not in (1, 3):
        a = a.mean(1, keepdim=True)
    return a


def atlas_png(images: Tensor, cell: tuple[int, int], columns: int = ATLAS_COLUMNS) -> bytes:
    """One PNG holding `images` (M, C, H, W) in [0, 1] as cells of `cell` (h, w) pixels, row by
    row, `columns` to a row: image m at row m // columns, column m % columns. Grey images become
    an 8-bit grey PNG, three-channel ones RGB."""
    h, w = cell
    a = _to_cells(images, h, w)
    m, c = int(a.shape[0]), int(a.shape[1])
    cols = max(1, min(columns, m))
    rows = max(1, math.ceil(m / cols))
    canvas = torch.zeros(rows * cols, c, h, w)
    canvas[:m] = a
    px = (canvas * 255).round().clamp(0, 255).to(torch.uint8)
    grid = px.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c).numpy()
    img = Image.fromarray(grid[:, :, 0], mode="L") if c == 1 else Image.fromarray(grid, mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def mask_png(masks: Tensor, masks_adv: Tensor) -> bytes:
    """One unit's strip: its masks (k, h, w) in a row, the masks on the attacked images in a second
    row, as an indexed PNG that is transparent outside the region and the concepts figures' yellow
    at alpha 0.55 inside it; laid over the images (the atlas) it tints them as those figures do."""
    k, h, w = (int(v) for v in masks.shape)
    both = torch.stack([masks.cpu(), masks_adv.cpu()])  # (2, k, h, w)
    grid = both.permute(0, 2, 1, 3).reshape(2 * h, k * w).to(torch.uint8).numpy()
    img = Image.fromarray(grid, mode="P")
    img.putpalette([0, 0, 0, *(round(255 * t) for t in TINT)])
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True, transparency=bytes([0, round(255 * TINT_ALPHA)]))
    return buf.getvalue()


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------
# the page


def script_json(obj: Any) -> str:
    """JSON for a `<script type="application/json">` block: NaN refused, and `<`, `>`, `&`
    written as \\u escapes, so no string (a layer called `</script>`) can end the block."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def attach_images(
    rows: Sequence[Mapping[str, Any]],
    images: UnitImages | None,
    strips: Sequence[str | None],
    atlas_positions: Sequence[int] = (),
    f_clean: Tensor | None = None,
    f_adv: Tensor | None = None,
) -> list[dict[str, Any]]:
    """The page's units: each row (explorer_rows) with its mask strip's data URI (`strips`, None
    for none) and `top`, its shown images column by column: `cell`, the atlas cell of each clean
    image (`atlas_positions`: the analysed positions the atlas holds; the attacked copy of cell t
    is cell M + t), its f clean and attacked (`f_clean`, `f_adv`: (N, U), the features'
    standardised responses) and the region's share of the image, clean and attacked. `images` has
    the rows' unit order."""
    cell_of = {int(p): t for t, p in enumerate(atlas_positions)}
    units = []
    for i, row in enumerate(rows):
        u = dict(row)
        u["strip"] = strips[i] if i < len(strips) else None
        top: dict[str, list[Any]] = {"cell": [], "f": [], "f_adv": [], "region": [], "region_adv": []}
        if images is not None and u["strip"] is not None:
            for j, pos in enumerate(images.top[i].tolist()):
                top["cell"].append(cell_of[pos])
                top["f"].append(as_number(f_clean[pos, i]) if f_clean is not None else None)
                top["f_adv"].append(as_number(f_adv[pos, i]) if f_adv is not None else None)
                top["region"].append(round(float(images.share[i, j]), 4))
                top["region_adv"].append(round(float(images.share_adv[i, j]), 4))
        u["top"] = top
        units.append(u)
    return units


def build_atlas(
    x: Tensor, x_adv: Tensor, images: UnitImages, cell: tuple[int, int], labels: Sequence[int] = ()
) -> dict[str, Any]:
    """The atlas of the distinct top images of `images`: cells 0..M−1 the clean images at
    `positions` (ascending) of x, cells M..2M−1 the same of x_adv. For the page: {"uri", "grid":
    [rows, columns], "cell": [h, w], "positions", "labels", "pred", "pred_adv"} (per clean cell)."""
    positions = torch.unique(images.top)
    both = torch.cat([x[positions], x_adv[positions]])
    m = int(both.shape[0])
    cols = max(1, min(ATLAS_COLUMNS, m))
    pred = dict(zip(images.top.flatten().tolist(), images.pred.flatten().tolist(), strict=True))
    pred_adv = dict(zip(images.top.flatten().tolist(), images.pred_adv.flatten().tolist(), strict=True))
    pos = positions.tolist()
    return {
        "uri": png_uri(atlas_png(both, cell, cols)), "grid": [max(1, math.ceil(m / cols)), cols], "cell": list(cell),
        "positions": pos, "labels": [int(labels[p]) if p < len(labels) else None for p in pos],
        "pred": [int(pred[p]) for p in pos], "pred_adv": [int(pred_adv[p]) for p in pos],
    }  # fmt: skip


def render_explorer(units: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The page for `units` (attach_images) and `meta`: title, model, dataset, classes, layers (depth
    order), quadrants ({code: name}), attack and threshold texts, cell (h, w) and display scale,
    explanatory text. Every string is escaped (Jinja2 autoescape in the HTML, `script_json` in
    the data block) and the script writes strings with `textContent` only."""
    data = {
        **meta,
        "columns": [{"key": k, "label": lab, "type": t, "title": tip} for k, lab, t, tip in COLUMNS],
        "colours": QUADRANT_COLOURS,
        "units": list(units),
    }
    env = Environment(
        loader=FunctionLoader(lambda name: resources.template(name)), autoescape=select_autoescape(["html", "j2"])
    )
    return env.get_template("units.html.j2").render(
        meta=meta, data_json=Markup(script_json(data)), colours=QUADRANT_COLOURS, units=len(units)
    )
