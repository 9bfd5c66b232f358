"""Per-sample attack losses on logits (N, K); every function returns (N,)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """CE(logits, labels) per sample, (N,)."""
    return F.cross_entropy(logits, labels, reduction="none")


def other_max(logits: Tensor, labels: Tensor) -> Tensor:
    """max_{i != label} z_i, (N,)."""
    masked = logits.scatter(1, labels[:, None], float("-inf"))
    return masked.amax(dim=1)


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """z_label - max_{i != label} z_i, (N,): positive while `labels` is the prediction."""
    return logits.gather(1, labels[:, None]).squeeze(1) - other_max(logits, labels)


def dlr(logits: Tensor, labels: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020), to be maximised; needs K >= 3.

    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), z_pi sorted in decreasing order.
    """
    top = logits.topk(3, dim=1).values
    return -margin(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Targeted DLR, to be maximised; needs K >= 4.

    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).
    """
    top = logits.topk(4, dim=1).values
    zy = logits.gather(1, labels[:, None]).squeeze(1)
    zt = logits.gather(1, targets[:, None]).squeeze(1)
    return -(zy - zt) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def is_success(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    """Bool (N,): misclassified (untargeted) or predicted as the target (targeted)."""
    pred = logits.argmax(dim=1)
    if targets is None:
        return pred != labels
    return pred == targets
