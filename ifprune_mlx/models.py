"""Build mlx-lm models with a PrunableMLP in every layer, and load weights into them."""

from __future__ import annotations

import importlib
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .errors import BundleError, UnsupportedArchitectureError
from .prune import PrunableMLP, QuantizedRowLinear, RowLinear
from .quantized import blas_quantized

# model_type -> mlx-lm module. Each has a SwiGLU MLP with gate/up/down projections; phi3's
# gate and up are one fused gate_up_proj, split at load (split_gate_up).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "phi3": "phi3"}


def model_classes(config: dict):
    """The mlx-lm (Model, ModelArgs) classes for a config, or UnsupportedArchitectureError."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    module = importlib.import_module(f"mlx_lm.models.{ARCHITECTURES[model_type]}")
    return module.Model, module.ModelArgs


SWIGLU_ACTS = ("silu", "swish")


def normalize_config(config: dict, weight_names) -> dict:
    """The config mlx-lm builds the same model from, checked for what the runtime supports.

    transformers >= 5 nests rope_theta, rope_scaling and partial_rotary_factor under
    "rope_parameters", which mlx-lm does not read (it would silently use its defaults), and
    configs may leave tie_word_embeddings to a default that differs between the libraries.
    Both are made explicit here (lifted rope scaling also gets the "type" key mlx-lm's phi3
    reads). Non-SwiGLU activations and non-MLX quantization formats (GPTQ, AWQ ...) are
    refused rather than run wrongly.
    """
    model_classes(config)
    if config.get("quantization_config") and "quantization" not in config:
        method = config["quantization_config"].get("quant_method", "quantized")
        raise BundleError(f"this is a {method} checkpoint; convert the float (or bfloat16) model, "
                          "with --quantize 4|8 for a quantized bundle")
    act = config.get("hidden_act", "silu")
    if act not in SWIGLU_ACTS:
        raise UnsupportedArchitectureError(
            f"hidden_act {act!r} is not supported; the prunable FFN is SwiGLU ({' or '.join(SWIGLU_ACTS)})")
    out = {k: v for k, v in config.items() if k != "rope_parameters"}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope and key not in config:
                out[key] = rope[key]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        rope_type = scaling.get("rope_type", "default")
        if rope_type != "default" and not config.get("rope_scaling"):
            out["rope_scaling"] = {"type": rope_type, **scaling}
    if "tie_word_embeddings" not in out:
        out["tie_word_embeddings"] = "lm_head.weight" not in set(weight_names)
    return out


def build_model(config: dict, prunable: bool = True) -> nn.Module:
    """Instantiate the mlx-lm model of `config`; with `prunable`, swap in PrunableMLPs."""
    model_class, args_class = model_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError) as e:
        raise BundleError(f"config.json does not describe a {config['model_type']} model: {e}") from e
    if prunable:
        bias = bool(config.get("mlp_bias", False))
        for layer in model.layers:
            d_model, d_ffn = layer.mlp.down_proj.weight.shape
            layer.mlp = PrunableMLP(d_model, d_ffn, bias)
    return model


def prunable_mlps(model: nn.Module) -> list[PrunableMLP]:
    return [layer.mlp for layer in model.layers]


def quantize_like(model: nn.Module, quantization: dict, weights: dict, *, blas_prefill: bool = True) -> None:
    """Quantize the modules whose `scales` the weights carry, as mlx-lm does at load.

    Bits and group size are read off each module's tensors, so mixed-precision checkpoints
    (e.g. 8-bit down_proj in a 4-bit model) load as written. blas_prefill: the quantized
    linears and embeddings outside the FFN become their BLAS-prefill twins (quantized.blas_quantized:
    many-token products through BLAS on the CPU, as the FFN's rows); False keeps mlx-lm's own
    (a plain mlx-lm model).
    """

    def params(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        in_dims = module.weight.shape[-1]
        bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
        if isinstance(module, RowLinear) and bits not in QuantizedRowLinear.BITS:
            raise BundleError(
                f"{path} is {bits}-bit: prunable FFN rows are affine "
                f"{'/'.join(map(str, QuantizedRowLinear.BITS))}-bit; quantize the float model with 4 or 8 bits")
        return {
            "group_size": in_dims // weights[f"{path}.scales"].shape[-1],
            "bits": bits,
            "mode": quantization.get("mode", "affine"),
        }

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=params)
    if blas_prefill:
        swapped = tree_map_with_path(lambda _, m: blas_quantized(m), model.leaf_modules(), is_leaf=nn.Module.is_module)
        model.update_modules(swapped)


def is_down_proj(name: str) -> bool:
    """Whether a weight is an FFN down_proj, the matrix the row layout stores transposed."""
    return name.endswith("mlp.down_proj.weight")


def is_gate_up_proj(name: str) -> bool:
    """Whether a tensor belongs to a fused FFN gate_up_proj (phi3), which the row layout splits."""
    return ".mlp.gate_up_proj." in name


def split_gate_up(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Fused FFN -> gate_proj and up_proj: the first and second half of gate_up_proj's rows.

    Applies to every mlp.gate_up_proj.{weight,scales,biases,bias} [2*d_ffn, ...], the way
    mlx-lm's phi3 MLP splits its output. Quantization groups run along d_model, so the split
    is exact for quantized rows too. Lazy; weights without a fused FFN come back unchanged.
    """
    out = {}
    for name, value in weights.items():
        if is_gate_up_proj(name):
            gate, up = mx.split(value, 2, axis=0)
            out[name.replace(".gate_up_proj.", ".gate_proj.")] = gate
            out[name.replace(".gate_up_proj.", ".up_proj.")] = up
        else:
            out[name] = value
    return out


def module_quantization(quantization: dict, module: str) -> dict:
    """How one module is quantized: mlx-lm's per-module entry in "quantization", else its defaults."""
    return {**quantization, **(quantization.get(module) or {})}


def to_row_layout(weights: dict[str, mx.array], quantization: dict | None = None) -> dict[str, mx.array]:
    """Standard layout -> row layout: every mlp.down_proj [d_model, d_ffn] becomes [d_ffn, d_model].

    A fused gate_up_proj (phi3) is split first (split_gate_up). Float weights are transposed.
    Quantized ones (mlx-lm's config "quantization", with its per-module overrides) are
    dequantized, transposed and quantized again along d_model with the same bits and group
    size: a re-quantization, whose error is of the order of the original one's. Lazy:
    nothing is computed until the weights are loaded.
    """
    weights = split_gate_up(weights)
    out = dict(weights)
    for name in [n for n in weights if is_down_proj(n)]:
        base = name[: -len(".weight")]
        if f"{base}.scales" not in weights:
            out[name] = mx.contiguous(weights[name].T)
            continue
        q = module_quantization(quantization, base)
        dense = mx.dequantize(weights[name], weights[f"{base}.scales"], weights[f"{base}.biases"],
                              group_size=q["group_size"], bits=q["bits"])
        out[name], out[f"{base}.scales"], out[f"{base}.biases"] = mx.quantize(
            mx.contiguous(dense.T), group_size=q["group_size"], bits=q["bits"])
    return out


def name_mismatch(expected, found) -> str | None:
    """What is wrong with the tensor names `found` against those a model `expected`: missing
    ones first, then unexpected ones; None when they are the same."""
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"{len(missing)} tensors the config implies are missing, e.g. {missing[0]!r}"
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        return f"tensor {unexpected[0]!r} ({len(unexpected)} in all) has no place in a model of this config"
    return None


def load_weights(model: nn.Module, weights: dict[str, mx.array], where: str,
                 on_progress: Callable[[int, int], None] | None = None) -> None:
    """Check names, shapes and dtypes of `weights` against `model`, then load them.

    Evaluates layer by layer so a lazily loaded (or transposed) checkpoint never holds much
    more than the weights' size in memory; on_progress(done, total) is called after each.
    """
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    problem = name_mismatch(expected, weights)
    if problem:
        raise BundleError(f"{where}: {problem}; the files do not match config.json (re-convert the model)")
    for name, value in weights.items():
        want = expected[name]
        if tuple(value.shape) != tuple(want.shape):
            raise BundleError(
                f"{where}: weight {name!r} has shape {tuple(value.shape)}, config.json implies "
                f"{tuple(want.shape)}"
            )
        kind = "uint32 (quantized)" if want.dtype == mx.uint32 else "a float dtype"
        if (value.dtype == mx.uint32) != (want.dtype == mx.uint32) or (
            want.dtype != mx.uint32 and not mx.issubdtype(value.dtype, mx.floating)
        ):
            raise BundleError(
                f"{where}: weight {name!r} has dtype {str(value.dtype).split('.')[-1]}, "
                f"expected {kind}; the files do not match config.json"
            )
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    parts = [*model.layers, model]
    for done, part in enumerate(parts, 1):
        mx.eval(part.parameters())
        if on_progress:
            on_progress(done, len(parts))


def is_quantizable(name: str, shape) -> bool:
    """What quantize_rows quantizes: 2-D weights that are not norms (linears, embeddings)."""
    return name.endswith(".weight") and len(shape) == 2 and "norm" not in name


def quantize_rows(weights: dict[str, mx.array], config: dict, bits: int,
                  group_size: int = 32) -> tuple[dict, dict]:
    """Affine-quantize every 2-D linear weight (row layout kept) and the embeddings.

    Groups run along the last axis (d_model for FFN rows), so quantized rows stay selectable.
    """
    out = {}
    for name, value in weights.items():
        if is_quantizable(name, value.shape):
            base = name[: -len(".weight")]
            out[name], out[f"{base}.scales"], out[f"{base}.biases"] = mx.quantize(
                value, group_size=group_size, bits=bits)
        else:
            out[name] = value
    config = dict(config, quantization={"group_size": group_size, "bits": bits})
    return out, config
