"""What every stage is built on: the stage registry, the `Context` a stage gets, `section(...)`.

A stage is a function (Context, options) -> results entry, registered in `STAGES`; the pipeline
(`robustdissect.pipeline`) resolves the run's inputs, runs the stages and writes results.json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import resources
from ..analysis.sensitivity import SensitivityResult, neuron_sensitivity
from ..attacks import Attack
from ..config import RunConfig, stage_options
from ..data import Dataset, Split
from ..errors import UserError
from ..evaluation import AttackOutcome, attack_evidence
from ..models.io import shipped_checkpoints
from ..models.resolve import resolve_model
from ..models.spec import parse_compare, split_label
from ..registry import Registry
from ..runs import RunDir
from ..store import EvidenceStore

StageFn = Callable[["Context", dict[str, Any]], dict[str, Any]]
# the shipped checkpoints compared by default when the run analyses one of them (vanilla / PAT / SNS)
# the stage registry: name -> stage function; each stage module registers itself
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


def profiled(fn: StageFn, cfg: RunConfig, options: dict[str, Any]) -> dict[str, Any]:
    """The stage's options with its reduced-budget defaults under `quick` (the default run)."""
    reduced = getattr(fn, "reduced_options", None)
    if cfg.quick and reduced:
        return {**reduced, **options}
    return options


def stage_settings(name: str, cfg: RunConfig) -> Any:
    """The validated options object of stage `name` under `cfg` (its profile applied)."""
    fn = STAGES.get(name)
    return stage_options(fn.options_class, profiled(fn, cfg, dict(cfg.stages.get(name, {}))), name)  # type: ignore[attr-defined]
