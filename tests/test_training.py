from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import interrupt_at
from torch import nn

from robustdissect.errors import UserError
from robustdissect.training import TrainConfig, Vanilla, train

CFG = TrainConfig(model="smallcnn", model_args={"width": 4}, n=512, epochs=2, batch_size=64, seed=3)


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_same_seed_same_weights(tmp_path: Path, fmnist) -> None:
    a = train(CFG, tmp_path / "a", data=fmnist)
    b = train(CFG, tmp_path / "b", data=fmnist)
    wa, wb = _weights(a.model), _weights(b.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "a" / "model.json").is_file()
    assert len(a.history) == 2 and a.card["epochs"] == 2


@pytest.mark.parametrize("kind", ["zoo", "user"])
def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path, fmnist, kind: str) -> None:
    cfg = CFG
    if kind == "user":  # the user's file.py:factory model (see test_training_user.py)
        from test_training_user import write_net

        spec = f"{write_net(tmp_path / 'code')}:make"
        cfg = TrainConfig(**{**CFG.__dict__, "model": spec, "model_args": {"in_channels": 1}})
    full = train(cfg, tmp_path / "full", data=fmnist)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", objective=interrupt_at(Vanilla(), 1), data=fmnist)
    assert (tmp_path / "cut" / "state.pt").is_file() and not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = train(cfg, tmp_path / "cut", resume=True, data=fmnist)
    wf, wr = _weights(full.model), _weights(resumed.model)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_refuses_to_overwrite_or_resume_wrong(tmp_path: Path, fmnist) -> None:
    train(CFG.__class__(**{**CFG.__dict__, "epochs": 1}), tmp_path / "r", data=fmnist)
    with pytest.raises(UserError, match="not empty"):
        train(CFG, tmp_path / "r", data=fmnist)
    with pytest.raises(UserError, match="different configuration"):
        train(CFG, tmp_path / "r", resume=True, data=fmnist)
    with pytest.raises(UserError, match="nothing to resume"):
        train(CFG, tmp_path / "empty", resume=True, data=fmnist)


def test_training_learns(tmp_path: Path, fmnist) -> None:
    cfg: dict[str, Any] = {**CFG.__dict__, "n": 2000, "epochs": 2, "model_args": {"width": 8}}
    result = train(TrainConfig(**cfg), tmp_path / "l", data=fmnist)
    assert result.card["test_accuracy"] > 0.6
