"""Parity check of a GGUF conversion: transformers' own GGUF model against the bundle.

The reference is AutoModelForCausalLM.from_pretrained(folder, gguf_file=name) in float32, which
dequantizes every tensor with its own kernels. Checks (the report is verify.VerifyReport's):

  weights     every bundle tensor against the Source's (exact for float32 and for the repacked
              Q8_0/Q4_0/Q4_1 blocks; within its dtype's rounding otherwise);
  logits      dense and pruned (the engine's selection installed on both sides), on each prompt
              and its greedy continuation: relative max |logit diff| within TOLERANCES of the
              dtype the engine computes in, quantized or not: the bundle holds exactly the
              values the file's blocks stand for (down_proj is kept as floats), plus
              requantization_tolerance(bits) if down_proj was re-quantized (requantize_down_proj);
  greedy      the greedy continuations (GREEDY_TOKENS), KL and top-1 agreement, reported.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ifprune_mlx.bundle import weight_files
from ifprune_mlx.fidelity import greedy_tokens, next_token_kl
from ifprune_mlx.models import module_quantization

from .layouts import Source
from .readers import torch_or_error
from .verify import (GREEDY_TOKENS, PROMPTS, TOLERANCES, VerifyReport, _bundle_tensors, _check_weights,
                     _float32_logits, _Tally, requantization_tolerance)


def reference_model(path: Path, adapter: dict | None = None):
    """transformers' float32 model of a GGUF file (needs torch), with a trained adapter merged
    into it when given (converters.artifacts.merge_adapter on its state dict)."""
    torch = torch_or_error("--verify of a GGUF file")
    import transformers

    path = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32)
    if adapter:
        from .artifacts import merge_adapter

        state = {name: value.numpy() for name, value in model.state_dict().items()}
        merged = merge_adapter(state, adapter)
        model.load_state_dict({name: torch.from_numpy(merged[name]) for name in state}, strict=False)
    return model.eval()


def _torch_greedy(torch, model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, end of sequence included (as fidelity.greedy_tokens, which does not stop)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def verify_gguf(bundle: Path, source: Source, path: Path, *, prompts=PROMPTS, density: float | None = None,
                reference=None, adapter: dict | None = None) -> VerifyReport:
    """Compare the bundle converted from GGUF file `path` with transformers' model of that file,
    `adapter` merged into it (or `reference`, that model already loaded). See the module docstring."""
    torch = torch_or_error("--verify of a GGUF file")
    from ifprune_mlx.engine import load
    from .reference import indices_to_mask, set_ffn_mask

    bundle = Path(bundle)
    engine = load(bundle)
    model = reference or reference_model(path, adapter)
    quantization = engine.config.get("quantization")
    dtype = str(engine.model.model.norm.weight.dtype).rsplit(".", 1)[-1]
    density = engine.default_density if density is None else density

    def reference_logits(ids, selection) -> np.ndarray:
        set_ffn_mask(model, None if selection is None else indices_to_mask(list(selection.indices), engine.d_ffn))
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()

    tally, kls, top1, positions, greedy_same = _Tally(), [], 0, 0, 0
    for prompt in prompts:
        ids = engine.prompt_tokens(prompt)
        engine.apply(None)
        set_ffn_mask(model, None)
        theirs = _torch_greedy(torch, model, ids, GREEDY_TOKENS)
        greedy_same += greedy_tokens(engine.model, ids, GREEDY_TOKENS) == theirs
        ref = reference_logits(ids + theirs, None)
        got = np.array(_float32_logits(engine.model, ids + theirs))
        kls.append(np.array(next_token_kl(mx.array(ref), mx.array(got))))
        top1 += int((ref.argmax(-1) == got.argmax(-1)).sum())
        positions += ref.shape[0]
        diff = float(np.abs(ref - got).max())
        tally.source(diff, float(np.abs(ref).max()))
        tally.logits(None, diff)
        selection = engine.select(prompt, density)
        engine.apply(selection)
        tally.logits(selection, float(np.abs(reference_logits(ids, selection)
                                             - np.array(_float32_logits(engine.model, ids))).max()))
    engine.apply(None)
    set_ffn_mask(model, None)

    checks = [_bundle_tensors(weight_files(bundle), source.llm, quantization, rows=True,
                              source_quantization=source.quantization)]
    worst = _check_weights(checks, lambda name, value: None)
    tolerance = TOLERANCES[dtype]  # the bundle holds the file's values, down_proj as floats...
    down_bits = [module_quantization(quantization, name.removesuffix(".weight"))["bits"]
                 for name in source.llm if name.endswith("mlp.down_proj.weight") and quantization
                 and f"{name.removesuffix('.weight')}.scales" in source.llm]
    if down_bits:  # ...unless converted with requantize_down_proj
        tolerance += requantization_tolerance(min(down_bits))
    return tally.report(
        prompts=len(prompts), density=density, dtype=dtype, quantization=quantization, tolerance=tolerance,
        worst=worst, with_predictor=False, reference=f"transformers' GGUF model of {Path(path).name}" + (" + the adapter" if adapter else ""),
        source_tolerance=tolerance, reference_model="transformers' GGUF model",
        kl=float(np.mean(np.concatenate(kls))), top1_agreement=top1 / positions, greedy_identical=greedy_same)
