"""GGUF files (llama.cpp's format) -> a Source for the bundle writer, without PyTorch.

Tensors and metadata are read with the `gguf` package (llama.cpp's own reader); the tokenizer
and chat template are rebuilt by transformers' GGUF tokenizer conversion (its torch-free part).

    info = read_gguf("model.gguf")                       # metadata only: architecture, config, types
    summary = convert_gguf("model.gguf", "bundle/")      # the bundle, written atomically
    convert_gguf("model.gguf", "bundle/", artifacts="trained/")   # + a trained predictor and adapter
                                                         # (converters.artifacts)

Tensor types:
  F32, F16, BF16      floats, cast to the bundle's dtype.
  Q8_0, Q4_0, Q4_1    affine with groups of 32 along a row: repacked, not inflated, into MLX
                      affine tensors (weight/scales/biases; 8 or 4 bits, group size 32) that
                      dequantize to exactly what gguf's dequantizer gives. down_proj is the
                      exception: the row layout stores it transposed, its groups must run along
                      d_model, so it is dequantized and kept as floats; re-quantizing it along
                      d_model instead (requantize_down_proj) adds a second rounding as large as
                      the first: on SmolLM2 Q4_1, KL 0.13 nats and 83% top-1 agreement with the
                      file's own model instead of ~0 and 100% (docs/CONVERTING.md).
  K-quants and others dequantized by gguf's dequantizer (gguf.quants.dequantize) and kept as
                      floats; a type it cannot dequantize is refused, by name.
`dequantize=True` (or --quantize, which re-quantizes every weight by rows) turns everything into floats.

llama.cpp's traps, undone here: llama's q_proj/k_proj rows are permuted for its rotary layout
(qwen2's are not); float32 metadata such as rms_norm_eps 9.9999997e-06 is read back as the
shortest decimal that float32 value stands for (1e-05); tied embeddings have no output.weight.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from ifprune_mlx.bundle import refuse_overwrite
from ifprune_mlx.errors import ConversionError, UnsupportedArchitectureError

from .artifacts import attach_artifacts, read_artifacts
from .layouts import Source, _check_model, _check_quantized, to_mlx_config
from .readers import TensorRef
from .write import DTYPES, ByteProgress, Summary, convert

GGUF_MAGIC = b"GGUF"
GROUP_SIZE = 32  # Q8_0, Q4_0 and Q4_1 blocks
DEFAULT_DTYPE = "float32"
# llama.cpp architecture -> (HF model_type, HF class, whether q_proj/k_proj rows are permuted)
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM", True),
                 "qwen2": ("qwen2", "Qwen2ForCausalLM", False)}
# llama.cpp tensor names -> Hugging Face's ("{}" is the layer)
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def _ggml():
    import gguf

    return gguf


def _affine_bits() -> dict:
    t = _ggml().GGMLQuantizationType
    return {t.Q8_0: 8, t.Q4_0: 4, t.Q4_1: 4}


def _float_types() -> dict:
    t = _ggml().GGMLQuantizationType
    return {t.F32: "float32", t.F16: "float16", t.BF16: "bfloat16"}


@dataclass
class GGUFInfo:
    """What a GGUF file describes, read from its metadata and tensor index (no tensor data).

    Attributes:
        path: the file.
        architecture: llama.cpp's general.architecture.
        name: general.name (or the file's stem).
        hf_config: the Hugging Face config.json the metadata amounts to.
        tensor_types: ggml type name -> how many tensors have it.
        parameters: the number of weights.
    """

    path: Path
    architecture: str
    name: str
    hf_config: dict
    tensor_types: dict[str, int]
    parameters: int

    @property
    def file_type(self) -> str:
        """The type most weights have (e.g. Q4_1)."""
        return max(self.tensor_types, key=self.tensor_types.get)


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file that starts as a GGUF file does (or is named *.gguf)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _open_reader(path: Path):
    """gguf.GGUFReader of `path`, with a ConversionError for what is not a whole GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConversionError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        return _ggml().GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, OSError, MemoryError) as e:
        raise ConversionError(f"{path}: cannot read this GGUF file ({str(e).splitlines()[0][:200]}); "
                              "it is truncated or corrupt") from e


def _metadata(reader, prefix: str = "") -> dict:
    """The metadata fields (those starting with `prefix`) as Python values."""
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith(prefix) and not key.startswith("GGUF.")}


def _float32_intent(value: float) -> float:
    """A float32 metadata value as the decimal it was written from: 9.9999997e-06 -> 1e-05."""
    return float(str(np.float32(value)))


def _hf_config(meta: dict, tensor_names: set[str], embedding_rows: int, path: Path) -> dict:
    """The Hugging Face config.json that llama.cpp's metadata stands for (llama, qwen2)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    model_type, hf_class, _ = ARCHITECTURES[arch]

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ConversionError(f"{path}: metadata {arch}.{key} is missing; the file is incomplete")
        return value

    heads = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // heads))
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise UnsupportedArchitectureError(
            f"{path}: rotary embedding over {rope_dims} of {head_dim} head dimensions (partial rotary) "
            f"is not supported for {arch}")
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedArchitectureError(
            f"{path}: the file carries rope_freqs.weight (llama 3.1-style rope scaling), which cannot be "
            "restated as a config; convert the model from its Hugging Face folder instead")
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": d_model,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32_intent(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_intent(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": int(meta.get(f"{arch}.vocab_size", embedding_rows)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling != "none":
        raise UnsupportedArchitectureError(f"{path}: rope scaling {scaling!r} is not supported (none or linear)")
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if name in meta:
            config[key] = int(meta[name])
    return config


def _hf_name(name: str, path: Path) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ConversionError(f"{path}: tensor {name!r} has no place in a llama/qwen2 model; "
                          "is this file of the architecture it says?")


def read_gguf(path: Path) -> GGUFInfo:
    """A GGUF file's architecture, config and tensor types, without reading tensor data.

    Raises ConversionError for a file that is not a whole GGUF file, and
    UnsupportedArchitectureError for an architecture other than llama and qwen2.
    """
    path = Path(path)
    reader = _open_reader(path)
    return _info(reader, path)


def _info(reader, path: Path) -> GGUFInfo:
    meta = _metadata(reader)
    names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ConversionError(f"{path}: no token_embd.weight tensor; not a language model GGUF file")
    config = _hf_config(meta, names, int(embedding.shape[-1]), path)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return GGUFInfo(path, meta["general.architecture"], str(meta.get("general.name", path.stem)), config,
                    types, int(sum(int(t.n_elements) for t in reader.tensors)))


# -- tensors ---------------------------------------------------------------------------------------


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary permutation of q_proj/k_proj (row i <- row perm[i])."""
    return np.arange(n_rows).reshape(n_heads, n_rows // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)


def repack_affine(blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8_0 / Q4_0 / Q4_1 rows [rows, n_blocks * block_bytes] (uint8) -> MLX affine
    (weight uint32 [rows, cols * bits / 32], scales and biases float32 [rows, cols / 32]).

    Q8_0 (d, 32 int8 q): value = q * d; MLX holds u = q + 128 with bias -128 d.
    Q4_0 (d, 16 bytes): value = (q - 8) * d; bias -8 d. Q4_1 (d, m, 16 bytes): value = q * d + m.
    llama.cpp's nibbles: byte j holds element j (low) and j + 16 (high); MLX packs consecutive
    elements from the low bits of each uint32 (two per byte at 4 bits, little-endian).
    """
    gguf = _ggml()
    t = gguf.GGMLQuantizationType
    rows = blocks.shape[0]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    b = np.asarray(blocks).reshape(rows, -1, block_bytes)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == t.Q8_0:
        packed = (b[..., 2:] ^ 0x80).copy()  # int8 q -> uint8 q + 128
        bias = -128.0 * d
    else:
        start = 4 if qtype == t.Q4_1 else 2
        qs = b[..., start:]
        elements = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # 32 values in order
        packed = (elements[..., 0::2] | (elements[..., 1::2] << 4)).astype(np.uint8)
        bias = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if qtype == t.Q4_1 else -8.0 * d
    weight = np.ascontiguousarray(packed).reshape(rows, -1).view(np.uint32)
    return weight, d, bias


def _dequantized(tensor) -> np.ndarray:
    """A tensor's values as float32 [rows, cols] (or [n]) through gguf's dequantizer."""
    gguf = _ggml()
    data = np.asarray(tensor.data)
    if tensor.tensor_type in _float_types():
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return gguf.quants.dequantize(data, tensor.tensor_type).reshape(shape).astype(np.float32)
    return gguf.quants.dequantize(data, tensor.tensor_type)


def _check_type(tensor, path: Path) -> None:
    """Refuse, by name, a type gguf's dequantizer cannot read (probed on one block)."""
    gguf = _ggml()
    qtype = tensor.tensor_type
    if qtype in _float_types() or qtype in _affine_bits():
        return
    try:
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except (NotImplementedError, KeyError):
        raise ConversionError(
            f"{path}: tensor {tensor.name!r} is {qtype.name}, which gguf's dequantizer cannot read; "
            f"supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (kept quantized) and the types gguf.quants "
            "dequantizes (K-quants ...)") from None


class _Tensors:
    """The bundle tensors of one GGUF file, computed on demand from its memory-mapped blocks.

    A quantized tensor gives three bundle tensors (weight, scales, biases), computed together
    and handed out one by one (each freed once taken).
    """

    def __init__(self, reader, path: Path, config: dict, target: str, dequantize: bool,
                 requantize_down_proj: bool):
        self.path, self.target, self.dequantize = path, getattr(mx, target), dequantize
        self.requantize_down_proj = requantize_down_proj
        self.permute = ARCHITECTURES[reader.fields["general.architecture"].contents()][2]
        self.heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        self.pending: dict[str, mx.array] = {}
        self.refs: dict[str, TensorRef] = {}
        for tensor in reader.tensors:
            _check_type(tensor, path)
            self._add(tensor, _hf_name(tensor.name, path))

    def quantized(self, tensor, name: str) -> int | None:
        """The bits a tensor keeps in the bundle, or None when it is written as floats."""
        bits = _affine_bits().get(tensor.tensor_type)
        if bits is None or self.dequantize or len(tensor.shape) != 2:
            return None
        return None if name.endswith("mlp.down_proj.weight") and not self.requantize_down_proj else bits

    def _add(self, tensor, name: str) -> None:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        bits = self.quantized(tensor, name)
        target = str(self.target).rsplit(".", 1)[-1]
        if bits is None:
            self.refs[name] = TensorRef(name, shape, target, self.path, lambda: self._float(tensor, name))
            return
        base = name.removesuffix(".weight")
        rows, cols = shape
        self.refs[name] = TensorRef(name, (rows, cols * bits // 32), "uint32", self.path,
                                    lambda: self._take(tensor, name, name))
        for part in ("scales", "biases"):
            self.refs[f"{base}.{part}"] = TensorRef(f"{base}.{part}", (rows, cols // GROUP_SIZE), target,
                                                    self.path, lambda p=part: self._take(tensor, name, f"{base}.{p}"))

    def _rows(self, value: np.ndarray, name: str) -> np.ndarray:
        """llama's q_proj/k_proj rows back in Hugging Face's order."""
        module = name.split(".")[-2]
        if self.permute and module in self.heads:
            return value[unpermute_rows(value.shape[0], self.heads[module])]
        return value

    def _float(self, tensor, name: str) -> mx.array:
        if tensor.tensor_type == _ggml().GGMLQuantizationType.BF16:  # exact: move the bits
            shape = tuple(int(n) for n in reversed(tensor.shape))
            value = mx.array(self._rows(np.asarray(tensor.data).view(np.uint16).reshape(shape), name))
            return value.view(mx.bfloat16).astype(self.target)
        return mx.array(self._rows(_dequantized(tensor), name)).astype(self.target)

    def _take(self, tensor, name: str, part: str) -> mx.array:
        if part not in self.pending:
            weight, scales, biases = (self._rows(a, name) for a in repack_affine(tensor.data, tensor.tensor_type))
            base = name.removesuffix(".weight")
            self.pending.update({name: mx.array(weight), f"{base}.scales": mx.array(scales).astype(self.target),
                                 f"{base}.biases": mx.array(biases).astype(self.target)})
        return self.pending.pop(part)


# -- tokenizer -------------------------------------------------------------------------------------


def save_tokenizer(reader, folder: Path) -> list[str]:
    """Write the file's tokenizer and chat template as Hugging Face tokenizer files in `folder`.

    The tokenizer is built by transformers' GGUF tokenizer conversion (what
    AutoTokenizer.from_pretrained(..., gguf_file=...) runs), fed from gguf's reader: transformers'
    own GGUF reader imports torch, which the runtime does without.
    """
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                           convert_gguf_tokenizer)
    except ImportError:  # transformers before its integrations.gguf package
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    meta = _metadata(reader, "tokenizer.")
    if "tokenizer.ggml.tokens" not in meta:
        raise ConversionError("the GGUF file has no tokenizer (tokenizer.ggml.tokens); it cannot be chatted with")
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokens, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokens.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece vocabularies
    for special, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                         ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        config[special] = tokens["tokens"][index] if index is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(reader.fields["general.architecture"].contents(), tokens)
    except ValueError as e:
        raise ConversionError(f"cannot build the GGUF file's tokenizer: {e}") from None
    PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra).save_pretrained(folder)
    return sorted(p.name for p in Path(folder).iterdir())


# -- the source ------------------------------------------------------------------------------------


@contextmanager
def open_gguf(path: Path, *, dtype: str | None = None, dequantize: bool = False,
              requantize_down_proj: bool = False, artifacts: Path | None = None) -> Iterator[Source]:
    """A checked Source (layout "gguf") for the bundle writer; its tokenizer files live in a
    temporary folder for the duration of the `with` block.

    Args:
        path: the GGUF file (llama or qwen2).
        dtype: the float dtype of float tensors and of quantized tensors' scales and biases
            (default float32).
        dequantize: write every tensor as floats (Q8_0/Q4_0/Q4_1 included).
        requantize_down_proj: keep a quantized down_proj quantized, re-quantized along d_model by
            the writer (same bits, group 32): a smaller bundle at a measured cost in fidelity.
        artifacts: a trained IFPruning artifacts folder (converters.artifacts): its adapter is
            merged into the LLM and its predictor attached (backbone: the file's first layers, as floats).
    """
    path = Path(path)
    dtype = dtype or DEFAULT_DTYPE
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    trained = None if artifacts is None else read_artifacts(artifacts)  # fails before any tensor is read
    reader = _open_reader(path)
    info = _info(reader, path)
    tensors = _Tensors(reader, path, info.hf_config, dtype, dequantize, requantize_down_proj)
    config = to_mlx_config(info.hf_config, tensors.refs, "the GGUF model")
    quantized = {name.removesuffix(".scales"): ref for name, ref in tensors.refs.items() if name.endswith(".scales")}
    if quantized:
        counts: dict[int, int] = {}
        bits_of = {base: tensors.refs[f"{base}.weight"].shape[1] // ref.shape[1]  # 32 values fill `bits` words
                   for base, ref in quantized.items()}
        for bits in bits_of.values():
            counts[bits] = counts.get(bits, 0) + 1
        common = max(counts, key=counts.get)
        quantization = {"group_size": GROUP_SIZE, "bits": common,
                        **{base: {"group_size": GROUP_SIZE, "bits": bits}
                           for base, bits in sorted(bits_of.items()) if bits != common}}
        config["quantization"] = quantization
        llm = _check_quantized(config, quantization, tensors.refs, "the GGUF model")
    else:
        quantization = None
        llm = _check_model(config, tensors.refs, "the GGUF model", rows=True)
    source = Source("gguf", config, info.hf_config, llm, None, quantization=quantization)
    if trained is not None:
        floats = tensors if dequantize or not quantized else _Tensors(reader, path, info.hf_config, dtype, True, False)
        source = attach_artifacts(source, trained, floats.refs)
    with tempfile.TemporaryDirectory(prefix="ifprune-gguf-tokenizer-") as folder:
        save_tokenizer(reader, Path(folder))
        yield replace(source, tokenizer_dir=Path(folder))


def convert_gguf(path: Path, out: Path, *, force: bool = False, dtype: str | None = None,
                 dequantize: bool = False, requantize_down_proj: bool = False,
                 bits: int | None = None, group_size: int = 64,
                 default_density: float | None = None, artifacts: Path | None = None,
                 on_progress: ByteProgress | None = None,
                 check: Callable[[Source, Path], None] | None = None) -> Summary:
    """Convert a GGUF file to a bundle at `out` (written atomically; see the module docstring).

    Args:
        path: the GGUF file (llama or qwen2; F32/F16/BF16, Q8_0/Q4_0/Q4_1, K-quants).
        out: the bundle folder to create.
        force: replace an existing `out`.
        dtype: float32 (default), float16 or bfloat16: float tensors and quantized tensors' scales.
        dequantize: write every weight as floats instead of keeping Q8_0/Q4_0/Q4_1 quantized.
        requantize_down_proj: re-quantize a quantized down_proj along d_model instead of writing it
            as floats (smaller, less faithful; see the module docstring).
        bits, group_size: re-quantize every weight by rows (4 or 8 bits) from floats instead.
        default_density: the bundle's default density (default: the artifacts' ifpruning.json's,
            else the plain model's).
        artifacts: a trained IFPruning artifacts folder: the adapter merged, the predictor attached.
        on_progress: called as on_progress(bytes_done, bytes_total) after each tensor.
        check: called as check(source, folder) on the finished folder before it is renamed to
            `out` (e.g. verify_gguf); if it raises, nothing is left at `out`.
    """
    out = Path(out)
    refuse_overwrite(out, force)
    with open_gguf(path, dtype=dtype, dequantize=dequantize or bits is not None,
                   requantize_down_proj=requantize_down_proj, artifacts=artifacts) as source:
        return convert(source, out, dtype=dtype or DEFAULT_DTYPE, bits=bits, group_size=group_size,
                       default_density=default_density, force=force, on_progress=on_progress,
                       check=None if check is None else (lambda folder: check(source, folder)))
