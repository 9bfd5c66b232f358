"""The one model resolver and the model listing: shipped checkpoints, checkpoint files, zoo
architectures and user factories, each checked against a small constructed dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from robustdissect import pipeline
from robustdissect.data import Dataset, Split
from robustdissect.errors import UserError
from robustdissect.models import (
    MODELS,
    build_model,
    describe_model,
    list_models,
    load_checkpoint,
    resolve_model,
    save_checkpoint,
    shipped_checkpoints,
)


def _data(name: str = "fashion-mnist", classes: int = 10, shape: tuple[int, int, int] = (1, 28, 28)) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.rand(n, *shape, generator=g), torch.arange(n) % classes)

    return Dataset(name, tuple(f"c{i}" for i in range(classes)), split(8), split(4), split(8))


def test_list_models_filters_zoo_and_checkpoints_with_fnmatch() -> None:
    shipped = shipped_checkpoints()
    assert "fmnist-smallcnn-vanilla" in shipped
    assert list_models() == sorted([*MODELS.names(), *shipped])
    assert list_models("*") == list_models()
    assert list_models("fmnist-*") == sorted(n for n in shipped if n.startswith("fmnist-"))
    assert "smallcnn" not in list_models("fmnist-*")
    assert list_models("*vgg*") == ["vgg16"]
    assert list_models("fmnist-smallcnn-?at") == ["fmnist-smallcnn-pat"]
    assert list_models("fmnist-smallcnn-[pa]*") == sorted(
        n for n in shipped if n.startswith(("fmnist-smallcnn-p", "fmnist-smallcnn-a"))
    )
    assert list_models("SMALLCNN") == []  # case-sensitive, as registry names are
    assert list_models("nothing-*") == []


def test_checkpoints_are_tags_of_their_architecture() -> None:
    entry = describe_model("fmnist-smallcnn-avg-pat")
    assert (entry.arch, entry.checkpoint) == ("smallcnn", True)
    assert "fashion-mnist" in entry.summary and "pat" in entry.summary
    zoo = describe_model("resnet18")
    assert (zoo.name, zoo.arch, zoo.checkpoint) == ("resnet18", "resnet18", False)
    with pytest.raises(UserError, match="unknown model 'lenett'; did you mean: lenet"):
        describe_model("lenett")


def test_pipeline_uses_the_one_resolver() -> None:
    assert pipeline.resolve_model is resolve_model


def test_shipped_checkpoint_with_and_without_data() -> None:
    x = torch.rand(3, 1, 28, 28)
    reference, ref_card = load_checkpoint("fmnist-smallcnn-vanilla")
    model, card = resolve_model("fmnist-smallcnn-vanilla")
    assert card == ref_card and not model.training
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    checked, _ = resolve_model("fmnist-smallcnn-vanilla", data=_data())
    with torch.no_grad():
        assert torch.equal(checked(x), reference(x))
    # matched by shape, not by name: another dataset's name is a note; another shape or class count refuses
    named, _ = resolve_model("fmnist-smallcnn-vanilla", data=_data("npz"))
    with torch.no_grad():
        assert torch.equal(named(x), reference(x))
    with pytest.raises(UserError, match=r"fails on inputs of shape \(N, 3, 32, 32\)"):
        resolve_model("fmnist-smallcnn-vanilla", data=_data("npz", shape=(3, 32, 32)))
    with pytest.raises(UserError, match="outputs 10 classes but the dataset has 5"):
        resolve_model("fmnist-smallcnn-vanilla", data=_data("npz", classes=5))
    with pytest.raises(UserError, match="--weights is only for zoo or user models"):
        resolve_model("fmnist-smallcnn-vanilla", weights="w.safetensors")
    with pytest.raises(UserError, match=r"model arguments \(width\) are only for zoo or user models"):
        resolve_model("fmnist-smallcnn-vanilla", model_args={"width": 8})


def test_checkpoint_file_with_card(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = build_model("smallcnn", width=4, num_classes=3).eval()
    save_checkpoint(m, tmp_path / "m.safetensors", {"dataset": "toy"})
    x = torch.rand(2, 1, 28, 28)
    for spec in ("m.safetensors", "m.json"):
        loaded, card = resolve_model(str(tmp_path / spec), data=_data("toy", classes=3))
        assert card["arch"]["width"] == 4 and card["dataset"] == "toy"
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x))
    with pytest.raises(UserError, match="outputs 3 classes but the dataset has 10"):
        resolve_model(str(tmp_path / "m.safetensors"), data=_data("toy", classes=10))


def test_zoo_model_is_built_for_the_data_and_takes_weights(tmp_path: Path) -> None:
    data = _data("toy", classes=3, shape=(3, 32, 32))
    with pytest.raises(UserError, match="'smallcnn' is an architecture without weights"):
        resolve_model("smallcnn", None, {"width": 4}, data)
    bare, card = resolve_model("smallcnn", None, {"width": 4}, data, require_weights=False)
    assert card["arch"]["num_classes"] == 3 and card["arch"]["in_channels"] == 3 and card["weights"] is None
    mean, std = data.channel_stats()
    assert card["arch"]["mean"] == pytest.approx(list(mean)) and card["arch"]["std"] == pytest.approx(list(std))
    # Weights of a differently initialised model of the same shape replace the initial ones.
    torch.manual_seed(1)
    other = build_model("smallcnn", width=4, num_classes=3, in_channels=3, mean=mean, std=std).eval()
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded, card = resolve_model("smallcnn", tmp_path / "w.safetensors", {"width": 4}, data)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), other(x))
        assert not torch.equal(bare(x), other(x))
    assert card["weights"] == str(tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="does not fit the model|has shape"):
        resolve_model("smallcnn", tmp_path / "w.safetensors", {"width": 8}, data)
    # Without data the factory's own defaults hold (10 classes, one channel).
    plain, _ = resolve_model("smallcnn", model_args={"width": 4}, require_weights=False)
    assert plain(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_user_factory_with_arguments_and_weights(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def make(num_classes=10):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, num_classes))\n"
    )
    spec = f"{tmp_path / 'net.py'}:make"
    data = _data("toy", classes=3)
    weights = {"1.weight": torch.full((3, 784), 0.01), "1.bias": torch.tensor([1.0, 0.0, -1.0])}
    save_file(weights, str(tmp_path / "w.safetensors"))
    model, card = resolve_model(spec, str(tmp_path / "w.safetensors"), {"num_classes": 3}, data)
    assert card == {
        "arch": {"name": spec, "num_classes": 3},
        "weights": str(tmp_path / "w.safetensors"),
        "user_model": True,
    }
    x = torch.rand(2, 1, 28, 28)
    expected = x.flatten(1).sum(1, keepdim=True) * 0.01 + torch.tensor([1.0, 0.0, -1.0])
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
    with pytest.raises(UserError, match="outputs 10 classes but the dataset has 3"):
        resolve_model(spec, None, {}, data, require_weights=False)


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(UserError, match="unknown model 'smalcnn'; did you mean: smallcnn"):
        resolve_model("smalcnn")
    with pytest.raises(UserError, match="did you mean: fmnist-smallcnn-pat"):
        resolve_model("fmnist-smallcnn-pta")


def test_normalize_keeps_attacks_in_pixel_space_and_layer_names(tmp_path: Path) -> None:
    """--normalize: the model sees (x − mean) / std, takes pixels in [0, 1], keeps its module paths."""
    (tmp_path / "std_net.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),\n"
        "                         nn.LazyLinear(num_classes))\n"
    )
    data = _data("npz", shape=(3, 8, 8))
    torch.manual_seed(0)
    plain, _ = resolve_model(f"{tmp_path / 'std_net.py'}:make", data=data)
    torch.manual_seed(0)
    normed, card = resolve_model(f"{tmp_path / 'std_net.py'}:make", data=data, normalize="imagenet")
    assert card["normalize"] == "imagenet"
    assert [n for n, _ in normed.named_modules()] == [n for n, _ in plain.named_modules()]
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(normed(x), plain((x - mean) / std), atol=1e-6)
    custom, _ = resolve_model(f"{tmp_path / 'std_net.py'}:make", data=data, normalize="0.5/0.25")
    with torch.no_grad():
        assert torch.allclose(custom.input_mean.flatten(), torch.full((3,), 0.5))
    for bad, why in (("0.5,0.5/0.2", "gives 2 mean and 1 std values for 3-channel"), ("0.5/0", "std must be positive"),
                     ("zca", "use one of imagenet")):
        with pytest.raises(UserError, match=why):
            resolve_model(f"{tmp_path / 'std_net.py'}:make", data=data, normalize=bad)


def test_compare_specs_labels_and_weights() -> None:
    from robustdissect.models.spec import parse_compare, short_label, split_label, unique_labels

    assert split_label("robust=runs/pat/model.safetensors") == ("robust", "runs/pat/model.safetensors")
    assert split_label("pkg.mod:make") == (None, "pkg.mod:make")
    assert short_label("/home/me/nets/lenet.py:make") == "lenet:make"
    assert short_label("/home/me/nets/lenet.py:make", "/w/lenet_adv.safetensors") == "lenet_adv"
    assert short_label("/runs/pat/model.safetensors") == "model"
    assert short_label("fmnist-smallcnn-pat") == "fmnist-smallcnn-pat"
    assert unique_labels(["a", "a", "b", "a"]) == ["a", "a-2", "b", "a-3"]
    specs = parse_compare(["adv=nets.py:make", {"model": "nets.py:make", "weights": "w2.safetensors"}],
                          weights=["w1.safetensors"])
    assert [(s.label, s.spec, s.weights) for s in specs] == [
        ("adv", "nets.py:make", "w1.safetensors"), ("w2", "nets.py:make", "w2.safetensors")]
    with pytest.raises(UserError, match="2 files for 1 --compare models"):
        parse_compare(["a"], weights=["x", "y"])
    with pytest.raises(UserError, match="each entry is SPEC"):
        parse_compare([{"weights": "w"}])
