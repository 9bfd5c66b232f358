"""The user documents stay true to the code: docs/config.md is what scripts/config_doc.py generates
from the option dataclasses, every key in it has a meaning, and every `METHODS §X.Y` the code cites
is a section of docs/methods.md."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config_doc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_doc", ROOT / "scripts" / "config_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["config_doc"] = module
    spec.loader.exec_module(module)
    return module


def test_config_md_is_what_the_script_generates(config_doc: ModuleType) -> None:
    expected = config_doc.generate()
    current = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == expected, "docs/config.md is stale: run .venv/bin/python scripts/config_doc.py"


def _table_keys(text: str, heading: str) -> dict[str, list[str]]:
    """Key -> its row's cells in the first table after `heading`."""
    section = text.split(heading, 1)[1]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines()[2:]:
        if line.startswith("#"):
            break
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_key_of_every_option_class_is_listed_with_type_default_and_meaning(config_doc: ModuleType) -> None:
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import STAGES

    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    sections = {"## Run config (top level)": RunConfig}
    for entry in STAGES:
        cls = getattr(entry.factory, "options_class", None)
        if cls is not None:
            sections[f"### `{entry.name}`"] = cls
    assert len(sections) >= 10
    for heading, cls in sections.items():
        rows = _table_keys(text, heading)
        names = [f.name for f in dataclasses.fields(cls)]
        assert list(rows) == names, heading
        for f in dataclasses.fields(cls):
            cells = rows[f.name]
            assert cells[-1] not in ("", "—"), f"{heading} {f.name} has no meaning"
            assert cells[2].strip("`") == config_doc.render_value(config_doc._default(f)), (heading, f.name)
    # the reduced profile of the default run is shown beside the full default
    evaluate = _table_keys(text, "### `evaluate`")
    assert evaluate["cw_steps"][2:4] == ["`300`", "`50`"]


def test_docstring_clauses_are_split_at_the_top_level_only(config_doc: ModuleType) -> None:
    @dataclasses.dataclass
    class Opts:
        """Options. a / b: two keys (None: x; y); c (note): third. an extra sentence for c; d_*: prefixed."""

        a: int = 0
        b: int = 0
        c: int = 0
        d_one: int = 0
        e: int = 0  # the comment

    clauses = config_doc.docstring_clauses(Opts)
    assert clauses["a"] == clauses["b"] == "two keys (None: x; y)"
    assert clauses["c"] == "third (note). an extra sentence for c"
    assert clauses["d_one"] == "prefixed"
    assert "e" not in clauses
    assert config_doc.field_comments(Opts)["e"] == "the comment"


CITATION = re.compile(r"METHODS\s*(§?\s*[0-9][0-9.]*(?:\s*(?:,|/|and|–|-)\s*§?\s*[0-9][0-9.]*)*)")
SECTION = re.compile(r"§?\s*([0-9]+(?:\.[0-9]+)?)")


def cited_sections(text: str) -> set[str]:
    """Section numbers cited as `METHODS §X.Y` (with lists and ranges such as `§6.1–§6.4, §3.5`)."""
    found: set[str] = set()
    for m in CITATION.finditer(text):
        found.update(s.rstrip(".") for s in SECTION.findall(m.group(1)))
    return found


def methods_headings() -> set[str]:
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^#{2,3} ([0-9]+(?:\.[0-9]+)?)[. ]", text, re.MULTILINE)}


def test_citation_parser_reads_lists_and_ranges() -> None:
    text = "see METHODS §6.1–§6.4, §3.5): and METHODS §2.4. and (METHODS §1.6 / §8.3 IG-1) METHODS 3.2"
    assert cited_sections(text) == {"6.1", "6.4", "3.5", "2.4", "1.6", "8.3", "3.2"}
    assert cited_sections("METHODS' K = 20; the METHODS document") == set()


def test_every_methods_section_cited_in_the_code_is_a_heading_of_docs_methods_md() -> None:
    headings = methods_headings()
    assert {"0.4", "1.5", "2.3", "5.4", "6.5", "8.3", "1", "9"} <= headings
    missing: dict[str, list[str]] = {}
    count = 0
    for path in sorted(p for p in (ROOT / "src").rglob("*") if p.suffix in (".py", ".yaml", ".j2")):
        text = path.read_text(encoding="utf-8")
        for section in cited_sections(text):
            count += 1
            if section not in headings:
                missing.setdefault(section, []).append(str(path.relative_to(ROOT)))
    assert count > 40  # the code cites the methods reference throughout
    assert not missing, f"METHODS sections cited in src/ but absent from docs/methods.md: {missing}"


def test_readme_is_a_user_guide_with_the_users_path_before_the_tour() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    order = ["What it does", "Two commands", "Your model and data", "The commands and what each answers",
             "GPU, torchrun and bigger than one machine", "Python API", "What a run directory holds",
             "What happens when things go wrong", "Development"]  # fmt: skip
    assert [h for h in headings if h in order] == order
    # the two commands CI relies on, exactly
    assert "bash scripts/setup.sh && .venv/bin/robustdissect run --out runs/default" in text
    assert "\nbash scripts/test.sh\n" in text
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]*)", text):  # every linked document exists
        assert (ROOT / link).exists(), link
