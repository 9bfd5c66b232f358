"""Experiment YU-1 (METHODS §2.4, §8.3): does Ψ rank a family of models like adversarial accuracy
does, is its ranking steadier across test settings, and how much cheaper is it?

Per model, on the same N test images: clean accuracy; Ψ at the main setting (ε = 0.1, K = 5 KL-PGD
steps, the package default, temperature calibration on 1,000 held-out validation images) and at
every (ε, K) of `psi_settings` (ε 0.05 and 0.2 at K = 5, and K = 20 at ε = 0.1, METHODS' K, so
every study shows how the K = 5 ranking compares with K = 20); L-inf PGD accuracy at every ε × k
of the grid (α = 2.5ε/k, uniform random start, early stop per image, `restarts` runs of which
each after the first re-attacks only the images still classified correctly); C&W-L2 accuracy
inside the L2 ball of `cw_eps`; the wall time of each; the landscape read-outs (a*, steepness)
along the adversarial direction of the PGD example at the main ε.

Across models: Spearman and Kendall correlations between −Ψ and each accuracy column, with
percentile bootstrap intervals over models (models resampled with replacement, `n_boot` times;
resamples where a ranking is constant are skipped); ranking stability: the mean pairwise Kendall τ
between the model rankings of the accuracy columns, against the same between Ψ's settings
(1 = the ranking never moves); the agreement of the K = 5 and K = 20 Ψ rankings; and the time of
Ψ against the time of the full evaluation and of PGD-100 at the main ε.

Command line (models are shipped checkpoint names or .safetensors paths with a card):

    python -m robustdissect.studies.yu1 --out docs/results/yu1 --n 100 --restarts 2

Resuming: each model's row is cached in OUT/models/<name>.json together with every setting that
determines it (N, seed, the fingerprint of the test images, the model's weights, Ψ's and the
attacks' settings, restarts). A row is reused only when all of them match; a changed setting
(e.g. `--restarts 2` after a `--restarts 1` study, or another `--n`) recomputes that model's row
and overwrites it, so an interrupted study continues where it stopped and a changed one never
mixes settings. `--estimate` prints, from the cached rows' timings, how long a study with the
given `--n` and `--restarts` would take; `--psi-steps-check` measures how Ψ's model ranking
depends on K (writes OUT/psi_steps.json).

The `metric` stage shows a finished study (`metric.study`, default: docs/results/yu1 of a checkout).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from ..analysis.landscape import landscape
from ..analysis.metric import DEFAULT_STEPS, clear_calibration_cache, robustness_metric
from ..attacks import PGD, make_attack
from ..data import Dataset, load_dataset
from ..errors import UserError
from ..models.io import shipped_checkpoints
from ..models.resolve import resolve_model
from ..modelutil import accuracy
from ..report.plots_metric import study_scatter
from ..runs import atomic_write_text, jsonable, save_png, write_json
from ..stages.metric import STUDY_FILE, read_study
from ..stats import kendall, percentile_interval, resample_indices, spearman
from ..store import model_hash

__all__ = [
    "DEFAULT_FAMILY",
    "cached_row",
    "estimate_rerun",
    "evaluate_model",
    "main",
    "psi_steps_agreement",
    "psi_steps_check",
    "rank_correlations",
    "ranking_stability",
    "read_study",
    "study_settings",
    "summarise",
]

log = logging.getLogger(__name__)

DEFAULT_FAMILY = [
    "fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat", "fmnist-smallcnn-alp", "fmnist-smallcnn-trades",
    "fmnist-smallcnn-fast", "fmnist-smallcnn-sns", "fmnist-smallcnn-w8-vanilla", "fmnist-smallcnn-w8-ls",
    "fmnist-smallcnn-w32-vanilla", "fmnist-smallcnn-w8-pat", "fmnist-smallcnn4-w8-vanilla",
    "fmnist-smallcnn4-w8-fast", "fmnist-smallcnn4-w16-pat", "fmnist-smallcnn4-w16-trades",
]  # fmt: skip
PSI_STEPS_FILE = "psi_steps.json"
ROW_VERSION = 2  # rows of version 1 (no recorded settings, K = 20 main Ψ) are recomputed
MAIN_EPS = 0.1
PGD_EPS = (0.05, 0.1, 0.2)
PSI_SETTINGS = ((0.05, DEFAULT_STEPS), (0.2, DEFAULT_STEPS), (0.1, 20))
CALIBRATION_IMAGES = 1000
LANDSCAPE_N = 50


def _pgd_column(eps: float, k: int) -> str:
    return f"pgd_eps{eps:g}_k{k}"


def _psi_column(eps: float, k: int) -> str:
    return f"psi_eps{eps:g}_k{k}"


def study_settings(
    *,
    n: int,
    seed: int = 0,
    restarts: int = 2,
    pgd_steps: Sequence[int] = (10, 40, 100),
    pgd_eps: Sequence[float] = PGD_EPS,
    eps: float = MAIN_EPS,
    psi_steps: int = DEFAULT_STEPS,
    psi_settings: Sequence[tuple[float, int]] = PSI_SETTINGS,
    cw_eps: float = 1.5,
    cw_steps: int = 50,
    cw_search_steps: int = 3,
    calibration_images: int = CALIBRATION_IMAGES,
    target_confidence: float = 0.9,
    landscape_n: int = LANDSCAPE_N,
) -> dict[str, Any]:
    """Every setting that determines a model's row (plain JSON values), as stored in the row and
    compared when the row is reused."""
    return jsonable({
        "version": ROW_VERSION, "n": n, "seed": seed, "split": "test", "restarts": restarts,
        "pgd_steps": list(pgd_steps), "pgd_eps": list(pgd_eps), "step_rule": "madry", "early_stop": True,
        "eps": eps, "psi_steps": psi_steps, "psi_settings": [list(s) for s in psi_settings],
        "calibration": "temperature", "target_confidence": target_confidence,
        "calibration_images": calibration_images,
        "cw": {"eps": cw_eps, "steps": cw_steps, "search_steps": cw_search_steps}, "landscape_n": landscape_n,
    })  # fmt: skip


def _fingerprint(x: torch.Tensor) -> str:
    t = x.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def row_settings(settings: Mapping[str, Any], model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """`settings` plus the fingerprints of the test images and of the model's weights."""
    return {**settings, "images": _fingerprint(x), "weights": model_hash(model)[:16]}


def cached_row(path: Path, expected: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The row cached at `path` if its recorded settings equal `expected`, else None; and why not
    ("" when reused): missing file, no recorded settings, or the settings that differ."""
    if not path.is_file():
        return None, "not computed yet"
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None, f"{path.name} is not valid JSON"
    got = row.get("settings") if isinstance(row, dict) else None
    if not isinstance(got, dict):
        return None, "no recorded settings (a row of an older study)"
    want = jsonable(dict(expected))
    diff = [f"{k} {got.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(want) | set(got)) if got.get(k) != want.get(k)]
    if diff:
        return None, "settings changed: " + "; ".join(diff)
    return row, ""


def evaluate_model(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_cal: torch.Tensor,
    *,
    eps: float = MAIN_EPS,
    psi_steps: int = DEFAULT_STEPS,
    psi_settings: Sequence[tuple[float, int]] = PSI_SETTINGS,
    pgd_eps: Sequence[float] = PGD_EPS,
    pgd_steps: Sequence[int] = (10, 40, 100),
    restarts: int = 2,
    cw_eps: float = 1.5,
    cw_steps: int = 50,
    cw_search_steps: int = 3,
    target_confidence: float = 0.9,
    landscape_n: int = LANDSCAPE_N,
    seed: int = 0,
) -> dict[str, Any]:
    """One model's row: clean, Ψ (main and per setting), PGD and C&W accuracies, times in seconds,
    landscape read-outs. x (N, C, H, W), y (N,); x_cal: held-out images for the temperature.

    psi_seconds is the main Ψ from scratch (its calibration included); psi_k{K}_seconds, for each
    setting at the main ε, that Ψ's own time plus the same calibration time, as if run alone."""
    row: dict[str, Any] = {"clean": accuracy(model, x, y)}
    clear_calibration_cache()  # the main Ψ is timed with its calibration, as a first call would be
    kw = {"calibration_x": x_cal, "target_confidence": target_confidence, "seed": seed}
    main = robustness_metric(model, x, eps=eps, steps=psi_steps, **kw)  # type: ignore[arg-type]
    row.update(psi_mean=main.mean, psi_p90=main.p90, psi_seconds=main.seconds,
               psi_calibration_seconds=main.calibration_seconds, temperature=main.temperature)  # fmt: skip
    for e, k in psi_settings:
        r = robustness_metric(model, x, eps=e, steps=k, **kw)  # type: ignore[arg-type]
        row[_psi_column(e, k)] = r.mean
        if e == eps:
            row[f"psi_k{k}_seconds"] = r.seconds + main.calibration_seconds
    eval_seconds = 0.0
    for e in pgd_eps:
        for k in pgd_steps:
            attack = PGD(e, steps=k, step_rule="madry", restarts=restarts, early_stop=True, seed=seed, batch_size=500)
            t0 = time.perf_counter()
            res = attack(model, x, y)
            dt = time.perf_counter() - t0
            eval_seconds += dt
            row[_pgd_column(e, k)] = res.robust_accuracy
            row[f"{_pgd_column(e, k)}_seconds"] = dt
    cw = make_attack("cw-l2", eps=cw_eps, steps=cw_steps, search_steps=cw_search_steps, seed=seed, batch_size=500)
    t0 = time.perf_counter()
    row["cw_l2"] = cw(model, x, y).robust_accuracy
    row["cw_l2_seconds"] = time.perf_counter() - t0
    eval_seconds += row["cw_l2_seconds"]
    row["eval_seconds"] = eval_seconds
    row["pgd100_seconds"] = row.get(f"{_pgd_column(eps, 100)}_seconds", math.nan)
    if landscape_n > 0:
        t0 = time.perf_counter()
        row.update(landscape_readouts(model, x[:landscape_n], y[:landscape_n], eps=eps, seed=seed))
        row["landscape_seconds"] = time.perf_counter() - t0
    return row


def landscape_readouts(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.1,
                       seed: int = 0) -> dict[str, float]:  # fmt: skip
    """a* and steepness along the PGD direction (PGD-20 from x, α = 2.5ε/20, no random start, so δ
    is the adversarial path rather than a start's noise) on a 101-point slice over [0, 2ε]."""
    x_adv = PGD(eps, steps=20, step_rule="madry", random_start=False, seed=seed, batch_size=500)(model, x, y).x_adv
    s = landscape(model, x, y, eps=eps, grid=3, line_points=101, x_adv=x_adv, seed=seed).summary()
    return {"boundary_inside_eps": float(s["boundary_inside_eps"]), "boundary_median": float(s["boundary_median"]),
            "steepness": float(s["steepness_mean"])}  # fmt: skip


def _corr(method: str, a: np.ndarray, b: np.ndarray) -> float:
    return spearman(a, b) if method == "spearman" else kendall(a, b)


def rank_correlations(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Spearman and Kendall between −Ψ (psi_mean) and each accuracy column over the models, with
    95% percentile bootstrap intervals (models resampled with replacement)."""
    neg_psi = -np.array([float(r["psi_mean"]) for r in rows])
    boots = resample_indices(len(rows), n_boot, seed)
    out: dict[str, dict[str, float]] = {}
    for col in columns:
        acc = np.array([float(r[col]) for r in rows])
        entry: dict[str, float] = {}
        for method in ("spearman", "kendall"):
            entry[method] = _corr(method, neg_psi, acc)
            vals = [_corr(method, neg_psi[i], acc[i]) for i in boots]
            entry[f"{method}_low"], entry[f"{method}_high"] = percentile_interval(vals)
        entry["p_spearman"] = float(stats.spearmanr(neg_psi, acc).pvalue) if np.ptp(acc) > 0 else math.nan
        out[col] = entry
    return out


def ranking_stability(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], higher_is_better: bool
) -> dict[str, Any]:
    """Mean and minimum pairwise Kendall τ between the model rankings given by `columns` (1: every
    setting ranks the models identically). Ψ columns are lower-is-better."""
    sign = 1.0 if higher_is_better else -1.0
    vecs = {c: sign * np.array([float(r[c]) for r in rows]) for c in columns}
    taus = [_corr("kendall", vecs[a], vecs[b]) for a, b in itertools.combinations(columns, 2)]
    taus = [t for t in taus if not math.isnan(t)]
    return {
        "columns": list(columns),
        "mean_pairwise_kendall": float(np.mean(taus)) if taus else math.nan,
        "min_pairwise_kendall": float(np.min(taus)) if taus else math.nan,
        "pairs": len(taus),
    }


def psi_steps_agreement(values: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, Any]:
    """Spearman and Kendall between two Ψ columns over the same models ({model: Ψ}), and the
    discordant model pairs (ordered one way by `values`, the other way by `reference`)."""
    names = [m for m in reference if m in values]
    a = np.array([float(values[m]) for m in names])
    b = np.array([float(reference[m]) for m in names])
    discordant = [[p, q] for (i, p), (j, q) in itertools.combinations(enumerate(names), 2)
                  if (a[i] - a[j]) * (b[i] - b[j]) < 0]  # fmt: skip
    return {"models": len(names), "spearman": _corr("spearman", a, b), "kendall": _corr("kendall", a, b),
            "discordant_pairs": discordant}  # fmt: skip


def summarise(rows: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Correlations, stability, the K = 5 / K = 20 agreement of Ψ and timing over the model rows."""
    acc_cols = [c for c in rows[0] if c.startswith("pgd_eps") and not c.endswith("_seconds")] + ["cw_l2"]
    psi_cols = ["psi_mean"] + [c for c in rows[0] if c.startswith("psi_eps")]
    psi_s = np.array([float(r["psi_seconds"]) for r in rows])
    full_s = np.array([float(r["eval_seconds"]) for r in rows])
    pgd100 = np.array([float(r["pgd100_seconds"]) for r in rows])
    timing: dict[str, Any] = {
        "psi_seconds_total": float(psi_s.sum()),
        "full_evaluation_seconds_total": float(full_s.sum()),
        "pgd100_seconds_total": float(np.nansum(pgd100)),
        "full_over_psi": float(full_s.sum() / psi_s.sum()),
        "pgd100_over_psi": float(np.nansum(pgd100) / psi_s.sum()),
        "psi_over_pgd100_per_model": [float(a / b) if b > 0 else math.nan for a, b in zip(psi_s, pgd100, strict=True)],
    }
    out: dict[str, Any] = {"accuracy_columns": acc_cols, "psi_columns": psi_cols}
    settings = rows[0].get("settings")
    if isinstance(settings, Mapping):
        eps, k_main = float(settings["eps"]), int(settings["psi_steps"])
        agreement = {}
        for e, k in settings.get("psi_settings", []):
            col = _psi_column(e, k)
            if float(e) == eps and int(k) != k_main and all(col in r for r in rows):
                agreement[col] = psi_steps_agreement({str(r["model"]): r["psi_mean"] for r in rows},
                                                     {str(r["model"]): r[col] for r in rows})  # fmt: skip
                key = f"psi_k{int(k)}_seconds"
                if all(key in r for r in rows):
                    other = float(sum(float(r[key]) for r in rows))
                    timing[f"psi_k{int(k)}_seconds_total"] = other
                    timing[f"pgd100_over_psi_k{int(k)}"] = float(np.nansum(pgd100) / other)
        out["psi_steps_agreement"] = agreement
    out.update(
        correlations=rank_correlations(rows, acc_cols, n_boot, seed),
        stability={
            "accuracy": ranking_stability(rows, acc_cols, higher_is_better=True),
            "psi": ranking_stability(rows, psi_cols, higher_is_better=False),
        },
        timing=timing,
    )
    return out


def check_models(models: Sequence[str]) -> None:
    """UserError naming every model that is neither a shipped checkpoint nor a checkpoint file,
    before any work (a family member still being trained is shipped with scripts/ship_checkpoint.py)."""
    shipped = set(shipped_checkpoints())
    files = [m for m in models if m.endswith((".safetensors", ".json")) and Path(m).is_file()]
    missing = [m for m in models if m not in shipped and m not in files]
    if missing:
        hint = "; ".join(f"python scripts/ship_checkpoint.py runs/train-{m} {m}" for m in missing if "/" not in m)
        when = f" (once trained: {hint})" if hint else ""
        raise UserError(f"YU-1: not a shipped checkpoint: {', '.join(missing)}{when}; or leave it out with --models")


def run_study(models: Sequence[str], out: Path, data: Dataset, n: int, restarts: int, seed: int,
              pgd_steps: Sequence[int], n_boot: int, cw_steps: int = 50, refresh_landscape: bool = False,
              psi_steps: int = DEFAULT_STEPS) -> dict[str, Any]:  # fmt: skip
    """Evaluate every model (rows cached in out/models/<name>.json with their settings; a row
    whose settings differ is recomputed) and write yu1.json, yu1.csv and yu1_scatter.png."""
    check_models(models)
    test = data.test.subset(n, seed=seed)
    x, y = test.x, test.y
    x_cal = data.val.x[:CALIBRATION_IMAGES]
    settings = study_settings(n=len(y), seed=seed, restarts=restarts, pgd_steps=pgd_steps, cw_steps=cw_steps,
                              psi_steps=psi_steps, calibration_images=len(x_cal))  # fmt: skip
    (out / "models").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in models:
        model, card = resolve_model(name, data=data)
        model.eval()
        expected = row_settings(settings, model, x)
        path = out / "models" / f"{Path(name).stem}.json"
        row, why = cached_row(path, expected)
        if row is not None:
            log.info("YU-1: %s from %s", name, path)
            if refresh_landscape:
                row.update(landscape_readouts(model, x[:LANDSCAPE_N], y[:LANDSCAPE_N], seed=seed))
                write_json(path, row)
            rows.append(row)
            continue
        log.info("YU-1: %s (%s)", name, why)
        t0 = time.perf_counter()
        values = evaluate_model(model, x, y, x_cal, restarts=restarts, seed=seed, pgd_steps=pgd_steps,
                                cw_steps=cw_steps, psi_steps=psi_steps)  # fmt: skip
        objective = card.get("objective", {})
        arch = card.get("arch", {}) if isinstance(card.get("arch"), dict) else {}
        row = {
            "model": Path(name).stem,
            "arch": arch.get("name", card.get("model", "")),
            "width": arch.get("width"),
            "objective": objective.get("name", "") if isinstance(objective, dict) else str(objective),
            "label_smoothing": objective.get("label_smoothing", 0.0) if isinstance(objective, dict) else 0.0,
            **values,
            "row_seconds": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),
            "settings": expected,
        }
        log.info("YU-1: %s done in %.0f s", name, row["row_seconds"])
        write_json(path, row)
        rows.append(row)
    summary = summarise(rows, n_boot=n_boot, seed=seed)
    study = {
        "experiment": "YU-1",
        "settings": {**settings, "threads": torch.get_num_threads()},
        "rows": rows,
        **summary,
    }
    write_json(out / STUDY_FILE, study)
    cols = [c for c in rows[0] if not isinstance(rows[0][c], (dict, list))]
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    atomic_write_text(out / "yu1.csv", "\n".join(lines) + "\n")
    save_png(study_scatter(rows, summary["accuracy_columns"], summary["correlations"]), out / "yu1_scatter.png")
    return study


# -- planning a rerun ------------------------------------------------------------------------------
def estimate_rerun(rows: Sequence[Mapping[str, Any]], n: int, restarts: int, psi_steps: int = DEFAULT_STEPS,
                   psi_settings: Sequence[tuple[float, int]] = PSI_SETTINGS,
                   old: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Seconds a study on `n` images with `restarts` would take, from the timings of cached rows
    (each row's own settings, else `old`: n, restarts, psi_steps). Per model, a [low, high] range:

    - PGD column (ε, k) with accuracy a measured in t seconds with r₀ runs: each run after the first
      re-attacks only the a·N images still correct, which use at most the whole k steps, so a
      run costs u = f·t₁ with f between a (broken images took as many steps) and 1 (they took
      none; 0 when a = 0); t₁ = t / (1 + (r₀ − 1)·f), new = t₁·(1 + (restarts − 1)·f)·n/N₀.
    - C&W scales with n/N₀; Ψ with the steps of its main and extra settings against the old
      main Ψ's (ΣK / K₀, times n/N₀); the landscape (fixed 50 images) as a PGD-20 on 50 images,
      i.e. the old Ψ's time × 50·20 / (N₀·K₀), unless the row recorded it.

    Everything else (clean accuracy, loading) is ignored; times are those of the machine and load
    the rows were measured under."""
    total_lo = total_hi = 0.0
    per_model = []
    for r in rows:
        recorded = r.get("settings")
        st: Mapping[str, Any] = recorded if isinstance(recorded, Mapping) else (old or {})
        n0, r0, k0 = int(st.get("n", n)), int(st.get("restarts", 1)), int(st.get("psi_steps", 20))
        scale = n / n0
        lo = hi = 0.0
        for col, t in r.items():
            if not (col.startswith("pgd_eps") and col.endswith("_seconds")):
                continue
            a = float(r[col[: -len("_seconds")]])
            for f, side in ((a, "lo"), (1.0 if a > 0 else 0.0, "hi")):
                t1 = float(t) / (1 + (r0 - 1) * f)
                new = t1 * (1 + (restarts - 1) * f) * scale
                if side == "lo":
                    lo += new
                else:
                    hi += new
        cw = float(r.get("cw_l2_seconds", 0.0)) * scale
        psi = float(r["psi_seconds"]) * (psi_steps + sum(k for _, k in psi_settings)) / k0 * scale
        land = float(r.get("landscape_seconds", float(r["psi_seconds"]) * LANDSCAPE_N * 20 / (n0 * k0)))
        lo, hi = lo + cw + psi + land, hi + cw + psi + land
        per_model.append({"model": r.get("model"), "low_seconds": lo, "high_seconds": hi})
        total_lo, total_hi = total_lo + lo, total_hi + hi
    return {"n": n, "restarts": restarts, "models": per_model, "low_seconds": total_lo, "high_seconds": total_hi}


def psi_steps_check(
    models: Sequence[str],
    data: Dataset,
    n: int = 100,
    steps: Sequence[int] = (1, 2, 3, 5, 10, 20),
    image_seeds: Sequence[int] = (0, 1),
    eps: float = MAIN_EPS,
    seed: int = 0,
) -> dict[str, Any]:
    """Ψ of each model at every K of `steps` (α = ε/4, temperature on 1,000 validation images) on
    `n` test images per seed of `image_seeds`: the Spearman / Kendall agreement of each K's model
    ranking with the largest K's on the same images, and of each K with itself across the image
    sets (the image-sampling noise any K's ranking carries). Models that are not shipped are
    skipped and listed."""
    shipped = set(shipped_checkpoints())
    present = [m for m in models if m in shipped or Path(m).is_file()]
    ref = max(steps)
    x_cal = data.val.x[:CALIBRATION_IMAGES]
    psi: dict[str, dict[str, dict[str, float]]] = {str(s): {str(k): {} for k in steps} for s in image_seeds}
    secs: dict[str, dict[str, dict[str, float]]] = {str(s): {str(k): {} for k in steps} for s in image_seeds}
    for name in present:
        model, _ = resolve_model(name, data=data)
        model.eval()
        short = Path(name).stem
        for s in image_seeds:
            x = data.test.subset(n, seed=s).x
            for k in steps:
                r = robustness_metric(model, x, eps=eps, steps=k, calibration_x=x_cal, seed=seed)
                psi[str(s)][str(k)][short], secs[str(s)][str(k)][short] = r.mean, r.seconds
        log.info("psi-steps check: %s", short)
    against_ref = {s: {k: psi_steps_agreement(psi[s][k], psi[s][str(ref)]) for k in psi[s]} for s in psi}
    across = {}
    for a, b in itertools.combinations([str(s) for s in image_seeds], 2):
        across[f"{a}-{b}"] = {k: psi_steps_agreement(psi[a][k], psi[b][k]) for k in psi[a]}
    return {
        "settings": {"n": n, "eps": eps, "steps": list(steps), "reference_steps": ref, "image_seeds": list(image_seeds),
                     "alpha": "eps/4", "calibration_images": len(x_cal), "threads": torch.get_num_threads()},
        "models": [Path(m).stem for m in present],
        "missing": [m for m in models if m not in present],
        "psi": psi, "seconds": secs, "agreement_with_reference": against_ref, "across_image_sets": across,
    }  # fmt: skip


def _print_steps_check(res: Mapping[str, Any]) -> None:
    ref = res["settings"]["reference_steps"]
    print(f"Ψ model ranking by K against K = {ref} ({len(res['models'])} models, {res['settings']['n']} images)")
    for s, per_k in res["agreement_with_reference"].items():
        for k, v in per_k.items():
            line = f"  images seed {s}: K {k:>3}  Spearman {v['spearman']:.3f}  Kendall {v['kendall']:.3f}"
            print(line + f"  discordant {len(v['discordant_pairs'])}")
    for pair, per_k in res["across_image_sets"].items():
        for k, v in per_k.items():
            print(f"  same K, image sets {pair}: K {k:>3}  Spearman {v['spearman']:.3f}  Kendall {v['kendall']:.3f}")
    if res["missing"]:
        print(f"  not shipped, skipped: {', '.join(res['missing'])}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Experiment YU-1: Ψ against adversarial accuracy over a model family")
    p.add_argument("--models", default=",".join(DEFAULT_FAMILY), help="comma-separated checkpoints")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=None, help="test images (seeded subset; study 1000, --psi-steps-check 100)")
    p.add_argument("--restarts", type=int, default=2, help="PGD runs per column (later runs: images still correct)")
    p.add_argument("--pgd-steps", default="10,40,100")
    p.add_argument("--psi-steps", type=int, default=DEFAULT_STEPS, help="K of the main Ψ (K = 20 is also computed)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--cw-steps", type=int, default=50)
    p.add_argument("--refresh-landscape", action="store_true", help="recompute a* and steepness of cached rows")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="only print how long a study with --n and --restarts would take, from OUT/models timings",
    )
    p.add_argument(
        "--psi-steps-check",
        nargs="?",
        const="1,2,3,5,10,20",
        default=None,
        metavar="K,K,...",
        help="only measure Ψ's model ranking at these K against the largest (writes OUT/psi_steps.json)",
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(a.out)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if a.estimate:
        rows = [json.loads(f.read_text()) for f in sorted((out / "models").glob("*.json"))]
        if not rows:
            raise SystemExit(f"no cached rows in {out / 'models'}")
        old = read_study(out)["settings"] if (out / STUDY_FILE).is_file() else None
        est = estimate_rerun(rows, a.n or 1000, a.restarts, a.psi_steps, old=old)
        for m in est["models"]:
            print(f"{m['model']:<30} {m['low_seconds']:8.0f} - {m['high_seconds']:8.0f} s")
        print(f"{len(rows)} models, n {a.n or 1000}, restarts {a.restarts}: {est['low_seconds'] / 3600:.2f} - "
              f"{est['high_seconds'] / 3600:.2f} h at the cached rows' speed")  # fmt: skip
        return
    data = load_dataset("fashion-mnist", seed=a.seed)
    if a.psi_steps_check is not None:
        steps = [int(s) for s in a.psi_steps_check.split(",")]
        res = psi_steps_check(models, data, n=a.n or 100, steps=steps, seed=a.seed)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PSI_STEPS_FILE, res)
        _print_steps_check(res)
        return
    steps = [int(s) for s in a.pgd_steps.split(",")]
    study = run_study(models, out, data, a.n or 1000, a.restarts, a.seed, steps, a.n_boot, a.cw_steps,
                      a.refresh_landscape, a.psi_steps)  # fmt: skip
    print(json.dumps({k: study[k] for k in ("correlations", "stability", "psi_steps_agreement", "timing")
                      if k in study}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
