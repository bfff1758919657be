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
