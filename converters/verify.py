"""Parity check of a conversion: the PyTorch reference against the MLX bundle.

The reference (converters/reference.py) is built with transformers from the *source*
checkpoint in float32; the bundle is loaded with ifprune_mlx.load. Three checks:

  weights     every bundle tensor (dequantized, down_proj transposed back) against its source
              tensor, within what the bundle's dtype or quantization allows (exact for float32;
              |error| <= |w| * 2^-8 for bfloat16, 2^-11 for float16; <= 1.01 * the group's
              scale for quantized rows);
  logits      on a few prompts, dense and pruned (the engine's selection installed on both sides
              with set_ffn_mask / engine.apply), engine.model against the reference holding the
              *bundle's* weights: what is left is compute rounding, so the tolerance depends only
              on the dtype the engine computes in (TOLERANCES). The difference to the float32
              source model (rounding / quantization noise included) is reported too;
  selection   reference select_channels(...) (source predictor, float32) against
              engine.select(prompt, density): mean per-layer overlap >= AGREEMENT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ifprune_mlx.bundle import read_safetensors, weight_files
from ifprune_mlx.errors import ConversionError

from .layouts import Source, is_down_proj
from .readers import TensorRef, torch_or_error

PROMPTS = (
    "Write a Python function that reverses a list.",
    "What is the sum of 12 and 30?",
    "Translate the sentence into French, please.",
)
# Largest allowed |logit difference| / max(1, max |logit|) between the engine and the reference
# holding the same weights, by the dtype the engine computes in.
TOLERANCES = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}
# Smallest allowed mean per-layer Jaccard overlap of the selections (float16/bfloat16
# predictors may swap channels whose scores tie within their precision).
AGREEMENT = {"float32": 0.99, "float16": 0.9, "bfloat16": 0.9}
_EPS = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}  # relative rounding error
_TINY = {"float32": 0.0, "float16": 2.0**-24, "bfloat16": 0.0}  # absolute, float16 subnormals


@dataclass
class VerifyReport:
    prompts: int
    density: float
    dtype: str
    quantization: dict | None
    dense_max_diff: float
    pruned_max_diff: float
    source_max_diff: float
    logit_scale: float
    tolerance: float
    worst_weight: str
    worst_weight_ratio: float  # |error| / allowed error of the worst tensor (<= 1 passes)
    selections_identical: int | None
    mean_overlap: float | None
    min_agreement: float

    @property
    def allowed(self) -> float:
        return self.tolerance * max(1.0, self.logit_scale)

    @property
    def passed(self) -> bool:
        return (self.worst_weight_ratio <= 1.0 and max(self.dense_max_diff, self.pruned_max_diff) <= self.allowed
                and (self.mean_overlap is None or self.mean_overlap >= self.min_agreement))

    def lines(self) -> list[str]:
        q = self.quantization
        kind = f"{q['bits']}-bit rows" if q else self.dtype
        out = [f"verify ({self.prompts} prompts, PyTorch reference vs MLX bundle, {kind}): "
               + ("PASSED" if self.passed else "FAILED"),
               f"  weights: worst {self.worst_weight} at {self.worst_weight_ratio:.2f} of the allowed "
               f"{'quantization' if q else 'rounding'} error",
               f"  logits max |diff| dense {self.dense_max_diff:.3g}, pruned at density {self.density:.3g} "
               f"{self.pruned_max_diff:.3g} (allowed {self.allowed:.3g}; logits up to {self.logit_scale:.3g})"]
        if q or self.dtype != "float32":
            out.append(f"  vs the float32 source model ({kind} noise included): {self.source_max_diff:.3g}")
        if self.mean_overlap is not None:
            out.append(f"  predictor selections identical on {self.selections_identical}/{self.prompts} prompts, "
                       f"mean per-layer overlap {self.mean_overlap:.4f} (required {self.min_agreement})")
        return out


# -- the reference ---------------------------------------------------------------------------------


def _tensor(torch, value: mx.array):
    return torch.from_numpy(np.array(value.astype(mx.float32)))


def _hf_model(torch, hf_config: dict, tensors: dict[str, TensorRef], what: str):
    import transformers

    config = dict(hf_config)
    config_obj = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    model = transformers.AutoModelForCausalLM.from_config(config_obj).float().eval()
    missing, unexpected = model.load_state_dict({k: _tensor(torch, v.load()) for k, v in tensors.items()},
                                                strict=False)
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
            layer.weight.copy_(_tensor(torch, source.head[f"head{i}.weight"].load()))
            layer.bias.copy_(_tensor(torch, source.head[f"head{i}.bias"].load()))
    return llm, predictor


# -- weights ---------------------------------------------------------------------------------------


def _bundle_tensors(files: list[Path], tensors: dict[str, TensorRef], quantization: dict | None, rows: bool):
    """Yield (name, bundle tensor as float32 in the source's layout, ratio of its error to the bound)."""
    weights = read_safetensors(files)
    for name, ref in tensors.items():
        value = weights.pop(name)
        original = ref.load().astype(mx.float32)
        if rows and is_down_proj(name):
            original = original.T
        base = name.removesuffix(".weight")
        if quantization and f"{base}.scales" in weights and name.endswith(".weight"):
            scales, biases = weights.pop(f"{base}.scales"), weights.pop(f"{base}.biases")
            g = quantization["group_size"]
            value = mx.dequantize(value, scales, biases, group_size=g, bits=quantization["bits"])
            bound = 1.01 * mx.repeat(mx.abs(scales.astype(mx.float32)), g, axis=-1)
        else:
            kind = str(value.dtype).rsplit(".", 1)[-1]
            bound = 1.01 * (mx.abs(original) * _EPS[kind] + _TINY[kind])
        value = value.astype(mx.float32)
        error = mx.abs(value - original)
        ratio = float(mx.max(mx.where(error == 0, 0.0, error / mx.maximum(bound, 1e-30))))
        yield name, (value.T if rows and is_down_proj(name) else value), ratio


# -- the check -------------------------------------------------------------------------------------


def verify(bundle: Path, source: Source, *, prompts=PROMPTS, density: float | None = None,
           tolerance: float | None = None) -> VerifyReport:
    """Compare the bundle at `bundle` with the PyTorch reference of `source` (see module doc)."""
    torch = torch_or_error("--verify")
    import transformers

    import ifprune_mlx
    from .reference import indices_to_mask, select_channels, set_ffn_mask

    bundle = Path(bundle)
    engine = ifprune_mlx.load(bundle)
    llm, predictor = reference_models(source)
    quantization = engine.config.get("quantization")
    dtype = str(engine.model.model.norm.weight.dtype).rsplit(".", 1)[-1]
    density = engine.default_density if density is None else density
    own = (bundle / "predictor" / "tokenizer_config.json").is_file()
    pred_tokenizer = (transformers.AutoTokenizer.from_pretrained(bundle / "predictor" if own else bundle)
                      if predictor is not None else None)

    def logits(ids, selection):
        set_ffn_mask(llm, None if selection is None else indices_to_mask(list(selection.indices), engine.d_ffn))
        with torch.no_grad():
            return llm(torch.tensor([ids])).logits[0].numpy()

    # the engine, and the float32 source model, on every prompt: dense and pruned
    runs, identical, overlaps = [], 0, []
    for prompt in prompts:
        ids = engine.prompt_tokens(prompt)
        selection = engine.select(prompt, density)  # predictor, or training-free for plain bundles
        for sel in (None, selection):
            engine.apply(sel)
            got = np.array(engine.model(mx.array([ids])).astype(mx.float32))[0]
            runs.append((ids, sel, got, logits(ids, sel)))
        if predictor is not None:
            expected = select_channels(predictor, pred_tokenizer, prompt, density, engine.pad_multiple)
            identical += all(np.array_equal(a, b) for a, b in zip(expected, selection.indices))
            overlaps += [len(np.intersect1d(a, b)) / len(np.union1d(a, b)) for a, b in zip(expected, selection.indices)]
    engine.apply(None)

    # every weight against its source; the reference then takes the bundle's weights
    worst, ratio = "", 0.0
    checks = [_bundle_tensors(weight_files(bundle), source.llm, quantization, rows=True)]
    if source.predictor is not None:
        checks += [_bundle_tensors(weight_files(bundle / "predictor"), source.predictor, None, rows=False),
                   _bundle_tensors([bundle / "predictor" / "head.safetensors"], source.head, None, rows=False)]
    params = dict(llm.named_parameters())
    with torch.no_grad():
        for check in checks:
            for name, value, r in check:
                if r > ratio or not worst:
                    worst, ratio = name, r
                if check is checks[0] and name in params:
                    params[name].copy_(_tensor(torch, value))

    dense = pruned = source_diff = scale = 0.0
    for ids, sel, got, source_logits in runs:
        ref = logits(ids, sel)
        diff = float(np.abs(ref - got).max())
        dense, pruned = (max(dense, diff), pruned) if sel is None else (dense, max(pruned, diff))
        source_diff = max(source_diff, float(np.abs(source_logits - got).max()))
        scale = max(scale, float(np.abs(source_logits).max()))
    return VerifyReport(
        prompts=len(prompts), density=density, dtype=dtype, quantization=quantization,
        dense_max_diff=dense, pruned_max_diff=pruned, source_max_diff=source_diff, logit_scale=scale,
        tolerance=TOLERANCES[dtype] if tolerance is None else tolerance,
        worst_weight=worst, worst_weight_ratio=ratio,
        selections_identical=identical if predictor is not None else None,
        mean_overlap=float(np.mean(overlaps)) if overlaps else None,
        min_agreement=AGREEMENT.get(dtype, 0.9),
    )
