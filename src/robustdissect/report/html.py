"""Render report.html from a run directory alone (results.json, tables/, figures/).

The page is self-contained: figures are embedded as data URIs, so it opens from disk in any
browser. Jinja2 autoescaping covers every user-supplied string.
"""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path
from typing import Any

from jinja2 import Environment, FunctionLoader, select_autoescape

from .. import resources
from ..errors import UserError
from ..runs import atomic_write_text, read_json

MAX_TABLE_ROWS = 60


def _template_source(name: str) -> str | None:
    """A template from the package resources (None makes Jinja2 raise TemplateNotFound)."""
    try:
        return resources.template(name)
    except FileNotFoundError:
        return None


def _figure_uri(run: Path, rel: str) -> str | None:
    p = run / rel
    if not p.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def _table(run: Path, rel: str) -> dict[str, Any] | None:
    p = run / rel
    if not p.is_file():
        return None
    with p.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return None
    body = rows[1:]
    return {"header": rows[0], "rows": body[:MAX_TABLE_ROWS], "truncated": max(0, len(body) - MAX_TABLE_ROWS)}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    if v is None:
        return "–"
    if isinstance(v, (list, dict)):
        return html.unescape(str(v))
    return str(v)


def render_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html from the files in run_dir; return its path."""
    run = Path(run_dir)
    if not (run / "results.json").is_file():
        raise UserError(f"{run} is not a run directory (no results.json)")
    results: dict[str, Any] = read_json(run / "results.json")
    env_info = read_json(run / "env.json") if (run / "env.json").is_file() else {}
    sections = []
    for name, entry in results.get("stages", {}).items():
        if not isinstance(entry, dict):
            continue
        figures = [
            {"uri": uri, "caption": f.get("caption", ""), "file": f["file"]}
            for f in entry.get("figures", [])
            if (uri := _figure_uri(run, f["file"])) is not None
        ]
        tables = []
        for t in entry.get("tables", []):
            if t.get("show"):
                data = _table(run, t["file"])
                if data is not None:
                    tables.append({"title": t.get("title", t["file"]), "file": t["file"], **data})
        links = [t for t in entry.get("tables", []) if (run / t["file"]).is_file()]
        sections.append(
            {
                "id": name,
                "title": entry.get("title", name),
                "text": entry.get("text", ""),
                "summary": entry.get("summary", {}),
                "figures": figures,
                "tables": tables,
                "links": links,
                "warnings": entry.get("warnings", []),
                "seconds": entry.get("seconds"),
            }
        )
    jenv = Environment(loader=FunctionLoader(_template_source), autoescape=select_autoescape(["html", "j2"]))
    jenv.filters["fmt"] = _fmt
    page = jenv.get_template("report.html.j2").render(
        results=results,
        env=env_info,
        sections=sections,
        card=results.get("model_card", {}),
        dataset=results.get("dataset", {}),
    )
    out = run / "report.html"
    atomic_write_text(out, page)
    return out
