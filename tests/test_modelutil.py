"""modelutil: model_device, eval_mode (flags restored, also on exceptions), predict, accuracy."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet
from torch import nn

from robustdissect.modelutil import accuracy, eval_mode, model_device, predict


def test_model_device_falls_back_to_buffers_then_default() -> None:
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.BatchNorm2d(2, affine=False)) == torch.device("cpu")  # buffers only
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.ReLU(), torch.device("meta")) == torch.device("meta")
    assert model_device(nn.ReLU(), "meta") == torch.device("meta")
    assert model_device(nn.Linear(2, 2, device="meta"), torch.device("cpu")) == torch.device("meta")


def test_eval_mode_restores_each_flag_also_on_exceptions() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # e.g. frozen BatchNorm inside a training model
    with eval_mode(model) as m:
        assert m is model
        assert not any(mod.training for mod in model.modules())
    assert [mod.training for mod in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert [mod.training for mod in model.modules()] == [True, True, False, True]


def test_predict_and_accuracy() -> None:
    torch.manual_seed(0)
    model = TinyNet().train()
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x).argmax(1)
    model.train()
    pred = predict(model, x, batch_size=3)
    assert pred.dtype == torch.int64 and torch.equal(pred, expected)
    assert model.training
    y = expected.clone()
    y[:2] = (y[:2] + 1) % 3
    assert accuracy(model, x, y, batch_size=2) == pytest.approx(5 / 7)
    assert math.isnan(accuracy(model, x[:0], y[:0]))
    assert predict(model, x[:0]).shape == (0,)
