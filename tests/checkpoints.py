"""Tiny PyTorch IFPruning checkpoints for the converter tests, written the ways users write them.

Models are random transformers models (Llama, Qwen2, Mistral, Qwen3) and a random predictor
(a tiny Qwen2 backbone + head, converters.reference.SparsityPredictor); weights are saved as
safetensors or .bin, in one file or sharded with an index. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

from converters.reference import SparsityPredictor
from ifprune_mlx import testing

VOCAB, HIDDEN, FFN, LAYERS = 320, 64, 256, 2
CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config}
MODELS = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
          "mistral": transformers.MistralForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}


def llm(arch: str = "llama", seed: int = 0, **extra) -> torch.nn.Module:
    """A random float32 causal LM; weights larger than the default init so logits are not flat."""
    torch.manual_seed(seed)
    options = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                   max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False)
    if arch in ("llama", "qwen2"):
        # not mlx-lm's defaults (1e4, 1e6): transformers 5 nests it in rope_parameters, which
        # mlx-lm's llama and qwen2 do not read; the converter must carry it over.
        options["rope_theta"] = {"llama": 5e5, "qwen2": 5e4}[arch]
    if arch == "qwen3":
        options["head_dim"] = 16
    options.update(extra)
    return MODELS[arch](CONFIGS[arch](**options)).eval()


def predictor(seed: int = 1, n_layers: int = LAYERS, d_ffn: int = FFN) -> SparsityPredictor:
    """A random predictor: a 1-layer Qwen2 backbone (width 32) and the two-linear head."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=256, initializer_range=0.2,
                                      tie_word_embeddings=True)
    model = SparsityPredictor(transformers.Qwen2ForCausalLM(config), n_layers, d_ffn).eval()
    with torch.no_grad():
        model.prediction_head2.bias.normal_(0, 0.5)  # spread the scores: no near-ties at the top-k edge
    return model


def save_weights(state: dict, folder: Path, fmt: str = "safetensors", shards: int = 1,
                 stem: str | None = None) -> list[Path]:
    """Save a state dict the way Hugging Face does: one file, or shards plus an index json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or ("model" if fmt == "safetensors" else "pytorch_model")
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}  # no shared storage
    names = sorted(state)
    groups = [[str(n) for n in g] for g in np.array_split(names, shards)]
    files, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        name = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{i:05d}-of-{shards:05d}.{suffix}"
        part = {k: state[k] for k in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, folder / name, metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        files.append(folder / name)
        weight_map.update({k: name for k in group})
    if shards > 1:
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def hf_folder(model: torch.nn.Module, folder: Path, fmt: str = "safetensors", shards: int = 1) -> Path:
    """A Hugging Face model folder: config.json, weights, tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    testing.make_tokenizer(folder, VOCAB)
    save_weights(model.state_dict(), folder, fmt, shards)
    return folder


def predictor_folder(pred: SparsityPredictor, folder: Path, fmt: str = "safetensors", shards: int = 1,
                     head_fmt: str = "safetensors", defaults: dict | None = None) -> Path:
    """The hf layout's predictor folder: backbone (HF keys) + head.safetensors + ifpruning.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pred.feature_extractor.config.to_json_file(folder / "config.json")
    backbone = {k: v for k, v in pred.feature_extractor.state_dict().items() if k != "lm_head.weight"
                or not pred.feature_extractor.config.tie_word_embeddings}
    save_weights(backbone, folder, fmt, shards)
    head = {k: v for k, v in pred.state_dict().items() if k.startswith("prediction_head")}
    save_weights(head, folder, head_fmt, 1, stem="head")
    (folder / "ifpruning.json").write_text(json.dumps(defaults or {"default_density": 0.33, "pad_multiple": 32,
                                                                    "pooling": "last"}))
    return folder


def public_checkpoint(model: torch.nn.Module, pred: SparsityPredictor, folder: Path,
                      fmt: str = "safetensors", combined: bool = True) -> dict:
    """The public IFPruning code's state dicts and, separately, the configs and tokenizer.

    Returns the paths: {"src", "predictor" (None when combined), "config", "predictor_config"}.
    """
    folder = Path(folder)
    config_dir = folder / "llm_config"
    config_dir.mkdir(parents=True)
    model.config.to_json_file(config_dir / "config.json")
    testing.make_tokenizer(config_dir, VOCAB)
    pconfig = folder / "predictor_config.json"
    pred.feature_extractor.config.to_json_file(pconfig)
    suffix = "safetensors" if fmt == "safetensors" else "pt"
    # torch.save keeps a tied lm_head (it shares the embedding's storage); safetensors refuses it
    pred_state = {k: v for k, v in pred.state_dict().items() if k != "feature_extractor.lm_head.weight"
                  or not pred.feature_extractor.config.tie_word_embeddings or fmt != "safetensors"}
    if combined:
        state = {f"llm.{k}": v for k, v in model.state_dict().items()}
        state.update({f"sparsity_predictor.{k}": v for k, v in pred_state.items()})
        src = _save_one(state, folder / f"ifpruning.{suffix}", fmt)
        return {"src": src, "predictor": None, "config": config_dir, "predictor_config": pconfig}
    src = _save_one(model.state_dict(), folder / f"llm.{suffix}", fmt)
    ppath = _save_one(pred_state, folder / f"predictor.{suffix}", fmt)
    return {"src": src, "predictor": ppath, "config": config_dir, "predictor_config": pconfig}


def _save_one(state: dict, path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        state = {k: v.detach().clone().contiguous() for k, v in state.items()}
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


# The earlier shipped run's adapter and densities (predictor + norms, gains, LoRA; 0.3-0.7): the
# shipped defaults now train the predictor alone, so tests set these to run every part of train.py.
WITH_ADAPTER = dict(densities="0.3,0.5,0.7", default_density=0.5, dense_frac=0.125, lr_adapter=1e-3,
                    lora_rank=16, gate_gain=1)


def smollm2_artifacts(root: Path, steps: int = 2):
    """examples/smollm2 at tiny size: a Q4_1 GGUF, its data (2 prompts a family), `steps` training
    steps and the exported artifacts; returns (gguf, data file, the Run, artifacts folder)."""
    from examples.smollm2 import data
    from examples.smollm2.train import Config, Run

    gguf = testing.make_gguf(root / "tiny.gguf", "llama", "Q4_1", tied=True)
    data.build(root / "data.jsonl", seed=0, batch=16, threads=1, limit=2, model=str(gguf))
    cfg = Config(model=str(gguf), data=str(root / "data.jsonl"), pred_layers=1, batch=4, steps=steps, warmup=1,
                 threads=1, ckpt_every=2, eval_every=0, **{**WITH_ADAPTER, "lora_rank": 4})
    run = Run(cfg, root / "run", log=lambda *a: None)
    run.train()
    return gguf, root / "data.jsonl", run, run.export(root / "artifacts")
