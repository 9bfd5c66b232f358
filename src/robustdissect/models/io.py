"""Building zoo models, loading user models and weights, and checkpoints with JSON cards.

A checkpoint is `NAME.safetensors` (the state dict) next to `NAME.json` (the card: architecture
and its arguments, dataset, objective, seed, epochs, accuracy, package version). Shipped
checkpoints are package resources (`robustdissect/weights/`) and load by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import warnings
import zipfile
from importlib.resources import as_file
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__, resources
from ..data.files import MAX_COMPRESSION_RATIO, RATIO_CHECK_ABOVE, check_input_size, human_bytes
from ..errors import UserError, unknown_name
from ..runs import write_json
from .zoo import MODELS


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a zoo model by registry name."""
    factory = MODELS.get(name)
    try:
        model: nn.Module = factory(**kwargs)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. width=-4 fails inside nn.Conv2d
        raise UserError(f"bad arguments for model '{name}' {kwargs}: {type(e).__name__}: {e}") from None
    return model


def shipped_checkpoints() -> list[str]:
    """Names of the checkpoints shipped with the package."""
    return resources.checkpoint_names()


def read_card(path: Path | Traversable) -> dict[str, Any]:
    """A checkpoint's JSON card; it must name its architecture (`arch.name`)."""
    try:
        card: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read model card {path}: {e}") from None
    if "arch" not in card or "name" not in card["arch"]:
        raise UserError(f"model card {path} has no 'arch' with a 'name'")
    return card


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights from .safetensors, or from .pt/.pth with torch.load(weights_only=True)."""
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a valid safetensors file: {e}") from None
    _check_pt_archive(path)
    try:
        with warnings.catch_warnings():  # the refusal below is the one line the user sees
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusals and corrupt archives alike
        first = str(e).strip().split("\n")[0][:200]
        raise UserError(
            f"refusing to load {path}: not a plain tensor checkpoint ({first}); "
            "save a state_dict with torch.save(model.state_dict(), ...) or use safetensors"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def _check_pt_archive(path: Path) -> None:
    """Refuse a zip-format .pt whose records would inflate past the input limit, from the zip
    directory alone (torch.save stores records uncompressed; a deflated one is suspect)."""
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format: torch.load reads what the file holds
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return  # torch.load's own refusal names the problem
    check_input_size(sum(i.file_size for i in infos), f"{path}")
    for i in infos:
        if i.file_size > RATIO_CHECK_ABOVE and i.file_size > MAX_COMPRESSION_RATIO * max(i.compress_size, 1):
            raise UserError(
                f"{path}: record {i.filename} inflates {human_bytes(i.compress_size)} -> "
                f"{human_bytes(i.file_size)}; refusing a likely zip bomb"
            )


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict, turning missing/unexpected keys and shape mismatches into UserErrors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(
            f"{where} does not fit the model: {len(missing)} missing keys "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise UserError(
                f"{where}: weight '{k}' has shape {tuple(v.shape)}, the model expects "
                f"{tuple(own[k].shape)}; check the architecture arguments (e.g. width, classes)"
            )
    model.load_state_dict(state)


def load_checkpoint(name_or_path: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a shipped checkpoint by name, or a `.safetensors` file that has a `.json` card beside it."""
    path = Path(name_or_path)
    if path.suffix in (".safetensors", ".json"):
        card_path, path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if not path.is_file():
            raise UserError(
                f"weights file {path} does not exist (a checkpoint is NAME.safetensors with its card NAME.json)"
            )
        if not card_path.is_file():
            raise UserError(f"no model card {card_path} next to the weights")
        card = read_card(card_path)
        model = _build_from_card(card)
        apply_weights(model, load_state_dict(path), str(path))
    elif name_or_path in shipped_checkpoints():
        weights, card_file = resources.checkpoint_files(name_or_path)
        card = read_card(card_file)
        model = _build_from_card(card)
        with as_file(weights) as file:  # a real file even when the package is not on a file system
            apply_weights(model, load_state_dict(file), name_or_path)
    else:
        raise unknown_name("model", name_or_path, [*MODELS.names(), *shipped_checkpoints()])
    model.eval()
    return model, card


def _build_from_card(card: dict[str, Any]) -> nn.Module:
    arch = dict(card["arch"])
    if card.get("user_model"):  # a card never imports code: the user names the factory again
        how = card.get("loads_with") or f"--model {arch['name']} --weights FILE"
        raise UserError(f"this checkpoint holds a user model ({arch['name']}); load it with {how}")
    return build_model(arch.pop("name"), **arch)


def save_checkpoint(model: nn.Module, path: Path, card: dict[str, Any]) -> None:
    """Write `path` (.safetensors) and its `.json` card atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    tmp.replace(path)
    full = {"arch": getattr(model, "arch", {}), "package_version": __version__, **card}
    write_json(path.with_suffix(".json"), full, sort_keys=True)


def load_user_model(spec: str, **kwargs: Any) -> nn.Module:
    """`path/to/file.py:factory` or `package.module:factory` -> the module that factory returns."""
    if ":" not in spec:
        raise UserError(f"user model '{spec}' must look like path/to/file.py:factory or pkg.module:factory")
    target, factory_name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise UserError(f"model file {file} does not exist")
        mod_name = f"robustdissect_user_{file.stem}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, file)
        if spec_obj is None or spec_obj.loader is None:
            raise UserError(f"cannot import {file}")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except SystemExit as e:
            raise UserError(f"importing {file} exited with status {_status(e)} (sys.exit at import)") from None
        except Exception as e:
            raise UserError(f"importing {file} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except SystemExit as e:
            raise UserError(f"importing module '{target}' exited with status {_status(e)}") from None
        except ImportError as e:
            raise UserError(f"cannot import module '{target}': {e}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UserError(f"'{factory_name}' is not a callable in {target}")
    try:
        model = factory(**kwargs)
    except SystemExit as e:  # sys.exit() in the factory must not end the run as if it had succeeded
        raise UserError(f"the model factory {spec} exited with status {_status(e)}") from None
    except Exception as e:  # the user's own code: its failure is the user's to fix
        raise UserError(f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) raised "
                        f"{type(e).__name__}: {e}") from None  # fmt: skip
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _status(e: SystemExit) -> str:
    """The status a SystemExit carries, as `sys.exit` would report it."""
    return "0" if e.code is None else repr(e.code) if not isinstance(e.code, int) else str(e.code)


class LogitsOnly(nn.Module):
    """Wrap a model whose forward returns a tuple/list (first item) or dict (key 'logits')."""

    def __init__(self, inner: nn.Module, key: str | int) -> None:
        super().__init__()
        self.inner = inner
        self.key = key
        for attr in ("layer_aliases", "arch"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        picked = out[self.key]
        assert isinstance(picked, torch.Tensor)
        return picked


def check_classifier(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Run one batch and check the output is (N, num_classes) logits; unwrap tuple/dict outputs."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.rand(2, *input_shape))
    except SystemExit as e:
        raise UserError(
            f"the model's forward pass exited with status {_status(e)} on inputs of shape "
            f"(N, {', '.join(map(str, input_shape))})"
        ) from None
    except Exception as e:
        raise UserError(
            f"the model fails on inputs of shape (N, {', '.join(map(str, input_shape))}): "
            f"{type(e).__name__}: {str(e)[:200]}"
        ) from None
    finally:
        model.train(was_training)
    wrapped = model
    if isinstance(out, (tuple, list)):
        if not out or not isinstance(out[0], torch.Tensor):
            raise UserError("the model returns a tuple whose first item is not a tensor of logits")
        wrapped, out = LogitsOnly(model, 0), out[0]
    elif isinstance(out, dict):
        if "logits" not in out:
            raise UserError(f"the model returns a dict without 'logits' (keys: {sorted(out)})")
        wrapped, out = LogitsOnly(model, "logits"), out["logits"]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the model must return logits of shape (N, classes), got {shape}")
    if out.shape[1] != num_classes:
        raise UserError(
            f"the model outputs {out.shape[1]} classes but the dataset has {num_classes}; set num_classes to match"
        )
    if torch.allclose(out.sum(1), torch.ones(2), atol=1e-4) and bool((out >= 0).all()):
        raise UserError("the model's outputs look like probabilities (rows sum to 1); return logits")
    return wrapped
