"""The runner of `robustdissect run`: resolve the run's inputs, run its stages, write results.json.

A stage (see `robustdissect.stages.base`) chains library functions on stored evidence, writes its
tables and figures through `ctx.run` and returns a JSON-able entry built with `section(...)`; the
report renders every entry the same way, so a new capability only adds a stage function. Only
this module writes results.json. Adversarial examples and other evidence come from `ctx.store`
(the run's evidence store), so each piece is computed once per run whichever stages need it.

`--resume` continues an interrupted run only when its config and model are the ones it was
started with (`identity.json`); finished stages are skipped and the store's evidence reused. A
stage that cannot run on the given model (`AnalysisUnavailable`) becomes a warning in its section;
finished stages are never deleted.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn

from . import __version__
from .batching import with_batch_size
from .config import RunConfig, dump_config, pick_device, stage_options
from .data import Dataset, load_dataset
from .errors import UserError
from .models.io import shipped_checkpoints
from .models.resolve import resolve_model as resolve_model
from .models.spec import parse_compare, short_label, split_label, unique_labels
from .parallel import all_ranks_agree, barrier, broadcast_object, dist_env, is_main_process, setup, teardown, world
from .probe.hooks import resolve_layer
from .report import render_report
from .report.findings import INTERVAL_NOTE, findings, model_names
from .report.labels import shorten_paths, summary_rows
from .runs import RunDir, partial_path, read_json, write_json
from .stages.base import STAGES as STAGES
from .stages.base import AnalysisUnavailable as AnalysisUnavailable
from .stages.base import Context as Context
from .stages.base import Prepared as Prepared
from .stages.base import analysed_split as analysed_split
from .stages.base import check_model_name as check_model_name
from .stages.base import profiled
from .stages.base import section as section
from .stages.base import stage_settings as stage_settings
from .store import EVIDENCE_DIR, EvidenceStore, model_hash

log = logging.getLogger(__name__)

COMPARISON = ("fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat", "fmnist-smallcnn-sns")



def environment(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    return {
        "robustdissect": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "processes": world()[1],  # torchrun ranks that shared the images
        "seed": cfg.seed,
        "command": " ".join(sys.argv),
    }


def default_compare(cfg: RunConfig) -> list[Any]:
    """The run's counterparts: `cfg.compare`, or PAT and SNS beside a shipped FMNIST smallcnn."""
    if cfg.compare is not None:
        return list(cfg.compare)
    return [m for m in COMPARISON[1:] if m != cfg.model] if cfg.model in COMPARISON else []


def prepare(cfg: RunConfig) -> Prepared:
    """Load the data, the model and its counterparts (each checked against the data's shape and
    classes) and pick the device; every problem is a UserError before any work."""
    device = pick_device(cfg.device)
    info = dist_env()
    if info.active and device.type == "cuda":  # under torchrun: one GPU per process
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, **cfg.data_options)
    model, card = resolve_model(cfg.model, cfg.weights, cfg.model_args, data, normalize=cfg.normalize)
    available = len(data.split(cfg.split))
    if cfg.n is not None and cfg.n > available:
        log.warning("asked for %d images, but the %s split of %s holds %d: analysing all %d",
                    cfg.n, cfg.split, data.name, available, available)  # fmt: skip
    specs = parse_compare(default_compare(cfg))
    label, *labels = unique_labels([cfg.label or short_label(cfg.model, cfg.weights), *(s.label for s in specs)])
    compared: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    for spec, spec_label in zip(specs, labels, strict=True):
        normalize = spec.normalize or (cfg.normalize if spec.spec not in shipped_checkpoints() else None)
        # the twin of a user factory is built with the run's factory arguments unless it has its own
        args = spec.model_args or (cfg.model_args if spec.spec == cfg.model else {})
        try:
            other, other_card = resolve_model(spec.spec, spec.weights, args, data, normalize=normalize)
        except UserError as e:
            raise UserError(f"--compare {spec_label}: {e}") from None
        compared[spec_label] = (other.to(device), other_card)
    return Prepared(model.to(device), card, label, compared, data, device)


def _identity(cfg: RunConfig, model: nn.Module) -> dict[str, str]:
    """What a resumed run must share with the interrupted one."""
    return {"config": hashlib.sha256(dump_config(cfg).encode()).hexdigest(), "model": model_hash(model)}


def _check_resume(run: RunDir, identity: dict[str, str], cfg: RunConfig) -> None:
    path = run.path / "identity.json"
    if not path.is_file():
        return
    before = read_json(path)
    if not isinstance(before, dict):
        raise UserError(f"cannot resume {run.path}: identity.json is damaged; start over with --overwrite")
    if before.get("model") != identity["model"]:
        raise UserError(
            f"cannot resume {run.path}: it was started with other model weights than {cfg.model}; "
            "use another --out, or --overwrite to start over"
        )
    if before.get("config") != identity["config"]:
        raise UserError(
            f"cannot resume {run.path}: its config differs from this one (see {run.path / 'config.yaml'}); "
            "rerun with --config that file, or --overwrite to start over"
        )


def validate_stages(cfg: RunConfig, model: nn.Module | None = None, prepared: Prepared | None = None) -> None:
    """Check every stage name and its option block before any work starts; with the model, also
    the layer names an option block gives (`layers`); with the prepared run, the model names its
    options give (`compare`, a stage's own `check(prepared, options)`)."""
    for name, options in cfg.stages.items():
        fn = STAGES.get(name)
        opts_cls = getattr(fn, "options_class", None)
        if opts_cls is not None:
            opts = stage_options(opts_cls, profiled(fn, cfg, dict(options)), name)
            layers = getattr(opts, "layers", None)
            if model is not None and isinstance(layers, list | tuple):
                for layer in layers:  # every named layer exists, before any stage runs
                    resolve_layer(model, str(layer))
            if prepared is not None:
                _check_model_names(name, getattr(opts, "compare", None), prepared)
                check = getattr(fn, "check", None)
                if check is not None:
                    check(prepared, opts)
        elif options:
            raise UserError(f"stage '{name}' takes no options, got {sorted(options)}")


def _check_model_names(stage: str, names: Sequence[str] | None, prepared: Prepared) -> None:
    """A stage's `compare` files and factories must exist before any work; a bare name that is
    not (yet) shipped is the stage's warning, with the command that trains it."""
    for spec in names or []:
        bare = split_label(str(spec))[1]
        if bare.endswith((".safetensors", ".json")) or ":" in bare:
            check_model_name(str(spec), prepared, f"{stage}: compare")


def _open_run(out: str | Path, overwrite: bool, resume: bool, identity: dict[str, str], cfg: RunConfig) -> RunDir:
    """Rank 0 creates (or resumes) the run directory; under torchrun the other ranks get a
    throwaway one, and every rank stops when rank 0 cannot open it."""
    if not is_main_process():
        if not all_ranks_agree(True):
            raise UserError("rank 0 could not open the run directory (see its message)")
        scratch = RunDir.scratch(shared=Path(broadcast_object(None)))
        scratch.figure_turns = world()
        return scratch
    try:
        run = RunDir.create(out, overwrite=overwrite, resume=resume)
        try:
            if resume:
                _check_resume(run, identity, cfg)
        except BaseException:
            run.discard()
            raise
    except BaseException:
        all_ranks_agree(False)
        raise
    all_ranks_agree(True)
    broadcast_object(str(run.path))  # the other ranks render their turns of the figures into it
    run.figure_turns = world()
    return run


def run_pipeline(
    cfg: RunConfig, out: str | Path, overwrite: bool = False, resume: bool = False
) -> Path:
    """Run every configured stage into a run directory; return its final path.

    Under `torchrun` (WORLD_SIZE > 1) every rank runs the stages, the images of every attack and
    prediction are split across the ranks and gathered back (see `robustdissect.parallel`), and
    rank 0 alone writes the run directory, which equals a single process's."""
    info = dist_env()
    validate_stages(cfg)
    prepared = prepare(cfg)
    validate_stages(cfg, prepared.model, prepared)
    identity = _identity(cfg, prepared.model)
    info = setup(info, prepared.device)
    try:
        if not info.is_main:  # one voice: rank 0 logs and reports
            logging.getLogger("robustdissect").setLevel(logging.ERROR)
        run = _open_run(out, overwrite, resume, identity, cfg)
        if info.is_main:
            return _run_stages(cfg, run, prepared, identity, run.path / EVIDENCE_DIR)
        try:  # the other ranks read what rank 0 stored before (a resumed run) and write nothing
            _run_stages(cfg, run, prepared, identity, partial_path(out) / EVIDENCE_DIR)
        finally:
            run.discard()
        return Path(out)
    finally:
        teardown(info)


def _run_stages(
    cfg: RunConfig, run: RunDir, prepared: Prepared, identity: dict[str, str], evidence: Path
) -> Path:
    """The stages of `cfg` into `run` (those already done in a resumed run are skipped), with
    the evidence store in `evidence`; returns the finished run's path."""
    model, card, data, device = prepared.model, prepared.card, prepared.data, prepared.device
    main = is_main_process()
    done = set(broadcast_object([name for name in cfg.stages if run.stage_done(name)]))
    try:
        torch.manual_seed(cfg.seed)
        store = EvidenceStore(evidence)
        ctx = Context(cfg, run, model, card, data, device, store, prepared.label, prepared.compared)
        run.write_text("config.yaml", dump_config(cfg))
        write_json(run.path / "identity.json", identity)
        write_json(run.path / "env.json", environment(cfg, device))
        run.update_results(
            schema_version=1, model=prepared.label, model_spec=cfg.model, model_card=card,
            model_hash=identity["model"], dataset=_data_summary(data, cfg),
            compared={label: _card_summary(c) for label, (_m, c) in prepared.compared.items()},
        )  # fmt: skip
        timings: dict[str, float] = {}
        for name, options in cfg.stages.items():
            if name in done:
                log.info("stage %s already done, skipping", name)
                continue
            log.info("stage %s", name)
            t0 = time.perf_counter()
            fn = STAGES.get(name)
            try:
                entry = fn(ctx, with_batch_size(fn, ctx, profiled(fn, cfg, dict(options))))
            except AnalysisUnavailable as e:
                log.warning("stage %s could not run: %s", name, e)
                entry = section(name, text=f"This analysis could not run on this model: {e}", warnings=[str(e)])
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            timings[name] = entry["seconds"]
            run.set_stage(name, entry)
            run.update_results(**ctx.results, evidence=store.counts())
        barrier()  # every rank has dropped its shares and rendered its figures before rank 0 goes on
        if main:
            store.remove_empty_shard_folders()
            render_report(run.path)
    except UserError:
        if any(run.stage_done(n) for n in cfg.stages):
            log.warning("finished stages are kept in %s; fix the problem and rerun with --resume", run.path)
        else:
            run.discard()
        raise
    return run.finish() if main else run.path


def _card_summary(card: Mapping[str, Any]) -> dict[str, Any]:
    """What a report says of a compared model: its architecture, objective and training data."""
    arch = card.get("arch") if isinstance(card.get("arch"), dict) else {}
    objective = card.get("objective")
    return {
        "arch": str(arch.get("name", "")) if arch else "",
        "objective": objective.get("name") if isinstance(objective, dict) else objective,
        "dataset": card.get("dataset"),
    }


def _data_summary(data: Dataset, cfg: RunConfig) -> dict[str, Any]:
    return {
        "name": data.name,
        "source": data.source,
        "classes": list(data.classes),
        "image_shape": list(data.image_shape),
        "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "analysed_split": cfg.split,
        "analysed_n": min(cfg.n or len(data.split(cfg.split)), len(data.split(cfg.split))),
        "analysed_images": "a seeded random sample" if cfg.sample else "the first n in file order",
    }


def headline(results: Mapping[str, Any]) -> list[str]:
    """The console summary of a finished run: each stage's summary numbers (with the report's
    readable labels and formats) and seconds, the evidence store's hits (requests answered from
    the store) and computations, then what the run found, in plain sentences."""
    names = model_names(results)
    lines: list[str] = []
    stages = results.get("stages")
    for name, entry in (stages if isinstance(stages, Mapping) else {}).items():
        if not isinstance(entry, Mapping):
            continue
        seconds = entry.get("seconds")
        title = shorten_paths(str(entry.get("title", name)))
        timed = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
        lines.append(f"{title} ({name}, {seconds:.0f} s)" if timed else f"{title} ({name})")
        summary = entry.get("summary")
        for label, shown in summary_rows(str(name), summary if isinstance(summary, Mapping) else {}, names):
            lines.append(f"  {label:<40} {shown}")
        for w in entry.get("warnings") or []:
            lines.append(f"  warning: {w}")
    ev = results.get("evidence")
    if isinstance(ev, Mapping):
        hits = sum((ev.get("hits") or {}).values())
        made = sum((ev.get("misses") or {}).values())
        lines.append(f"evidence store: {made} items computed, {hits} requests answered from the store")
    found = findings(results)
    if found:
        lines.append(f"What this run found ({INTERVAL_NOTE}):")
        lines += [f"  - {s}" for s in found]
    return lines


# `run --quick`: a first look in under a minute, on top of the reduced budgets of the default run.
FIRST_LOOK: dict[str, dict[str, Any]] = {
    "evaluate": {
        "attacks": ["pgd-linf", "fgsm"],
        "worst_case": ["pgd-linf", "fgsm", "apgd-ce"],
        "curve_n": 200,  # the table's images: its PGD-20 is the sweeps' (ε, 20) point, from the store
        "eps_sweep_relative": [1.0],
        "steps_sweep": [1, 20],
    },
    "sensitivity": {"n": 100, "experiments": ["profiles", "compare"]},
    "concepts": {"n": 300, "figure_concepts": 2, "gradcam_images": 2},
    "diagnose": {"n": 16, "show": 2},  # 16 explained examples keep the first look within its minute
}


def quick_config(cfg: RunConfig) -> RunConfig:
    """A first look: at most 200 images, the reduced budgets and the lighter stage settings of
    FIRST_LOOK (options the config already sets win)."""
    stages = {name: {**FIRST_LOOK.get(name, {}), **opts} for name, opts in cfg.stages.items()}
    if cfg.n is None or cfg.n > 200:
        log.info("--quick analyses 200 images, not %s; drop --quick to analyse them all", cfg.n or "the whole split")
    return cfg.replace(n=min(cfg.n or 200, 200), quick=True, stages=stages)
