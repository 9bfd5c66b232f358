"""E4 (METHODS §5.4, Fig. 9): suppress the sensitive neurons by a factor β and compare with the
same number of random non-sensitive neurons.

Model A scales the top-10% sensitive neurons of each layer (post-ReLU hooks by default) by β;
model B scales as many neurons drawn at random from the non-sensitive ones (`draws` seeded
draws, averaged). Accuracy is measured on clean data and under each supplied attack (noise is
an "attack" too): regenerated white-box on the suppressed model, and optionally transferred
from the unmodified model.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from ..errors import UserError
from ..modelutil import accuracy, eval_mode, model_device
from ..probe import ChannelEdit, intervene, record, scale_channels
from .pairs import AttackFn

__all__ = [
    "DEFAULT_BETAS",
    "SuppressionResult",
    "accuracy",
    "layer_channels",
    "random_non_sensitive",
    "summarize_suppression",
    "suppression_edits",
    "suppression_experiment",
]

DEFAULT_BETAS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5)
Selection = Mapping[str, Sequence[int] | NDArray[Any]]


def layer_channels(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> dict[str, int]:
    """Channel count of each layer's output, from one forward pass on x[:1]."""
    with eval_mode(model), torch.no_grad(), record(model, layers) as rec:
        model(x[:1].to(model_device(model)))
    return {name: int(rec.outputs[name].shape[1]) for name in layers}


def random_non_sensitive(
    sensitive: Selection,
    channels: Mapping[str, int],
    *,
    draws: int = 3,
    seed: int = 0,
) -> list[dict[str, NDArray[np.int64]]]:
    """`draws` seeded selections of as many non-sensitive neurons per layer as are sensitive
    (all non-sensitive ones if there are fewer)."""
    out: list[dict[str, NDArray[np.int64]]] = []
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        sel: dict[str, NDArray[np.int64]] = {}
        for name, idx in sensitive.items():
            chosen = np.asarray(idx, dtype=np.int64)
            if name not in channels:
                raise UserError(f"channel count of layer '{name}' unknown")
            pool = np.setdiff1d(np.arange(channels[name]), chosen)
            m = min(chosen.size, pool.size)
            sel[name] = np.sort(rng.choice(pool, size=m, replace=False)).astype(np.int64)
        out.append(sel)
    return out


def suppression_edits(selection: Selection, beta: float) -> list[ChannelEdit]:
    """One `scale_channels` edit per layer."""
    return [scale_channels(name, [int(c) for c in idx], beta) for name, idx in selection.items()]


def _attacked(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackFn,
    batch_size: int,
    seed: int | None,
) -> torch.Tensor:
    device = model_device(model)
    parts = []
    for i, s in enumerate(range(0, x.shape[0], batch_size)):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        res = attack(model, xb, yb, seed=None if seed is None else seed + i)
        parts.append(res.x_adv.detach().to(x.device, x.dtype))
    return torch.cat(parts) if parts else x[:0]


@dataclass(frozen=True)
class SuppressionResult:
    """`rows`: one per β × group × draw × condition × mode; `summary`: averaged over draws
    (mean and std), the table behind Fig. 9; `selections`: the neurons of each group/draw."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    selections: dict[str, list[dict[str, NDArray[np.int64]]]]


def suppression_experiment(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sensitive: Selection,
    *,
    attacks: Mapping[str, AttackFn] | None = None,
    betas: Sequence[float] = DEFAULT_BETAS,
    draws: int = 3,
    seed: int = 0,
    transfer: bool | Collection[str] = True,
    batch_size: int = 256,
) -> SuppressionResult:
    """E4: accuracy of the model with the `sensitive` neurons (layer → channel ids, e.g. the
    top-10% of relu1..reluL) scaled by β, against random non-sensitive neurons.

    `attacks`: name → attack callable (e.g. "pgd-linf", "pgd-l2", "fgsm", "noise-s3"), run
    white-box on each suppressed model; `transfer` (True, False or a set of names) also
    evaluates examples crafted once on the unmodified model. Attack seeds are `seed + batch`.

    Rows: beta, group ("sensitive" | "random"), draw, condition ("clean" | attack name),
    mode ("clean" | "whitebox" | "transfer"), accuracy, n, neurons.
    """
    attacks = dict(attacks or {})
    if any(b < 0 for b in betas):
        raise UserError(f"β must be non-negative, got {list(betas)}")
    if draws < 1:
        raise UserError(f"draws must be at least 1, got {draws}")
    layers = list(sensitive)
    channels = layer_channels(model, layers, x)
    groups: dict[str, list[dict[str, NDArray[np.int64]]]] = {
        "sensitive": [{k: np.asarray(v, dtype=np.int64) for k, v in sensitive.items()}],
        "random": random_non_sensitive(sensitive, channels, draws=draws, seed=seed),
    }
    for name, idx in groups["sensitive"][0].items():
        if idx.size and (idx.min() < 0 or idx.max() >= channels[name]):
            raise UserError(f"layer '{name}' has {channels[name]} channels; got ids {idx.tolist()}")
    transfer_names = set(attacks) if transfer is True else set() if transfer is False else set(transfer)
    unknown = transfer_names - set(attacks)
    if unknown:
        raise UserError(f"transfer names unknown attacks: {sorted(unknown)}")
    transferred = {name: _attacked(model, x, y, attacks[name], batch_size, seed) for name in sorted(transfer_names)}

    def evaluate() -> list[tuple[str, str, float]]:
        out = [("clean", "clean", accuracy(model, x, y, batch_size))]
        for name, attack in attacks.items():
            xa = _attacked(model, x, y, attack, batch_size, seed)
            out.append((name, "whitebox", accuracy(model, xa, y, batch_size)))
        for name, xa in transferred.items():
            out.append((name, "transfer", accuracy(model, xa, y, batch_size)))
        return out

    rows: list[dict[str, Any]] = []
    baseline: list[tuple[str, str, float]] | None = None
    for beta in betas:
        for group, selections in groups.items():
            for draw, sel in enumerate(selections):
                if beta == 1.0:
                    if baseline is None:
                        baseline = evaluate()
                    results = baseline
                else:
                    with intervene(model, suppression_edits(sel, beta)):
                        results = evaluate()
                neurons = int(sum(v.size for v in sel.values()))
                for condition, mode, acc in results:
                    rows.append(
                        {
                            "beta": float(beta),
                            "group": group,
                            "draw": draw,
                            "condition": condition,
                            "mode": mode,
                            "accuracy": acc,
                            "n": int(x.shape[0]),
                            "neurons": neurons,
                        }
                    )
    return SuppressionResult(rows, summarize_suppression(rows), groups)


def summarize_suppression(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std of accuracy over draws per (β, group, condition, mode)."""
    acc: dict[tuple[float, str, str, str], list[float]] = {}
    for r in rows:
        acc.setdefault((r["beta"], r["group"], r["condition"], r["mode"]), []).append(r["accuracy"])
    out: list[dict[str, Any]] = []
    for (beta, group, condition, mode), vals in acc.items():
        a = np.asarray(vals, dtype=np.float64)
        out.append(
            {
                "beta": beta,
                "group": group,
                "condition": condition,
                "mode": mode,
                "accuracy": float(a.mean()),
                "accuracy_std": float(a.std()) if a.size > 1 else 0.0,
                "draws": int(a.size),
            }
        )
    return out
