"""Stage `overview`: clean accuracy per class, confusion matrix, sample images."""

from __future__ import annotations

from typing import Any

import torch

from ..batching import run_batch_size
from ..errors import UserError
from ..evaluation import clean_predictions
from ..report import plots
from .base import STAGES, Context, section


@STAGES.register("overview", "clean accuracy per class, confusion matrix, sample images")
def overview_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Clean accuracy per class, the confusion matrix and sample images of the run's model."""
    if options:
        raise UserError(f"stage 'overview' takes no options, got {sorted(options)}")
    split = ctx.split
    pred = clean_predictions(ctx.store, ctx.model, split.x, torch.arange(len(split)), ctx.images_id,
                             run_batch_size(ctx))  # fmt: skip
    k = ctx.data.num_classes
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((split.y, pred), torch.ones_like(pred), accumulate=True)
    acc = int((pred == split.y).sum()) / max(1, len(split))
    rows: list[dict[str, Any]] = []
    for c, name in enumerate(ctx.data.classes):
        support = int(confusion[c].sum())
        rows.append(
            {
                "class": name,
                "support": support,
                "accuracy": float(confusion[c, c]) / support if support else float("nan"),
            }
        )
    ctx.run.write_table("clean_accuracy_per_class", rows)
    ctx.run.write_table(
        "confusion_matrix",
        [
            {"true": ctx.data.classes[i], **{ctx.data.classes[j]: int(confusion[i, j]) for j in range(k)}}
            for i in range(k)
        ],
    )
    ctx.run.save_figure("confusion_matrix", plots.confusion_matrix(confusion.numpy(), ctx.data.classes))
    ctx.run.save_figure(
        "per_class_accuracy",
        plots.per_class_bars([float(r["accuracy"]) for r in rows], ctx.data.classes, "clean accuracy"),
    )
    ctx.run.save_figure(
        "samples",
        plots.image_grid(
            split.x[:32],
            [
                f"{ctx.data.classes[int(t)][:10]}\n→ {ctx.data.classes[int(p)][:10]}"
                for t, p in zip(split.y[:32], pred[:32], strict=True)
            ],
        ),
    )
    ctx.results["clean_accuracy"] = acc
    return section(
        "Model and clean accuracy",
        text=f"Accuracy of the model on {len(split)} {ctx.config.split} images, per class, with the confusion matrix.",
        summary={"clean accuracy": acc, "images": len(split), "split": ctx.config.split},
        tables=[{"file": "tables/clean_accuracy_per_class.csv", "title": "Clean accuracy per class", "show": True}],
        figures=[
            {"file": "figures/per_class_accuracy.png", "caption": "Clean accuracy per class"},
            {"file": "figures/confusion_matrix.png", "caption": "Confusion matrix (rows: true class)"},
            {"file": "figures/samples.png", "caption": "Sample images: true class → prediction"},
        ],
        clean_accuracy=acc,
        per_class_accuracy={r["class"]: r["accuracy"] for r in rows},
        confusion_matrix=confusion.tolist(),
    )
