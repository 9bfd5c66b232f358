"""Readable labels and number formats for the report's key-value tables and the console summary.

Stages name their summary keys for machines (`share RU`, `dbp_criterion_holds`, `RS <model>`);
here each known key gets a label a reader understands and a format: shares and accuracies as
percentages with one decimal, ratios with 3 significant digits, booleans as yes/no. A key
without a label is humanised (underscores to spaces), never shown raw. Model names inside keys
and values are shortened (a file path never appears).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

# kinds of value: "pct" share or accuracy in [0, 1] -> "91.7%"; "num" -> 3 significant digits;
# "int" -> integer; "text" -> as given (shortened paths)
Kind = str

ATTACK_LABELS = {
    "clean": "clean accuracy",
    "pgd-linf": "PGD (L∞)",
    "pgd-l2": "PGD (L2)",
    "fgsm": "FGSM (L∞)",
    "cw-l2": "C&W (L2)",
    "apgd-ce": "APGD-CE",
    "apgd-dlr": "APGD-DLR",
    "spsa": "SPSA (black-box, L∞)",
    "nattack": "NATTACK (black-box, L∞)",
    "square-linf": "Square (black-box, L∞)",
    "square-l2": "Square (black-box, L2)",
}

QUADRANT_LABELS = {
    "RU": "robust & useful units (RU)",
    "NRU": "useful but brittle units (NRU, dangerous)",
    "RL": "robust & useless units (RL)",
    "NL": "noise units (NL)",
}

# exact keys, per stage ("*": any stage): (label, kind)
EXACT: dict[str, dict[str, tuple[str, Kind]]] = {
    "*": {
        "images": ("images", "int"),
        "units": ("units", "int"),
        "split": ("split", "text"),
    },
    "overview": {"clean accuracy": ("clean accuracy", "pct")},
    "sensitivity": {
        "attack": ("attack", "text"),
        "hook": ("hook point", "text"),
        "median top-10% gap (σ top / σ rest)": ("σ of the top 10% over σ of the rest (median over layers)", "num"),
    },
    "features": {
        "τ_ρ": ("usefulness threshold τ_ρ", "text"),
        "τ_s (median s)": ("stability threshold τ_s (median s)", "num"),
        "feature-attacked units": ("units attacked with feature-targeted PGD", "int"),
        "quadrant shift": ("quadrant shift", "text"),
    },
    "concepts": {
        "concept images": ("concept images", "int"),
        "concepts": ("concepts", "int"),
        "detectors": ("concept detectors", "int"),
        "unique concepts": ("distinct concepts detected", "int"),
        "most fragile concepts": ("most fragile concepts (fragility)", "text"),
    },
    "diagnose": {
        "adversarial examples judged": ("adversarial examples judged", "int"),
        "most frequent flip layer": ("most frequent flip layer", "text"),
        "no flip (share)": ("no flip at any layer", "pct"),
        "largest IL_l": ("largest information loss IL_l at", "text"),
        "judge": ("judge", "text"),
        "explanations by": ("explanations by", "text"),
    },
    "pushback": {
        "verdict": ("purification verdict", "text"),
        "dbp_criterion_holds": ("D_bp criterion holds", "bool"),
        "share_brittle_neutralised": ("brittle units neutralised by D_bp", "pct"),
        "share_robust_kept": ("robust units kept by D_bp", "pct"),
    },
}

# patterns over any stage's keys: (regex, label template with the groups, kind)
PATTERNS: list[tuple[re.Pattern[str], str, Kind]] = [
    (re.compile(r"^share (RU|NRU|RL|NL)$"), "share of {q0}", "pct"),
    (re.compile(r"^reliance on RU units \((.+)\)$"), "importance on robust & useful units, {m0}", "pct"),
    (re.compile(r"^Ψ (.+)$"), "Ψ, {m0}", "text"),
    (re.compile(r"^PGD-(\d+) accuracy (.+)$"), "PGD-{0} accuracy, {m1}", "text"),
    (re.compile(r"^a\* ≤ ε \((.+)\)$"), "images with the decision boundary inside ε, {m0}", "pct"),
    (re.compile(r"^steepness \((.+)\)$"), "steepness |∂D/∂a|, {m0}", "num"),
    (re.compile(r"^acc: (.+)$"), "accuracy: {0}", "pct"),
    (re.compile(r"^RS ablation (.+)$"), "reliance shift RS (ablation), {m0}", "pct"),
    (re.compile(r"^RS (.+)$"), "reliance shift RS, {m0}", "pct"),
    (re.compile(r"^Spearman\((.+)\)$"), "Spearman({0}) [95% interval]", "text"),
    (re.compile(r"^dangerous \(NRU\) units$"), "useful but brittle (NRU) units", "int"),
]

_PY_FACTORY = re.compile(r"(?:[^\s:()\[\],;]*/)?([A-Za-z0-9_.-]+?)\.py:([A-Za-z_][A-Za-z0-9_]*)")
_CHECKPOINT = re.compile(r"(?:[^\s()\[\],;]*/)([A-Za-z0-9_.+-]+?)\.(?:safetensors|pt|pth|json)\b")


def short_name(spec: str) -> str:
    """A model spec's short, path-free name: a shipped name as it is, `path/to/file.py:make` ->
    `file:make`, `pkg.module:make` -> `module:make`, a checkpoint path -> its file stem."""
    s = str(spec).strip()
    name, sep, rest = s.partition("=")
    if sep and rest and name and "/" not in name and ":" not in name:
        return name  # `name=SPEC`: the user's own short name
    if ":" in s and not s.endswith((".safetensors", ".pt", ".pth", ".json")):
        module, _, factory = s.rpartition(":")
        if module.endswith(".py"):
            return f"{PurePath(module).stem}:{factory}"
        return f"{module.rsplit('.', 1)[-1]}:{factory}" if "/" not in module else f"{PurePath(module).name}:{factory}"
    if s.endswith((".safetensors", ".pt", ".pth", ".json")) or "/" in s:
        return PurePath(s).stem
    return s


def shorten_paths(text: str) -> str:
    """`text` with every model file path replaced by its short name."""
    text = _PY_FACTORY.sub(lambda m: f"{m.group(1)}:{m.group(2)}", text)
    return _CHECKPOINT.sub(lambda m: m.group(1), text)


def humanize(key: str) -> str:
    """A key without a label, readable: underscores to spaces, paths shortened."""
    return shorten_paths(re.sub(r"\s+", " ", str(key).replace("_", " ")).strip())


def finite(v: Any) -> float | None:
    """v as a float when it is a finite number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def sig(v: float, digits: int = 3) -> str:
    """v with `digits` significant digits, without exponents for everyday magnitudes."""
    if v == 0:
        return "0"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    if abs(v) < 1e-4:
        return f"{v:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    out = f"{v:.{decimals}f}"
    if "." in out and decimals > 0:
        out = out.rstrip("0").rstrip(".")
    return out


def pct(v: float) -> str:
    """A share in [0, 1] as a percentage with one decimal."""
    return f"{100 * v:.1f}%"


def _as_number(v: Any) -> float | None:
    if isinstance(v, str):
        try:
            return finite(float(v))
        except ValueError:
            return None
    return finite(v)


def format_value(v: Any, kind: Kind = "auto") -> str:
    """A summary value as the report shows it (never 'nan', never a long decimal)."""
    if v is None:
        return "–"
    if isinstance(v, bool) or kind == "bool":
        return "yes" if v else "no"
    if isinstance(v, float) and not math.isfinite(v):
        return "n/a"
    if kind == "pct":
        num = _as_number(v)
        if num is not None:
            return pct(num)
    if kind == "int" and isinstance(v, (int, float)):
        return f"{int(v):,}" if float(v).is_integer() else sig(float(v))
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        return sig(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(format_value(x) for x in v)
    if isinstance(v, Mapping):
        return "; ".join(f"{humanize(str(k))} {format_value(x)}" for k, x in v.items())
    text = str(v)
    return "n/a" if text.strip().lower() == "nan" else shorten_paths(text)


def _fill(template: str, groups: Sequence[str], short: Callable[[str], str]) -> str:
    values: dict[str, str] = {}
    for i, g in enumerate(groups):
        values[f"m{i}"] = short(g)
        values[f"q{i}"] = QUADRANT_LABELS.get(g, g)
    return template.format(*groups, **values)


def label(stage: str, key: str, models: Mapping[str, str] | None = None) -> tuple[str, Kind]:
    """(readable label, value kind) of summary key `key` of stage `stage`; `models` maps model
    names as stages write them to the run's short names."""
    names = dict(models or {})

    def short(name: str) -> str:
        return names.get(name) or short_name(name)

    for scope in (stage, "compare" if stage == "training" else stage, "*"):
        hit = EXACT.get(scope, {}).get(key)
        if hit:
            return hit
    for pattern, template, kind in PATTERNS:
        m = pattern.match(key)
        if m:
            return _fill(template, m.groups(), short), kind
    if stage == "evaluate" or key in ATTACK_LABELS:
        return ATTACK_LABELS.get(key, humanize(key)), "text"
    if stage in ("training", "compare"):  # "<model> <attack>"
        model, _, attack = key.rpartition(" ")
        if model and attack in ATTACK_LABELS:
            what = "clean accuracy" if attack == "clean" else ATTACK_LABELS[attack]
            return f"{short(model)}: {what}", "text"
    return humanize(key), "auto"


def summary_rows(stage: str, summary: Mapping[str, Any], models: Mapping[str, str] | None = None
                 ) -> list[tuple[str, str]]:  # fmt: skip
    """(label, formatted value) for every entry of a stage's summary."""
    rows = []
    for key, value in summary.items():
        text, kind = label(stage, str(key), models)
        rows.append((text, format_value(value, kind)))
    return rows


# columns of the stages' CSV tables, readable
COLUMN_LABELS = {
    "ci_low": "95% low",
    "ci_high": "95% high",
    "diff_vs_first": "difference to the first model",
    "diff_ci_low": "difference 95% low",
    "diff_ci_high": "difference 95% high",
    "importance_share": "importance share",
    "n": "images",
}

_SUFFIXES = (("_ci_low", "low"), ("_ci_high", "high"), ("_lo", "low"), ("_hi", "high"), ("_low", "low"),
             ("_high", "high"))  # fmt: skip
_NUMBER = re.compile(r"^-?(\d+\.\d+|\d+(\.\d+)?[eE][-+]?\d+)$")
_ANY_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")


def _interval_of(name: str) -> tuple[str, str] | None:
    """(owner column, 'low' or 'high') of an interval column (`ci_low` -> ('', 'low'))."""
    if name in ("ci_low", "ci_high"):
        return "", name[3:]
    for suffix, side in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], side
    return None


def column_label(name: str) -> str:
    """A CSV column header, readable."""
    if name in COLUMN_LABELS:
        return COLUMN_LABELS[name]
    iv = _interval_of(name)
    if iv and iv[0]:
        owner = iv[0] if iv[0] == "clean" else ATTACK_LABELS.get(iv[0], iv[0])
        return f"{humanize(owner)} 95% {iv[1]}"
    return ATTACK_LABELS.get(name, humanize(name)) if name != "clean" else "clean"


def _percent_columns(header: Sequence[str]) -> set[int]:
    """Columns holding shares or accuracies: named so or after an attack (or `clean`), or with
    their own interval columns."""
    names = list(header)
    base = {n for n in names if re.search(r"(accuracy|share)", n) or n in ATTACK_LABELS}  # an attack's column: accuracy
    base |= {n for n in names if f"{n}_ci_low" in names or f"{n}_lo" in names}
    out = {i for i, n in enumerate(names) if n in base}
    for i, n in enumerate(names):
        iv = _interval_of(n)
        if not iv:
            continue
        owner = iv[0]
        if owner in base or f"{owner}_share" in base or (not owner and ("accuracy" in base or "share" in base)):
            out.add(i)
    return out


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """A CSV table as shown: readable headers, numbers with 3 significant digits, shares and
    accuracies as percentages, 'nan' as n/a, paths shortened."""
    percent = _percent_columns(header)
    out = []
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            text = c.strip()
            if text.lower() in ("nan", "none", ""):
                cells.append("n/a" if text else "")
            elif i in percent and _ANY_NUMBER.match(text) and math.isfinite(float(text)):
                cells.append(pct(float(text)))
            elif _NUMBER.match(text):
                v = float(text)
                cells.append(pct(v) if i in percent and math.isfinite(v) else format_value(v))
            elif text in ("True", "False"):
                cells.append("yes" if text == "True" else "no")
            else:
                cells.append(shorten_paths(text))
        out.append(cells)
    return [column_label(h) for h in header], out
