"""Render report.html from a run directory alone (results.json, tables/, figures/).

The page is self-contained: figures are embedded as data URIs, so it opens from disk in any
browser. Jinja2 autoescaping covers every user-supplied string. Other pages a stage wrote into
the run directory (a section's `pages`, e.g. the unit explorer's units.html) are linked, when
they are regular files inside it.
"""

from __future__ import annotations

import base64
import csv
import html
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from jinja2 import Environment, FunctionLoader, UndefinedError, select_autoescape

from .. import resources
from ..errors import UserError
from ..runs import atomic_write_text, read_json
from .findings import INTERVAL_NOTE, findings, model_label, model_names
from .labels import format_table, format_value, humanize, shorten_paths, summary_rows

MAX_TABLE_ROWS = 60


def _template_source(name: str) -> str | None:
    """A template from the package resources (None makes Jinja2 raise TemplateNotFound)."""
    try:
        return resources.template(name)
    except FileNotFoundError:
        return None


def _inside(root: Path, rel: Any, where: str) -> Path | None:
    """The regular file `rel` names inside the run directory `root` (resolved), or None if absent.

    Absolute paths, `..`, links that lead outside `root` and anything but a regular file are
    refused: the report embeds only files that belong to the run."""
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        raise UserError(f"{where}: 'file' must be a path inside the run directory, got {rel!r}")
    if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
        raise UserError(f"{where}: '{rel}' is not inside the run directory; the report reads only files in it")
    target = root / rel
    if not target.exists() and not target.is_symlink():
        return None
    try:
        resolved = target.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UserError(f"{where}: '{rel}' is a broken or looping link") from None
    if not resolved.is_relative_to(root):
        raise UserError(f"{where}: '{rel}' leads outside the run directory; the report reads only files in it")
    if not stat.S_ISREG(resolved.stat().st_mode):
        raise UserError(f"{where}: '{rel}' is not a regular file")
    return resolved


def _figure_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(path: Path, where: str) -> dict[str, Any] | None:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{where}: cannot read {path.name} as CSV: {e}") from None
    if not rows:
        return None
    body = rows[1:]
    header, shown = format_table(rows[0], body[:MAX_TABLE_ROWS])
    return {"header": header, "rows": shown, "truncated": max(0, len(body) - MAX_TABLE_ROWS)}


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _entries(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UserError(f"{where} must be a list of objects with a 'file'")
    for i, v in enumerate(value):
        if "file" not in v:
            raise UserError(f"{where}[{i}] has no 'file'")
    return value


def _fmt(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return html.unescape(format_value(v))
    return format_value(v)


def render_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html from the files in run_dir; return its path.

    Only regular files inside run_dir are read; a results.json that names anything else, or
    that does not have the shape the run writes, is a UserError."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run} is not a run directory")
    root = run.resolve()
    results_path = _inside(root, "results.json", str(run))
    if results_path is None:
        raise UserError(f"{run} is not a run directory (no results.json)")
    results = _mapping(read_json(results_path), f"{run}/results.json")
    env_path = _inside(root, "env.json", str(run))
    env_info = _mapping(read_json(env_path), f"{run}/env.json") if env_path else {}
    names = model_names(results)
    sections = []
    for name, raw in _mapping(results.get("stages"), "results.json 'stages'").items():
        where = f"results.json stage '{name}'"
        entry = _mapping(raw, where)
        figures = []
        for i, f in enumerate(_entries(entry.get("figures"), f"{where} figures")):
            path = _inside(root, f["file"], f"{where} figure {i}")
            if path is not None:
                figures.append({"uri": _figure_uri(path), "caption": str(f.get("caption", "")), "file": f["file"]})
        tables, links = [], []
        for i, t in enumerate(_entries(entry.get("tables"), f"{where} tables")):
            path = _inside(root, t["file"], f"{where} table {i}")
            if path is None:
                continue
            links.append(t)
            if t.get("show"):
                data = _table(path, f"{where} table {i}")
                if data is not None:
                    tables.append({"title": t.get("title", t["file"]), "file": t["file"], **data})
        pages = []
        for i, pg in enumerate(_entries(entry.get("pages"), f"{where} pages")):
            if _inside(root, pg["file"], f"{where} page {i}") is not None:
                pages.append({"file": pg["file"], "title": str(pg.get("title", pg["file"])),
                              "caption": str(pg.get("caption", ""))})  # fmt: skip
        warnings = entry.get("warnings") or []
        sections.append(
            {
                "id": name,
                "title": shorten_paths(str(entry.get("title", name))),
                "text": entry.get("text", ""),
                "summary": summary_rows(name, _mapping(entry.get("summary"), f"{where} summary"), names),
                "figures": figures,
                "tables": tables,
                "links": links,
                "pages": pages,
                "warnings": [str(w) for w in warnings] if isinstance(warnings, list) else [str(warnings)],
                "seconds": entry.get("seconds") if isinstance(entry.get("seconds"), (int, float)) else None,
            }
        )
    jenv = Environment(loader=FunctionLoader(_template_source), autoescape=select_autoescape(["html", "j2"]))
    jenv.filters["fmt"] = _fmt
    jenv.filters["human"] = humanize
    try:
        found = findings(results)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise UserError(f"{run}/results.json has a value of an unexpected type ({e})") from None
    try:
        page = jenv.get_template("report.html.j2").render(
            results=results,
            model=model_label(results),
            findings=found,
            interval_note=INTERVAL_NOTE,
            env=env_info,
            sections=sections,
            card=_mapping(results.get("model_card"), "results.json 'model_card'"),
            dataset=_mapping(results.get("dataset"), "results.json 'dataset'"),
        )
    except (TypeError, ValueError, AttributeError, UndefinedError) as e:
        raise UserError(f"{run}/results.json has a value of an unexpected type ({e})") from None
    out = run / "report.html"
    if out.is_dir() and not out.is_symlink():
        raise UserError(f"{out} is a directory; remove it to render the report")
    atomic_write_text(out, page)
    return out
