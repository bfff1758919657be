"""Parity check of a conversion: the PyTorch reference against the MLX bundle.

The reference (converters/reference.py) is built from the *source* checkpoint in float32 with
transformers; the bundle is loaded with ifprune_mlx.load. On each prompt:
  - dense: logits of the Hugging Face model vs engine.model, on the same token ids;
  - selection: reference select_channels(...) vs engine.select(prompt, density);
  - pruned: set_ffn_mask(reference, the engine's selection) vs engine.apply(selection).
The conversion passes when the largest logit difference is within tolerance (relative to the
logits' scale, by dtype / quantization; see TOLERANCES) and the selections agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ifprune_mlx.errors import ConversionError

from .layouts import Source
from .readers import TensorRef, torch_or_error

PROMPTS = (
    "Write a Python function that reverses a list.",
    "What is the sum of 12 and 30?",
    "Translate the sentence into French, please.",
)
# Largest allowed |logit difference| / max(1, max |reference logit|), by what the bundle holds.
# Quantized: measured 0.029 (8-bit) and 0.40 (4-bit, group 32) on random tiny models, a worst
# case (gaussian weights, no outliers the groups could absorb); see docs/CONVERTING.md.
TOLERANCES = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2, "q8": 6e-2, "q4": 0.6}
# Smallest allowed mean per-layer Jaccard overlap of the selections (float16/bf16 predictors
# may swap channels whose scores tie within their precision).
AGREEMENT = {"float32": 0.99, "float16": 0.9, "bfloat16": 0.9}


@dataclass
class VerifyReport:
    prompts: int
    density: float
    dense_max_diff: float
    pruned_max_diff: float | None
    logit_scale: float
    tolerance: float
    selections_identical: int | None
    mean_overlap: float | None
    min_agreement: float

    @property
    def passed(self) -> bool:
        diffs = [self.dense_max_diff] + ([self.pruned_max_diff] if self.pruned_max_diff is not None else [])
        ok = max(diffs) <= self.tolerance * max(1.0, self.logit_scale)
        return ok and (self.mean_overlap is None or self.mean_overlap >= self.min_agreement)

    def lines(self) -> list[str]:
        allowed = self.tolerance * max(1.0, self.logit_scale)
        out = [f"verify ({self.prompts} prompts, PyTorch reference vs MLX bundle): "
               + ("PASSED" if self.passed else "FAILED"),
               f"  dense logits max |diff| {self.dense_max_diff:.3g} (allowed {allowed:.3g}; logits up to {self.logit_scale:.3g})"]
        if self.pruned_max_diff is not None:
            out.append(f"  pruned at density {self.density}: logits max |diff| {self.pruned_max_diff:.3g}")
        if self.mean_overlap is not None:
            out.append(f"  predictor selections identical on {self.selections_identical}/{self.prompts} prompts, "
                       f"mean per-layer overlap {self.mean_overlap:.4f} (required {self.min_agreement})")
        return out


def _tensor(torch, ref: TensorRef):
    return torch.from_numpy(np.array(ref.load().astype(mx.float32)))


def _hf_model(torch, hf_config: dict, tensors: dict[str, TensorRef], what: str):
    import transformers

    config = dict(hf_config)
    config_obj = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    model = transformers.AutoModelForCausalLM.from_config(config_obj).float().eval()
    missing, unexpected = model.load_state_dict({k: _tensor(torch, v) for k, v in tensors.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ConversionError(f"verify: the PyTorch reference of {what} does not take the checkpoint's "
                              f"tensors (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if "lm_head.weight" not in tensors:
        model.tie_weights()
    return model


def reference_models(source: Source):
    """(Hugging Face LLM, SparsityPredictor or None) built from the source in float32."""
    torch = torch_or_error("--verify")
    from .reference import SparsityPredictor

    llm = _hf_model(torch, source.hf_config, source.llm, "the LLM")
    if source.predictor is None:
        return llm, None
    backbone = _hf_model(torch, source.predictor_hf_config, source.predictor, "the predictor")
    predictor = SparsityPredictor(backbone, source.n_layers, source.d_ffn).eval()
    with torch.no_grad():
        for i in (1, 2):
            layer = getattr(predictor, f"prediction_head{i}")
            layer.weight.copy_(_tensor(torch, source.head[f"head{i}.weight"]))
            layer.bias.copy_(_tensor(torch, source.head[f"head{i}.bias"]))
    return llm, predictor


def verify(bundle: Path, source: Source, *, prompts=PROMPTS, density: float | None = None,
           tolerance: float | None = None) -> VerifyReport:
    """Compare the bundle at `bundle` with the PyTorch reference of `source` (see module doc)."""
    torch = torch_or_error("--verify")
    import transformers

    import ifprune_mlx
    from .reference import indices_to_mask, select_channels, set_ffn_mask

    engine = ifprune_mlx.load(bundle)
    llm, predictor = reference_models(source)
    q = engine.config.get("quantization")
    kind = f"q{q['bits']}" if q else str(engine.model.model.norm.weight.dtype).rsplit(".", 1)[-1]
    density = engine.default_density if density is None else density
    pred_dtype = kind if not q else str(engine.model.model.norm.weight.dtype).rsplit(".", 1)[-1]
    tok_dir = Path(bundle) / "predictor" if (Path(bundle) / "predictor" / "tokenizer_config.json").is_file() else Path(bundle)
    pred_tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir) if predictor is not None else None

    dense, pruned, scale, identical, overlaps = 0.0, 0.0, 0.0, 0, []
    with torch.no_grad():
        for prompt in prompts:
            ids = engine.prompt_tokens(prompt)
            set_ffn_mask(llm, None)
            engine.apply(None)
            ref = llm(torch.tensor([ids])).logits[0].numpy()
            got = np.array(engine.model(mx.array([ids])).astype(mx.float32))[0]
            dense = max(dense, float(np.abs(ref - got).max()))
            scale = max(scale, float(np.abs(ref).max()))
            selection = engine.select(prompt, density)  # predictor, or training-free for plain bundles
            if predictor is not None:
                expected = select_channels(predictor, pred_tokenizer, prompt, density, engine.pad_multiple)
                identical += all(np.array_equal(a, b) for a, b in zip(expected, selection.indices))
                overlaps += [len(np.intersect1d(a, b)) / len(np.union1d(a, b))
                             for a, b in zip(expected, selection.indices)]
            engine.apply(selection)
            set_ffn_mask(llm, indices_to_mask(list(selection.indices), engine.d_ffn))
            ref = llm(torch.tensor([ids])).logits[0].numpy()
            got = np.array(engine.model(mx.array([ids])).astype(mx.float32))[0]
            pruned = max(pruned, float(np.abs(ref - got).max()))
    engine.apply(None)
    return VerifyReport(
        prompts=len(prompts), density=density, dense_max_diff=dense,
        pruned_max_diff=pruned, logit_scale=scale,
        tolerance=TOLERANCES[kind] if tolerance is None else tolerance,
        selections_identical=identical if predictor is not None else None,
        mean_overlap=float(np.mean(overlaps)) if overlaps else None,
        min_agreement=AGREEMENT.get(pred_dtype, 0.9),
    )
