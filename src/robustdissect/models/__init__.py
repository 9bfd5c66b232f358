"""Model zoo, layer naming, user models, checkpoints and the one model resolver."""

from .io import (
    apply_weights,
    build_model,
    check_classifier,
    load_checkpoint,
    load_state_dict,
    load_user_model,
    save_checkpoint,
    shipped_checkpoints,
)
from .layers import LayerInfo, aliases_of, default_conv_layers, list_layers, resolve_layer, resolve_layers
from .resolve import ModelEntry, describe_model, list_models, resolve_model
from .zoo import MODELS, Classifier, Normalize

__all__ = [
    "MODELS",
    "Classifier",
    "LayerInfo",
    "ModelEntry",
    "Normalize",
    "aliases_of",
    "apply_weights",
    "build_model",
    "check_classifier",
    "default_conv_layers",
    "describe_model",
    "list_layers",
    "list_models",
    "load_checkpoint",
    "load_state_dict",
    "load_user_model",
    "resolve_layer",
    "resolve_layers",
    "resolve_model",
    "save_checkpoint",
    "shipped_checkpoints",
]
