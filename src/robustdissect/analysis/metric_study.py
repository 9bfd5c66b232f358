"""Experiment YU-1 (METHODS §2.4, §8.3): does Ψ rank a family of models like adversarial accuracy
does, is its ranking steadier across test settings, and how much cheaper is it?

Per model, on the same N test images: clean accuracy; Ψ at the main setting (ε = 0.1, K = 20,
temperature calibration on held-out validation images) and at every (ε, K) of `psi_settings`;
L-inf PGD accuracy at every ε × k of the grid (α = 2.5ε/k, random start, `restarts`); C&W-L2
accuracy inside the L2 ball of `cw_eps`; the wall time of each; the landscape read-outs (a*,
steepness) along the adversarial direction of the PGD example at the main ε.

Across models: Spearman and Kendall correlations between −Ψ and each accuracy column, with
percentile bootstrap intervals over models (models resampled with replacement, `n_boot` times;
resamples where a ranking is constant are skipped); ranking stability: the mean pairwise Kendall τ
between the model rankings of the accuracy columns, against the same between Ψ's settings
(1 = the ranking never moves); and the time of Ψ against the time of the full evaluation and of
PGD-100 at the main ε.

Command line (models are shipped checkpoint names or .safetensors paths with a card; a model whose
row is already in OUT/models/ is not recomputed, so an interrupted study continues):

    python -m robustdissect.analysis.metric_study --out docs/results/yu1 --n 200 \\
        --models fmnist-smallcnn-vanilla,fmnist-smallcnn-pat,...

The `metric` stage shows a finished study (`metric.study`, default: docs/results/yu1 of a checkout).
"""

from __future__ import annotations

import argparse
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

from ..attacks import PGD, make_attack
from ..data import Dataset, load_dataset
from ..errors import UserError
from ..models.resolve import resolve_model
from ..modelutil import accuracy
from ..runs import atomic_write_text, jsonable, save_png
from .landscape import landscape
from .metric import robustness_metric

__all__ = [
    "DEFAULT_FAMILY",
    "evaluate_model",
    "main",
    "rank_correlations",
    "ranking_stability",
    "read_study",
    "summarise",
]

log = logging.getLogger(__name__)

DEFAULT_FAMILY = [
    "fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat", "fmnist-smallcnn-alp", "fmnist-smallcnn-trades",
    "fmnist-smallcnn-fast", "fmnist-smallcnn-sns", "fmnist-smallcnn-w8-vanilla", "fmnist-smallcnn-w8-ls",
    "fmnist-smallcnn-w32-vanilla", "fmnist-smallcnn-w8-pat", "fmnist-smallcnn4-w8-vanilla",
    "fmnist-smallcnn4-w8-fast", "fmnist-smallcnn4-w16-pat",
]  # fmt: skip
STUDY_FILE = "yu1.json"


def _pgd_column(eps: float, k: int) -> str:
    return f"pgd_eps{eps:g}_k{k}"


def evaluate_model(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_cal: torch.Tensor,
    *,
    eps: float = 0.1,
    psi_steps: int = 20,
    psi_settings: Sequence[tuple[float, int]] = ((0.05, 20), (0.1, 10), (0.2, 20)),
    pgd_eps: Sequence[float] = (0.05, 0.1, 0.2),
    pgd_steps: Sequence[int] = (10, 40, 100),
    restarts: int = 2,
    cw_eps: float = 1.5,
    cw_steps: int = 50,
    cw_search_steps: int = 3,
    landscape_n: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """One model's row: clean, Ψ (main and per setting), PGD and C&W accuracies, times in seconds,
    landscape read-outs. x (N, C, H, W), y (N,); x_cal: held-out images for the temperature."""
    row: dict[str, Any] = {"clean": accuracy(model, x, y)}
    main = robustness_metric(model, x, eps=eps, steps=psi_steps, calibration_x=x_cal, seed=seed)
    row.update(psi_mean=main.mean, psi_p90=main.p90, psi_seconds=main.seconds, temperature=main.temperature)
    for e, k in psi_settings:
        r = robustness_metric(model, x, eps=e, steps=k, calibration_x=x_cal, seed=seed)
        row[f"psi_eps{e:g}_k{k}"] = r.mean
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
        row.update(landscape_readouts(model, x[:landscape_n], y[:landscape_n], eps=eps, seed=seed))
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
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    r = stats.spearmanr(a, b) if method == "spearman" else stats.kendalltau(a, b)
    return float(r.statistic)


def rank_correlations(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Spearman and Kendall between −Ψ (psi_mean) and each accuracy column over the models, with
    95% percentile bootstrap intervals (models resampled with replacement)."""
    neg_psi = -np.array([float(r["psi_mean"]) for r in rows])
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, len(rows), len(rows)) for _ in range(n_boot)]
    out: dict[str, dict[str, float]] = {}
    for col in columns:
        acc = np.array([float(r[col]) for r in rows])
        entry: dict[str, float] = {}
        for method in ("spearman", "kendall"):
            entry[method] = _corr(method, neg_psi, acc)
            vals = [_corr(method, neg_psi[i], acc[i]) for i in boots]
            vals = [v for v in vals if not math.isnan(v)]
            lo, hi = np.percentile(vals, [2.5, 97.5]) if vals else (math.nan, math.nan)
            entry[f"{method}_low"], entry[f"{method}_high"] = float(lo), float(hi)
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


def summarise(rows: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Correlations, stability and timing over the model rows of a study."""
    acc_cols = [c for c in rows[0] if c.startswith("pgd_eps") and not c.endswith("_seconds")] + ["cw_l2"]
    psi_cols = ["psi_mean"] + [c for c in rows[0] if c.startswith("psi_eps")]
    psi_s = np.array([float(r["psi_seconds"]) for r in rows])
    full_s = np.array([float(r["eval_seconds"]) for r in rows])
    pgd100 = np.array([float(r["pgd100_seconds"]) for r in rows])
    return {
        "accuracy_columns": acc_cols,
        "psi_columns": psi_cols,
        "correlations": rank_correlations(rows, acc_cols, n_boot, seed),
        "stability": {
            "accuracy": ranking_stability(rows, acc_cols, higher_is_better=True),
            "psi": ranking_stability(rows, psi_cols, higher_is_better=False),
        },
        "timing": {
            "psi_seconds_total": float(psi_s.sum()),
            "full_evaluation_seconds_total": float(full_s.sum()),
            "pgd100_seconds_total": float(np.nansum(pgd100)),
            "full_over_psi": float(full_s.sum() / psi_s.sum()),
            "pgd100_over_psi": float(np.nansum(pgd100) / psi_s.sum()),
            "psi_over_pgd100_per_model": [
                float(a / b) if b > 0 else math.nan for a, b in zip(psi_s, pgd100, strict=True)
            ],
        },
    }


def read_study(folder: str | Path) -> dict[str, Any]:
    """The study written by `main` into `folder` (its yu1.json)."""
    path = Path(folder) / STUDY_FILE
    if not path.is_file():
        raise UserError(
            f"no YU-1 study in {folder} (missing {STUDY_FILE}); run python -m robustdissect.analysis.metric_study"
        )
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "rows" not in data:
        raise UserError(f"{path} is not a YU-1 study")
    return data


def run_study(models: Sequence[str], out: Path, data: Dataset, n: int, restarts: int, seed: int,
              pgd_steps: Sequence[int], n_boot: int, cw_steps: int = 50,
              refresh_landscape: bool = False) -> dict[str, Any]:  # fmt: skip
    """Evaluate every model (rows cached in out/models/<name>.json) and write yu1.json, yu1.csv
    and yu1_scatter.png."""
    from .plots_metric import study_scatter

    test = data.test.subset(n, seed=seed)
    x, y = test.x, test.y
    x_cal = data.val.x[:1000]
    (out / "models").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in models:
        cached = out / "models" / f"{Path(name).stem}.json"
        if cached.is_file():
            row = json.loads(cached.read_text())
            if refresh_landscape:
                model, _ = resolve_model(name, data=data)
                row.update(landscape_readouts(model.eval(), x[:50], y[:50], seed=seed))
                atomic_write_text(cached, json.dumps(jsonable(row), indent=1, allow_nan=False) + "\n")
            rows.append(row)
            continue
        model, card = resolve_model(name, data=data)
        model.eval()
        log.info("YU-1: %s", name)
        t0 = time.perf_counter()
        row = evaluate_model(model, x, y, x_cal, restarts=restarts, seed=seed, pgd_steps=pgd_steps,
                             cw_steps=cw_steps)  # fmt: skip
        objective = card.get("objective", {})
        arch = card.get("arch", {}) if isinstance(card.get("arch"), dict) else {}
        row = {
            "model": Path(name).stem,
            "arch": arch.get("name", card.get("model", "")),
            "width": arch.get("width"),
            "objective": objective.get("name", "") if isinstance(objective, dict) else str(objective),
            "label_smoothing": objective.get("label_smoothing", 0.0) if isinstance(objective, dict) else 0.0,
            **row,
        }
        log.info("YU-1: %s done in %.0f s", name, time.perf_counter() - t0)
        atomic_write_text(cached, json.dumps(jsonable(row), indent=1, allow_nan=False) + "\n")
        rows.append(row)
    summary = summarise(rows, n_boot=n_boot, seed=seed)
    study = {
        "experiment": "YU-1",
        "settings": {"n": len(y), "split": "test", "seed": seed, "eps": 0.1, "psi_steps": 20, "restarts": restarts,
                     "pgd_steps": list(pgd_steps), "pgd_eps": [0.05, 0.1, 0.2], "step_rule": "madry",
                     "cw": {"eps": 1.5, "steps": cw_steps, "search_steps": 3}, "calibration": "temperature (0.9)",
                     "calibration_images": len(x_cal), "threads": torch.get_num_threads()},
        "rows": rows,
        **summary,
    }  # fmt: skip
    atomic_write_text(out / STUDY_FILE, json.dumps(jsonable(study), indent=1, allow_nan=False) + "\n")
    cols = list(rows[0])
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    atomic_write_text(out / "yu1.csv", "\n".join(lines) + "\n")
    save_png(study_scatter(rows, summary["accuracy_columns"], summary["correlations"]), out / "yu1_scatter.png")
    return study


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Experiment YU-1: Ψ against adversarial accuracy over a model family")
    p.add_argument("--models", default=",".join(DEFAULT_FAMILY), help="comma-separated checkpoints")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000, help="test images (seeded subset)")
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--pgd-steps", default="10,40,100")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--cw-steps", type=int, default=50)
    p.add_argument("--refresh-landscape", action="store_true", help="recompute a* and steepness of cached rows")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = load_dataset("fashion-mnist", seed=a.seed)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    steps = [int(s) for s in a.pgd_steps.split(",")]
    study = run_study(models, Path(a.out), data, a.n, a.restarts, a.seed, steps, a.n_boot, a.cw_steps,
                      a.refresh_landscape)  # fmt: skip
    print(json.dumps({k: study[k] for k in ("correlations", "stability", "timing")}, indent=1))


if __name__ == "__main__":
    main()
