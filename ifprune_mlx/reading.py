"""Reading a model's LLM from its folder: a bundle (row layout) or a plain model folder, all of
it, one rank's share of the FFN rows (mlx.distributed) or the resident rows only."""

from __future__ import annotations

from pathlib import Path

import mlx.nn as nn

from . import bundle
from .distributed import Sharding
from .errors import BundleError
from .models import build_model, load_weights, normalize_config, quantize_like, to_row_layout
from .resident import Residency


def read_model(folder: Path, config: dict, is_bundle: bool, on_progress=None,
               sharding: Sharding | None = None, residency: Residency | None = None) -> nn.Module:
    """The LLM of a bundle (row layout) or of a plain model folder (converted here); with
    `sharding`, only this rank's FFN rows (read from the files alone, for a bundle); with
    `residency` (bundles only), the first `capacity` rows of every layer's FFN."""
    files = bundle.weight_files(folder)
    weights = bundle.read_safetensors(files)
    config = normalize_config(config, weights)
    model = build_model(config)
    if sharding is not None:
        sharding.shard_model(model, bool(config.get("mlp_bias", False)))
    if residency is not None:
        residency.shape_model(model, bool(config.get("mlp_bias", False)))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantization = config.get("quantization")
    if quantization and quantization.get("mode", "affine") != "affine":
        raise BundleError(f"{folder}: {quantization['mode']} quantization is not supported; use affine 4- or 8-bit")
    if not is_bundle:
        weights = to_row_layout(weights, quantization)
    if sharding is not None:
        weights = sharding.local_weights(weights, files if is_bundle else None)
    if residency is not None:
        weights = residency.local_weights(weights)
    if quantization:
        quantize_like(model, quantization, weights)
    load_weights(model, weights, str(folder), on_progress)
    if residency is not None:
        residency.attach(model)
    return model
