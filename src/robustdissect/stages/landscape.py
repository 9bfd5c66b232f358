"""Stage `landscape`: decision and CE surfaces in input space (METHODS §2.2) of the run's model
and its counterparts (`--compare`; the default run: the first of them), side by side:
contours, 3-D surfaces, 1-D slices along the adversarial direction, boundary distance a* and
steepness."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..analysis.landscape import DIRECTIONS, NORMS, LandscapeResult, landscape, landscape_attack
from ..config import parse_budgets, stage_options
from ..errors import UserError
from ..report.plots_metric import landscape_contours, landscape_slices, landscape_surfaces
from .base import STAGES, Context, section

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LandscapeOptions:
    """Options of the `landscape` stage.

    eps: the threat radius (ℓ∞ pixels, or ℓ2 with norm "l2"); radius: half-width of the plane
    (None: 2ε); grid: G (odd); n: images (a prefix of the run's analysed split); norm: "linf" or
    "l2" directions; direction: "pgd" (d₁ from the stored PGD example: `attack_steps` steps,
    α = 2.5ε/k from x, no random start, its highest-loss iterate) or "gradient"; line_points: the 1-D slice for a*;
    chunk_size: points per forward; compare: other models (None: the run's counterparts);
    counterparts: how many of them (None: all; the default run: 1)."""

    eps: float = 0.1
    radius: float | None = None
    grid: int = 41
    n: int = 100
    norm: str = "linf"
    direction: str = "pgd"
    attack_steps: int = 20
    line_points: int = 201
    chunk_size: int = 4096
    compare: list[str] | None = None
    counterparts: int | None = None

    def __post_init__(self) -> None:
        parse_budgets(self, "eps", stage="landscape")
        if self.counterparts is not None and (not isinstance(self.counterparts, int) or self.counterparts < 0):
            raise UserError(f"landscape: counterparts must be an integer >= 0 or null, got {self.counterparts!r}")
        if self.norm not in NORMS:
            raise UserError(f"landscape: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.direction not in DIRECTIONS:
            raise UserError(f"landscape: direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if not isinstance(self.grid, int) or self.grid < 3 or self.grid % 2 == 0:
            raise UserError(f"landscape: grid must be an odd integer >= 3, got {self.grid!r}")
        for name in ("n", "attack_steps", "line_points", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (3 if name == "line_points" else 1):
                raise UserError(f"landscape: {name} must be a positive integer, got {v!r}")
        if self.radius is not None and not self.radius > 0:
            raise UserError(f"landscape: radius must be > 0, got {self.radius}")


# The default run: 8 images on a 15 x 15 grid.
QUICK_LANDSCAPE: dict[str, Any] = {"n": 8, "grid": 15, "line_points": 51, "counterparts": 1}


@STAGES.register("landscape", "decision and CE surfaces in input space, boundary distance and steepness")
def landscape_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Surfaces of every model on the same images (adversarial examples from the store)."""
    opts: LandscapeOptions = stage_options(LandscapeOptions, options, "landscape")
    eps = opts.eps
    split = ctx.split
    n = min(opts.n, len(split))
    x, y = split.x[:n], split.y[:n]
    index = torch.arange(n)
    models, warnings = ctx.with_counterparts(opts.compare, opts.counterparts)
    results: dict[str, LandscapeResult] = {}
    rows: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    for name, model in models.items():
        x_adv = None
        if opts.direction == "pgd":
            attack = landscape_attack(eps, opts.norm, opts.attack_steps, ctx.config.seed)
            x_adv = ctx.attack(attack, x, y, index, model=model).x_adv
        log.info("landscape: %s, %d images, %dx%d grid", name, n, opts.grid, opts.grid)
        r = landscape(model, x, y, eps=eps, radius=opts.radius, grid=opts.grid, norm=opts.norm,
                      direction=opts.direction, x_adv=x_adv, line_points=opts.line_points,
                      chunk_size=opts.chunk_size, seed=ctx.config.seed)  # fmt: skip
        results[name] = r
        rows.append({"model": name, **r.summary()})
        per_image += r.per_image_rows(y, name)
    run = ctx.run
    run.write_table("landscape_summary", rows)
    run.write_table("landscape_per_image", per_image)
    mean_rows = [row for name, r in results.items() for row in r.mean_surface_rows(name)]
    run.write_table("landscape_mean_surfaces", mean_rows)
    run.save_figure("landscape_decision_contours", landscape_contours(results, "decision"))
    run.save_figure("landscape_loss_contours", landscape_contours(results, "loss"))
    run.save_figure("landscape_loss_surface3d", landscape_surfaces(results, "loss"))
    run.save_figure("landscape_decision_surface3d", landscape_surfaces(results, "decision"))
    run.save_figure("landscape_slices", landscape_slices(results))
    figures = [
        {"file": "figures/landscape_decision_contours.png",
         "caption": "Mean decision surface D over (adversarial d₁, random d₂); black: D = 0, dashed: the ε square"},
        {"file": "figures/landscape_loss_contours.png", "caption": "Mean CE surface on the same plane"},
        {"file": "figures/landscape_loss_surface3d.png", "caption": "Mean CE surface, 3-D, same z scale"},
        {"file": "figures/landscape_decision_surface3d.png", "caption": "Mean decision surface, 3-D"},
        {"file": "figures/landscape_slices.png",
         "caption": "D along d₁ per image (thin) and averaged (thick); dotted: ε"},
    ]  # fmt: skip
    tables: list[dict[str, Any]] = [
        {"file": "tables/landscape_summary.csv", "show": True,
         "title": "Boundary distance a* along d₁ and steepness |∂D/∂a| at x (correctly classified images)"},
        {"file": "tables/landscape_per_image.csv", "title": "Per image"},
        {"file": "tables/landscape_mean_surfaces.csv", "title": "Mean surfaces (grid)"},
    ]  # fmt: skip
    summary = {f"a* ≤ ε ({r['model']})": f"{r['boundary_inside_eps']:.0%}" for r in rows}
    summary.update({f"steepness ({r['model']})": f"{r['steepness_mean']:.3g}" for r in rows})
    text = (
        f"Surfaces over a {opts.grid}×{opts.grid} grid of half-width {results[next(iter(results))].radius:g} around "
        f"{n} images, d₁ = {'the PGD direction' if opts.direction == 'pgd' else 'the CE gradient'} ({opts.norm}), "
        f"d₂ random. Standard models are expected steep with the boundary inside ε = {eps:g} along d₁; "
        "adversarially trained models flat with a* > ε."
    )
    return section("Input-space landscapes", text=text, summary=summary, tables=tables, figures=figures,
                   warnings=warnings, models=rows)  # fmt: skip


landscape_stage.options_class = LandscapeOptions  # type: ignore[attr-defined]
landscape_stage.reduced_options = QUICK_LANDSCAPE  # type: ignore[attr-defined]
