"""Data-parallel training under torchrun: 2 CPU processes (gloo) against one process.

The comparison model is LeNet, which has no BatchNorm: with BatchNorm in train mode each rank
normalises its shard with the shard's own batch statistics, so the forward pass (and hence the
gradient) differs from the single-process one by design, as it does under DistributedDataParallel
without SyncBatchNorm. Without BatchNorm the averaged gradient equals the global-batch gradient up
to floating-point summation order, so the weights after training agree to ~1e-6; the tolerance
(atol 1e-5) allows for that reordering only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import interrupt_at
from torch import nn

from robustdissect.models import load_checkpoint
from robustdissect.runs import release_all
from robustdissect.training import TrainConfig, Vanilla, train
from robustdissect.training.distributed import shard

# seed 0: the `fmnist` fixture holds out the validation split with seed 0, as the CLI does for this seed
CFG = TrainConfig(model="lenet", n=256, epochs=1, batch_size=64, seed=0, lr=0.05, device="cpu")


def _torchrun(tmp_path: Path, cfg: TrainConfig, out: Path, resume: bool = False) -> None:
    """`robustdissect train --config ...` under `torch.distributed.run --nproc_per_node 2`."""
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in cfg.__dict__.items() if k not in ("model_args",)}))
    launcher = tmp_path / "launch.py"
    launcher.write_text("from robustdissect.cli import main\nmain()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    where = ["--resume", str(out)] if resume else ["--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(launcher), "train", "--config", str(config), *where]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def test_shards_are_disjoint_and_cover_the_batch() -> None:
    for n in (0, 1, 5, 64, 65):
        for world in (1, 2, 3):
            parts = [range(n)[shard(n, r, world)] for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_ranks_match_one_process_and_resume(tmp_path: Path, fmnist) -> None:
    """2 epochs: a single-process run against (a) a 2-rank run from scratch and (b) a single-process
    run killed after epoch 1 and resumed by 2 ranks from its state.pt. Global batch 64 = 2 x 32."""
    torch.set_num_threads(1)
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    single = train(cfg, tmp_path / "single", data=fmnist)

    _torchrun(tmp_path, cfg, tmp_path / "ddp")
    ddp_model, ddp_card = load_checkpoint(str(tmp_path / "ddp" / "model.safetensors"))
    assert _max_diff(single.model, ddp_model) < 1e-5
    assert ddp_card["epochs"] == 2 and len(list((tmp_path / "ddp").iterdir())) == 4  # state, model, card, history
    assert abs(ddp_card["test_accuracy"] - single.card["test_accuracy"]) <= 2e-4

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", objective=interrupt_at(Vanilla(), 1), data=fmnist)
    release_all()  # what the end of an interrupted process does: the torchrun ranks may take the folder
    _torchrun(tmp_path, cfg, tmp_path / "cut", resume=True)
    resumed, _card = load_checkpoint(str(tmp_path / "cut" / "model.safetensors"))
    assert _max_diff(single.model, resumed) < 1e-5
