"""The sparsity predictor: a small LM backbone and a two-layer head.

scores = head2(head1(h)) reshaped layer-major to [n_layers, d_ffn], where h is the
backbone's last hidden state (after its final norm) at the prompt's last token. The
prompt is the raw user text, tokenized with the predictor's tokenizer and its default
special tokens (no chat template).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .bundle import SAFETENSORS_DTYPES, read_config, read_row_runs, read_safetensors, safetensors_header, weight_files
from .errors import BundleError, PredictorError
from .models import build_model, load_weights, quantize_like

HEAD_WIDTH = 128


def head_shapes(d_model: int, n_layers: int, d_ffn: int) -> dict[str, tuple[int, ...]]:
    """The head's tensors and their shapes, for a backbone of width d_model and an LLM of
    n_layers x d_ffn FFN channels (head.safetensors holds exactly these)."""
    return {"head1.weight": (HEAD_WIDTH, d_model), "head1.bias": (HEAD_WIDTH,),
            "head2.weight": (n_layers * d_ffn, HEAD_WIDTH), "head2.bias": (n_layers * d_ffn,)}


def head_mismatch(shapes: dict[str, tuple[int, ...]], d_model: int, n_layers: int,
                  d_ffn: int) -> tuple[str, str | None] | None:
    """The first head tensor that does not fit (head_shapes): (its name, None if it is missing,
    else what is wrong with its shape); None when every tensor fits."""
    for name, shape in head_shapes(d_model, n_layers, d_ffn).items():
        if name not in shapes:
            return name, None
        if tuple(shapes[name]) != shape:
            return name, (f"has shape {tuple(shapes[name])}, expected {shape} for an LLM with "
                          f"{n_layers} layers x {d_ffn} FFN channels and a predictor of width {d_model}")
    return None


class Predictor(nn.Module):
    """Backbone + head mapping a prompt's token ids to channel scores [n_layers, d_ffn]."""

    def __init__(self, backbone: nn.Module, d_model: int, n_layers: int, d_ffn: int):
        super().__init__()
        self.backbone = backbone
        self.head1 = nn.Linear(d_model, HEAD_WIDTH)
        self.head2 = nn.Linear(HEAD_WIDTH, n_layers * d_ffn)
        self.n_layers, self.d_ffn = n_layers, d_ffn

    def __call__(self, tokens: mx.array) -> mx.array:
        h = self.backbone.model(tokens[None])[0, -1]  # (d_model,) last token, after final norm
        scores = self.head2(self.head1(h.astype(self.head1.weight.dtype)))
        return scores.reshape(self.n_layers, self.d_ffn)

    def scores(self, tokens: list[int]) -> np.ndarray:
        """Channel scores of one prompt as float32 numpy, [n_layers, d_ffn]."""
        if not tokens:
            raise PredictorError("the predictor needs a non-empty prompt")
        out = self(mx.array(tokens, dtype=mx.int32)).astype(mx.float32)
        return np.array(out)


def load_predictor(folder: Path, n_layers: int, d_ffn: int, llm: nn.Module | None = None) -> Predictor:
    """Load predictor/ of a bundle and check that its head fits an LLM of this shape.

    llm: the loaded LLM, whose arrays the backbone uses where the files hold the same values
    (share_llm_weights; those are never read whole).
    """
    folder = Path(folder)
    try:
        config = read_config(folder)
        backbone = build_model(config, prunable=False)
        files = weight_files(folder)
        weights = read_safetensors(files)
        if llm is not None:
            weights = share_llm_weights(weights, files, llm)
    except BundleError as e:
        raise PredictorError(f"predictor: {e}") from e
    if "quantization" in config:
        quantize_like(backbone, config["quantization"], weights)
    load_weights(backbone, weights, str(folder))

    head_path = folder / "head.safetensors"
    if not head_path.is_file():
        raise PredictorError(f"{head_path}: missing; the predictor needs its head weights")
    head = read_safetensors([head_path])
    d_model = config["hidden_size"]
    mismatch = head_mismatch({name: value.shape for name, value in head.items()}, d_model, n_layers, d_ffn)
    if mismatch:
        name, problem = mismatch
        raise PredictorError(f"{head_path}: tensor {name!r} is missing" if problem is None else
                             f"{head_path}: {name} {problem}; this predictor was trained for another LLM")
    predictor = Predictor(backbone, d_model, n_layers, d_ffn)
    predictor.head1.update({"weight": head["head1.weight"], "bias": head["head1.bias"]})
    predictor.head2.update({"weight": head["head2.weight"], "bias": head["head2.bias"]})
    mx.eval(predictor.parameters())
    return predictor


def share_llm_weights(weights: dict[str, mx.array], files, llm: nn.Module) -> dict[str, mx.array]:
    """The predictor's (lazily loaded) `weights` with the LLM's own arrays in place of those the
    files hold equal (same name, shape, dtype and values), compared a block of rows at a time
    read from the files by byte range, so the predictor's copy is never loaded: an IFPruning
    predictor built from the LLM's first layers holds its embedding table and attention again
    (SmolLM2: 113 MB of embeddings). FFN weights are never shared: the engine moves the LLM's
    rows in place."""
    ours = dict(tree_flatten(llm.parameters()))
    out = dict(weights)
    for path in map(Path, files):
        header = safetensors_header(path)
        for name, info in header.items():
            mine = ours.get(name)
            if (mine is None or ".mlp." in name or tuple(info["shape"]) != tuple(mine.shape)
                    or SAFETENSORS_DTYPES[info["dtype"]][0] != str(mine.dtype).split(".")[-1]):
                continue
            if _equal_to_file(mine, path, header, name):
                out[name] = mine
    return out


def _equal_to_file(a: mx.array, path: Path, header: dict, name: str, block_bytes: int = 8 << 20) -> bool:
    """a equals tensor `name` of the file, compared a block of rows at a time (no full-size copy)."""
    if a.ndim == 0:
        return False
    step = max(1, block_bytes // max(1, a[0].nbytes))
    for i in range(0, a.shape[0], step):
        ours = a[i: i + step]
        if ours.dtype == mx.bfloat16:
            ours = ours.view(mx.uint16)
        if not np.array_equal(np.array(ours), read_row_runs(path, header, name, [(i, min(a.shape[0], i + step))])):
            return False
    return True
