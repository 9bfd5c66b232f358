"""The run directory: atomic writes, results.json, CSV tables, figures, the marker and the lock.

A run is built in `DIR.partial/` and renamed to `DIR/` when it finishes, so a directory named
`DIR` is always complete. A run stopped by an error the user caused is removed; one that was
interrupted (Ctrl-C, kill) or hit an unexpected error keeps `DIR.partial/` so that `--resume` can
pick it up.

Guarantees:

- every run directory holds a marker file (`.robustdissect-run.json`, with the run's id); only a
  directory with that marker is ever replaced (`--overwrite`) or removed;
- while a run is being written, its `DIR.partial/` holds an exclusive OS-level lock (`flock`); the
  kernel releases it when the process ends, however it ends, so a second process is refused while
  the first lives and may resume once it has died;
- files are written to a temporary name and renamed into place, with the permissions the user's
  umask gives (0644 under the usual 022).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCHEMA_VERSION = 1
MARKER = ".robustdissect-run.json"
LOCK = ".robustdissect.lock"
ERROR_LOG = "error.log"


# -- permissions and atomic writes -------------------------------------------------------------
def umask() -> int:
    """The process's current umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path`.

    The file gets the mode a plain `open(path, "w")` would give (0o666 minus the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the file the caller wanted, not the temporary one
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_png(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Render `fig` to PNG, write it atomically to `path` and close the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values and tuples to plain JSON types (NaN and ±inf -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> None:
    """Write obj atomically as strict JSON, the project's one JSON file format: `jsonable`
    values (NaN and ±inf become null, tensors and tuples lists, paths strings), indent 2, a final
    newline; keys sorted with sort_keys (cards and stamps, so equal content is equal text)."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    """Parse a JSON file; an unreadable or malformed file is a UserError."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


# -- the lock ----------------------------------------------------------------------------------
_HELD: dict[tuple[int, int], DirLock] = {}


class DirLock:
    """An exclusive `flock` on a lock file inside the directory being written.

    The kernel drops the lock when the process ends (exit, crash, kill -9), so a lock that cannot
    be taken always belongs to a live process. `work` is the directory the lock guards and `hint`
    says how to continue its work after an interruption (shown by the command line).
    """

    def __init__(self, path: Path, fd: int, key: tuple[int, int], work: Path, hint: str) -> None:
        self.path, self.work, self.hint = path, work, hint
        self.run: RunDir | None = None  # the run directory this lock guards, when it is one
        self._fd: int | None = fd
        self._key = key

    @classmethod
    def acquire(cls, path: Path, what: str | Path, hint: str = "") -> DirLock:
        """Take the lock at `path` (created if missing) or raise UserError naming the holder.

        A lock this process still holds from an earlier, abandoned call (an exception that left
        a run unfinished) is taken over: one process never waits for itself."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~umask())
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        stale = _HELD.pop(key, None)
        if stale is not None:
            stale.close()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock {path}: {e.strerror}") from None
            who = f"process {holder}" if holder else "another process"
            raise UserError(
                f"{what} is being written by {who}; wait for it to finish or choose another --out"
            ) from None
        try:
            same = os.stat(path).st_ino == st.st_ino
        except OSError:
            same = False
        if not same:  # the holder finished and removed the file between our open and our lock
            os.close(fd)
            raise UserError(
                f"{what} is being written by another process; wait for it to finish or choose another --out"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        lock = cls(path, fd, key, path.parent, hint)
        _HELD[key] = lock
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if _HELD.get(self._key) is self:
            del _HELD[self._key]


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def held_locks() -> list[DirLock]:
    """Locks this process holds on unfinished work (oldest first)."""
    return list(_HELD.values())


def current_run() -> RunDir | None:
    """The newest unfinished run directory this process is writing, if any."""
    for lock in reversed(held_locks()):
        if lock.run is not None:
            return lock.run
    return None


def release_all() -> None:
    """Release every lock this process holds (as process exit would)."""
    for lock in list(_HELD.values()):
        lock.close()


def write_error_log(text: str) -> Path | None:
    """Append `text` to error.log in the newest directory this process is writing; its path."""
    for lock in reversed(held_locks()):
        if lock.work.is_dir():
            log = lock.work / ERROR_LOG
            old = log.read_text(errors="replace") if log.is_file() else ""
            atomic_write_text(log, old + text)
            return log
    return None


# -- the output path ---------------------------------------------------------------------------
def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of a directory robustdissect created, or None."""
    p = directory / MARKER
    if p.is_symlink() or not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        return None
    return data


def _write_marker(directory: Path, kind: str) -> str:
    run_id = uuid.uuid4().hex
    marker = {"tool": "robustdissect", "kind": kind, "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(directory / MARKER, marker)
    return run_id


def partial_path(out: str | Path) -> Path:
    """`DIR.partial` for `--out DIR`."""
    final = Path(out)
    return final.with_name(final.name + ".partial")


def check_writable_parent(target: Path, flag: str = "--out") -> None:
    """Refuse a target whose nearest existing ancestor is a file or not writable."""
    parent = Path(os.path.abspath(target)).parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create {flag} {target}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {flag} {target}: {parent} is not writable")


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """Validate `--out` before any work starts; return the final path.

    Refused with one line: `.`, `..`, `/`, the current directory or one of its parents; a path
    that exists as a file or link; a path inside a file or in a folder that is not writable; an
    existing directory without `--overwrite`, or one robustdissect did not create (no marker)."""
    text = str(out)
    final = Path(out)
    if not text.strip() or final.name in ("", ".", ".."):
        raise UserError(f"--out '{text}' must name a new run directory, e.g. runs/first")
    resolved = final.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(f"--out {text} is the current directory or one of its parents; name a new run directory")
    if final.is_symlink():
        raise UserError(f"--out {final} is a symbolic link; name a new run directory")
    if final.exists():
        if not final.is_dir():
            raise UserError(f"--out {final} is a file; name a new run directory")
        if not overwrite:
            raise UserError(f"run directory {final} already exists; choose another --out or pass --overwrite")
        if read_marker(final) is None:
            raise UserError(
                f"{final} exists and is not a robustdissect run directory (no {MARKER}); "
                "--overwrite only replaces run directories, choose another --out"
            )
    check_writable_parent(final)
    work = partial_path(final)
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise UserError(f"{work} exists and is not a run directory; move it away or choose another --out")
    return final


class SectionArtefacts:
    """The tables and figures one stage writes into a run, listed as its report section wants them."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.tables: list[dict[str, Any]] = []
        self.figures: list[dict[str, str]] = []

    def table(self, name: str, rows: list[dict[str, Any]], title: str, show: bool = False) -> None:
        """Write tables/NAME.csv and list it under `title` (shown inline when `show`)."""
        self.run.write_table(name, rows)
        self.tables.append({"file": f"tables/{name}.csv", "title": title, "show": show})

    def figure(self, name: str, fig: Figure | Callable[[], Figure], caption: str) -> None:
        """Write figures/NAME.png and list it with `caption` (`fig` may be a function that draws
        it: under torchrun only the rank whose turn it is calls it)."""
        self.run.save_figure(name, fig)
        self.figures.append({"file": f"figures/{name}.png", "caption": caption})


class RunDir:
    """A run directory being written. Use `RunDir.create(...)` and `finish()`.

    `path` is where files go (`DIR.partial` until `finish()`), `final` the directory's name when
    complete; `resumed` says whether an interrupted run was picked up."""

    def __init__(
        self,
        final: Path,
        work: Path,
        lock: DirLock | None = None,
        created: bool = False,
        overwrite: bool = False,
        run_id: str = "",
    ) -> None:
        self.final = final
        self.path = work
        self.lock = lock
        self.created = created
        self.resumed = lock is not None and not created
        self.overwrite = overwrite
        self.run_id = run_id
        self.figures_into = work  # the run directory whose figures/ this process renders into
        self.figure_turns = (0, 1)  # (this rank, ranks): under torchrun the ranks take turns drawing
        self._figures_seen = 0

    @classmethod
    def create(cls, out: str | Path, overwrite: bool = False, resume: bool = False) -> RunDir:
        """Start (or with `resume`, continue) a run whose finished directory will be `out`."""
        final = check_out(out, overwrite)
        work = partial_path(final)
        hint = f"finished stages are kept in {work}; rerun the same command with --resume to continue"
        if work.exists():
            marker = read_marker(work)
            if marker is None:
                raise UserError(
                    f"{work} exists but was not created by robustdissect (no {MARKER}); "
                    "move it away or choose another --out"
                )
            lock = DirLock.acquire(work / LOCK, final, hint)
            try:
                if resume:
                    run = cls(final, work, lock, created=False, overwrite=overwrite, run_id=marker["run_id"])
                elif overwrite:
                    _clear(work, keep={LOCK})
                    run = cls(final, work, lock, created=True, overwrite=True, run_id=_write_marker(work, "run"))
                else:
                    raise UserError(
                        f"an interrupted run is in {work}; pass --resume to continue it or --overwrite to start over"
                    )
            except BaseException:
                lock.close()
                raise
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{work.name}.", dir=final.parent))
            try:
                staging.chmod(0o777 & ~umask())
                lock = DirLock.acquire(staging / LOCK, final, hint)
                run_id = _write_marker(staging, "run")
                try:
                    os.rename(staging, work)
                except OSError:
                    lock.close()
                    raise UserError(f"{final} is being written by another process; choose another --out") from None
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            lock.work, lock.path = work, work / LOCK
            run = cls(final, work, lock, created=True, overwrite=overwrite, run_id=run_id)
        if run.lock is not None:
            run.lock.run = run
        try:
            for sub in ("tables", "figures"):
                (work / sub).mkdir(parents=True, exist_ok=True)
        except BaseException:
            run.discard()
            raise
        return run

    @classmethod
    def scratch(cls, shared: Path | None = None) -> RunDir:
        """A throwaway run directory in a temporary folder (removed by `discard()`): where the
        other ranks of a torchrun job put the files that rank 0 writes for real. Their turns of
        figure rendering (`save_figure`) go to `shared`, rank 0's run directory."""
        work = Path(tempfile.mkdtemp(prefix="robustdissect-rank-"))
        for sub in ("tables", "figures"):
            (work / sub).mkdir()
        run = cls(work.with_name(work.name + "-final"), work, created=True)
        run.figures_into = shared or work
        return run

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
        """results.json as written so far (an empty skeleton before the first write)."""
        if self.results_path.is_file():
            data = read_json(self.results_path)
            if not isinstance(data, dict):
                raise UserError(f"{self.results_path} does not hold a JSON object")
            return data
        return {"schema_version": SCHEMA_VERSION, "stages": {}}

    def update_results(self, **fields: Any) -> None:
        res = self.results()
        res.update(jsonable(fields))
        write_json(self.results_path, res)

    def set_stage(self, name: str, entry: Mapping[str, Any]) -> None:
        res = self.results()
        res.setdefault("stages", {})[name] = jsonable(dict(entry))
        write_json(self.results_path, res)

    def stage_done(self, name: str) -> bool:
        return name in self.results().get("stages", {})

    def computed(self) -> bool:
        """Whether the run holds finished work: a finished stage or anything in its evidence store."""
        try:
            if self.results_path.is_file() and self.results().get("stages"):
                return True
            evidence = self.path / "evidence"  # store.EVIDENCE_DIR; ".NAME.tmp" files are unfinished writes
            return evidence.is_dir() and any(p.is_file() and not p.name.startswith(".") for p in evidence.rglob("*"))
        except (OSError, UserError):
            return True  # unreadable: keep it rather than remove work

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

    def save_figure(self, name: str, fig: Figure | Callable[[], Figure]) -> Path:
        """Render `fig` (or what the function `fig` draws) to figures/NAME.png and close it.
        Under torchrun the ranks take turns (the k-th figure of the run is rendered by rank
        k mod W into rank 0's directory): every rank holds the same gathered numbers, and drawing
        and PNG encoding are the slowest serial part of a stage."""
        rank, size = self.figure_turns
        turn = self._figures_seen
        self._figures_seen += 1
        path = self.figures_into / "figures" / f"{name}.png"
        if turn % size != rank:
            if not callable(fig):
                import matplotlib.pyplot as plt

                plt.close(fig)
            return path
        return save_png(fig() if callable(fig) else fig, path)

    def write_text(self, relpath: str, text: str) -> Path:
        path = self.path / relpath
        atomic_write_text(path, text)
        return path

    # -- lifecycle -------------------------------------------------------------------------
    def finish(self) -> Path:
        """Rename DIR.partial to DIR and release the lock; return the final path.

        An existing DIR is replaced only when this run was started with `overwrite` and DIR
        still holds the marker; otherwise the finished run stays in DIR.partial."""
        if self.path == self.final:
            return self.final
        work, final = self.path, self.final
        kept = f"the finished run is kept in {work}"
        if final.exists() or final.is_symlink():
            if not self.overwrite:
                raise UserError(f"{final} appeared while this run was being written; {kept}")
            if final.is_symlink() or not final.is_dir() or read_marker(final) is None:
                raise UserError(f"{final} is no longer a robustdissect run directory; {kept}")
            trash = final.with_name(f".{final.name}.replaced-{self.run_id or uuid.uuid4().hex}")
            os.rename(final, trash)
            try:
                os.rename(work, final)
            except OSError:
                os.rename(trash, final)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.rename(work, final)
            except OSError as e:
                raise UserError(f"cannot rename {work} to {final} ({e.strerror}); {kept}") from None
        self.path = final
        (final / LOCK).unlink(missing_ok=True)
        self._release()
        return final

    def discard(self) -> None:
        """Remove a half-written run after an error the user caused.

        Only a directory this call created is removed; a resumed run is kept for another try."""
        if self.created and self.path != self.final and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.close()


def _clear(directory: Path, keep: set[str]) -> None:
    """Remove everything inside `directory` except the names in `keep`."""
    for child in directory.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _fmt_cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
