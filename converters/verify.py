"""Parity check of a conversion: the PyTorch reference (or mlx-lm's model) against the bundle.

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

An mlx-lm folder has no PyTorch original: its reference is mlx-lm's own model of the folder
(verify_with_mlx_lm). The logits check then runs against mlx-lm's model holding the bundle's
weights (dequantized, float32), and the bundle is also compared with mlx-lm's model as it is:
max |logit diff| within requantization_tolerance when down_proj was re-quantized, KL of the
next-token distributions, top-1 agreement and greedy continuations (reported).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ifprune_mlx.bundle import read_safetensors, weight_files
from ifprune_mlx.errors import ConversionError
from ifprune_mlx.fidelity import greedy_tokens, next_token_kl
from ifprune_mlx.models import is_down_proj, is_gate_up_proj, module_quantization
from ifprune_mlx.selectors import overlap

from .layouts import Source
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
GREEDY_TOKENS = 16


def requantization_tolerance(bits: int) -> float:
    """Largest allowed |logit difference| / max(1, max |logit|) between the bundle and mlx-lm's
    model of a quantized folder whose down_proj was re-quantized at `bits`: proportional to the
    quantization step, 0.25 at 4 bits (0.015 at 8), 5x the worst measured (docs/CONVERTING.md)."""
    return 0.25 * 15 / (2**bits - 1)


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
    reference: str = "PyTorch reference"
    # against mlx-lm's model of an mlx-lm folder, as it is (verify_with_mlx_lm only)
    source_tolerance: float | None = None  # relative bound on source_max_diff (None: reported only)
    kl: float | None = None  # mean KL(mlx-lm || bundle) of the next-token distributions
    top1_agreement: float | None = None  # fraction of positions whose most likely token is the same
    greedy_identical: int | None = None  # prompts whose greedy continuations are identical
    reference_model: str = "mlx-lm's model"  # what the KL / greedy line compares with

    @property
    def allowed(self) -> float:
        return self.tolerance * max(1.0, self.logit_scale)

    @property
    def source_allowed(self) -> float | None:
        return None if self.source_tolerance is None else self.source_tolerance * max(1.0, self.logit_scale)

    @property
    def passed(self) -> bool:
        return (self.worst_weight_ratio <= 1.0 and max(self.dense_max_diff, self.pruned_max_diff) <= self.allowed
                and (self.mean_overlap is None or self.mean_overlap >= self.min_agreement)
                and (self.source_allowed is None or self.source_max_diff <= self.source_allowed))

    def lines(self) -> list[str]:
        q = self.quantization
        kind = f"{q['bits']}-bit rows" if q else self.dtype
        mlx_lm = self.kl is not None
        out = [f"verify ({self.prompts} prompts, {self.reference} vs MLX bundle, {kind}): "
               + ("PASSED" if self.passed else "FAILED"),
               f"  weights: worst {self.worst_weight} at {self.worst_weight_ratio:.2f} of the allowed "
               f"{'quantization' if q else 'rounding'} error",
               f"  logits max |diff| dense {self.dense_max_diff:.3g}, pruned at density {self.density:.3g} "
               f"{self.pruned_max_diff:.3g} (allowed {self.allowed:.3g}; logits up to {self.logit_scale:.3g})"
               + (", mlx-lm holding the bundle's weights" if mlx_lm and self.reference_model.startswith("mlx-lm")
                  else "")]
        if mlx_lm:
            bound = "" if self.source_allowed is None else f" (allowed {self.source_allowed:.3g})"
            out.append(f"  vs {self.reference_model} as it is: max |diff| {self.source_max_diff:.3g}{bound}, KL "
                       f"{self.kl:.2g}, same top-1 token at {100 * self.top1_agreement:.1f}% of positions, "
                       f"greedy continuations identical on {self.greedy_identical}/{self.prompts} prompts "
                       f"({GREEDY_TOKENS} tokens)")
        elif q or self.dtype != "float32":
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
    state = {k: _tensor(torch, v.load()) for k, v in tensors.items()}
    for name in model.state_dict():  # a fused FFN (phi3) takes back the halves the bundle splits
        halves = [name.replace(".gate_up_proj.", f".{part}.") for part in ("gate_proj", "up_proj")]
        if is_gate_up_proj(name) and all(h in state for h in halves):
            state[name] = torch.cat([state.pop(h) for h in halves])
    missing, unexpected = model.load_state_dict(state, strict=False)
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
    return _hf_model(torch, source.hf_config, source.llm, "the LLM"), reference_predictor(source)


def reference_predictor(source: Source):
    """The source's SparsityPredictor in float32 (PyTorch), or None without a predictor."""
    if source.predictor is None:
        return None
    torch = torch_or_error("--verify with a predictor")
    from .reference import SparsityPredictor

    backbone = _hf_model(torch, source.predictor_hf_config, source.predictor, "the predictor")
    predictor = SparsityPredictor(backbone, source.n_layers, source.d_ffn).eval()
    with torch.no_grad():
        for i in (1, 2):
            layer = getattr(predictor, f"prediction_head{i}")
            layer.weight.copy_(_tensor(torch, source.head[f"head{i}.weight"].load()))
            layer.bias.copy_(_tensor(torch, source.head[f"head{i}.bias"].load()))
    return predictor


# -- weights ---------------------------------------------------------------------------------------


def _dequantize(weight: mx.array, scales: mx.array, biases: mx.array, q: dict) -> mx.array:
    return mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32),
                         group_size=q["group_size"], bits=q["bits"])


def _bundle_names(name: str) -> list[str]:
    """The bundle tensors a source tensor became: itself, or a fused gate_up_proj's (phi3) gate and up rows."""
    if is_gate_up_proj(name):
        return [name.replace(".gate_up_proj.", part) for part in (".gate_proj.", ".up_proj.")]
    return [name]


def _take(weights: dict[str, mx.array], name: str) -> mx.array:
    """Pop the bundle's tensor for source tensor `name` (gate and up rows fused back for phi3)."""
    parts = [weights.pop(part) for part in _bundle_names(name)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def _bundle_tensors(files: list[Path], tensors: dict[str, TensorRef], quantization: dict | None, rows: bool,
                    source_quantization: dict | None = None):
    """Yield (name, bundle tensor as float32 in the source's layout, ratio of its error to the bound).

    Quantized weights, the bundle's or the source's, are dequantized (their scales and biases go
    with them); a quantized bundle weight may differ by its group's scale (a few float rounding
    steps more when the scales are float16 / bfloat16).
    """
    weights = read_safetensors(files)
    for name, ref in tensors.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and f"{base}.weight" in tensors:
            continue  # part of a quantized source weight
        original = ref.load()
        if source_quantization and name.endswith(".weight") and f"{base}.scales" in tensors:
            original = _dequantize(original, tensors[f"{base}.scales"].load(), tensors[f"{base}.biases"].load(),
                                   module_quantization(source_quantization, base))
        original = original.astype(mx.float32)
        if rows and is_down_proj(name):
            original = original.T
        value = _take(weights, name)
        if quantization and name.endswith(".weight") and _bundle_names(f"{base}.scales")[0] in weights:
            scales, biases = _take(weights, f"{base}.scales"), _take(weights, f"{base}.biases")
            q = module_quantization(quantization, base)  # the bundle keeps the source's per-module entries
            value = _dequantize(value, scales, biases, q)
            kind = str(scales.dtype).rsplit(".", 1)[-1]
            step = mx.repeat(mx.abs(scales.astype(mx.float32)), q["group_size"], axis=-1)
            bound = 1.01 * (step + mx.abs(original) * _EPS[kind])
        else:
            kind = str(value.dtype).rsplit(".", 1)[-1]
            bound = 1.01 * (mx.abs(original) * _EPS[kind] + _TINY[kind])
        value = value.astype(mx.float32)
        error = mx.abs(value - original)
        ratio = float(mx.max(mx.where(error == 0, 0.0, error / mx.maximum(bound, 1e-30))))
        yield name, (value.T if rows and is_down_proj(name) else value), ratio


def _predictor_tokenizer(bundle: Path):
    import transformers

    own = (bundle / "predictor" / "tokenizer_config.json").is_file()
    return transformers.AutoTokenizer.from_pretrained(bundle / "predictor" if own else bundle)


@dataclass
class _Tally:
    """What both verifications gather over the prompts, and the report they make of it."""

    dense: float = 0.0          # largest |logit diff| against the reference, dense
    pruned: float = 0.0         # the same, pruned
    source_diff: float = 0.0    # largest |logit diff| against the source model as it is
    scale: float = 0.0          # largest |logit| of the source model
    identical: int = 0          # prompts whose predictor selections are identical
    overlaps: list = field(default_factory=list)  # per-layer Jaccard overlaps of the selections

    def logits(self, selection, diff: float) -> None:
        if selection is None:
            self.dense = max(self.dense, diff)
        else:
            self.pruned = max(self.pruned, diff)

    def source(self, diff: float, scale: float) -> None:
        self.source_diff, self.scale = max(self.source_diff, diff), max(self.scale, scale)

    def selection(self, predictor, tokenizer, prompt: str, density: float, engine, selection) -> None:
        """The reference predictor's channels for `prompt` against the engine's `selection`."""
        from .reference import select_channels

        expected = select_channels(predictor, tokenizer, prompt, density, engine.pad_multiple)
        self.identical += all(np.array_equal(a, b) for a, b in zip(expected, selection.indices))
        self.overlaps += overlap(expected, selection.indices)

    def report(self, *, prompts: int, density: float, dtype: str, quantization: dict | None,
               tolerance: float | None, worst: tuple[str, float], with_predictor: bool, **extra) -> VerifyReport:
        return VerifyReport(
            prompts=prompts, density=density, dtype=dtype, quantization=quantization,
            dense_max_diff=self.dense, pruned_max_diff=self.pruned, source_max_diff=self.source_diff,
            logit_scale=self.scale, tolerance=TOLERANCES[dtype] if tolerance is None else tolerance,
            worst_weight=worst[0], worst_weight_ratio=worst[1],
            selections_identical=self.identical if with_predictor else None,
            mean_overlap=float(np.mean(self.overlaps)) if self.overlaps else None,
            min_agreement=AGREEMENT.get(dtype, 0.9), **extra)


def _check_weights(checks: list, take_llm_weight) -> tuple[str, float]:
    """Run every weight check (_bundle_tensors); return the worst (name, ratio). The LLM's
    weights (the first check) are handed to take_llm_weight(name, value) one by one."""
    worst, ratio = "", 0.0
    for check in checks:
        for name, value, r in check:
            if r > ratio or not worst:
                worst, ratio = name, r
            if check is checks[0]:
                take_llm_weight(name, value)
    return worst, ratio


def _predictor_weights(bundle: Path, source: Source):
    """_bundle_tensors of the predictor's backbone and head."""
    if source.predictor is None:
        return []
    return [_bundle_tensors(weight_files(bundle / "predictor"), source.predictor, None, rows=False),
            _bundle_tensors([bundle / "predictor" / "head.safetensors"], source.head, None, rows=False)]


# -- the check -------------------------------------------------------------------------------------


def verify(bundle: Path, source: Source, *, prompts=PROMPTS, density: float | None = None,
           tolerance: float | None = None) -> VerifyReport:
    """Compare the bundle at `bundle` with the reference of `source` (see module doc): the
    PyTorch reference, or mlx-lm's own model for an mlx-lm folder (verify_with_mlx_lm)."""
    if source.folder is not None:
        return verify_with_mlx_lm(bundle, source, prompts=prompts, density=density, tolerance=tolerance)
    torch = torch_or_error("--verify")

    from ifprune_mlx.engine import load
    from .reference import indices_to_mask, set_ffn_mask

    bundle = Path(bundle)
    engine = load(bundle)
    llm, predictor = reference_models(source)
    quantization = engine.config.get("quantization")
    dtype = str(engine.model.model.norm.weight.dtype).rsplit(".", 1)[-1]
    density = engine.default_density if density is None else density
    pred_tokenizer = _predictor_tokenizer(bundle) if predictor is not None else None

    def logits(ids, selection):
        set_ffn_mask(llm, None if selection is None else indices_to_mask(list(selection.indices), engine.d_ffn))
        with torch.no_grad():
            return llm(torch.tensor([ids])).logits[0].numpy()

    # the engine, and the float32 source model, on every prompt: dense and pruned
    runs, tally = [], _Tally()
    for prompt in prompts:
        ids = engine.prompt_tokens(prompt)
        selection = engine.select(prompt, density)  # predictor, or training-free for plain bundles
        for sel in (None, selection):
            engine.apply(sel)
            got = np.array(engine.model(mx.array([ids])).astype(mx.float32))[0]
            runs.append((ids, sel, got, logits(ids, sel)))
        if predictor is not None:
            tally.selection(predictor, pred_tokenizer, prompt, density, engine, selection)
    engine.apply(None)

    # every weight against its source; the reference then takes the bundle's weights
    checks = [_bundle_tensors(weight_files(bundle), source.llm, quantization, rows=True),
              *_predictor_weights(bundle, source)]
    params = dict(llm.named_parameters())

    def into_reference(name, value):
        if name in params:
            params[name].copy_(_tensor(torch, value))

    with torch.no_grad():
        worst = _check_weights(checks, into_reference)

    for ids, sel, got, source_logits in runs:
        tally.logits(sel, float(np.abs(logits(ids, sel) - got).max()))
        tally.source(float(np.abs(source_logits - got).max()), float(np.abs(source_logits).max()))
    return tally.report(prompts=len(prompts), density=density, dtype=dtype, quantization=quantization,
                        tolerance=tolerance, worst=worst, with_predictor=predictor is not None)


# -- an mlx-lm folder: mlx-lm's own model is the reference -----------------------------------------


@contextmanager
def _gates_masked(model, selection, d_ffn: int):
    """mlx-lm's model with the FFN channels outside `selection` switched off, by zeroing their
    gate_proj rows (weight, bias, or scales and biases when quantized): silu(0) * up = 0. A fused
    gate_up_proj (phi3) holds the gate rows first."""
    saved = []
    try:
        for layer, kept in zip(model.layers, [] if selection is None else selection.indices):
            mask = np.zeros(d_ffn, dtype=np.float32)
            mask[np.asarray(kept)] = 1
            gate = getattr(layer.mlp, "gate_proj", None)
            if gate is None:
                gate, mask = layer.mlp.gate_up_proj, np.concatenate([mask, np.ones(d_ffn, dtype=np.float32)])
            names = [n for n in ("scales", "biases", "bias") if n in gate] if "scales" in gate else \
                [n for n in ("weight", "bias") if n in gate]
            saved.append((gate, {n: gate[n] for n in names}))
            gate.update({n: gate[n] * mx.array(mask if gate[n].ndim == 1 else mask[:, None]).astype(gate[n].dtype)
                         for n in names})
        yield model
    finally:
        for gate, params in saved:
            gate.update(params)


def _float32_logits(model, ids: list[int]) -> mx.array:
    """Evaluated now: an apply() swaps rows in place, which a lazy graph would see."""
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    mx.eval(logits)
    return logits


def verify_with_mlx_lm(bundle: Path, source: Source, *, prompts=PROMPTS, density: float | None = None,
                       tolerance: float | None = None) -> VerifyReport:
    """Compare the bundle converted from an mlx-lm folder with mlx-lm's own model of it.

    Weights: copied tensors equal, a re-quantized down_proj within its new groups' scale of the
    source's. Logits (dense and pruned): against mlx-lm's model holding the bundle's weights
    (dequantized, float32), within TOLERANCES of the dtype the engine computes in. Against
    mlx-lm's model as it is (the folder's config made explicit as in the bundle): dense max
    |logit diff| within requantization_tolerance(bits) if down_proj was re-quantized (reported only
    for a float source, whose bundle may be cast or quantized on request), KL, top-1 agreement
    and greedy continuations. A predictor is checked as in verify() (needs torch).
    """
    from ifprune_mlx.engine import load
    from ifprune_mlx.models import build_model
    from mlx_lm.utils import load_model

    bundle = Path(bundle)
    engine = load(bundle)
    mlx_lm_model, _ = load_model(Path(source.folder), model_config=source.config)
    quantization = engine.config.get("quantization")
    dtype = str(engine.model.model.norm.weight.dtype).rsplit(".", 1)[-1]
    density = engine.default_density if density is None else density
    predictor = reference_predictor(source)
    pred_tokenizer = _predictor_tokenizer(bundle) if predictor is not None else None

    # the bundle against mlx-lm's model as it is
    runs, tally, kls, top1, positions, greedy_same = [], _Tally(), [], 0, 0, 0
    for prompt in prompts:
        ids = engine.prompt_tokens(prompt)
        engine.apply(None)
        theirs = greedy_tokens(mlx_lm_model, ids, GREEDY_TOKENS)
        greedy_same += greedy_tokens(engine.model, ids, GREEDY_TOKENS) == theirs
        ref, got = _float32_logits(mlx_lm_model, ids + theirs), _float32_logits(engine.model, ids + theirs)
        kls.append(np.array(next_token_kl(ref, got)))
        top1 += int(mx.sum(ref.argmax(-1) == got.argmax(-1)))
        positions += ref.shape[0]
        tally.source(float(mx.abs(ref - got).max()), float(mx.abs(ref).max()))
        selection = engine.select(prompt, density)
        for sel in (None, selection):
            engine.apply(sel)
            runs.append((ids, sel, _float32_logits(engine.model, ids)))
        if predictor is not None:
            tally.selection(predictor, pred_tokenizer, prompt, density, engine, selection)
    engine.apply(None)

    # every weight against its source; mlx-lm's float32 model then takes the bundle's weights
    own = {}
    checks = [_bundle_tensors(weight_files(bundle), source.llm, quantization, rows=True,
                              source_quantization=source.quantization),
              *_predictor_weights(bundle, source)]
    worst = _check_weights(checks, own.__setitem__)
    float_config = {k: v for k, v in source.config.items() if k not in ("quantization", "quantization_config")}
    reference = build_model(float_config, prunable=False)
    reference.load_weights(list(own.items()), strict=True)
    for ids, sel, got in runs:
        with _gates_masked(reference, sel, engine.d_ffn) as masked:
            tally.logits(sel, float(mx.abs(_float32_logits(masked, ids) - got).max()))

    down_bits = [module_quantization(source.quantization, name.removesuffix(".scales"))["bits"]
                 for name in source.llm if source.quantization and name.endswith("mlp.down_proj.scales")]
    return tally.report(
        prompts=len(prompts), density=density, dtype=dtype, quantization=quantization, tolerance=tolerance,
        worst=worst, with_predictor=predictor is not None, reference=f"mlx-lm's model of {source.folder}",
        source_tolerance=requantization_tolerance(min(down_bits)) if down_bits else None,
        kl=float(np.mean(np.concatenate(kls))), top1_agreement=top1 / positions, greedy_identical=greedy_same,
    )
