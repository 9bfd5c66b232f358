"""The stages of `robustdissect run`: each is a function (Context, options) -> results entry.

A stage chains library functions on stored evidence, writes its tables and figures through
`ctx.run` and returns a JSON-able entry built with `section(...)`; the report renders every entry
the same way, so a new capability only adds a stage function. Only this module writes
results.json. Adversarial examples and other evidence come from `ctx.store` (the run's evidence
store), so each piece is computed once per run whichever stages need it.

`--resume` continues an interrupted run only when its config and model are the ones it was
started with (`identity.json`); finished stages are skipped and the store's evidence reused. A
stage that cannot run on the given model (`AnalysisUnavailable`) becomes a warning in its section;
finished stages are never deleted.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import __version__, resources
from .attacks import Attack
from .config import RunConfig, dump_config, pick_device
from .data import Dataset, Split, load_dataset
from .errors import UserError
from .evaluation import AttackOutcome, attack_evidence
from .models.io import shipped_checkpoints
from .models.resolve import resolve_model as resolve_model
from .models.spec import parse_compare, short_label, split_label, unique_labels
from .registry import Registry
from .runs import RunDir, read_json, write_json
from .store import EVIDENCE_DIR, EvidenceStore

if TYPE_CHECKING:
    from .analysis.sensitivity import SensitivityResult

log = logging.getLogger(__name__)

StageFn = Callable[["Context", dict[str, Any]], dict[str, Any]]
# the shipped checkpoints compared by default when the run analyses one of them (vanilla / PAT / SNS)
COMPARISON = ("fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat", "fmnist-smallcnn-sns")
STAGES: Registry[StageFn] = Registry("stage")


@dataclass
class Context:
    """What every stage gets: the config, the run directory, the model, the data, the store."""

    config: RunConfig
    run: RunDir
    model: nn.Module
    card: dict[str, Any]
    data: Dataset
    device: torch.device
    store: EvidenceStore
    label: str = "model"  # the run's model's short name
    # the run's counterparts: label -> (model on the run's device, card)
    compared: dict[str, tuple[nn.Module, dict[str, Any]]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # run-level fields a stage reports

    @property
    def split(self) -> Split:
        """The analysed images: the first `config.n` images of `config.split` in file order, or
        a seeded random sample of n with `config.sample`."""
        return analysed_split(self.data, self.config)

    def attack(
        self, attack: Attack, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, model: nn.Module | None = None
    ) -> AttackOutcome:
        """`attack` on images x (N, C, H, W) with labels y (N,), positions `index` (N,) of the
        analysed split, against `model` (default the run's model): from the store when the same
        (model weights, images, attack settings, seed) was computed before in this run."""
        return attack_evidence(
            self.store, model if model is not None else self.model, attack, x, y, index, self.images_id
        )

    def sensitivity(
        self, outcome: AttackOutcome, x: torch.Tensor, layers: Sequence[str], reduction: str = "eq1",
        model: nn.Module | None = None, batch_size: int = 250,
    ) -> SensitivityResult:
        """σ (Eq. 1) of `layers` on the pairs (x, outcome.x_adv), computed once per run."""
        from .analysis import neuron_sensitivity

        m = model if model is not None else self.model
        parts = {"adv": outcome.key, "model": self.store.model_hash(m), "layers": list(layers), "reduction": reduction}
        return self.store.memo(
            "sigma", parts,
            lambda: neuron_sensitivity(m, (x, outcome.x_adv), list(layers), reduction=reduction,  # type: ignore[arg-type]
                                       batch_size=batch_size),
        )  # fmt: skip

    def comparison_models(self, names: Sequence[str] | None = None) -> tuple[dict[str, nn.Module], list[str]]:
        """The models to compare with the run's model, by short label: the run's `compare` models
        (resolved once, before any stage), or the specs `names` a stage's options give instead.
        Returns ({label: model on the run's device}, warnings for those that cannot be used)."""
        if names is None:
            return {label: m for label, (m, _card) in self.compared.items()}, []
        models: dict[str, nn.Module] = {}
        warnings: list[str] = []
        for spec in parse_compare(list(names)):
            if spec.spec == self.config.model and spec.weights == self.config.weights:
                continue
            try:
                other, _card = resolve_model(spec.spec, spec.weights, spec.model_args, self.data,
                                             normalize=spec.normalize)  # fmt: skip
            except UserError as e:
                warnings.append(f"model {spec.label} not compared: {e}")
                continue
            models[spec.label] = other.to(self.device)
        return models, warnings

    def with_counterparts(
        self, names: Sequence[str] | None = None, limit: int | None = None
    ) -> tuple[dict[str, nn.Module], list[str]]:
        """The run's model first, then `comparison_models(names)` (at most `limit` of them), by
        short label; warnings for those that cannot be used."""
        others, warnings = self.comparison_models(names)
        kept = list(others.items())[: limit if limit is not None else len(others)]
        return {self.label: self.model, **dict(kept)}, warnings

    def load_model(self, spec: str) -> tuple[nn.Module, dict[str, Any]] | str:
        """Model `spec` (a counterpart's label, a shipped name, a checkpoint file) on the run's
        device with its card, checked against the run's data; or one sentence why it cannot be used."""
        if spec == self.label:
            return self.model, self.card
        if spec in self.compared:
            return self.compared[spec]
        if not spec.endswith((".safetensors", ".json")) and spec not in shipped_checkpoints():
            return f"checkpoint '{spec}' is not available; train it with: {retrain_hint(spec)}"
        try:
            model, card = resolve_model(spec, None, {}, self.data)
        except UserError as e:
            return f"checkpoint '{spec}' cannot be used here ({e})"
        return model.to(self.device).eval(), card

    @property
    def builtin_reference(self) -> bool:
        """Whether the run analyses a shipped checkpoint on the data it was trained on: only then
        do the shipped reference studies (YU-1, IG-1, the pushback results) belong in its report."""
        return self.config.model in shipped_checkpoints() and self.card.get("dataset") == self.data.name

    def robust_counterpart(self) -> str | None:
        """The label of the first counterpart not trained with the standard objective, if any."""
        for label, (_m, card) in self.compared.items():
            objective = card.get("objective")
            name = objective.get("name") if isinstance(objective, dict) else objective
            if name not in ("vanilla", "standard"):
                return label
        return None

    def no_counterpart(self, what: str) -> str:
        """The sentence a stage shows when it needs a robust counterpart and the run has none."""
        return (
            f"No robust counterpart to {what}: pass --compare SPEC (e.g. robust=my_model_pat.safetensors), "
            f"or train one: robustdissect train --model {self.config.model} --objective pat --out runs/pat."
        )

    @property
    def images_id(self) -> str:
        """What identifies the analysed image set that `index` positions refer to."""
        c = self.config
        return f"{self.data.name}/{c.split}/n={c.n}/seed={c.seed}"


def section(
    title: str,
    text: str = "",
    summary: Mapping[str, Any] | None = None,
    tables: Sequence[Mapping[str, Any]] = (),
    figures: Sequence[Mapping[str, str]] = (),
    warnings: Sequence[str] = (),
    pages: Sequence[Mapping[str, str]] = (),
    **data: Any,
) -> dict[str, Any]:
    """A results entry the report can render.

    tables: [{"file": "tables/x.csv", "title": ..., "show": True}] (shown ones are rendered as
    HTML tables); figures: [{"file": "figures/x.png", "caption": ...}]; pages: other HTML pages
    the stage wrote into the run directory, [{"file": "units.html", "title": ..., "caption": ...}]
    (linked from the report); extra keys are kept as machine-readable results.
    """
    entry = {
        "title": title,
        "text": text,
        "summary": dict(summary or {}),
        "tables": list(tables),
        "figures": list(figures),
        "warnings": list(warnings),
        **data,
    }
    if pages:
        entry["pages"] = list(pages)
    return entry


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


@dataclass(frozen=True)
class Prepared:
    """A run's resolved inputs: its model (with card and short label), counterparts, data, device."""

    model: nn.Module
    card: dict[str, Any]
    label: str
    compared: dict[str, tuple[nn.Module, dict[str, Any]]]
    data: Dataset
    device: torch.device


def retrain_hint(name: str) -> str:
    """The command (and shipped preset) that trains checkpoint `name`."""
    stem = Path(name).stem
    cmd = f"robustdissect train --config {stem} --out runs/train-{stem}"
    if stem not in resources.train_presets():
        return f"{cmd} (there is no preset '{stem}': write a config from the §8.3 presets)"
    return cmd


def default_compare(cfg: RunConfig) -> list[Any]:
    """The run's counterparts: `cfg.compare`, or PAT and SNS beside a shipped FMNIST smallcnn."""
    if cfg.compare is not None:
        return list(cfg.compare)
    return [m for m in COMPARISON[1:] if m != cfg.model] if cfg.model in COMPARISON else []


def prepare(cfg: RunConfig) -> Prepared:
    """Load the data, the model and its counterparts (each checked against the data's shape and
    classes) and pick the device; every problem is a UserError before any work."""
    device = pick_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
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


def analysed_split(data: Dataset, cfg: RunConfig) -> Split:
    """The images a run analyses (see `Context.split`)."""
    split = data.split(cfg.split)
    if cfg.n is None or cfg.n >= len(split):
        return split
    if cfg.sample:
        return split.subset(cfg.n, seed=cfg.seed)
    return Split(split.x[: cfg.n], split.y[: cfg.n])


class AnalysisUnavailable(UserError):
    """An analysis that cannot run on the given model (a reused module, a layer without channels);
    the pipeline turns it into a warning in the stage's section instead of failing the run."""


def _identity(cfg: RunConfig, model: nn.Module) -> dict[str, str]:
    """What a resumed run must share with the interrupted one."""
    import hashlib

    from .store import model_hash

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
    from .config import stage_options

    for name, options in cfg.stages.items():
        fn = STAGES.get(name)
        opts_cls = getattr(fn, "options_class", None)
        if opts_cls is not None:
            opts = stage_options(opts_cls, _profiled(fn, cfg, dict(options)), name)
            layers = getattr(opts, "layers", None)
            if model is not None and isinstance(layers, list | tuple):
                from .models import resolve_layer

                for layer in layers:  # every named layer exists, before any stage runs
                    resolve_layer(model, str(layer))
            if prepared is not None:
                _check_model_names(name, getattr(opts, "compare", None), prepared)
                check = getattr(fn, "check", None)
                if check is not None:
                    check(prepared, opts)
        elif options:
            raise UserError(f"stage '{name}' takes no options, got {sorted(options)}")


def check_model_name(spec: str, prepared: Prepared, what: str) -> None:
    """`spec` names the run's model, one of its counterparts, a shipped checkpoint, a checkpoint
    file with its card or a factory: anything else is a UserError naming `what`."""
    if spec in (prepared.label, *prepared.compared) or spec in shipped_checkpoints():
        return
    _label, bare = split_label(spec)
    if bare.endswith((".safetensors", ".json")):
        for path in (Path(bare).with_suffix(".safetensors"), Path(bare).with_suffix(".json")):
            if not path.is_file():
                raise UserError(f"{what} {spec}: {path} does not exist (a checkpoint needs its weights and card)")
        return
    if ":" not in bare:
        names = ", ".join([prepared.label, *prepared.compared]) or "none"
        raise UserError(f"{what} {spec} is neither a model of this run ({names}) nor a shipped checkpoint "
                        "(robustdissect list checkpoints) nor a checkpoint file")  # fmt: skip


def _check_model_names(stage: str, names: Sequence[str] | None, prepared: Prepared) -> None:
    for spec in names or []:
        check_model_name(str(spec), prepared, f"{stage}: compare")


def _profiled(fn: StageFn, cfg: RunConfig, options: dict[str, Any]) -> dict[str, Any]:
    """The stage's options with its reduced-budget defaults under `quick` (the default run)."""
    reduced = getattr(fn, "reduced_options", None)
    if cfg.quick and reduced:
        return {**reduced, **options}
    return options


def stage_settings(name: str, cfg: RunConfig) -> Any:
    """The validated options object of stage `name` under `cfg` (its profile applied)."""
    from .config import stage_options

    fn = STAGES.get(name)
    return stage_options(fn.options_class, _profiled(fn, cfg, dict(cfg.stages.get(name, {}))), name)  # type: ignore[attr-defined]


def run_pipeline(
    cfg: RunConfig, out: str | Path, overwrite: bool = False, resume: bool = False
) -> Path:
    """Run every configured stage into a run directory; return its final path."""
    load_stages()
    validate_stages(cfg)
    prepared = prepare(cfg)
    model, card, data, device = prepared.model, prepared.card, prepared.data, prepared.device
    validate_stages(cfg, model, prepared)
    identity = _identity(cfg, model)
    run = RunDir.create(out, overwrite=overwrite, resume=resume)
    if resume:
        _check_resume(run, identity, cfg)
    try:
        torch.manual_seed(cfg.seed)
        store = EvidenceStore(run.path / EVIDENCE_DIR)
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
            if run.stage_done(name):
                log.info("stage %s already done, skipping", name)
                continue
            log.info("stage %s", name)
            t0 = time.perf_counter()
            fn = STAGES.get(name)
            try:
                entry = fn(ctx, _profiled(fn, cfg, dict(options)))
            except AnalysisUnavailable as e:
                log.warning("stage %s could not run: %s", name, e)
                entry = section(name, text=f"This analysis could not run on this model: {e}", warnings=[str(e)])
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            timings[name] = entry["seconds"]
            run.set_stage(name, entry)
            run.update_results(**ctx.results, evidence=store.counts())
        from .report import render_report

        render_report(run.path)
    except UserError:
        if any(run.stage_done(n) for n in cfg.stages):
            log.warning("finished stages are kept in %s; fix the problem and rerun with --resume", run.path)
        else:
            run.discard()
        raise
    return run.finish()


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
    from .report.findings import INTERVAL_NOTE, findings, model_names
    from .report.labels import shorten_paths, summary_rows

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
}


def quick_config(cfg: RunConfig) -> RunConfig:
    """A first look: at most 200 images, the reduced budgets and the lighter stage settings of
    FIRST_LOOK (options the config already sets win)."""
    stages = {name: {**FIRST_LOOK.get(name, {}), **opts} for name, opts in cfg.stages.items()}
    if cfg.n is None or cfg.n > 200:
        log.info("--quick analyses 200 images, not %s; drop --quick to analyse them all", cfg.n or "the whole split")
    return cfg.replace(n=min(cfg.n or 200, 200), quick=True, stages=stages)
