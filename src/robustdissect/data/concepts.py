"""Concept probe sets for Network Dissection (METHODS §4.3, §8.3 "§4" row).

A `ConceptSet` is a set of images with per-pixel concept labels: `planes` of (N, H, W) concept
ids (-1 = unlabelled). Image-level concepts (a class, a whole-image texture) fill the whole plane,
so every concept is dissected with the same IoU (§4.1 item 4). `generate_concept_set` renders one
in code, seeded, for grayscale 28×28 or RGB 32×32 data: intensity bands (colour names on RGB),
procedural textures, scikit-image's natural textures (brick, grass, gravel), foreground masks,
garment-on-texture composites with exact masks, texture collages and the dataset's classes.
`load_broden` reads the Broden directory layout (index.csv, label.csv, images/) for users who have
it; `load_concept_dir` reads the common segmentation layout (images/, one label PNG per image in
masks/, and a label list) for users who bring their own concepts with pixel masks.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from .files import check_input_size
from .lazy import read_image

log = logging.getLogger(__name__)

__all__ = [
    "COLOUR_NAMES",
    "COLOUR_RGB",
    "INTENSITY_BANDS",
    "PROCEDURAL_TEXTURES",
    "ConceptSet",
    "colour_names",
    "generate_concept_set",
    "intensity_bands",
    "load_broden",
    "load_concept_dir",
    "natural_textures",
]

# NetDissect's colorname.py: the 11 colour names and their RGB prototypes (van de Weijer et al.)
COLOUR_NAMES = ("black", "blue", "brown", "grey", "green", "orange", "pink", "purple", "red", "white", "yellow")
COLOUR_RGB = (
    (0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.4, 0.25), (0.5, 0.5, 0.5), (0.0, 1.0, 0.0), (1.0, 0.8, 0.0),
    (1.0, 0.5, 1.0), (1.0, 0.0, 1.0), (1.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 1.0, 0.0),
)  # fmt: skip
# colour reduces to intensity bands on grayscale data (§8.3): [0, 1/3), [1/3, 2/3), [2/3, 1]
INTENSITY_BANDS = ("black", "grey", "white")
STRIPE_ORIENTATIONS = (0, 45, 90, 135)
STRIPE_PERIODS = {"low": 9.0, "mid": 5.0, "high": 2.5}  # pixels per cycle at 28 px (scaled with size)
PROCEDURAL_TEXTURES = (
    *(f"stripes-{o}-{f}" for o in STRIPE_ORIENTATIONS for f in STRIPE_PERIODS),
    "checkerboard", "dots", "grid", "zigzag", "blobs", "noise", "gradient",
)  # fmt: skip
NATURAL_TEXTURES = ("brick", "grass", "gravel")
HIGH_FREQUENCY = frozenset({"noise", "gravel", "checkerboard", *(f"stripes-{o}-high" for o in STRIPE_ORIENTATIONS)})


@dataclass(frozen=True)
class ConceptSet:
    """Images with per-pixel concept labels.

    images: (N, C, H, W) float32 in [0, 1]; planes: label planes, each (N, H, W) int64 with a
    concept id or -1 (a pixel may carry one concept per plane, e.g. an intensity band and a
    texture); concept_category[c]: index into `categories` of concept c; kinds[i]: how image i was
    made (e.g. "texture", "garment", "composite"); `identity` names the set for cache keys.
    """

    images: torch.Tensor
    planes: list[torch.Tensor]
    concepts: list[str]
    categories: list[str]
    concept_category: list[int]
    kinds: list[str] = field(default_factory=list)
    identity: str = ""
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        x = self.images
        if x.ndim != 4 or x.shape[0] == 0:
            raise UserError(f"concept images must be a non-empty (N, C, H, W) tensor, got {tuple(x.shape)}")
        n, _, h, w = x.shape
        for p in self.planes:
            if tuple(p.shape) != (n, h, w):
                raise UserError(f"a label plane has shape {tuple(p.shape)}, expected {(n, h, w)}")
            if p.numel() and int(p.max()) >= len(self.concepts):
                raise UserError(f"a label plane holds concept id {int(p.max())} but only {len(self.concepts)} exist")
        if len(self.concept_category) != len(self.concepts):
            raise UserError("concept_category must give one category per concept")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def category_of(self, concept: int) -> str:
        return self.categories[self.concept_category[concept]]

    def annotated(self, part: slice = slice(None)) -> torch.Tensor:
        """(N, G) bool: image i (of the slice `part`) carries a label of category g somewhere
        (NetDissect-Lite counts a unit's activation in the union only over images annotated for
        the concept's category)."""
        g = len(self.categories)
        n = len(range(len(self))[part])
        out = torch.zeros(n, g, dtype=torch.bool)
        cat = torch.tensor(self.concept_category, dtype=torch.long)
        for p in self.planes:
            flat = p[part].reshape(n, -1)
            valid = flat >= 0
            cats = torch.where(valid, cat[flat.clamp_min(0)], torch.full_like(flat, g))
            hit = torch.zeros(n, g + 1, dtype=torch.bool)
            hit.scatter_(1, cats, True)
            out |= hit[:, :g]
        return out

    def areas(self, part: slice = slice(None)) -> torch.Tensor:
        """(n_concepts,) float64: labelled pixels of each concept over the images of `part`, |L_c|."""
        total = torch.zeros(len(self.concepts), dtype=torch.float64)
        for p in self.planes:
            v = p[part]
            v = v[v >= 0]
            total += torch.bincount(v, minlength=len(self.concepts)).double()
        return total

    def concept_mask(self, concept: int, index: int) -> torch.Tensor:
        """(H, W) bool: pixels of image `index` labelled `concept` in any plane."""
        m = torch.zeros(self.images.shape[2:], dtype=torch.bool)
        for p in self.planes:
            m |= p[index] == concept
        return m


# ---------------------------------------------------------------------------------------------
# pixel labels from pixel values


def intensity_bands(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grayscale in [0, 1] -> (N, H, W) band index into INTENSITY_BANDS."""
    v = images[:, 0]
    return (v >= 1 / 3).long() + (v >= 2 / 3).long()


def _srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) sRGB in [0, 1] -> (..., 3) CIELAB (D65)."""
    from skimage.color import rgb2lab

    return torch.from_numpy(rgb2lab(rgb.double().numpy())).double()


def colour_names(images: torch.Tensor, chroma_floor: float = 10.0) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, H, W) index into COLOUR_NAMES (METHODS §4.3 item 1
    fallback): the nearest of the 11 prototypes in CIELAB; pixels with chroma below
    `chroma_floor` are black, grey or white by L* (the nearest achromatic prototype)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"colour names need (N, 3, H, W) RGB images, got {tuple(images.shape)}")
    lab = _srgb_to_lab(images.permute(0, 2, 3, 1).clamp(0, 1))
    protos = _srgb_to_lab(torch.tensor(COLOUR_RGB, dtype=torch.float64))
    d = ((lab.unsqueeze(-2) - protos) ** 2).sum(-1)  # (N, H, W, 11)
    label = d.argmin(-1)
    achromatic = torch.tensor([COLOUR_NAMES.index(c) for c in INTENSITY_BANDS])
    l_star = lab[..., 0].unsqueeze(-1)
    grey_label = achromatic[(l_star - protos[achromatic, 0]).abs().argmin(-1)]
    chroma = lab[..., 1:].norm(dim=-1)
    return torch.where(chroma < chroma_floor, grey_label, label)


# ---------------------------------------------------------------------------------------------
# texture generators: (size, generator) -> (H, W) pattern in [0, 1]


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(size, dtype=torch.float64)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return yy, xx


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _stripes(orientation: int, period: float) -> Callable[[int, torch.Generator], torch.Tensor]:
    def make(size: int, g: torch.Generator) -> torch.Tensor:
        yy, xx = _grid(size)
        t = math.radians(orientation + _u(g, -5, 5))
        p = period * size / 28 * _u(g, 0.85, 1.15)
        phase = _u(g, 0, 2 * math.pi)
        return 0.5 + 0.5 * torch.sin(2 * math.pi * (xx * math.cos(t) + yy * math.sin(t)) / p + phase)

    return make


def _checkerboard(size: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(size)
    cell = _u(g, 3, 6) * size / 28
    oy, ox = _u(g, 0, cell), _u(g, 0, cell)
    return (((yy + oy) // cell + (xx + ox) // cell) % 2).double()


def _dots(size: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(size)
    sp = _u(g, 5, 8) * size / 28
    rad = _u(g, 1.0, 1.8) * size / 28
    oy, ox = _u(g, 0, sp), _u(g, 0, sp)
    dy = (yy + oy) % sp - sp / 2
    dx = (xx + ox) % sp - sp / 2
    return ((dy**2 + dx**2) <= rad**2).double()


def _gridlines(size: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(size)
    sp = _u(g, 5, 8) * size / 28
    oy, ox = _u(g, 0, sp), _u(g, 0, sp)
    return (((yy + oy) % sp < 1.2) | ((xx + ox) % sp < 1.2)).double()


def _zigzag(size: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(size)
    period, amp, sp = _u(g, 6, 10) * size / 28, _u(g, 1.5, 3) * size / 28, _u(g, 5, 8) * size / 28
    tri = amp * (2 * ((xx / period + _u(g)) % 1 - 0.5).abs() * 2 - 1)
    pattern = ((yy + tri + _u(g, 0, sp)) % sp < sp / 2.5).double()
    return pattern.t() if _u(g) < 0.5 else pattern


def _blobs(size: int, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(1, 1, size, size, generator=g, dtype=torch.float64)
    k = max(3, round(size / 5)) | 1
    for _ in range(3):
        noise = F.avg_pool2d(F.pad(noise, (k // 2,) * 4, mode="circular"), k, stride=1)
    v = noise[0, 0]
    return (v > v.median()).double()


def _noise(size: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(size, size, generator=g, dtype=torch.float64)


def _gradient(size: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(size)
    t = _u(g, 0, 2 * math.pi)
    v = xx * math.cos(t) + yy * math.sin(t)
    return (v - v.min()) / (v.max() - v.min())


def _procedural() -> dict[str, Callable[[int, torch.Generator], torch.Tensor]]:
    gens: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {
        f"stripes-{o}-{f}": _stripes(o, p) for o in STRIPE_ORIENTATIONS for f, p in STRIPE_PERIODS.items()
    }
    gens.update(checkerboard=_checkerboard, dots=_dots, grid=_gridlines, zigzag=_zigzag, blobs=_blobs,
                noise=_noise, gradient=_gradient)  # fmt: skip
    return gens


def natural_textures() -> dict[str, torch.Tensor]:
    """scikit-image's bundled texture photographs (brick, grass, gravel) as (512, 512) float64
    in [0, 1]; empty when scikit-image or its data is not installed."""
    try:
        import skimage.data as skd
    except ImportError:
        return {}
    out: dict[str, torch.Tensor] = {}
    for name in NATURAL_TEXTURES:
        try:
            img = np.asarray(getattr(skd, name)(), dtype=np.float64)
        except Exception as e:
            log.warning("scikit-image texture %s unavailable: %s", name, e)
            continue
        if img.ndim == 3:
            img = img[..., :3].mean(-1)
        out[name] = torch.from_numpy(img / 255.0)
    return out


def _natural_crop(photo: torch.Tensor) -> Callable[[int, torch.Generator], torch.Tensor]:
    def make(size: int, g: torch.Generator) -> torch.Tensor:
        scale = _u(g, 3, 6)  # a 28 px crop covers 84-168 px of the 512 px photograph
        side = min(photo.shape[0], round(size * scale))
        y0 = int(torch.randint(0, photo.shape[0] - side + 1, (), generator=g))
        x0 = int(torch.randint(0, photo.shape[1] - side + 1, (), generator=g))
        crop = photo[y0 : y0 + side, x0 : x0 + side][None, None]
        v = F.interpolate(crop, size=(size, size), mode="area")[0, 0]
        lo, hi = v.min(), v.max()
        return (v - lo) / (hi - lo).clamp_min(1e-6)

    return make


def _render(pattern: torch.Tensor, channels: int, g: torch.Generator) -> torch.Tensor:
    """(H, W) pattern in [0, 1] -> (C, H, W) image between two random intensities (grayscale,
    contrast >= 0.4) or two random colours (RGB)."""
    if channels == 1:
        a = _u(g, 0.0, 0.6)
        b = _u(g, a + 0.4, 1.0)
        if _u(g) < 0.5:
            a, b = b, a
        return (a + (b - a) * pattern).unsqueeze(0)
    ca = torch.rand(channels, generator=g, dtype=torch.float64)
    cb = torch.rand(channels, generator=g, dtype=torch.float64)
    return ca[:, None, None] + (cb - ca)[:, None, None] * pattern


def _disc_or_rect(size: int, g: torch.Generator) -> torch.Tensor:
    """(H, W) bool: a random rectangle or disc covering roughly 15-45% of the image."""
    yy, xx = _grid(size)
    if _u(g) < 0.5:
        h, w = round(_u(g, 0.4, 0.7) * size), round(_u(g, 0.4, 0.7) * size)
        y0, x0 = int(_u(g, 0, size - h)), int(_u(g, 0, size - w))
        return (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
    r = _u(g, 0.22, 0.36) * size
    cy, cx = _u(g, r, size - r), _u(g, r, size - r)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


# ---------------------------------------------------------------------------------------------
# the generated set


DEFAULT_MIX = {"garment": 0.3, "texture": 0.3, "composite": 0.25, "collage": 0.1, "patch": 0.05}


def generate_concept_set(
    n: int,
    image_shape: Sequence[int] = (1, 28, 28),
    *,
    class_images: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    class_names: Sequence[str] = (),
    foreground: float = 0.1,
    mix: dict[str, float] | None = None,
    natural: bool = True,
    seed: int = 0,
) -> ConceptSet:
    """A seeded concept set of `n` images of `image_shape` ((1, 28, 28) or (3, 32, 32); any size).

    Kinds (fractions in `mix`): "garment" (dataset images with their class as an image-level
    concept and, on grayscale, the foreground mask pixels > `foreground`), "texture" (one texture
    filling the image), "composite" (a grayscale dataset image's foreground pasted on a texture:
    exact texture, foreground and class masks), "collage" (a texture patch on another texture),
    "patch" (a uniform patch on a uniform background). Every pixel also carries its intensity band
    (grayscale) or colour name (RGB). Without `class_images`, garments and composites are replaced
    by textures and collages. Images come out in a seeded random order.
    """
    if n <= 0:
        raise UserError(f"a concept set needs at least one image, got n={n}")
    c, h, w = (int(v) for v in image_shape)
    if h != w:
        raise UserError(f"concept sets are generated for square images, got {h}x{w}")
    if c not in (1, 3):
        raise UserError(f"concept sets are generated for 1 or 3 channels, got {c}")
    g = torch.Generator().manual_seed(seed)
    warnings: list[str] = []
    textures = _procedural()
    photos = natural_textures() if natural else {}
    missing = [t for t in NATURAL_TEXTURES if t not in photos]
    if natural and missing:
        warnings.append(f"natural textures {', '.join(missing)} skipped: scikit-image's data does not carry them")
    textures.update({name: _natural_crop(p) for name, p in photos.items()})
    texture_names = list(textures)

    have_classes = class_images is not None and class_labels is not None and len(class_labels) > 0
    if have_classes:
        assert class_images is not None and class_labels is not None
        if tuple(class_images.shape[1:]) != (c, h, w):
            raise UserError(f"class images {tuple(class_images.shape[1:])} do not match the shape {(c, h, w)}")
        names = list(class_names) or [str(i) for i in range(int(class_labels.max()) + 1)]
    else:
        names = []
    grayscale = c == 1

    categories = ["colour" if not grayscale else "intensity", "texture", "object", "class"]
    colour_list = list(INTENSITY_BANDS if grayscale else COLOUR_NAMES)
    concepts = colour_list + texture_names + (["foreground"] if grayscale and have_classes else []) + names
    cat_of = [0] * len(colour_list) + [1] * len(texture_names)
    cat_of += [2] * (1 if grayscale and have_classes else 0) + [3] * len(names)
    tex_id = {t: len(colour_list) + i for i, t in enumerate(texture_names)}
    fg_id = concepts.index("foreground") if "foreground" in concepts else -1
    cls0 = len(concepts) - len(names)

    shares = dict(mix or DEFAULT_MIX)
    if not have_classes:
        shares["texture"] = shares.get("texture", 0) + shares.pop("garment", 0)
        shares["collage"] = shares.get("collage", 0) + shares.pop("composite", 0)
    elif not grayscale:  # no foreground masks on RGB data: composites become collages
        shares["collage"] = shares.get("collage", 0) + shares.pop("composite", 0)
    total = sum(shares.values())
    if total <= 0 or any(v < 0 for v in shares.values()):
        raise UserError(f"mix must have non-negative shares with a positive sum, got {shares}")
    counts = {k: int(n * v / total) for k, v in shares.items()}
    counts[max(shares, key=lambda k: shares[k])] += n - sum(counts.values())

    images = torch.zeros(n, c, h, w, dtype=torch.float64)
    tex_plane = torch.full((n, h, w), -1, dtype=torch.long)
    obj_plane = torch.full((n, h, w), -1, dtype=torch.long)
    cls_plane = torch.full((n, h, w), -1, dtype=torch.long)
    kinds: list[str] = []

    def texture(i: int) -> tuple[int, torch.Tensor]:
        name = texture_names[i % len(texture_names)]
        return tex_id[name], _render(textures[name](h, g), c, g)

    def garment() -> tuple[torch.Tensor, int]:
        assert class_images is not None and class_labels is not None
        j = int(torch.randint(0, len(class_labels), (), generator=g))
        return class_images[j].double(), int(class_labels[j])

    i = 0
    for kind in ("garment", "texture", "composite", "collage", "patch"):
        for j in range(counts.get(kind, 0)):
            if kind == "garment":
                img, label = garment()
                images[i] = img
                cls_plane[i] = cls0 + label
                if grayscale:
                    obj_plane[i][img[0] > foreground] = fg_id
            elif kind == "texture":
                t, img = texture(j)
                images[i], tex_plane[i] = img, t
            elif kind == "composite":
                gimg, label = garment()
                fg = gimg[0] > foreground
                t, back = texture(j)
                images[i] = torch.where(fg, gimg, back)
                tex_plane[i][~fg] = t
                obj_plane[i][fg] = fg_id
                cls_plane[i][fg] = cls0 + label
            elif kind == "collage":
                t1, back = texture(j)
                t2, front = texture(j + 1 + int(torch.randint(0, len(texture_names) - 1, (), generator=g)))
                m = _disc_or_rect(h, g)
                images[i] = torch.where(m, front, back)
                tex_plane[i] = torch.where(m, t2, t1)
            else:
                m = _disc_or_rect(h, g)
                images[i] = torch.where(m, _render(torch.ones(h, w), c, g), _render(torch.zeros(h, w), c, g))
            kinds.append(kind)
            i += 1

    images = images.clamp(0, 1).float()
    colour = intensity_bands(images) if grayscale else colour_names(images)
    order = torch.randperm(n, generator=g)
    planes = [p[order] for p in (colour, tex_plane, obj_plane, cls_plane) if (p >= 0).any()]
    identity = hashlib.sha256(
        repr(("generated", n, (c, h, w), seed, foreground, sorted(shares.items()), concepts)).encode()
    ).hexdigest()[:16]
    return ConceptSet(
        images=images[order],
        planes=planes,
        concepts=concepts,
        categories=categories,
        concept_category=cat_of,
        kinds=[kinds[k] for k in order.tolist()],
        identity=f"generated:{identity}",
        warnings=warnings,
    )


# ---------------------------------------------------------------------------------------------
# Broden


BRODEN_CATEGORIES = ("color", "object", "part", "material", "scene", "texture")


def load_broden(
    root: str | Path,
    image_shape: Sequence[int] = (3, 224, 224),
    *,
    categories: Sequence[str] | None = None,
    max_images: int | None = None,
    split: str | None = None,
) -> ConceptSet:
    """Read a Broden-style directory: `index.csv` (image, split, ih, iw, sh, sw and one column per
    category holding `;`-separated mask file names, or label numbers for image-level categories
    such as scene and texture), `label.csv` (number, name, category, ...) and `images/`. Masks are
    PNGs whose label is R + 256·G (0 = none). Images are resized to `image_shape` (bilinear,
    converted to grayscale when it has one channel) and masks to its size (nearest)."""
    base = Path(root)
    index, labels = base / "index.csv", base / "label.csv"
    for p in (index, labels):
        if not p.is_file():
            raise UserError(f"{base} is not a Broden directory: {p.name} is missing")
        check_input_size(8 * p.stat().st_size, f"{p}")  # parsed rows take several times the text
    c, h, w = (int(v) for v in image_shape)
    names: dict[int, str] = {}
    label_cat: dict[int, str] = {}
    with labels.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                num = int(row["number"])
            except (KeyError, ValueError):
                raise UserError(f"{labels}: each row needs an integer 'number'") from None
            if num == 0:
                continue
            names[num] = row.get("name", str(num))
    with index.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{index} lists no images")
    cats = [k for k in (categories or BRODEN_CATEGORIES) if k in rows[0]]
    if not cats:
        raise UserError(f"{index} has none of the category columns {', '.join(categories or BRODEN_CATEGORIES)}")
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
    rows = rows[:max_images] if max_images else rows
    used: dict[int, int] = {}
    images: list[torch.Tensor] = []
    plane_lists: list[list[torch.Tensor]] = []

    def cid(num: int, cat: str) -> int:
        if num not in used:
            used[num] = len(used)
            label_cat[num] = cat  # the column that first labels it (NetDissect-Lite tallies per category)
        return used[num]

    def open_image(name: str, mode: str) -> Image.Image:
        p = (base / "images" / name).resolve()
        if base.resolve() not in p.parents:
            raise UserError(f"{index}: {name} points outside {base}")
        if not p.is_file():
            raise UserError(f"{index} lists {name}, which is missing under {base / 'images'}")
        return read_image(p, mode)

    for r in rows:
        img = open_image(r["image"], "L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        images.append(arr[None] if c == 1 else arr.permute(2, 0, 1))
        planes: list[torch.Tensor] = []
        for cat in cats:
            for item in filter(None, (r.get(cat) or "").split(";")):
                if item.strip().isdigit():  # image-level label
                    num = int(item)
                    if num in names:
                        planes.append(torch.full((h, w), cid(num, cat), dtype=torch.long))
                    continue
                m = np.asarray(open_image(item, "RGB").resize((w, h), Image.Resampling.NEAREST), dtype=np.int64)
                code = torch.from_numpy(m[..., 0] + 256 * m[..., 1])
                plane = torch.full((h, w), -1, dtype=torch.long)
                for num in torch.unique(code).tolist():
                    if num in names:
                        plane[code == num] = cid(num, cat)
                planes.append(plane)
        plane_lists.append(planes)
    depth = max((len(p) for p in plane_lists), default=0)
    stacked = [
        torch.stack([p[k] if k < len(p) else torch.full((h, w), -1, dtype=torch.long) for p in plane_lists])
        for k in range(depth)
    ]
    ordered = sorted(used, key=lambda num: used[num])
    cat_names = sorted({label_cat.get(num, "") or "unknown" for num in ordered})
    return ConceptSet(
        images=torch.stack(images),
        planes=stacked,
        concepts=[names[num] for num in ordered],
        categories=cat_names,
        concept_category=[cat_names.index(label_cat.get(num, "") or "unknown") for num in ordered],
        kinds=["broden"] * len(rows),
        identity=f"broden:{base.resolve()}:{len(rows)}:{','.join(cats)}:{split}",
    )


# ---------------------------------------------------------------------------------------------
# the user's own concepts: images/, masks/ (label PNGs) and a label list


CONCEPT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_FILES = ("labels.txt", "labels.csv")
DEFAULT_CATEGORY = "object"
VOID_LABEL = 255  # Pascal VOC's border / void value in 8-bit masks: unlabelled unless listed


def read_label_list(path: Path) -> dict[int, tuple[str, str]]:
    """`labels.txt` (lines `INDEX NAME [CATEGORY]`, whitespace- or comma-separated, `#` comments)
    or `labels.csv` (rows `index,name[,category]`, an optional header) -> {index: (name,
    category)}; index 0 (background) is dropped, the category defaults to "object"."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the label list {path}: {' '.join(str(e).split())[:200]}") from None
    if path.suffix == ".csv":
        rows = [[c.strip() for c in r] for r in csv.reader(text.splitlines())]
    else:
        rows = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            rows.append([c.strip() for c in line.split(",")] if "," in line else line.split())
    rows = [r for r in rows if any(r)]
    if rows and not rows[0][0].lstrip("-").isdigit() and rows[0][0].lower() in ("index", "number", "id", "label"):
        rows = rows[1:]  # a header row
    labels: dict[int, tuple[str, str]] = {}
    for k, row in enumerate(rows, 1):
        if len(row) < 2 or not row[0].isdigit() or not row[1]:
            raise UserError(f"{path}: entry {k} {','.join(row)!r} is not 'INDEX, NAME[, CATEGORY]' with INDEX >= 0")
        index = int(row[0])
        if index in labels:
            raise UserError(f"{path}: label index {index} is listed twice")
        if index == 0:
            continue  # background / none
        if any(name == row[1] for name, _ in labels.values()):
            raise UserError(f"{path}: the concept name {row[1]!r} is listed twice")
        labels[index] = (row[1], (row[2] if len(row) > 2 and row[2] else DEFAULT_CATEGORY).lower())
    if not labels:
        raise UserError(f"{path} lists no concept (index 0 is the background)")
    return labels


def _open_concept_file(path: Path, root: Path) -> Any:
    """A decoded PIL image (pixels loaded), with unreadable files and decompression bombs as
    one-line UserErrors naming the file relative to `root`."""
    name = path.relative_to(root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
        return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{root}: {name} is too large to decode safely; resize it first") from None
    except Exception as e:  # any undecodable file is the user's data problem
        raise UserError(f"{root}: cannot read {name}: {' '.join(str(e).split())[:200]}") from None


def _label_array(img: Any, where: str) -> np.ndarray:
    """(H, W) int64 label values of a label PNG: palette indices (mode P), grey levels (L, I;16, I),
    or the one value of an RGB(A) mask whose channels are equal."""
    if img.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
        return np.asarray(img, dtype=np.int64)
    if img.mode in ("RGB", "RGBA", "LA"):
        a = np.asarray(img, dtype=np.int64)
        colour = a[..., :3] if img.mode != "LA" else a[..., :1]
        if (colour == colour[..., :1]).all():
            return colour[..., 0]
    raise UserError(f"{where} is a {img.mode} image; a mask is a one-channel label PNG (mode L, P or I: pixel "
                    "value = concept index)")  # fmt: skip


def concept_dir_identity(root: str | Path) -> str:
    """A fingerprint of a concept directory's files (names, sizes, modification times): the
    identity of the set it loads, without decoding an image."""
    base = Path(root)
    digest = hashlib.sha256()
    for sub in ("images", "masks"):
        try:
            entries = sorted((base / sub).iterdir()) if (base / sub).is_dir() else []
        except OSError as e:
            raise UserError(f"cannot list {base / sub}: {e.strerror}") from None
        for f in entries:
            st = f.stat()
            digest.update(repr((sub, f.name, st.st_size, st.st_mtime_ns)).encode())
    for name in LABEL_FILES:
        if (base / name).is_file():
            digest.update((base / name).read_bytes())
    return digest.hexdigest()[:16]


def check_concept_dir(root: str | Path) -> tuple[Path, dict[int, tuple[str, str]], list[tuple[Path, Path]]]:
    """Check a concept directory's layout without decoding an image: (the label list file, its
    labels {index: (name, category)}, the (image, mask) file pairs in name order)."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"concept directory {base} does not exist")
    for sub in ("images", "masks"):
        if not (base / sub).is_dir():
            raise UserError(f"{base} is not a concept directory: {sub}/ is missing (expected images/, masks/, "
                            "labels.txt or labels.csv)")  # fmt: skip
    label_files = [base / f for f in LABEL_FILES if (base / f).is_file()]
    if not label_files:
        raise UserError(f"{base} is not a concept directory: labels.txt or labels.csv is missing")
    if len(label_files) > 1:
        raise UserError(f"{base} holds both labels.txt and labels.csv; keep one label list")
    labels = read_label_list(label_files[0])
    try:
        files = sorted(p for p in (base / "images").iterdir() if p.suffix.lower() in CONCEPT_IMAGE_SUFFIXES)
    except OSError as e:
        raise UserError(f"cannot list {base / 'images'}: {e.strerror}") from None
    if not files:
        raise UserError(f"{base / 'images'} holds no .png or .jpg image")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise UserError(f"{base}: images/{stems[f.stem].name} and images/{f.name} share the name {f.stem}; "
                            "one mask names one image")  # fmt: skip
        stems[f.stem] = f
    pairs = []
    for stem, f in stems.items():
        mask = base / "masks" / f"{stem}.png"
        if not mask.is_file():
            raise UserError(f"{base}: images/{f.name} has no mask masks/{stem}.png")
        pairs.append((f, mask))
    return label_files[0], labels, pairs


def load_concept_dir(root: str | Path, image_shape: Sequence[int] = (3, 224, 224)) -> ConceptSet:
    """Read the user's concept directory: `images/NAME.png|jpg|jpeg`, one label PNG per image
    `masks/NAME.png` (pixel value = concept index, 0 = none; 255 in an 8-bit mask = void unless
    listed) and a label list `labels.txt` or `labels.csv` (see `read_label_list`). Images are
    resized to `image_shape` (C, H, W) bilinearly and converted to its channels (1: grayscale,
    3: RGB); masks are resized with nearest neighbour. One plane of concept ids per image;
    concepts are the listed labels that occur in some mask, in index order."""
    base = Path(root)
    c, h, w = (int(v) for v in image_shape)
    if c not in (1, 3):
        raise UserError(f"a concept directory feeds 1- or 3-channel models, the model takes {c} channels")
    label_file, labels, pairs = check_concept_dir(base)
    lut = np.full(max(max(labels), VOID_LABEL) + 1, -2, dtype=np.int64)  # -2: not listed
    for index in labels:
        lut[index] = index
    lut[0] = -1
    if VOID_LABEL not in labels:
        lut[VOID_LABEL] = -1
    images: list[torch.Tensor] = []
    codes: list[np.ndarray] = []
    for f, mask_path in pairs:
        img = _open_concept_file(f, base)
        mask = _open_concept_file(mask_path, base)
        if img.size != mask.size:
            raise UserError(f"{base}: masks/{mask_path.name} is {mask.size[0]}x{mask.size[1]} but images/{f.name} is "
                            f"{img.size[0]}x{img.size[1]}")  # fmt: skip
        raw = _label_array(mask, f"{base}: masks/{mask_path.name}")
        bad = raw[(raw >= len(lut)) | (lut[np.minimum(raw, len(lut) - 1)] == -2)] if raw.size else raw
        if bad.size:
            raise UserError(f"{base}: masks/{mask_path.name} holds label {int(bad.flat[0])}, which "
                            f"{label_file.name} does not list")  # fmt: skip
        rgb = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
        arr = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)
        images.append(arr[None] if c == 1 else arr.permute(2, 0, 1))
        small = Image.fromarray(raw.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST)
        codes.append(lut[np.asarray(small, dtype=np.int64)])
    present = sorted({int(v) for a in codes for v in np.unique(a) if v > 0})
    absent = [labels[i][0] for i in labels if i not in present]
    warnings = [f"concepts listed but in no mask (at {w}x{h}): {', '.join(absent)}"] if absent else []
    if not present:
        raise UserError(f"{base}: no mask labels any pixel with a listed concept")
    cid = np.full(len(lut), -1, dtype=np.int64)
    for k, index in enumerate(present):
        cid[index] = k
    plane = torch.from_numpy(np.stack([np.where(a > 0, cid[np.maximum(a, 0)], -1) for a in codes]))
    cats = sorted({labels[i][1] for i in present})
    return ConceptSet(
        images=torch.stack(images),
        planes=[plane],
        concepts=[labels[i][0] for i in present],
        categories=cats,
        concept_category=[cats.index(labels[i][1]) for i in present],
        kinds=["concept-dir"] * len(images),
        identity=f"concept-dir:{concept_dir_identity(base)}:{c}x{h}x{w}",
        warnings=warnings,
    )
