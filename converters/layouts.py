"""Source layouts: where an IFPruning checkpoint keeps its LLM, predictor, head and configs.

Four layouts, detected from the files and their tensor names (or forced with --layout):

  hf      SRC is a Hugging Face folder (config.json, weights, tokenizer files); --predictor P
          is a folder with config.json, the backbone's weights (HF keys model.*, lm_head.weight)
          and head.safetensors|.bin|.pt (prediction_head1/2.{weight,bias}), an optional
          ifpruning.json {"default_density", "pad_multiple", "pooling"} and optional tokenizer
          files. A SRC holding llm/ and predictor/ sub-folders is read as SRC/llm + SRC/predictor.
  public  state dicts as the public IFPruning code saves them: the LLM with HF Llama keys and the
          predictor as feature_extractor.model.*, feature_extractor.lm_head.weight,
          prediction_head1/2.*, in separate files or one file prefixed llm. / sparsity_predictor.
          State dicts carry no config: --config (the LLM's config.json, or its folder with the
          tokenizer files) and --predictor-config are required.
  plain   an LLM and no predictor: the bundle selects with explicit masks or the training-free
          selector.
  mlx     SRC is an mlx-lm folder (what mlx_lm.convert writes, e.g. an mlx-community model):
          float, or quantized (config.json "quantization", tensors X.weight/.scales/.biases).
          A quantized one is written as is except down_proj, re-quantized once along d_model
          (models.to_row_layout); --predictor P works as for hf.

Every layout resolves to a `Source`: configs as mlx-lm reads them and, for each tensor of the
bundle, the checkpoint tensor it comes from (names are mlx-lm's; for llama, qwen2, qwen3 and
mistral they are the Hugging Face names). Names and shapes are checked against the model the
config describes before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.nn as nn

from ifprune_mlx.bundle import DEFAULT_PREFILL, PREFILLS, TOKENIZER_FILES, read_config_file, safetensors_header
from ifprune_mlx.errors import ConversionError
from ifprune_mlx.models import (build_model, is_down_proj, is_gate_up_proj, module_quantization,
                                name_mismatch, normalize_config, split_gate_up)
from ifprune_mlx.predictor import head_mismatch
from ifprune_mlx.prune import QuantizedRowLinear

from .readers import Checkpoint, TensorRef, conversion_errors, open_checkpoint

LAYOUTS = ("auto", "hf", "public", "plain", "mlx")
FFN_BITS = QuantizedRowLinear.BITS  # what the runtime's quantized FFN rows hold
LLM_PREFIX, PREDICTOR_PREFIX, BACKBONE_PREFIX = "llm.", "sparsity_predictor.", "feature_extractor."
HEAD_KEYS = {"prediction_head1.weight": "head1.weight", "prediction_head1.bias": "head1.bias",
             "prediction_head2.weight": "head2.weight", "prediction_head2.bias": "head2.bias"}


@dataclass
class Source:
    """What a checkpoint holds, resolved to the bundle's names and checked.

    Attributes:
        layout: "hf", "public", "plain" or "mlx".
        config: the LLM's config as mlx-lm reads it (the bundle's config.json, minus "ifpruning").
        hf_config: the LLM's config as Hugging Face wrote it (the PyTorch reference builds from it).
        llm: bundle tensor name -> checkpoint tensor (standard layout; the writer transposes
            down_proj to rows).
        tokenizer_dir: the folder whose tokenizer files are copied.
        predictor_config, predictor_hf_config, predictor, head: the same for the predictor
            backbone; head maps head1.weight ... to prediction_head1.weight ... (None: no predictor).
        predictor_tokenizer_dir: the predictor's own tokenizer, if it has one.
        defaults: ifpruning.json's values (default_density, pad_multiple).
        quantization: an mlx-lm quantized LLM's config "quantization" (per-module overrides
            included): llm then holds its X.weight/.scales/.biases as mlx-lm wrote them (None: floats).
        folder: the mlx-lm folder (layout mlx), from which verify loads mlx-lm's own model.
    """

    layout: str
    config: dict
    hf_config: dict
    llm: dict[str, TensorRef]
    tokenizer_dir: Path | None
    predictor_config: dict | None = None
    predictor_hf_config: dict | None = None
    predictor: dict[str, TensorRef] | None = None
    head: dict[str, TensorRef] | None = None
    predictor_tokenizer_dir: Path | None = None
    defaults: dict = field(default_factory=dict)
    quantization: dict | None = None
    folder: Path | None = None

    @property
    def n_layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def d_ffn(self) -> int:
        return self.config["intermediate_size"]


def detect(src: Path, *, predictor: Path | None = None, layout: str = "auto",
           config: Path | None = None, predictor_config: Path | None = None,
           tokenizer: Path | None = None) -> Source:
    """Resolve a checkpoint to a checked Source (see the module docstring for the layouts).

    Args:
        src: the LLM: a Hugging Face or mlx-lm folder, a state-dict file or folder, or a combined file.
        predictor: the predictor: a folder (hf, mlx) or a state-dict file (public).
        layout: "auto", "hf", "public", "plain" or "mlx" (plain ignores any predictor in src).
        config: the LLM's config.json or its folder (required for state dicts without one).
        predictor_config: the predictor backbone's config.json or folder (same rule).
        tokenizer: a folder with the LLM's tokenizer files (default: next to the config).
    """
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    src = Path(src)
    if src.is_dir() and predictor is None and (src / "llm").is_dir() and (src / "predictor").is_dir():
        src, predictor = src / "llm", (None if layout == "plain" else src / "predictor")
    if layout == "plain" and predictor is not None:
        raise ConversionError("--layout plain converts an LLM without a predictor; drop --predictor")

    checkpoint = open_checkpoint(src)
    llm, pred = _split(checkpoint)
    pred_dir = None
    if predictor is not None:
        predictor = Path(predictor)
        if not predictor.exists():
            raise ConversionError(f"{predictor}: no such predictor file or folder")
        if pred:
            raise ConversionError(f"{src} already holds a predictor; drop --predictor {predictor}")
        _, pred = _split(open_checkpoint(predictor, skip="head."), predictor_only=True)
        pred_dir = predictor if predictor.is_dir() else None
        if pred_dir is not None:
            pred.update(_head_file(pred_dir))
    if layout == "plain":
        pred = {}

    hf_config, config_dir = _config(config, src, "the LLM", "--config")
    if "ifpruning" in hf_config:
        raise ConversionError(f"{src} is already an ifprune bundle: load it as it is (ifprune_mlx.load), "
                              "there is nothing to convert")
    public = any(k.startswith(BACKBONE_PREFIX) for k in pred) or _had_prefix(llm)
    mlx = _is_mlx_lm(hf_config, checkpoint)
    found = "mlx" if mlx else "plain" if not pred else "public" if public else "hf"
    if layout != "auto" and layout != found and layout != "plain":
        raise ConversionError(
            f"--layout {layout} does not match the checkpoint, whose tensor names are those of "
            f"the {found!r} layout; drop --layout to detect it"
        )
    tok_dir = Path(tokenizer) if tokenizer else config_dir
    if tok_dir is None or not _has_tokenizer(tok_dir):
        raise ConversionError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])} ...) found in "
            f"{tok_dir or src}; pass --tokenizer FOLDER (or --config with a folder that holds them)"
        )
    llm = {k.removeprefix(LLM_PREFIX): v for k, v in llm.items()}
    mlx_config = to_mlx_config(hf_config, llm, "the LLM")
    quantization = mlx_config.get("quantization") if any(k.endswith(".scales") for k in llm) else None
    if quantization is None and any(k.endswith(".scales") for k in llm):
        raise ConversionError(f"{src}: the weights are quantized (X.scales tensors) but config.json has no "
                              "\"quantization\" entry saying how; is this an mlx-lm folder?")
    if quantization:
        tensors = _check_quantized(mlx_config, quantization, llm, "the LLM")
    else:
        tensors = _check_model(mlx_config, _split_fused_ffn(llm), "the LLM", rows=True)
    source = Source(found, mlx_config, hf_config, tensors, tok_dir, quantization=quantization,
                    folder=src if mlx else None)
    if pred:
        _attach_predictor(source, pred, pred_dir, predictor_config)
    return source


def _attach_predictor(source: Source, pred: dict, pred_dir: Path | None, predictor_config: Path | None) -> None:
    """Check the predictor's tensors (backbone + head) against its config and the LLM, and
    give them to `source` with the predictor's tokenizer folder and ifpruning.json defaults."""
    phf, pconfig_dir = _config(predictor_config, pred_dir, "the predictor backbone", "--predictor-config")
    backbone = {k.removeprefix(BACKBONE_PREFIX): v for k, v in pred.items() if k not in HEAD_KEYS}
    head = {HEAD_KEYS[k]: v for k, v in pred.items() if k in HEAD_KEYS}
    pconfig = to_mlx_config(phf, backbone, "the predictor backbone")
    source.predictor_hf_config, source.predictor_config = phf, pconfig
    source.predictor = _check_model(pconfig, backbone, "the predictor backbone", rows=False)
    source.head = _check_head(head, pconfig["hidden_size"], source.n_layers, source.d_ffn)
    for folder in (pred_dir, pconfig_dir):
        if folder is not None and _has_tokenizer(folder):
            source.predictor_tokenizer_dir = folder
            break
    if pred_dir is not None:
        source.defaults = _ifpruning_json(pred_dir)


# -- tensor names --------------------------------------------------------------------------------


def _split(checkpoint, predictor_only: bool = False) -> tuple[dict, dict]:
    """Split a checkpoint's tensors into the LLM's and the predictor's (prefix sparsity_predictor. removed)."""
    llm, pred = {}, {}
    for name, ref in checkpoint.items():
        prefixed = name.startswith(PREDICTOR_PREFIX)
        name = name.removeprefix(PREDICTOR_PREFIX)
        if predictor_only or prefixed or name.startswith(BACKBONE_PREFIX) or name in HEAD_KEYS:
            pred[name] = ref
        else:
            llm[name] = ref
    return llm, pred


def _split_fused_ffn(tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """phi3's fused gate_up_proj -> gate_proj and up_proj refs, each reading its half of the
    rows (models.split_gate_up, one tensor at a time); other tensors unchanged."""
    out = {}
    for name, ref in tensors.items():
        if not is_gate_up_proj(name):
            out[name] = ref
            continue
        for part in ("gate_proj", "up_proj"):
            half = name.replace(".gate_up_proj.", f".{part}.")
            out[half] = TensorRef(half, (ref.shape[0] // 2, *ref.shape[1:]), ref.dtype, ref.path,
                                  lambda ref=ref, half=half: split_gate_up({ref.name: ref.load()})[half])
    return out


def _had_prefix(llm: dict) -> bool:
    return any(k.startswith(LLM_PREFIX) for k in llm)


def _is_mlx_lm(config: dict, checkpoint: Checkpoint) -> bool:
    """Whether mlx-lm wrote the LLM: a "quantization" entry (Hugging Face writes
    "quantization_config" only), quantized tensors, or safetensors tagged {"format": "mlx"}."""
    if "quantization" in config or any(name.endswith(".scales") for name in checkpoint):
        return True
    tags = set()
    for path in checkpoint.files:
        if not path.name.endswith(".safetensors"):
            return False
        tags.add(safetensors_header(path).get("__metadata__", {}).get("format"))
    return tags == {"mlx"}


def _head_file(folder: Path) -> dict[str, TensorRef]:
    """head.safetensors / head.bin / head.pt of an hf predictor folder (if the weights lack the head)."""
    for name in ("head.safetensors", "head.bin", "head.pt", "head.pth"):
        if (folder / name).is_file():
            return dict(open_checkpoint(folder / name))
    return {}


# -- configs -------------------------------------------------------------------------------------


def _config(explicit: Path | None, folder: Path | None, what: str, flag: str) -> tuple[dict, Path | None]:
    """(config dict, the folder it lives in) from `explicit` (file or folder) or `folder`/config.json."""
    if explicit is not None:
        path = Path(explicit)
        path = path / "config.json" if path.is_dir() else path
    elif folder is not None and Path(folder).is_dir() and (Path(folder) / "config.json").is_file():
        path = Path(folder) / "config.json"
    else:
        raise ConversionError(
            f"no config.json for {what}: a state dict carries no config; pass {flag} "
            "(its config.json, or the folder holding it)"
        )
    if not path.is_file():
        raise ConversionError(f"{path}: no such config file ({flag})")
    with conversion_errors():
        return read_config_file(path), path.parent


def to_mlx_config(hf_config: dict, tensors: dict, what: str) -> dict:
    """The config mlx-lm builds the same model from (ifprune_mlx.models.normalize_config)."""
    with conversion_errors(what):
        return normalize_config(hf_config, tensors)


def _has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer.model",
                                                            "tokenizer_config.json", "vocab.json"))


def _ifpruning_json(folder: Path) -> dict:
    path = folder / "ifpruning.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    pooling = values.get("pooling", "last")
    if pooling != "last":
        raise ConversionError(f"{path}: pooling {pooling!r} is not supported (only \"last\": the last prompt token)")
    return bundle_defaults(values, path)


def bundle_defaults(values: dict, path: Path) -> dict:
    """The bundle settings an ifpruning.json sets (default_density, pad_multiple, prefill),
    prefill checked to be one of bundle.PREFILLS."""
    if values.get("prefill", DEFAULT_PREFILL) not in PREFILLS:
        raise ConversionError(f"{path}: \"prefill\" must be one of {', '.join(PREFILLS)}, got {values['prefill']!r}")
    return {k: values[k] for k in ("default_density", "pad_multiple", "prefill") if k in values}


# -- checks --------------------------------------------------------------------------------------


def _expected_shapes(config: dict, what: str, rows: bool) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the (unquantized) mlx-lm model of `config`; `rows`: the
    prunable LLM, whose down_proj is [d_ffn, d_model]."""
    with conversion_errors(what):
        model = build_model(config, prunable=rows)  # parameters stay lazy: nothing is allocated
    return {name: tuple(p.shape) for name, p in nn.utils.tree_flatten(model.parameters())}


def _match_names(config: dict, expected, tensors: dict[str, TensorRef], what: str) -> dict[str, TensorRef]:
    """The tensors, minus rotary inv_freq buffers and a tied lm_head; exactly the expected names."""
    tied = config["tie_word_embeddings"]
    kept = {name: ref for name, ref in tensors.items()
            if not (name.endswith("rotary_emb.inv_freq") or (tied and name.startswith("lm_head.")))}
    problem = name_mismatch(expected, kept)
    if problem:
        raise ConversionError(f"{what}: {problem} ({config['model_type']}); is this the right checkpoint "
                              "for this config?")
    return kept


def _check_model(config: dict, tensors: dict[str, TensorRef], what: str, rows: bool) -> dict[str, TensorRef]:
    """Keep the tensors the mlx-lm model of `config` has; check names and shapes.

    Drops rotary inv_freq buffers, and lm_head when the embeddings are tied. `rows`: the
    model is the prunable LLM, whose down_proj the writer stores transposed.
    """
    expected = _expected_shapes(config, what, rows)
    kept = _match_names(config, expected, tensors, what)
    for name, ref in kept.items():
        shape = ref.shape[::-1] if rows and is_down_proj(name) else ref.shape
        if tuple(shape) != expected[name]:
            want = expected[name][::-1] if rows and is_down_proj(name) else expected[name]
            raise ConversionError(
                f"{ref.path.name}: tensor {ref.name!r} has shape {tuple(ref.shape)}, the config "
                f"implies {want}; the checkpoint and its config.json do not match"
            )
        if not ref.dtype.startswith(("float", "bfloat")):
            raise ConversionError(f"{ref.path.name}: tensor {ref.name!r} has dtype {ref.dtype}; expected floats")
    return kept


def _check_quantized(config: dict, quantization: dict, tensors: dict[str, TensorRef],
                     what: str) -> dict[str, TensorRef]:
    """An mlx-lm quantized LLM: names, shapes and dtypes against mlx-lm's model quantized as its
    config.json says, and what the row layout needs.

    The runtime's FFN rows are affine (any of MLX's widths) with groups along d_model, so
    down_proj's group size must divide d_model (its groups move from d_ffn to d_model). Every
    module keeps its own bits: mlx-lm's mixed recipes convert as written.
    """
    modules = [(None, quantization)] + [(k, v) for k, v in quantization.items() if isinstance(v, dict)]
    for module, params in modules:
        mode = params.get("mode", "affine")
        if mode != "affine":
            raise ConversionError(
                f"{what}: {mode} quantization{f' of {module}' if module else ''} cannot be converted: the "
                "runtime's FFN rows are affine; convert the float model (with --quantize 4|8)")
    d_model = config["hidden_size"]
    quantized = {name.removesuffix(".scales") for name in tensors if name.endswith(".scales")}
    expected, packed = {}, {}
    for name, shape in _expected_shapes(config, what, rows=False).items():
        base = name.removesuffix(".weight")
        if not (name.endswith(".weight") and base in quantized):
            expected[name] = shape
            continue
        q = module_quantization(quantization, base)
        bits, group = q.get("bits"), q.get("group_size")
        if bits is None or group is None:
            raise ConversionError(f"{what}: config.json's \"quantization\" gives no bits and group_size for {base}")
        if ".mlp." in name and bits not in FFN_BITS:
            raise ConversionError(
                f"{what}: {base} is {bits}-bit; the runtime's FFN rows are affine "
                f"{'/'.join(map(str, FFN_BITS))}-bit. Convert the float model with --quantize 4|8")
        if is_down_proj(name) and d_model % group:
            raise ConversionError(
                f"{what}: {base} is quantized in groups of {group}; in row layout its groups run along "
                f"d_model ({d_model}), which {group} does not divide")
        rows, cols = shape
        expected[name] = (rows, cols * bits // 32)
        expected[f"{base}.scales"] = expected[f"{base}.biases"] = (rows, cols // group)
        packed[name] = f"{bits}-bit, group {group}"
    kept = _match_names(config, expected, tensors, what)
    for name, ref in kept.items():
        module = name.rsplit(".", 1)[0]
        how = packed.get(f"{module}.weight")
        if tuple(ref.shape) != expected[name]:
            because = f"config.json's quantization of {module} ({how})" if how else "the config"
            raise ConversionError(
                f"{ref.path.name}: tensor {ref.name!r} has shape {tuple(ref.shape)}, {because} implies "
                f"{expected[name]}; the checkpoint and its config.json do not match")
        want = "uint32" if name in packed else "float"
        if not ref.dtype.startswith(("uint32",) if name in packed else ("float", "bfloat")):
            raise ConversionError(f"{ref.path.name}: tensor {ref.name!r} has dtype {ref.dtype}; expected {want}"
                                  + (" (affine quantization keeps its scales and biases in floats)" if how else ""))
    return kept


def _check_head(head: dict[str, TensorRef], d_pred: int, n_layers: int, d_ffn: int) -> dict[str, TensorRef]:
    mismatch = head_mismatch({name: ref.shape for name, ref in head.items()}, d_pred, n_layers, d_ffn)
    if mismatch:
        name, problem = mismatch
        source_name = {v: k for k, v in HEAD_KEYS.items()}[name]
        if problem is None:
            raise ConversionError(
                f"the predictor's head tensor {source_name!r} is missing; an IFPruning predictor has "
                "prediction_head1.{weight,bias} and prediction_head2.{weight,bias} (in head.safetensors "
                "next to the backbone, or in the predictor's state dict)")
        raise ConversionError(f"{head[name].path.name}: {source_name} {problem}; was this predictor "
                              "trained for this LLM?")
    return head
