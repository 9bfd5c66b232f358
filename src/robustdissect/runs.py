"""The run directory: atomic writes, results.json, CSV tables, figures, and the manifest.

A run is built in `DIR.partial/` and renamed to `DIR/` when it finishes, so a directory named
`DIR` is always complete. A run stopped by an error the user caused is removed; one that was
interrupted (Ctrl-C, kill) keeps `DIR.partial/` so that `--resume` can pick it up.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCHEMA_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_png(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Render `fig` to PNG, write it atomically to `path` and close the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values and tuples to plain JSON types (NaN -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


class RunDir:
    """A run directory being written. Use `RunDir.create(...)` and `finish()`."""

    def __init__(self, final: Path, work: Path) -> None:
        self.final = final
        self.path = work

    @classmethod
    def create(cls, out: str | Path, overwrite: bool = False, resume: bool = False) -> RunDir:
        final = Path(out)
        work = final.with_name(final.name + ".partial")
        if final.exists() and not overwrite:
            raise UserError(f"run directory {final} already exists; choose another --out or pass --overwrite")
        if work.exists() and not resume:
            if overwrite:
                shutil.rmtree(work)
            else:
                raise UserError(
                    f"an interrupted run is in {work}; pass --resume to continue it or --overwrite to start over"
                )
        for sub in ("tables", "figures"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        return cls(final, work)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open a finished run directory (for re-rendering the report)."""
        p = Path(path)
        if not (p / "results.json").is_file():
            raise UserError(f"{p} is not a run directory (no results.json)")
        return cls(p, p)

    # -- results ---------------------------------------------------------------------------
    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    def results(self) -> dict[str, Any]:
        if self.results_path.is_file():
            data: dict[str, Any] = read_json(self.results_path)
            return data
        return {"schema_version": SCHEMA_VERSION, "stages": {}}

    def update_results(self, **fields: Any) -> None:
        res = self.results()
        res.update(_jsonable(fields))
        write_json(self.results_path, res)

    def set_stage(self, name: str, entry: Mapping[str, Any]) -> None:
        res = self.results()
        res.setdefault("stages", {})[name] = _jsonable(dict(entry))
        write_json(self.results_path, res)

    def stage_done(self, name: str) -> bool:
        return name in self.results().get("stages", {})

    # -- files -----------------------------------------------------------------------------
    def write_table(self, name: str, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
        rows = [dict(r) for r in rows]
        cols = list(columns) if columns else (list(rows[0]) if rows else [])
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt_cell(v) for k, v in r.items()})
        path = self.path / "tables" / f"{name}.csv"
        atomic_write_text(path, buf.getvalue())
        return path

    def save_figure(self, name: str, fig: Figure) -> Path:
        return save_png(fig, self.path / "figures" / f"{name}.png")

    def write_text(self, relpath: str, text: str) -> Path:
        path = self.path / relpath
        atomic_write_text(path, text)
        return path

    # -- lifecycle -------------------------------------------------------------------------
    def finish(self) -> Path:
        """Rename DIR.partial to DIR; return the final path."""
        if self.path != self.final:
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.path, self.final)
            self.path = self.final
        return self.final

    def discard(self) -> None:
        """Remove a half-written run (after an error the user caused)."""
        if self.path != self.final and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _fmt_cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
