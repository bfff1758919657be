"""Tiny random models for tests, examples and benchmarks: nothing is downloaded.

make_tokenizer() trains a byte-level BPE tokenizer on a few sentences; make_model_folder()
writes a random mlx-lm model (a plain folder); make_bundle() adds a random predictor.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .bundle import save_safetensors, write_bundle
from .models import build_model, quantize_rows, to_row_layout  # noqa: F401 (re-exported)
from .predictor import HEAD_WIDTH

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "Write a Python function that reverses a list.",
    "Translate the sentence into French, please.",
    "What is the sum of 12 and 30? The answer is 42.",
    "Sort these numbers: 5 3 9 1. Count the letters in pruning.",
    "Once upon a time a small model learned to compute like a big one.",
]


def make_tokenizer(folder: Path, vocab_size: int = 320) -> Path:
    """Train and save a tiny byte-level BPE tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def model_config(model_type: str = "llama", *, hidden_size: int = 64, num_hidden_layers: int = 2,
                 intermediate_size: int = 256, vocab_size: int = 320, **extra) -> dict:
    """A config.json dict for a tiny model of an mlx-lm architecture."""
    config = {
        "model_type": model_type, "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers, "intermediate_size": intermediate_size,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "max_position_embeddings": 2048,
    }
    if model_type == "qwen3":
        config["head_dim"] = hidden_size // 4
    if model_type == "phi3":  # Phi3Config's default eos/pad (32000) lie outside a tiny vocabulary
        config.update(bos_token_id=None, eos_token_id=0, pad_token_id=0)
    config.update(extra)
    return config


def random_weights(config: dict, seed: int = 0) -> dict[str, mx.array]:
    """Random float32 weights of an mlx-lm model, in mlx-lm's standard (non-row) layout."""
    mx.random.seed(seed)
    model = build_model(config, prunable=False)
    weights = dict(nn.utils.tree_flatten(model.parameters()))
    mx.eval(weights)
    return weights


def make_model_folder(folder: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Write a plain mlx-lm model folder (config, random weights, tokenizer)."""
    folder = Path(folder)
    config = config or model_config()
    make_tokenizer(folder, config["vocab_size"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors(folder / "model.safetensors", random_weights(config, seed))
    return folder


def quantize_model_folder(folder: Path, bits: int, group_size: int = 64, predicate=None) -> nn.Module:
    """Quantize a plain model folder in place as `mlx_lm.convert -q` does; returns mlx-lm's model.

    The weights are mlx-lm's (affine, groups along each matrix's input axis) and config.json
    gets its "quantization" entry: what an mlx-community quantized folder holds. `predicate`
    is mlx-lm's quant_predicate (path, module) -> bool | {"bits", "group_size"}: mixed recipes.
    """
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    folder = Path(folder)
    model, config = load_model(folder)
    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return model


def reference_tokens(engine, prompt, n: int, *, dense_prefill: bool = False) -> list[int]:
    """The n greedy tokens generation of `prompt` must give under the selection the engine
    computes with now, computed another way: by a plain model holding compact copies of the
    kept rows (fidelity.compact_model, same kernels, so equal to the bit); with dense_prefill
    (the training-free selector's GRIFFIN path), by the engine with all but the prompt's last
    token prefilled dense, then the same selection applied. Tests compare engine.generate and
    stream_responses with it."""
    from .fidelity import compact_model, greedy_tokens, prefill_dense

    ids = engine.prompt_tokens(prompt)
    if dense_prefill:
        selection = engine.applied
        cache = prefill_dense(engine, ids)
        engine.apply(selection)
        return greedy_tokens(engine.model, ids[-1:], n, cache)
    widths = {mlp.k for mlp in engine.mlps}
    if len(widths) != 1:
        raise ValueError(f"the layers keep different channel counts {sorted(widths)}: no compact model")
    return greedy_tokens(compact_model(engine, widths.pop(), rows=True), ids, n)


def random_predictor(config: dict, d_pred: int = 32, seed: int = 1) -> dict:
    """A random predictor for an LLM config: tiny qwen2 backbone + head (write_bundle format)."""
    pconfig = model_config("qwen2", hidden_size=d_pred, num_hidden_layers=1,
                           intermediate_size=2 * d_pred, vocab_size=config["vocab_size"],
                           tie_word_embeddings=True)
    weights = random_weights(pconfig, seed)
    n_out = config["num_hidden_layers"] * config["intermediate_size"]
    mx.random.seed(seed + 1)
    head = {
        "head1.weight": mx.random.normal((HEAD_WIDTH, d_pred)) / d_pred**0.5,
        "head1.bias": mx.zeros((HEAD_WIDTH,)),
        "head2.weight": mx.random.normal((n_out, HEAD_WIDTH)) / HEAD_WIDTH**0.5,
        "head2.bias": mx.random.normal((n_out,)) * 0.1,
    }
    return {"config": pconfig, "weights": weights, "head": head}


def make_bundle(folder: Path, config: dict | None = None, *, seed: int = 0,
                predictor: bool = True, quantize_bits: int | None = None, dtype: str = "float32",
                predictor_width: int = 32, force: bool = False) -> Path:
    """Write a bundle of a random model (with a random predictor unless predictor=False).

    dtype: the float dtype of the LLM's weights (before quantize_bits, if given);
    predictor_width: d_model of the predictor's backbone.
    """
    folder = Path(folder)
    config = dict(config or model_config())
    tok_dir = make_tokenizer(folder.parent / f".{folder.name}-tokenizer", config["vocab_size"])
    weights = to_row_layout(random_weights(config, seed))
    if dtype != "float32":
        weights = {name: value.astype(getattr(mx, dtype)) for name, value in weights.items()}
    if quantize_bits:
        weights, config = quantize_rows(weights, config, quantize_bits)
    return write_bundle(folder, config=config, weights=weights, tokenizer_dir=tok_dir,
                        predictor=random_predictor(config, predictor_width) if predictor else None,
                        force=force)


def gguf_name(name: str) -> str:
    """A Hugging Face tensor name as llama.cpp writes it (model.layers.0.mlp.up_proj.weight -> blk.0.ffn_up.weight)."""
    from converters.gguf import GLOBAL_NAMES, LAYER_NAMES

    globals_ = {hf: name for name, hf in GLOBAL_NAMES.items()}
    if name in globals_:
        return globals_[name]
    _, _, layer, *module, kind = name.split(".")
    return f"blk.{layer}.{ {hf: short for short, hf in LAYER_NAMES.items()}['.'.join(module)]}.{kind}"


def make_gguf(path: Path, arch: str = "llama", weight_type: str = "F32", *, config: dict | None = None,
              tied: bool = False, types: dict[str, str] | None = None, seed: int = 0) -> Path:
    """Write a tiny random llama/qwen2 GGUF file as llama.cpp's converter would, with a real tokenizer.

    Args:
        arch: "llama" (q_proj/k_proj rows permuted for llama.cpp's rotary layout) or "qwen2".
        weight_type: the ggml type of every 2-D weight (F32, F16, BF16, Q8_0, Q4_0, Q4_1, or a
            type gguf cannot quantize, e.g. Q6_K or Q8_1: random blocks with sane scales); norms
            and biases stay F32 as llama.cpp keeps them.
        config: the model (default: model_config(arch, vocab_size=the tokenizer's)).
        tied: no output.weight (the embeddings are the output projection).
        types: per GGUF tensor name, a type overriding weight_type.
    """
    import gguf
    import numpy as np

    path = Path(path)
    tok_dir = make_tokenizer(path.parent / f".{path.name}-tokenizer")
    tokenizer = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for added in tokenizer["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {added["content"] for added in tokenizer["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    config = config or model_config(arch, vocab_size=len(tokens), tie_word_embeddings=tied)
    weights = random_weights(config, seed)

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])  # written as float32: reads back 9.9999997e-06
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab["<|end|>"])
    writer.add_bos_token_id(vocab["<|system|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)
    qtypes = gguf.GGMLQuantizationType
    for name, value in sorted(weights.items()):
        if tied and name == "lm_head.weight":
            continue
        value = np.array(value.astype(mx.float32))
        module = name.split(".")[-2]
        if arch == "llama" and module in ("q_proj", "k_proj"):  # llama.cpp's permute()
            heads = config["num_attention_heads" if module == "q_proj" else "num_key_value_heads"]
            value = value.reshape(heads, 2, value.shape[0] // heads // 2, *value.shape[1:]).swapaxes(1, 2)
            value = value.reshape(-1, *value.shape[3:])
        target = gguf_name(name)
        kind = (types or {}).get(target, weight_type if value.ndim == 2 else "F32")
        qtype = qtypes[kind]
        if qtype == qtypes.F32:
            writer.add_tensor(target, value)
        elif qtype == qtypes.F16:
            writer.add_tensor(target, value.astype(np.float16))
        else:
            try:
                blocks = gguf.quants.quantize(value, qtype)
            except NotImplementedError:  # K-quants and others: random blocks, scales set sane
                blocks = _random_blocks(rng, value.shape, qtype)
            writer.add_tensor(target, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _random_blocks(rng, shape, qtype):
    """Random blocks of a ggml type gguf cannot quantize; every fp16 field set to a small scale.

    Scales are fp16 fields at known offsets: the first (or last, Q6_K) bytes of a block.
    """
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    t = gguf.GGMLQuantizationType
    halves = {t.Q6_K: [size - 2], t.Q4_K: [0, 2], t.Q5_K: [0, 2], t.Q2_K: [size - 4, size - 2],
              t.Q3_K: [size - 2], t.Q8_1: [0, 2]}.get(qtype, [0])
    for offset in halves:
        scale = (rng.uniform(0.5, 1.0, size=data.shape[:2]) / 64 / cols ** 0.5).astype(np.float16)
        data[..., offset:offset + 2] = scale[..., None].view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(rows, -1)
