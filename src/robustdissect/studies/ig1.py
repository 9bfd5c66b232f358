"""Experiment IG-1 (METHODS §1.6, §8.3): is average pooling more robust than max pooling, and does
it lose less information?

The model family is defined once, in `family()`:

- **short-schedule seeds** (the main comparison): `fmnist-smallcnn-ig1-{max,avg}-{vanilla,pat}-s{0,1,2}`,
  three training seeds per variant, one schedule (3 epochs; PAT on a seeded 8,000-image subset), so
  max and avg of one seed differ only in pooling (same initial weights, same data order);
- **shipped pairs** (reported separately): `fmnist-smallcnn-{vanilla,avg-vanilla}` and
  `fmnist-smallcnn-{pat,avg-pat}`, compared only when the two checkpoints were trained with the
  same settings apart from pooling (the 20-epoch PAT preset for both PAT checkpoints).

A family member whose checkpoint is not shipped yet is skipped with a message saying how to train
and ship it; one whose card no longer matches its training preset (retrain pending) is left out of
the comparisons with the reason.

Per model and ε: clean and L∞ PGD-`steps` accuracy (α = `alpha`, random start) on the first `n`
test images with Wilson intervals; on the first `diag_n` of them the layer diagnosis of
`analysis.diagnose` (V_l, V_l^soft read by one fixed judge for every model, IL_l from the
model's decoders G_l or, with `--inverter optim`, the optimisation inversion, A_l). Each row is
saved in OUT/models/NAME.json as soon as it is computed, with its settings (including the SHA-256
of the model's and the judge's weights): a rerun reuses a row only when its settings are
unchanged, so an interrupted study resumes, a retrained checkpoint or changed settings are
recomputed, and seeds shipped later are added by rerunning the command.

Across models, per comparison, training type and ε: the avg − max difference (positive: average
pooling higher) of clean and PGD accuracy, and of IL, V and V^soft summed over the pooling layers;
for the seeds paired by training seed, with the mean and a t interval over the seed pairs; for a
single pair of accuracies, Newcombe's interval for a difference of two proportions (over test
images, not seeds).

    python -m robustdissect.studies.ig1 --out docs/results/ig1
    python -m robustdissect.studies.ig1 --out docs/results/ig1 --cached-only   # re-aggregate

The `diagnose` stage shows the study.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import resources
from ..analysis.diagnose import (
    DecoderBank,
    DecoderSettings,
    InversionSettings,
    Inverter,
    OptimisationInverter,
    diagnose,
    diagnosis_layers,
)
from ..attacks import PGD
from ..data import load_dataset
from ..errors import UserError, unknown_name
from ..models.io import read_card
from ..models.resolve import resolve_model
from ..modelutil import eval_mode
from ..report.plots_diagnose import pooling_comparison
from ..runs import atomic_write_text, save_png
from ..stats import newcombe_interval, t_interval, wilson_interval
from ..store import model_hash

log = logging.getLogger(__name__)

JUDGE = "fmnist-smallcnn-trades"  # robust, trained separately from every compared model
SEEDS = (0, 1, 2)
TRAININGS = {"standard": "vanilla", "pgd-at": "pat"}  # training type -> objective in the preset names
POOLINGS = ("max", "avg")
SEED_GROUP = "short-schedule seeds"
SHIPPED_GROUP = "shipped pair"
GROUPS = (SEED_GROUP, SHIPPED_GROUP)
SHIPPED = {
    ("standard", "max"): "fmnist-smallcnn-vanilla",
    ("standard", "avg"): "fmnist-smallcnn-avg-vanilla",
    ("pgd-at", "max"): "fmnist-smallcnn-pat",
    ("pgd-at", "avg"): "fmnist-smallcnn-avg-pat",
}


@dataclass(frozen=True)
class Member:
    """One model of the IG-1 family: its checkpoint (= training preset) name and role."""

    name: str
    group: str
    training: str
    pooling: str
    seed: int


def seed_model(pooling: str, training: str, seed: int) -> str:
    return f"fmnist-smallcnn-ig1-{pooling}-{TRAININGS[training]}-s{seed}"


def family() -> list[Member]:
    """The IG-1 models: three short-schedule seeds per (training, pooling), then the shipped pairs."""
    out = [Member(seed_model(p, t, s), SEED_GROUP, t, p, s) for t in TRAININGS for p in POOLINGS for s in SEEDS]
    out += [Member(name, SHIPPED_GROUP, t, p, 0) for (t, p), name in SHIPPED.items()]
    return out


def train_and_ship(name: str) -> str:
    return (f"robustdissect train --config {name} --out runs/train-{name} && "
            f"python scripts/ship_checkpoint.py runs/train-{name} {name}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# cards and schedules


def _describe(card: Mapping[str, Any]) -> dict[str, Any]:
    arch = card.get("arch") or {}
    obj = card.get("objective") or {}
    tc = card.get("train_config") or {}
    objective = obj.get("name") if isinstance(obj, dict) else str(obj)
    return {
        "pooling": arch.get("pooling", "max"),
        "training": "standard" if objective == "vanilla" else "pgd-at" if objective == "pat" else str(objective),
        "seed": int(card.get("seed", tc.get("seed", 0)) or 0),
        "schedule": f"{tc.get('epochs', card.get('epochs'))} epochs on {tc.get('n') or 'all'} images",
        "train_config": dict(tc),
    }


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# Where and how fast a model was trained, not what was trained (None and False: both off).
RUNTIME_KEYS = ("device", "data_dir", "compile", "channels_last")


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """The settings where training configs a and b differ ("key a vs b"), nested keys dotted;
    runtime settings (`RUNTIME_KEYS`) and the keys in `ignore` are not compared."""
    fa, fb = _flat(a), _flat(b)
    keys = sorted((set(fa) | set(fb)) - set(ignore) - set(RUNTIME_KEYS))
    return [f"{k} {fa.get(k)} vs {fb.get(k)}" for k in keys if fa.get(k) != fb.get(k)]


def preset_mismatch(name: str, train_config: Mapping[str, Any]) -> list[str]:
    """How checkpoint `name`'s training config differs from its training preset of the same name
    (the settings the preset names; [] when it matches or no such preset exists): a non-empty
    answer means the checkpoint is stale, waiting to be retrained."""
    if name not in resources.train_presets():
        return []
    preset = resources.read_train_config(name)
    card = {k: train_config.get(k) for k in preset}
    return [f"{d.replace(' vs ', ' in the card, ')} in the preset" for d in config_differences(card, preset)]


# ---------------------------------------------------------------------------------------------
# rows


def row_settings(settings: Mapping[str, Any], eps: float, checkpoint: str, judge_checkpoint: str) -> dict[str, Any]:
    """What one (model, ε) row depends on; a stored row is reused only when these are equal."""
    return {**{k: v for k, v in settings.items() if k != "eps"}, "eps": float(eps), "checkpoint": checkpoint,
            "judge_checkpoint": judge_checkpoint}  # fmt: skip


def model_row(
    name: str, model: nn.Module, card: Mapping[str, Any], x: torch.Tensor, y: torch.Tensor, x_mean: torch.Tensor,
    judge: nn.Module, eps: float, steps: int, alpha: float, diag_n: int, inverter: Inverter,
    resamples: int, seed: int, settings: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The study's row of one checkpoint at one ε; `inverter` explains the model's layers."""
    t0 = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        clean_correct = torch.cat([model(x[b : b + 500]).argmax(1) == y[b : b + 500] for b in range(0, len(x), 500)])
    layers = diagnosis_layers(model, x[:1])
    res = PGD(eps, steps=steps, alpha=alpha, random_start=True, seed=seed, batch_size=500)(model, x, y)
    n, c, r = len(y), int(clean_correct.sum()), int(res.correct.sum())
    diag = diagnose(model, x[:diag_n], y[:diag_n], res.x_adv[:diag_n], res.logits[:diag_n].argmax(1), layers,
                    inverter, judge, x_mean, resamples=resamples,
                    seed=seed, show=0)  # fmt: skip
    layer_rows = diag.layer_rows()
    return {
        "model": name, **_describe(card), "eps": eps, "n": n,
        "clean_accuracy": c / n, "clean_ci": list(wilson_interval(c, n)),
        "pgd_accuracy": r / n, "pgd_ci": list(wilson_interval(r, n)),
        "judged": int(diag.vulnerability.y.numel()), "V_input": layer_rows[0]["V"],
        "no_flip": 1.0 - sum(lr["V"] for lr in layer_rows),
        "spearman_IL_V": diag.correlations[0].rho, "spearman_IL_V_ci": [diag.correlations[0].low,
                                                                         diag.correlations[0].high],
        "spearman_IL_Vsoft": diag.correlations[1].rho,
        "spearman_IL_Vsoft_ci": [diag.correlations[1].low, diag.correlations[1].high],
        "layers": [{k: lr[k] for k in ("layer", "d", "A", "R", "IL", "V", "V_soft")} for lr in layer_rows[1:]],
        "seconds": round(time.perf_counter() - t0, 1),
        "settings": dict(settings),
    }  # fmt: skip


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows stored for one model (none when the file is missing or unreadable)."""
    if not path.is_file():
        return []
    try:
        got = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("IG-1: %s is not valid JSON; its rows are recomputed", path)
        return []
    rows = got.get("rows", []) if isinstance(got, dict) else []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("settings"), dict)]


def write_rows(path: Path, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
    rows = sorted(rows, key=lambda r: float(r["eps"]))
    atomic_write_text(path, json.dumps({"model": name, "rows": list(rows)}, indent=1))


# ---------------------------------------------------------------------------------------------
# comparisons


def _pool_sum(row: Mapping[str, Any], key: str) -> float:
    return float(sum(lr[key] for lr in row["layers"] if str(lr["layer"]).startswith("pool")))


METRICS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    "pgd_accuracy": lambda r: float(r["pgd_accuracy"]),
    "clean_accuracy": lambda r: float(r["clean_accuracy"]),
    "IL_pooling_layers": lambda r: _pool_sum(r, "IL"),
    "V_pooling_layers": lambda r: _pool_sum(r, "V"),
    "V_soft_pooling_layers": lambda r: _pool_sum(r, "V_soft"),
}
CI_KEYS = {"pgd_accuracy": "pgd_ci", "clean_accuracy": "clean_ci"}


def comparisons(rows: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(differences, excluded). Rows carry `group`, `training`, `pooling`, `seed`, `eps`,
    `train_config` and, for stale checkpoints, a non-empty `stale` list.

    differences: per (group, training, ε, metric) with a usable pair, the avg − max difference, paired by training
    seed, its mean and interval (t over seed pairs with ≥ 2 pairs; Newcombe over test images for a
    single pair of accuracies; none otherwise). A pair is used only when neither checkpoint is
    stale and their training configs agree in everything but pooling. excluded: one entry per
    (group, training, seed) pair left out, with the reason."""
    diffs: list[dict[str, Any]] = []
    excluded: list[dict[str, Any]] = []
    seen_excluded: set[tuple[str, str, int]] = set()
    for group in GROUPS:
        for training, eps in sorted({(r["training"], r["eps"]) for r in rows if r.get("group") == group}):
            sel = [r for r in rows if r.get("group") == group and r["training"] == training and r["eps"] == eps]
            by = {(r["pooling"], int(r["seed"])): r for r in sel}
            used: list[int] = []
            for s in sorted({s for _p, s in by}):
                a, b = by.get(("max", s)), by.get(("avg", s))
                reasons: list[str] = []
                if a is None or b is None:
                    missing = "max" if a is None else "avg"
                    reasons.append(f"no {missing}-pooling model at seed {s}")
                else:
                    for r in (a, b):
                        reasons += [f"{r['model']} is stale ({'; '.join(r['stale'])})"] if r.get("stale") else []
                    diff = config_differences(a.get("train_config") or {}, b.get("train_config") or {},
                                              ignore=("model_args.pooling",))  # fmt: skip
                    if diff:
                        reasons.append(f"not like for like: {a['model']} vs {b['model']}: {', '.join(diff)}")
                if reasons:
                    if (group, training, s) not in seen_excluded:
                        seen_excluded.add((group, training, s))
                        excluded.append({"comparison": group, "training": training, "seed": s,
                                         "models": ", ".join(r["model"] for r in (a, b) if r is not None),
                                         "reason": "; ".join(reasons)})  # fmt: skip
                    continue
                used.append(s)
            pairs = [(by[("max", s)], by[("avg", s)]) for s in used]
            if not pairs:
                continue
            for metric, get in METRICS.items():
                # V is undefined (NaN) for a model with no judged adversarial example: that pair is left out
                kept = [(s, get(avg) - get(mx)) for s, (mx, avg) in zip(used, pairs, strict=True)]
                kept = [(s, v) for s, v in kept if math.isfinite(v)]
                if not kept:
                    continue
                d = [v for _s, v in kept]
                mean, lo, hi = t_interval(d)
                interval = f"t over {len(d)} seed pairs" if len(d) >= 2 else "none"
                if len(d) == 1 and metric in CI_KEYS:
                    mx, avg = by[("max", kept[0][0])], by[("avg", kept[0][0])]
                    lo, hi = newcombe_interval(get(avg), avg[CI_KEYS[metric]], get(mx), mx[CI_KEYS[metric]])
                    interval = f"Newcombe over {avg['n']} test images (one pair)"
                diffs.append({"comparison": group, "training": training, "eps": eps, "metric": metric,
                              "seeds": ",".join(str(s) for s, _v in kept), "n_pairs": len(d),
                              "avg_minus_max": mean, "ci_low": lo, "ci_high": hi, "interval": interval,
                              "per_seed": [float(v) for v in d]})  # fmt: skip
    return diffs, excluded


def differences(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The avg − max differences of `comparisons` (without the excluded pairs)."""
    return comparisons(rows)[0]


def _verdict(d: Mapping[str, Any]) -> str:
    if math.isnan(d["ci_low"]):
        return "no interval"
    if d["ci_low"] > 0:
        return "avg pooling higher"
    if d["ci_high"] < 0:
        return "max pooling higher"
    return "no difference resolved"


def note(diffs: Sequence[Mapping[str, Any]], excluded: Sequence[Mapping[str, Any]] = (),
         skipped: Sequence[Mapping[str, Any]] = ()) -> str:  # fmt: skip
    """The study's answer in words, with what the seeds can and cannot show."""
    parts = []
    for group in GROUPS:
        sel = [d for d in diffs if d["comparison"] == group and d["metric"] == "pgd_accuracy" and d["n_pairs"]]
        lines = []
        for d in sel:
            ci = "" if math.isnan(d["ci_low"]) else f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            lines.append(f"{d['training']} ε={d['eps']:g}: {d['avg_minus_max']:+.3f}{ci} "
                         f"(seeds {d['seeds']}; {d['interval']}), {_verdict(d)}")  # fmt: skip
        if lines:
            parts.append(f"{group}: " + "; ".join(lines))
        else:
            parts.append(f"{group}: no pair to compare")
    text = "IG-1, PGD accuracy avg − max pooling (positive: average pooling more robust). " + ". ".join(parts) + "."
    if excluded:
        text += " Left out: " + "; ".join(f"{e['comparison']} {e['training']} seed {e['seed']} ({e['reason']})"
                                          for e in excluded) + "."  # fmt: skip
    if skipped:
        text += " Not yet available: " + ", ".join(s["model"] for s in skipped) + "."
    text += (" With 2–3 seed pairs a t interval is wide, so only a large, consistent difference is resolved; "
             "one pair proves nothing about pooling (its interval covers test images, not training "
             "seeds).")  # fmt: skip
    return text


# ---------------------------------------------------------------------------------------------
# the study


def study_settings(a: argparse.Namespace) -> tuple[dict[str, Any], InversionSettings | DecoderSettings]:
    """The settings every row records, and the inverter's settings."""
    inv: InversionSettings | DecoderSettings
    if a.inverter == "optim":
        inv = InversionSettings(steps=a.inversion_steps)
        described: dict[str, Any] = {"method": "optim", **asdict(inv)}
    else:
        inv = DecoderSettings(epochs=a.decoder_epochs, batch_size=a.decoder_batch_size, seed=a.seed)
        described = {"method": "decoder", "train_images": a.decoder_n, **asdict(inv)}
    settings = {"eps": [float(e) for e in a.eps.split(",")], "steps": a.steps, "alpha": a.alpha, "n": a.n,
                "diag_n": a.diag_n, "inverter": described, "resamples": a.resamples,
                "judge": a.judge, "seed": a.seed, "random_start": True}  # fmt: skip
    return settings, inv


def make_inverter(model: nn.Module, name: str, inv: InversionSettings | DecoderSettings, x_train: torch.Tensor,
                  x_mean: torch.Tensor, folder: Path, model_id: str) -> Inverter:  # fmt: skip
    """The model's inverter: an optimisation inversion, or decoders kept in FOLDER/NAME (trained once
    per model and shared by its ε rows; a rerun loads them when their cards match)."""
    if isinstance(inv, InversionSettings):
        return OptimisationInverter(model, x_mean, inv)
    return DecoderBank(model, folder / name, x_train, inv, model_id)


def members(only: str | None) -> list[Member]:
    fam = family()
    if not only:
        return fam
    names = [m.strip() for m in only.split(",") if m.strip()]
    known = {m.name: m for m in fam}
    for n in names:
        if n not in known:
            raise unknown_name("IG-1 model", n, list(known))
    return [known[n] for n in names]


def run_study(a: argparse.Namespace) -> dict[str, Any]:
    """Compute (or reuse) every available member's rows, then compare; returns the study."""
    settings, inv = study_settings(a)
    folder = a.out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    shipped = set(resources.checkpoint_names())
    todo = members(a.only)
    skipped: list[dict[str, Any]] = []
    data: Any = None
    judge: nn.Module | None = None
    judge_hash = ""
    rows: list[dict[str, Any]] = []
    for m in family():
        if m.name not in shipped:
            reason = f"checkpoint not shipped yet; train and ship it: {train_and_ship(m.name)}"
            log.warning("IG-1: skipping %s: %s", m.name, reason)
            skipped.append({"model": m.name, "reason": reason})
            continue
        card = read_card(resources.checkpoint_files(m.name)[1])
        desc = _describe(card)
        stale = preset_mismatch(m.name, desc["train_config"])
        if (desc["pooling"], desc["training"]) != (m.pooling, m.training):
            stale.append(f"card says {desc['pooling']} pooling, {desc['training']}; the family expects "
                         f"{m.pooling}, {m.training}")  # fmt: skip
        path = folder / f"{m.name}.json"
        stored = read_rows(path)
        model, _ = resolve_model(m.name)
        ckpt = model_hash(model)
        if judge is None:
            judge, _ = resolve_model(a.judge)
            judge_hash = model_hash(judge)
        got = []
        inverter: Inverter | None = None
        for eps in settings["eps"]:
            want = row_settings(settings, eps, ckpt, judge_hash)
            hit = next((r for r in stored if r["settings"] == want), None)
            if hit is not None:
                got.append(hit)
                continue
            if a.cached_only or m not in todo:
                why = "--cached-only" if a.cached_only else "not among --only"
                log.warning("IG-1: %s at ε = %g: no stored row for these settings (%s)", m.name, eps, why)
                continue
            if data is None:
                data = load_dataset("fashion-mnist", None, seed=a.seed)
            x, y = data.test.x[: a.n], data.test.y[: a.n]
            x_mean = data.train.x.mean(0)
            if inverter is None:
                x_train = data.train.subset(min(a.decoder_n, len(data.train)), seed=a.seed).x
                inverter = make_inverter(model, m.name, inv, x_train, x_mean, a.decoder_dir, ckpt)
            log.info("IG-1: %s at ε = %g", m.name, eps)
            row = model_row(m.name, model, card, x, y, x_mean, judge, eps, a.steps, a.alpha, a.diag_n, inverter,
                            a.resamples, a.seed, want)  # fmt: skip
            stored = [r for r in stored if float(r["eps"]) != float(eps)] + [row]
            write_rows(path, m.name, stored)  # saved at once: an interrupted study resumes here
            got.append(row)
        for r in got:
            # the family's seed pairs the models (a card's training seed need not be that number)
            rows.append({**r, **desc, "seed": m.seed, "group": m.group, "stale": stale})
    diffs, excluded = comparisons(rows)
    study = {"settings": settings, "family": [asdict(m) for m in family()], "models": rows, "differences": diffs,
             "excluded": excluded, "skipped": skipped, "note": note(diffs, excluded, skipped)}  # fmt: skip
    return study


def parser() -> argparse.ArgumentParser:
    """The study's command line; its defaults are the settings of the shipped docs/results/ig1."""
    p = argparse.ArgumentParser(prog="python -m robustdissect.studies.ig1", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default=None,
                   help="compute only these family members (comma-separated); the others' stored rows are still "
                        "compared")  # fmt: skip
    p.add_argument("--cached-only", action="store_true", help="compute nothing: compare the stored rows")
    p.add_argument("--eps", default="0.1,0.2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--diag-n", type=int, default=300, help="images diagnosed (a prefix of the --n images)")
    p.add_argument("--inverter", choices=("decoder", "optim"), default="decoder",
                   help="GAN-free decoders G_l (METHODS §8.3) or optimisation inversion")  # fmt: skip
    p.add_argument("--decoder-n", type=int, default=1000, help="clean training images per decoder")
    p.add_argument("--decoder-epochs", type=int, default=3)
    p.add_argument("--decoder-batch-size", type=int, default=32)
    p.add_argument("--decoder-dir", type=Path, default=Path("runs/ig1-decoders"),
                   help="where the decoders are kept between runs (a cache, not results)")  # fmt: skip
    p.add_argument("--inversion-steps", type=int, default=40, help="with --inverter optim")
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--judge", default=JUDGE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        study = run_study(a)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    atomic_write_text(a.out / "study.json", json.dumps(study, indent=1))
    save_png(pooling_comparison(study), a.out / "ig1.png")
    print(study["note"])
    for d in study["differences"]:
        print(f"{d['comparison']:20s} {d['training']:8s} eps={d['eps']:<4g} {d['metric']:22s} avg-max "
              f"{d['avg_minus_max']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] "
              f"n_pairs={d['n_pairs']}")  # fmt: skip


if __name__ == "__main__":
    main()
