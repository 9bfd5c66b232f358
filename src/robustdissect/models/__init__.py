"""Model zoo, layer naming, user models and checkpoints."""

from .io import (
    WEIGHTS_DIR,
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
from .zoo import MODELS, Classifier, Normalize

__all__ = [
    "MODELS",
    "WEIGHTS_DIR",
    "Classifier",
    "LayerInfo",
    "Normalize",
    "aliases_of",
    "apply_weights",
    "build_model",
    "check_classifier",
    "default_conv_layers",
    "list_layers",
    "load_checkpoint",
    "load_state_dict",
    "load_user_model",
    "resolve_layer",
    "resolve_layers",
    "save_checkpoint",
    "shipped_checkpoints",
]
