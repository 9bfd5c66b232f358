from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from robustdissect.errors import UserError
from robustdissect.models import (
    MODELS,
    build_model,
    check_classifier,
    list_layers,
    load_checkpoint,
    load_state_dict,
    load_user_model,
    resolve_layer,
    save_checkpoint,
    shipped_checkpoints,
)
from robustdissect.models.io import apply_weights

SHAPES = {
    "smallcnn": (1, 28, 28), "smallcnn4": (1, 28, 28), "lenet": (1, 28, 28), "vgg16": (3, 32, 32),
    "resnet18": (3, 32, 32),
}  # fmt: skip
SMALL_ARGS = {"vgg16": {"width_mult": 0.125}, "resnet18": {"width": 8}}


@pytest.mark.parametrize("name", MODELS.names())
def test_zoo_contract(name: str) -> None:
    """Every zoo model: logits (N, K), finite, every parameter gets a gradient, aliases resolve."""
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = build_model(name, num_classes=7, in_channels=shape[0], **SMALL_ARGS.get(name, {}))
    x = torch.rand(3, *shape)
    out = model(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    modules = dict(model.named_modules())
    for alias, path in model.layer_aliases.items():
        assert path in modules, (alias, path)
    infos = list_layers(model, shape)
    assert infos[-1].shape == (7,)  # the last module produces the logits


def test_smallcnn_layout_and_pooling() -> None:
    m = build_model("smallcnn", width=16, pooling="avg")
    infos = {i.alias: i for i in list_layers(m, (1, 28, 28)) if i.alias}
    assert [infos[f"conv{i}"].channels for i in range(1, 7)] == [16, 16, 32, 32, 64, 64]
    assert infos["pool1"].shape == (16, 14, 14) and infos["pool3"].shape == (64, 3, 3)
    assert isinstance(m.pool1, nn.AvgPool2d)
    assert build_model("smallcnn", in_channels=3, mean=(0, 0, 0), std=(1, 1, 1))(torch.rand(2, 3, 32, 32)).shape == (
        2,
        10,
    )


def test_vgg16_and_resnet18_paper_aliases() -> None:
    vgg = build_model("vgg16", width_mult=0.125)
    assert resolve_layer(vgg, "conv13") == "features.conv13.bn"
    assert resolve_layer(vgg, "relu10") == "features.conv10.relu"
    res = build_model("resnet18", width=8)
    assert resolve_layer(res, "l4b2c2") == "layer4.1.bn2"
    assert resolve_layer(res, "fc1") == "fc"


def test_unknown_layer_lists_close_matches() -> None:
    m = build_model("smallcnn")
    with pytest.raises(UserError, match="did you mean: .*conv1"):
        resolve_layer(m, "conv1x")


def test_unknown_model() -> None:
    with pytest.raises(UserError, match="unknown model 'smalcnn'; did you mean: smallcnn"):
        load_checkpoint("smalcnn")


def test_checkpoint_roundtrip_and_card(tmp_path: Path) -> None:
    m = build_model("smallcnn", width=4)
    save_checkpoint(m, tmp_path / "m.safetensors", {"dataset": "fashion-mnist", "test_accuracy": 0.5})
    loaded, card = load_checkpoint(str(tmp_path / "m.safetensors"))
    assert card["arch"]["width"] == 4 and card["dataset"] == "fashion-mnist" and "package_version" in card
    x = torch.rand(2, 1, 28, 28)
    m.eval()
    assert torch.equal(loaded(x), m(x))


def test_weights_of_the_wrong_shape(tmp_path: Path) -> None:
    small = build_model("smallcnn", width=8)
    torch.save(small.state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="has shape .* the model expects"):
        apply_weights(build_model("smallcnn", width=16), load_state_dict(tmp_path / "w.pt"), "w.pt")


def test_pickle_file_as_weights_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("arbitrary code",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(UserError, match="refusing to load"):
        load_state_dict(tmp_path / "evil.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_class_count_mismatch_and_output_checks() -> None:
    m = build_model("smallcnn", num_classes=5)
    with pytest.raises(UserError, match="outputs 5 classes but the dataset has 10"):
        check_classifier(m, (1, 28, 28), 10)

    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x.flatten(1)), x

    wrapped = check_classifier(TupleOut(), (1, 2, 2), 3)
    assert wrapped(torch.rand(2, 1, 2, 2)).shape == (2, 3)

    class Probs(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x.flatten(1)[:, :3], 1)

    with pytest.raises(UserError, match="probabilities"):
        check_classifier(Probs(), (1, 2, 2), 3)
    with pytest.raises(UserError, match="fails on inputs of shape"):
        check_classifier(build_model("lenet"), (3, 32, 32), 10)


def test_user_model_from_file(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "def make(num_classes=10):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, num_classes))\n"
    )
    m = load_user_model(f"{tmp_path / 'mynet.py'}:make", num_classes=4)
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(UserError, match="not a callable"):
        load_user_model(f"{tmp_path / 'mynet.py'}:missing")
    with pytest.raises(UserError, match="does not exist"):
        load_user_model("nowhere.py:make")


def test_shipped_checkpoints_meet_their_targets(fmnist) -> None:
    from robustdissect.training import accuracy

    names = shipped_checkpoints()
    assert {"fmnist-smallcnn-vanilla", "fmnist-smallcnn-avg-vanilla"} <= set(names)
    for name in ("fmnist-smallcnn-vanilla", "fmnist-smallcnn-avg-vanilla"):
        model, card = load_checkpoint(name)
        acc = accuracy(model, fmnist.test.x, fmnist.test.y)
        # A floor for a sound standard smallcnn (8 epochs: vanilla 93.1%, avg-vanilla 92.5%).
        assert acc >= 0.92, (name, acc)
        assert abs(acc - card["test_accuracy"]) < 1e-3
    assert load_checkpoint("fmnist-smallcnn-avg-vanilla")[1]["arch"]["pooling"] == "avg"
