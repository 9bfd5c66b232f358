"""What a run found, in plain sentences: the first screen of report.html and the console's last lines.

`findings(results)` reads a run's results.json (a mapping) and states, each only when its stage
ran and its numbers exist: how robust the model is (clean accuracy, worst case per threat model),
which layer vulnerability enters at, what share of units are useful but brittle and which
concepts they carry, what the robust counterparts change, Ψ, and the warnings that matter.
Numbers in brackets are 95% intervals. Models are named by their short names, never by a path.
Pure: no file is read, nothing is computed beyond arithmetic on the given numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..stats import wilson_interval
from .labels import ATTACK_LABELS, finite, pct, short_name, sig

INTERVAL_NOTE = "numbers in brackets are 95% intervals"
MAX_WARNINGS = 3
# warnings about reference material a run may lack; they never make the first screen
_MINOR = ("study to show", "is shipped; build the sets", "E13 needs")
_EPS = re.compile(r"eps=([^;,\s]+)")


def _mapping(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _rows(v: Any) -> list[Mapping[str, Any]]:
    return [r for r in v if isinstance(r, Mapping)] if isinstance(v, list) else []


def _stage(results: Mapping[str, Any], *names: str) -> Mapping[str, Any] | None:
    """The entry of the first stage in `names` that ran, or None."""
    stages = _mapping(results.get("stages"))
    for name in names:
        entry = stages.get(name)
        if isinstance(entry, Mapping):
            return entry
    return None


def _interval(lo: Any, hi: Any) -> str:
    """' [a, b]' in percent when both ends are finite, else ''."""
    a, b = finite(lo), finite(hi)
    return f" [{100 * a:.1f}, {100 * b:.1f}]" if a is not None and b is not None else ""


def _points(v: float) -> str:
    return f"{100 * v:+.1f}".replace("-", "−") + " points"


def model_label(results: Mapping[str, Any]) -> str:
    """The run's short name for its model: `model_label` if given, else the short form of `model`."""
    given = results.get("model_label")
    if isinstance(given, str) and given.strip():
        return given.strip()
    return short_name(str(results.get("model", "the model")))


def model_names(results: Mapping[str, Any]) -> dict[str, str]:
    """Model names as stages may write them (full specs, `name=SPEC`) -> the run's short names."""
    out: dict[str, str] = {}
    label = model_label(results)
    for key in ("model", "model_spec"):
        if isinstance(results.get(key), str):
            out[results[key]] = label
    compare = results.get("compare")
    for entry in compare if isinstance(compare, list) else []:
        if isinstance(entry, str):
            out[entry] = short_name(entry)
            name, sep, spec = entry.partition("=")
            if sep and spec:
                out[spec] = short_name(entry)
        elif isinstance(entry, Mapping):
            spec = entry.get("spec", entry.get("model"))
            name = entry.get("name", entry.get("label"))
            if isinstance(spec, str):
                out[spec] = name if isinstance(name, str) and name else short_name(spec)
    return out


class _Names:
    def __init__(self, results: Mapping[str, Any]) -> None:
        self.table = model_names(results)
        self.label = model_label(results)

    def __call__(self, name: Any) -> str:
        text = str(name)
        return self.table.get(text) or short_name(text)

    def is_run_model(self, name: Any) -> bool:
        """Whether a stage's model name is the run's model (the shipped comparison tables drop the
        `fmnist-smallcnn-` family prefix, so `vanilla` is the run's `fmnist-smallcnn-vanilla`)."""
        short = self(name)
        return short == self.label or self.label.endswith(f"-{short}")


def _split(results: Mapping[str, Any]) -> str:
    split = _mapping(results.get("dataset")).get("analysed_split")
    return f"{split} " if isinstance(split, str) and split.isidentifier() else ""


def _clean(results: Mapping[str, Any], name: str) -> str | None:
    ev = _stage(results, "evaluate")
    rows = _rows(ev.get("table")) if ev else []
    clean = next((r for r in rows if r.get("attack") == "clean"), None)
    if clean is not None and finite(clean.get("accuracy")) is not None:
        n = clean.get("n")
        on = f" on {n} {_split(results)}images" if isinstance(n, int) else ""
        ci = _interval(clean.get("ci_low"), clean.get("ci_high"))
        return f"Clean accuracy of {name}: {pct(clean['accuracy'])}{ci}{on}."
    ov = _stage(results, "overview")
    acc = finite(ov.get("clean_accuracy")) if ov else None
    if acc is None or ov is None:
        return None
    n = _mapping(ov.get("summary")).get("images")
    if isinstance(n, int) and n > 0:
        lo, hi = wilson_interval(round(acc * n), n)
        return f"Clean accuracy of {name}: {pct(acc)}{_interval(lo, hi)} on {n} {_split(results)}images."
    return f"Clean accuracy of {name}: {pct(acc)}."


def _worst_cases(results: Mapping[str, Any]) -> str | None:
    """Worst-case robust accuracy per threat model (L∞, L2) from the evaluate stage."""
    ev = _stage(results, "evaluate")
    if ev is None:
        return None
    rows = _rows(ev.get("table"))
    settings = _mapping(ev.get("attack_settings"))
    parts: list[str] = []
    for norm, label in (("linf", "L∞"), ("l2", "L2")):
        row = next((r for r in rows if r.get("attack") == f"worst case ({label})"), None)
        how = ""
        if row is None:  # no worst-case row: the strongest white-box attack of this norm
            own = [r for r in rows if r.get("kind") == "white-box" and finite(r.get("accuracy")) is not None
                   and _mapping(settings.get(str(r.get("attack")))).get("norm") == norm]  # fmt: skip
            if not own:
                continue
            row = min(own, key=lambda r: float(r["accuracy"]))
            how = f", strongest attack {ATTACK_LABELS.get(str(row['attack']), row['attack'])}"
        acc = finite(row.get("accuracy"))
        if acc is None:
            continue
        m = _EPS.search(str(row.get("settings", "")))
        eps = f" ε = {m.group(1)}" if m else ""
        parts.append(f"{label}{eps}: {pct(acc)}{_interval(row.get('ci_low'), row.get('ci_high'))}{how}")
    if not parts:
        return None
    return ("Worst-case robust accuracy under " + "; under ".join(parts)
            + " (an upper bound of the true robust accuracy: a stronger attack can only lower it).")  # fmt: skip


def _layer(results: Mapping[str, Any]) -> list[str]:
    """Which layer vulnerability enters at: diagnose's amplification and flip layer, else the
    sensitivity stage's layer with the highest σ_Ratio of its top-10% units."""
    out: list[str] = []
    dg = _stage(results, "diagnose")
    rows = [r for r in _rows(dg.get("layers")) if r.get("layer") != "input"] if dg else []
    amp = [r for r in rows if finite(r.get("A")) is not None]
    if amp:
        top = max(amp, key=lambda r: float(r["A"]))
        i = rows.index(top)
        prev = rows[i - 1] if i > 0 else next((r for r in _rows(dg.get("layers") if dg else None)
                                                if r.get("layer") == "input"), None)  # fmt: skip
        d0, d1 = (finite(prev.get("d")) if prev else None), finite(top.get("d"))
        growth = f", relative distortion d {sig(d0)} → {sig(d1)}" if d0 is not None and d1 is not None else ""
        out.append(f"Vulnerability enters at {top['layer']}: the adversarial perturbation is amplified most there "
                   f"(A = {sig(float(top['A']))}{growth}).")  # fmt: skip
    summary = _mapping(dg.get("summary")) if dg else {}
    judged = summary.get("adversarial examples judged")
    flips = [r for r in rows if (finite(r.get("V")) or 0.0) > 0]
    if isinstance(judged, int) and judged > 0 and flips:
        top_v = max(flips, key=lambda r: float(r["V"]))
        v = float(top_v["V"])
        lo, hi = wilson_interval(round(v * judged), judged)
        total = sum(float(r["V"]) for r in rows if finite(r.get("V")) is not None)
        no_flip = f"; for {pct(max(0.0, 1.0 - total))} the judge never reads the adversarial class"
        out.append(f"Explanations of the adversarial examples turn into the adversarial class for good most often at "
                   f"{top_v['layer']} ({pct(v)}{_interval(lo, hi)} of {judged} judged examples{no_flip}).")  # fmt: skip
    elif isinstance(judged, int) and judged == 0 and dg is not None:
        out.append("No adversarial example flipped a correct prediction in the diagnosed images, so no flip layer "
                   "was judged.")  # fmt: skip
    if out:
        return out
    se = _stage(results, "sensitivity")
    layers = [r for r in _rows(se.get("layers")) if r.get("hook") in ("conv", None)
              and finite(r.get("ratio_mean_sensitive")) is not None] if se else []  # fmt: skip
    if se is None or not layers:
        return []
    top = max(layers, key=lambda r: float(r["ratio_mean_sensitive"]))
    frac = finite(_mapping(se.get("options")).get("fraction"))
    share = f"top {100 * frac:.0f}%" if frac is not None else "most sensitive"
    attack = _mapping(se.get("summary")).get("attack")
    under = f" under {attack}" if isinstance(attack, str) else ""
    return [f"Vulnerability enters at {top['layer']}: its {share} most sensitive units change the most relative to "
            f"their clean response{under} (mean σ_Ratio {sig(float(top['ratio_mean_sensitive']))}, the highest of "
            f"{len(layers)} layers)."]  # fmt: skip


def _quadrant_rows(fe: Mapping[str, Any]) -> tuple[str | None, list[Mapping[str, Any]]]:
    rows = _rows(fe.get("quadrants"))
    models = fe.get("models")
    first = models[0] if isinstance(models, list) and models else (rows[0].get("model") if rows else None)
    return (str(first) if first is not None else None), rows


def _units(results: Mapping[str, Any], names: _Names) -> list[str]:
    """The share of useful but brittle units and the concepts they carry."""
    out: list[str] = []
    fe = _stage(results, "features")
    if fe is not None:
        first, rows = _quadrant_rows(fe)
        own = {r.get("quadrant"): r for r in rows if r.get("model") == first}
        nru, ru = own.get("NRU"), own.get("RU")
        if nru is not None and finite(nru.get("share")) is not None:
            units = _mapping(fe.get("summary")).get("units")
            of = f" of the {units} units" if isinstance(units, int) else " of the units"
            imp = finite(nru.get("importance_share"))
            carry = f" and carry {pct(imp)} of its importance" if imp is not None else ""
            text = (f"{pct(nru['share'])}{_interval(nru.get('ci_low'), nru.get('ci_high'))}{of} of {names(first)} "
                    f"are useful but brittle (the dangerous quadrant NRU: useful for the class, not robust under "
                    f"attack){carry}")  # fmt: skip
            if ru is not None and finite(ru.get("share")) is not None:
                text += f"; {pct(ru['share'])}{_interval(ru.get('ci_low'), ru.get('ci_high'))} are robust and useful"
            out.append(text + ".")
    co = _stage(results, "concepts")
    fragile = _rows(co.get("most_fragile")) if co else []
    if fragile:
        who = names(fragile[0].get("model", results.get("model")))
        dangerous = [r for r in fragile if isinstance(r.get("nru"), int) and r["nru"] > 0]

        def item(r: Mapping[str, Any]) -> str:
            frag, se = finite(r.get("fragility")), finite(r.get("fragility_se"))
            bits = []
            nru, units = r.get("nru"), r.get("units")
            if isinstance(nru, int) and isinstance(units, int):
                bits.append(f"{nru} of {units} detectors dangerous{_interval(r.get('nru_low'), r.get('nru_high'))}")
            if frag is not None:
                bits.append(f"fragility {frag:.2f}" + (f" ± {se:.2f}" if se is not None else ""))
            return f"{r.get('concept')}" + (f" ({', '.join(bits)})" if bits else "")

        what = "fragility is the mean 1 − γ̂/ρ over a concept's detectors"
        if dangerous:
            out.append(f"The dangerous units of {who} carry its most fragile concepts: "
                       + ", ".join(item(r) for r in dangerous) + f"; {what}.")  # fmt: skip
        else:
            out.append(f"No detector of the most fragile concepts of {who} is in the dangerous quadrant: "
                       + ", ".join(item(r) for r in fragile) + f"; {what}.")  # fmt: skip
    return out


def _robust_column(row: Mapping[str, Any]) -> str | None:
    """The compare table's robust-accuracy column: the L∞ worst case, else PGD, else an L∞ attack."""
    for col in ("worst case (L∞)", "pgd-linf", "apgd-ce", "fgsm"):
        if finite(row.get(col)) is not None:
            return col
    return None


def _compare(results: Mapping[str, Any], names: _Names) -> list[str]:
    """What the robust counterparts change: their accuracies, and the features' quadrant shift."""
    out: list[str] = []
    cs = _stage(results, "compare", "training")
    if cs is not None:
        rows = [r for r in _rows(cs.get("comparison")) if not names.is_run_model(r.get("model"))]
        parts = []
        for r in rows:
            bits = []
            if finite(r.get("clean")) is not None:
                bits.append(f"clean {pct(r['clean'])}{_interval(r.get('clean_ci_low'), r.get('clean_ci_high'))}")
            col = _robust_column(r)
            if col is not None:
                what = "worst case (L∞)" if col.startswith("worst") else ATTACK_LABELS.get(col, col)
                bits.append(f"{what} {pct(r[col])}{_interval(r.get(f'{col}_ci_low'), r.get(f'{col}_ci_high'))}")
            if bits:
                parts.append(f"{names(r.get('model'))} " + ", ".join(bits))
        if parts:
            out.append("Robust counterparts on the same images: " + "; ".join(parts) + ".")
        elif isinstance(cs.get("unavailable"), str) and cs["unavailable"].strip():
            out.append(cs["unavailable"].strip())
    fe = _stage(results, "features")
    if fe is not None:
        first, rows = _quadrant_rows(fe)
        by_model: dict[str, dict[str, Mapping[str, Any]]] = {}
        for r in rows:
            if r.get("model") != first:
                by_model.setdefault(str(r.get("model")), {})[str(r.get("quadrant"))] = r
        for model, quads in by_model.items():
            bits = []
            for q, what in (("NRU", "useful but brittle"), ("RU", "robust and useful")):
                row = quads.get(q)
                if row is None or finite(row.get("share")) is None or finite(row.get("diff_vs_first")) is None:
                    continue
                lo, hi = finite(row.get("diff_ci_low")), finite(row.get("diff_ci_high"))
                ci = ""
                if lo is not None and hi is not None:
                    ci = f" [{100 * lo:+.1f}, {100 * hi:+.1f}]".replace("-", "−")
                bits.append(f"{pct(row['share'])} {what} units ({_points(float(row['diff_vs_first']))}{ci})")
            if bits:
                out.append(f"Against {names(first)}, {names(model)} has " + " and ".join(bits) + ".")
    return out


def _psi(results: Mapping[str, Any], names: _Names) -> str | None:
    me = _stage(results, "metric")
    rows = [r for r in _rows(me.get("models")) if finite(r.get("psi_mean")) is not None] if me else []
    if not rows:
        return None
    eps = finite(rows[0].get("eps"))
    ball = f" in the L∞ ball of ε = {sig(eps)}" if eps is not None else ""
    parts = []
    for r in rows:
        p90 = finite(r.get("psi_p90"))
        parts.append(f"{sig(float(r['psi_mean']))} for {names(r.get('model'))}"
                     + (f" (90th percentile {sig(p90)})" if p90 is not None else ""))  # fmt: skip
    n = rows[0].get("n")
    on = f", mean over {n} images" if isinstance(n, int) else ""
    return (f"Ψ, the largest change of the calibrated prediction (KL){ball}, lower is more robust: "
            + "; ".join(parts) + f"{on}.")  # fmt: skip


def _warning_rank(stage: str, entry: Mapping[str, Any], text: str) -> int | None:
    """0 gradient masking / evaluation, 1 a stage that could not run, 2 a model left out, 3 other;
    None for notes about reference material the run lacks."""
    low = text.lower()
    if any(m.lower() in low for m in _MINOR):
        return None
    if stage == "evaluate" or "mask" in low or "gradient" in low:
        return 0
    if "could not run" in str(entry.get("text", "")) or "unavailable" in entry:
        return 1
    if "not compared" in low or "not available" in low or "cannot be loaded" in low:
        return 2
    return 3


def _warnings(results: Mapping[str, Any]) -> list[str]:
    ranked: list[tuple[int, int, str]] = []
    for order, (name, entry) in enumerate(_mapping(results.get("stages")).items()):
        if not isinstance(entry, Mapping):
            continue
        ws = entry.get("warnings")
        for w in ws if isinstance(ws, list) else ([ws] if ws else []):
            text = str(w).strip()
            rank = _warning_rank(str(name), entry, text)
            if text and rank is not None:
                title = str(entry.get("title", name))
                ranked.append((rank, order, f"Warning ({title}): {text.rstrip('.')}."))
    ranked.sort(key=lambda t: (t[0], t[1]))
    shown = [t[2] for t in ranked[:MAX_WARNINGS]]
    rest = len(ranked) - len(shown)
    if rest > 0:
        shown.append(f"{rest} more warning{'s' if rest > 1 else ''} in the sections below.")
    return shown


def findings(results: Mapping[str, Any]) -> list[str]:
    """Plain sentences stating what the run found (see the module docstring); [] when no stage
    that answers a question ran."""
    names = _Names(results)
    out: list[str] = []
    for sentence in (_clean(results, names.label), _worst_cases(results)):
        if sentence:
            out.append(sentence)
    out += _layer(results)
    out += _units(results, names)
    out += _compare(results, names)
    psi = _psi(results, names)
    if psi:
        out.append(psi)
    return [s for s in out if not _has_nan(s)] + _warnings(results)


def _has_nan(sentence: str) -> bool:
    """A sentence with an undefined number is left out rather than shown with 'nan'."""
    return bool(re.search(r"\b(nan|inf)\b", sentence, flags=re.IGNORECASE))


def numbered(sentences: Sequence[str]) -> list[str]:
    """The sentences as console lines."""
    return [f"  • {s}" for s in sentences]


__all__ = ["INTERVAL_NOTE", "findings", "model_label", "model_names", "numbered", "short_name"]
