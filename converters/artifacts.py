"""Trained IFPruning artifacts (what examples/smollm2/train.py exports) -> bundle tensors, without PyTorch.

An artifacts folder holds what training changed, small enough to ship; the rest is rebuilt
from the original LLM (a GGUF file):

  adapter.safetensors   the LLM's adapter, merged into its tensors (merge_adapter):
      model.layers.L.{input,post_attention}_layernorm.weight, model.norm.weight
                        [d_model]   replaces the LLM's tensor of that name;
      model.layers.L.mlp.{up,gate}_proj.channel_gain
                        [d_ffn]     row j of that projection times g[j]; on an affine-quantized
                                    projection the row's scales and biases are scaled (exact: the
                                    codes are untouched);
      model.layers.L.mlp.down_proj.lora_a [r, d_ffn] and .lora_b [d_model, r]
                                    down_proj.weight [d_model, d_ffn] += lora_b @ lora_a; needs a
                                    float down_proj (the GGUF converter keeps it float by default).
  head.safetensors      prediction_head1/2.{weight,bias} and feature_extractor.model.norm.weight:
                        the predictor's head and the final norm of its backbone.
  ifpruning.json        default_density, pad_multiple, pooling ("last"), predictor_layers, and
                        optionally prefill ("pruned" or "dense"; docs/FORMAT.md).

The predictor is the ORIGINAL LLM's embeddings and first `predictor_layers` decoder layers
(tied embeddings), that final norm, then the head; it reads the raw prompt
(ifprune_mlx/predictor.py). Any other adapter key, or a shape that does not fit, is a
ConversionError naming the key.

    artifacts = read_artifacts("ifprune_mlx/pretrained/smollm2_135m_instruct")
    merged = merge_adapter(tensors, artifacts.adapter)      # numpy or mlx arrays, by HF names
    source = attach_artifacts(source, artifacts, float_refs)   # a Source for the bundle writer
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ifprune_mlx.errors import ConversionError

from .layouts import HEAD_KEYS, Source, _check_head, _check_model, bundle_defaults, to_mlx_config
from .readers import TensorRef

ADAPTER_FILE, HEAD_FILE, META_FILE = "adapter.safetensors", "head.safetensors", "ifpruning.json"
FILES = (ADAPTER_FILE, HEAD_FILE, META_FILE)
BACKBONE_NORM = "feature_extractor.model.norm.weight"
_KINDS = {"norm": re.compile(r"^model\.(layers\.\d+\.(input|post_attention)_layernorm|norm)\.weight$"),
          "gain": re.compile(r"^model\.layers\.\d+\.mlp\.(up|gate)_proj\.channel_gain$"),
          "lora": re.compile(r"^model\.layers\.\d+\.mlp\.down_proj\.lora_[ab]$")}


@dataclass
class Artifacts:
    """A checked artifacts folder (see the module docstring); tensors as float32 numpy.

    Attributes:
        folder: where it was read from.
        adapter: adapter tensors by their keys.
        head: head.safetensors' tensors by their keys (prediction_head1.weight ...).
        meta: ifpruning.json.
    """

    folder: Path
    adapter: dict[str, np.ndarray]
    head: dict[str, np.ndarray]
    meta: dict

    @property
    def predictor_layers(self) -> int:
        return self.meta["predictor_layers"]

    @property
    def defaults(self) -> dict:
        """The bundle defaults it sets: default_density, pad_multiple, prefill."""
        return bundle_defaults(self.meta, self.folder / META_FILE)


def is_artifacts(folder: Path) -> bool:
    """Whether `folder` looks like an artifacts folder (one of its files is there)."""
    return Path(folder).is_dir() and any((Path(folder) / name).is_file() for name in FILES)


def read_artifacts(folder: Path) -> Artifacts:
    """Read and check an artifacts folder; ConversionError (one line) for a missing or corrupt file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such artifacts folder")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise ConversionError(f"{folder}: missing {', '.join(missing)}; a trained IFPruning artifacts folder "
                              f"holds {', '.join(FILES)} (examples/smollm2/train.py --export writes them)")
    meta = _read_meta(folder / META_FILE)
    head = _read_tensors(folder / HEAD_FILE)
    unknown = sorted(set(head) - set(HEAD_KEYS) - {BACKBONE_NORM})
    if unknown:
        raise ConversionError(f"{folder / HEAD_FILE}: unexpected tensor {unknown[0]!r}; it holds "
                              f"{', '.join(sorted(HEAD_KEYS))} and {BACKBONE_NORM}")
    absent = [name for name in (*sorted(HEAD_KEYS), BACKBONE_NORM) if name not in head]
    if absent:
        raise ConversionError(f"{folder / HEAD_FILE}: tensor {absent[0]!r} is missing")
    adapter = _read_tensors(folder / ADAPTER_FILE)
    for name in adapter:
        _adapter_kind(name)
    return Artifacts(folder, adapter, head, meta)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    layers = meta.get("predictor_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ConversionError(f"{path}: \"predictor_layers\" must be a positive integer, got {layers!r}")
    if meta.get("pooling", "last") != "last":
        raise ConversionError(f"{path}: pooling {meta['pooling']!r} is not supported (only \"last\")")
    density = meta.get("default_density", 0.5)
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConversionError(f"{path}: \"default_density\" must be in (0, 1], got {density!r}")
    pad = meta.get("pad_multiple", 1)
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 1:
        raise ConversionError(f"{path}: \"pad_multiple\" must be a positive integer, got {pad!r}")
    bundle_defaults(meta, path)  # checks prefill
    return meta


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as float32 numpy, ConversionError if it is not one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    for name, value in tensors.items():
        if value.dtype.kind != "f":
            raise ConversionError(f"{path}: tensor {name!r} is {value.dtype}; expected floats")
    return {name: value.astype(np.float32) for name, value in tensors.items()}


# -- the adapter ---------------------------------------------------------------------------------


def _adapter_kind(name: str) -> str:
    """"norm", "gain" or "lora": what an adapter key is; ConversionError for another key."""
    for kind, pattern in _KINDS.items():
        if pattern.match(name):
            return kind
    raise ConversionError(
        f"adapter key {name!r} is not one this converter merges: RMSNorm weights by their LLM names, "
        "model.layers.L.mlp.{up,gate}_proj.channel_gain, model.layers.L.mlp.down_proj.lora_{a,b}")


Edit = Callable[[object], object]  # an LLM tensor (numpy or mlx) -> the adapted tensor, same type and dtype


def adapter_edits(adapter: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, Edit]:
    """How the adapter changes an LLM whose tensors (mlx-lm / Hugging Face names, down_proj
    [d_model, d_ffn]) have these shapes: tensor name -> edit. Checks every key and shape first.

    Affine-quantized projections (X.weight packed, X.scales, X.biases, groups along the row)
    take their gains in X.scales and X.biases; the codes are untouched.
    """
    adapter = {name: _numpy(value) for name, value in adapter.items()}
    edits: dict[str, Edit] = {}

    def target(key: str, name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise ConversionError(f"adapter key {key!r}: the LLM has no tensor {name!r} "
                                  f"({_layers(shapes)} layers); was this adapter trained for this LLM?")
        return tuple(shapes[name])

    for key in sorted(adapter):
        value = adapter[key]
        kind = _adapter_kind(key)
        if kind == "norm":
            _expect(key, value.shape, target(key, key))
            edits[key] = lambda old, value=value: _like(old, value)
        elif kind == "gain":
            base = key.removesuffix(".channel_gain")
            parts = [f"{base}.scales", f"{base}.biases"] if f"{base}.scales" in shapes else [f"{base}.weight"]
            for part in parts:
                _expect(key, value.shape, target(key, part)[:1])
                edits[part] = lambda old, gain=value[:, None]: _like(old, _float32(old) * _const(old, gain))
        else:  # a LoRA: lora_a [r, d_ffn], lora_b [d_model, r]
            base = key.rsplit(".", 1)[0]
            missing = [name for name in (f"{base}.lora_a", f"{base}.lora_b") if name not in adapter]
            if missing:
                raise ConversionError(f"adapter key {key!r} has no {missing[0]!r}: a LoRA needs both")
            if key.endswith(".lora_b"):
                continue  # merged with its lora_a
            a, b = value, adapter[f"{base}.lora_b"]
            weight = target(key, f"{base}.weight")
            if f"{base}.scales" in shapes:
                raise ConversionError(
                    f"adapter key {key!r}: {base} is quantized here; the LoRA merges into a float down_proj "
                    "(convert the GGUF file without requantize_down_proj)")
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != weight[1] or b.shape != (weight[0], a.shape[0]):
                raise ConversionError(
                    f"adapter key {key!r}: lora_a {a.shape} and lora_b {b.shape} do not fit {base}.weight "
                    f"{weight}; expected lora_a [r, {weight[1]}] and lora_b [{weight[0]}, r]")
            edits[f"{base}.weight"] = lambda old, delta=b @ a: _like(old, _float32(old) + _const(old, delta))
    return edits


def merge_adapter(tensors: dict, adapter: dict) -> dict:
    """The adapter merged into an LLM's tensors (numpy or mlx arrays, quantized or not, by their
    mlx-lm / Hugging Face names; see adapter_edits). Returns a new dict; `tensors` is not
    modified and tensors the adapter does not touch are the same objects."""
    edits = adapter_edits(adapter, {name: tuple(value.shape) for name, value in tensors.items()})
    return {**tensors, **{name: edit(tensors[name]) for name, edit in edits.items()}}


def merge_adapter_refs(refs: dict[str, TensorRef], adapter: dict) -> dict[str, TensorRef]:
    """merge_adapter for lazy checkpoint tensors: each edited tensor is adapted when it is read."""
    edits = adapter_edits(adapter, {name: ref.shape for name, ref in refs.items()})
    out = dict(refs)
    for name, edit in edits.items():
        ref = refs[name]
        out[name] = TensorRef(ref.name, ref.shape, ref.dtype, ref.path, lambda ref=ref, edit=edit: edit(ref.load()))
    return out


def _expect(key: str, shape: tuple, want: tuple) -> None:
    if tuple(shape) != tuple(want):
        raise ConversionError(f"adapter key {key!r} has shape {tuple(shape)}, the LLM needs {tuple(want)}; "
                              "was this adapter trained for this LLM?")


def _layers(shapes: dict) -> int:
    return len({name.split(".")[2] for name in shapes if name.startswith("model.layers.")})


def _numpy(value) -> np.ndarray:
    """numpy, mlx or torch (CPU) values as float32 numpy."""
    if isinstance(value, mx.array):
        return np.array(value.astype(mx.float32))
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _float32(value):
    return value.astype(np.float32) if isinstance(value, np.ndarray) else value.astype(mx.float32)


def _const(reference, value: np.ndarray):
    """A float32 constant in the array library of `reference`."""
    return value if isinstance(reference, np.ndarray) else mx.array(value)


def _like(reference, value):
    """value (float32, numpy or mlx) in the array library and dtype of `reference`."""
    if isinstance(reference, np.ndarray):
        return np.asarray(value, dtype=np.float32).astype(reference.dtype)
    return (value if isinstance(value, mx.array) else mx.array(value)).astype(reference.dtype)


# -- the bundle source ---------------------------------------------------------------------------


def predictor_refs(artifacts: Artifacts, llm_refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The predictor backbone's tensors: the ORIGINAL LLM's embeddings and first predictor_layers
    layers from `llm_refs` (float, standard layout), and the trained final norm."""
    n = artifacts.predictor_layers
    prefixes = tuple(f"model.layers.{i}." for i in range(n))
    backbone = {name: ref for name, ref in llm_refs.items()
                if name == "model.embed_tokens.weight" or name.startswith(prefixes)}
    backbone["model.norm.weight"] = _array_ref("model.norm.weight", artifacts.head[BACKBONE_NORM],
                                               artifacts.folder / HEAD_FILE)
    return backbone


def _array_ref(name: str, value: np.ndarray, path: Path) -> TensorRef:
    return TensorRef(name, tuple(value.shape), "float32", path, lambda: mx.array(value))


def attach_artifacts(source: Source, artifacts: Artifacts, float_refs: dict[str, TensorRef]) -> Source:
    """`source` (an LLM without predictor) with the adapter merged into its tensors and the
    trained predictor attached; `float_refs` are the same LLM's tensors as floats in the standard
    layout (the predictor's backbone is read from them, unadapted)."""
    if source.predictor is not None:
        raise ConversionError("the LLM already has a predictor; an artifacts folder brings its own")
    n_layers, d_ffn = source.n_layers, source.d_ffn
    if artifacts.predictor_layers > n_layers:
        raise ConversionError(f"{artifacts.folder / META_FILE}: predictor_layers {artifacts.predictor_layers} "
                              f"exceeds the LLM's {n_layers} layers; was it trained for this LLM?")
    llm = merge_adapter_refs(source.llm, artifacts.adapter)
    backbone = predictor_refs(artifacts, float_refs)
    hf_config = {**source.hf_config, "num_hidden_layers": artifacts.predictor_layers, "tie_word_embeddings": True}
    config = to_mlx_config(hf_config, backbone, "the predictor backbone")
    backbone = _check_model(config, backbone, "the predictor backbone", rows=False)
    head = {HEAD_KEYS[name]: _array_ref(HEAD_KEYS[name], value, artifacts.folder / HEAD_FILE)
            for name, value in artifacts.head.items() if name in HEAD_KEYS}
    head = _check_head(head, config["hidden_size"], n_layers, d_ffn)
    return replace(source, llm=llm, predictor_config=config, predictor_hf_config=hf_config, predictor=backbone,
                   head=head, defaults=artifacts.defaults)
