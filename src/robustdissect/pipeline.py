"""The stages of `robustdissect run`: each is a function (Context, options) -> results entry.

A stage writes its tables and figures through `ctx.run` and returns a JSON-able entry built with
`section(...)`; the report renders every entry the same way, so a new capability only adds a
stage function. Stages that already finished in an interrupted run are skipped on `--resume`.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import RunConfig, dump_config
from .data import Dataset, Split, load_dataset
from .errors import UserError
from .models.resolve import resolve_model as resolve_model
from .registry import Registry
from .runs import RunDir, write_json
from .training import pick_device

log = logging.getLogger(__name__)

StageFn = Callable[["Context", dict[str, Any]], dict[str, Any]]
STAGES: Registry[StageFn] = Registry("stage")


@dataclass
class Context:
    """What every stage gets: the config, the run directory, the model, the data."""

    config: RunConfig
    run: RunDir
    model: nn.Module
    card: dict[str, Any]
    data: Dataset
    device: torch.device
    progress: bool = False

    @property
    def split(self) -> Split:
        """The analysed images: `config.n` images of `config.split`, a seeded subset."""
        return self.data.split(self.config.split).subset(self.config.n, seed=self.config.seed)


def section(
    title: str,
    text: str = "",
    summary: Mapping[str, Any] | None = None,
    tables: Sequence[Mapping[str, Any]] = (),
    figures: Sequence[Mapping[str, str]] = (),
    warnings: Sequence[str] = (),
    **data: Any,
) -> dict[str, Any]:
    """A results entry the report can render.

    tables: [{"file": "tables/x.csv", "title": ..., "show": True}] (shown ones are rendered as
    HTML tables); figures: [{"file": "figures/x.png", "caption": ...}]; extra keys are kept as
    machine-readable results.
    """
    return {
        "title": title,
        "text": text,
        "summary": dict(summary or {}),
        "tables": list(tables),
        "figures": list(figures),
        "warnings": list(warnings),
        **data,
    }


def load_stages() -> None:
    """Import the stage modules so that they register themselves in STAGES."""
    from . import stages  # noqa: F401


def environment(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    import numpy

    return {
        "robustdissect": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "command": " ".join(sys.argv),
    }


def prepare(cfg: RunConfig) -> tuple[nn.Module, dict[str, Any], Dataset, torch.device]:
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    model, card = resolve_model(cfg.model, cfg.weights, cfg.model_args, data)
    card_ds = card.get("dataset")
    if card_ds and card_ds != cfg.dataset:
        raise UserError(f"model {cfg.model} was trained on {card_ds}, but the run uses {cfg.dataset}")
    device = pick_device(cfg.device)
    return model.to(device), card, data, device


def run_pipeline(
    cfg: RunConfig, out: str | Path, overwrite: bool = False, resume: bool = False, progress: bool = False
) -> Path:
    """Run every configured stage into a run directory; return its final path."""
    load_stages()
    for name in cfg.stages:
        STAGES.get(name)  # fail fast on unknown stage names
    run = RunDir.create(out, overwrite=overwrite, resume=resume)
    try:
        model, card, data, device = prepare(cfg)
        torch.manual_seed(cfg.seed)
        ctx = Context(cfg, run, model, card, data, device, progress)
        run.write_text("config.yaml", dump_config(cfg))
        write_json(run.path / "env.json", environment(cfg, device))
        run.update_results(schema_version=1, model=cfg.model, model_card=card, dataset=_data_summary(data, cfg))
        for name, options in cfg.stages.items():
            if run.stage_done(name):
                log.info("stage %s already done, skipping", name)
                continue
            log.info("stage %s", name)
            t0 = time.perf_counter()
            entry = STAGES.get(name)(ctx, dict(options))
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            run.set_stage(name, entry)
        from .report import render_report

        render_report(run.path)
    except UserError:
        run.discard()
        raise
    except KeyboardInterrupt:
        log.warning("interrupted; finished stages are kept in %s, rerun with --resume", run.path)
        raise
    return run.finish()


def _data_summary(data: Dataset, cfg: RunConfig) -> dict[str, Any]:
    return {
        "name": data.name,
        "source": data.source,
        "classes": list(data.classes),
        "image_shape": list(data.image_shape),
        "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "analysed_split": cfg.split,
        "analysed_n": min(cfg.n or len(data.split(cfg.split)), len(data.split(cfg.split))),
    }


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (N,) for images x (N, C, H, W)."""
    preds = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def quick_config(cfg: RunConfig) -> RunConfig:
    """A smaller run for a first look: 300 images and the reduced attack budgets."""
    return cfg.replace(n=min(cfg.n or 300, 300), quick=True)
