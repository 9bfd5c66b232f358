"""The evidence store of a run: adversarial examples, predictions and per-layer statistics, computed
once per run and reused by every stage that needs them.

Each item is a set of named tensors stored as `evidence/<kind>/<key>.safetensors` in the run
directory. The key is the SHA-256 of a canonical JSON of what determines the item — the model's
weights (`model_hash`), the exact image indices (`index_hash`), the attack and all its settings,
the seed, and whatever else the producer names — so the same request is a hit, and any change is
a miss (never a silent mix of two models or two image sets). Every stage asks the store first;
hits and misses are logged and counted.

From outside the package (a notebook):

    from robustdissect.store import load_evidence, list_evidence
    list_evidence("runs/default")                 # [{"kind": ..., "key": ..., "parts": {...}}, ...]
    tensors, parts = load_evidence("runs/default", "adv", key)   # key or a unique prefix
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import UserError
from .parallel import all_ranks_agree, is_main_process

log = logging.getLogger(__name__)

EVIDENCE_DIR = "evidence"
SHARDS_DIR = ".shards"  # under EVIDENCE_DIR: per-rank shares of unfinished items (torchrun)
T = TypeVar("T")


def model_hash(model: nn.Module) -> str:
    """SHA-256 of the model's class and every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in sorted(model.state_dict().items()):
        data = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{data.dtype}|{tuple(t.shape)}".encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def index_hash(index: Tensor) -> str:
    """SHA-256 of the exact image indices (N,), in order."""
    return hashlib.sha256(index.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def evidence_key(parts: Mapping[str, Any]) -> str:
    """The key of an item: SHA-256 of the canonical JSON of its parts."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class EvidenceStore:
    """Items under `root` (`RUN/evidence`), with an in-memory layer for the current process.

    `fetch(kind, parts, compute)` returns the stored tensors for `parts`, or runs `compute()`,
    stores its tensors and returns them. `hits` and `misses` count requests per kind. Under
    torchrun every rank keeps every item in memory and only rank 0 writes files.
    """

    root: Path
    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    _memory: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    _model_hashes: dict[int, tuple[nn.Module, str]] = field(default_factory=dict, repr=False)
    _objects: dict[str, Any] = field(default_factory=dict, repr=False)

    def model_hash(self, model: nn.Module) -> str:
        """`model_hash(model)`, computed once per model object of this run."""
        cached = self._model_hashes.get(id(model))
        if cached is None or cached[0] is not model:
            cached = (model, model_hash(model))
            self._model_hashes[id(model)] = cached
        return cached[1]

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    def get(self, kind: str, parts: Mapping[str, Any]) -> dict[str, Tensor] | None:
        """The stored tensors for `parts`, or None."""
        key = evidence_key(parts)
        if key in self._memory:
            return self._memory[key]
        p = self.path(kind, key)
        if not p.is_file():
            return None
        tensors = load_file(str(p))
        self._memory[key] = tensors
        return tensors

    def put(self, kind: str, parts: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
        """Store `tensors` (moved to the CPU, contiguous) under the key of `parts`, atomically."""
        key = evidence_key(parts)
        stored = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self._memory[key] = stored
        if not is_main_process():  # under torchrun every rank holds the item; rank 0 writes it
            return
        p = self.path(kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        meta = {"kind": kind, "key": key, "parts": json.dumps(parts, sort_keys=True, default=str)}
        save_file(stored, str(tmp), metadata=meta)
        tmp.replace(p)

    def shard_path(self, kind: str, parts: Mapping[str, Any], part: slice) -> Path:
        """Where this process keeps its share `part` of an item while the item is unfinished."""
        return self.root / SHARDS_DIR / kind / f"{evidence_key(parts)}-{part.start}-{part.stop}.safetensors"

    def fetch_shard(
        self, kind: str, parts: Mapping[str, Any], part: slice, compute: Callable[[], Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """This process's share `part` (images start..stop) of the item `parts` under torchrun:
        from the shard file an interrupted run left, else computed and written by this rank (each
        rank writes its own), so `--resume` repeats no finished share. `drop_shards` removes them
        once the whole item is stored."""
        path = self.shard_path(kind, parts, part)
        if path.is_file():
            log.info("evidence: hit %s/%s images %d..%d (a share of an interrupted run)",
                     kind, evidence_key(parts)[:12], part.start, part.stop)  # fmt: skip
            return load_file(str(path))
        tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
        return tensors

    def drop_shards(self, kind: str, parts: Mapping[str, Any]) -> None:
        """Remove this item's share files (each rank its own: they are named by their images).

        The folders stay: another rank may be writing its share of the next item into them;
        `remove_empty_shard_folders` clears them once every rank is done."""
        for path in (self.root / SHARDS_DIR / kind).glob(f"{evidence_key(parts)}-*.safetensors"):
            path.unlink(missing_ok=True)

    def remove_empty_shard_folders(self) -> None:
        """Leave no empty share folders in a finished run (call on one rank after a barrier)."""
        shards = self.root / SHARDS_DIR
        if not shards.is_dir():
            return
        for folder in [*sorted(p for p in shards.iterdir() if p.is_dir()), shards]:
            with contextlib.suppress(OSError):  # not empty: an interrupted share stays for --resume
                folder.rmdir()

    def fetch(
        self, kind: str, parts: Mapping[str, Any], compute: Callable[[], Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Stored tensors for `parts`, computing and storing them on a miss."""
        found = self.get(kind, parts)
        label = parts.get("name", kind)
        if not all_ranks_agree(found is not None):  # under torchrun: a hit only where every rank has it
            found = None
        if found is not None:
            self.hits[kind] = self.hits.get(kind, 0) + 1
            log.info("evidence: hit %s/%s (%s)", kind, evidence_key(parts)[:12], label)
            return found
        self.misses[kind] = self.misses.get(kind, 0) + 1
        log.info("evidence: computing %s/%s (%s)", kind, evidence_key(parts)[:12], label)
        tensors = dict(compute())
        self.put(kind, parts, tensors)
        return self.get(kind, parts) or tensors

    def memo(self, kind: str, parts: Mapping[str, Any], compute: Callable[[], T]) -> T:
        """An object derived from stored evidence (e.g. per-layer statistics), computed once per
        process for `parts` and kept in memory; counted like `fetch`."""
        key = f"{kind}:{evidence_key(parts)}"
        if key in self._objects:
            self.hits[kind] = self.hits.get(kind, 0) + 1
            log.info("evidence: hit %s/%s", kind, key[len(kind) + 1 : len(kind) + 13])
            return self._objects[key]
        self.misses[kind] = self.misses.get(kind, 0) + 1
        value = compute()
        self._objects[key] = value
        return value

    def counts(self) -> dict[str, dict[str, int]]:
        """{"hits": {kind: n}, "misses": {kind: n}}."""
        return {"hits": dict(self.hits), "misses": dict(self.misses)}


def list_evidence(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored item of a run directory: kind, key and the parts it was keyed on."""
    root = Path(run_dir) / EVIDENCE_DIR
    out: list[dict[str, Any]] = []
    for p in sorted(root.glob("*/*.safetensors")):
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        out.append({"kind": p.parent.name, "key": p.stem, "parts": json.loads(meta.get("parts", "{}"))})
    return out


def load_evidence(run_dir: str | Path, kind: str, key: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and parts of one stored item; `key` may be a unique prefix."""
    folder = Path(run_dir) / EVIDENCE_DIR / kind
    matches = sorted(folder.glob(f"{key}*.safetensors")) if key and "/" not in key else []
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        raise UserError(f"{what} evidence item of kind '{kind}' matches key '{key}' in {Path(run_dir)}")
    with safe_open(str(matches[0]), "pt") as f:
        meta = f.metadata() or {}
    return load_file(str(matches[0])), json.loads(meta.get("parts", "{}"))
