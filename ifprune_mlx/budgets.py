"""Per-layer budgets: how many FFN channels each layer keeps at a given average density.

Uniform pruning keeps k = kept_count(density) channels in every layer. Layers are not equally
sensitive, so a budget moves channels from layers whose pruning costs little to layers whose
pruning costs most, with the same total (the same FFN bytes read per token).

The allocation is TEAL-style (Liu et al. 2024, "Training-free activation sparsity"): per-layer
loss curves measured on calibration prompts, and a greedy that spends channels where they lower
the summed loss most. Layer l's curve, loss[l][s] for the s-th kept count of steps(), is

    KL_l(k_ref) * e_l(k) / e_l(k_ref),   e_l(k) = sum_t ||y_t - y_t(top k)||^2 / sum_t ||y_t||^2:

the model's KL to dense when layer l alone keeps k_ref channels (one batched pass measures it
for every layer), carried along the layer's own output error e_l, which the same pass gives for
every k (channels in the selector's order for the prompt). One measured sensitivity per layer
and a free curve shape, instead of a greedy by the whole model's marginal KL (a pass per layer
and step); the sensitivity matters: e_l alone (tried first) starves the last layer and raises
the KL. Whether the budgets help is measured, not assumed: calibrate.py compares them with
uniform at equal average density on prompts that did not set them, and turns them on only
where they lower the KL.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .errors import BundleError
from .selectors import kept_count

METHOD = "teal-error-greedy"


def steps(d_ffn: int, pad_multiple: int) -> list[int]:
    """The kept counts a layer budget may take: multiples of pad_multiple below d_ffn, and d_ffn."""
    pad = max(1, pad_multiple)
    return [*range(pad, d_ffn, pad), d_ffn]


def allocate(loss: np.ndarray, total: int, d_ffn: int, pad_multiple: int) -> list[int]:
    """Kept channels per layer that sum to `total` (exactly when d_ffn is a multiple of
    pad_multiple; never above), greedily minimising the summed loss.

    loss: [n_layers, len(steps(d_ffn, pad_multiple))], the loss of each layer at each step.
    Every layer keeps at least the first step; a step is taken where it lowers the summed loss
    most (ties: the lower layer): optimal for convex curves. The result is each layer's count,
    in steps(d_ffn, pad_multiple).
    """
    grid = steps(d_ffn, pad_multiple)
    loss = np.asarray(loss, dtype=np.float64)
    n_layers = loss.shape[0]
    if loss.shape != (n_layers, len(grid)):
        raise ValueError(f"loss must be [n_layers, {len(grid)}], got {loss.shape}")
    level = [0] * n_layers
    spent = n_layers * grid[0]
    if total <= spent:
        return [grid[0]] * n_layers

    def push(heap, layer):
        s = level[layer]
        if s + 1 < len(grid):
            heapq.heappush(heap, (-(loss[layer, s] - loss[layer, s + 1]), layer))

    heap: list = []
    for layer in range(n_layers):
        push(heap, layer)
    while heap:
        _, layer = heapq.heappop(heap)
        cost = grid[level[layer] + 1] - grid[level[layer]]
        if spent + cost > total:
            continue  # this layer's next step does not fit; others (smaller steps) may
        level[layer] += 1
        spent += cost
        push(heap, layer)
    return [grid[s] for s in level]


@dataclass
class LayerBudgets:
    """Per-layer loss curves from calibration, and whether the engine uses them.

    loss[l][s]: the estimated KL (nats) of layer l alone keeping steps(d_ffn, pad_multiple)[s]
    channels, mean over the budget prompts (see the module docstring). counts(density)
    allocates from them.
    """

    selector: str
    prompts: int
    pad_multiple: int
    loss: list[list[float]]
    enabled: bool = False
    method: str = METHOD

    def counts(self, density: float, d_ffn: int) -> list[int]:
        """Kept channels per layer at `density`: the uniform total L * kept_count(density), allocated."""
        total = len(self.loss) * kept_count(density, d_ffn, self.pad_multiple)
        return allocate(np.asarray(self.loss), total, d_ffn, self.pad_multiple)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, n_layers: int, d_ffn: int, where: str) -> "LayerBudgets":
        """Check a stored block against the model (layers, steps, finite losses), else BundleError."""
        try:
            budgets = cls(**data)
        except TypeError as e:
            raise BundleError(f"{where}: layer_budgets is malformed ({e}); run `ifprune calibrate` again") from None
        if not isinstance(budgets.pad_multiple, int) or budgets.pad_multiple < 1:
            raise BundleError(f"{where}: layer_budgets.pad_multiple must be a positive integer, "
                              f"got {budgets.pad_multiple!r}")
        width = len(steps(d_ffn, budgets.pad_multiple))
        try:
            errors = np.asarray(budgets.loss, dtype=np.float64)
        except (TypeError, ValueError):
            errors = np.zeros(0)
        if errors.shape != (n_layers, width):
            raise BundleError(f"{where}: layer_budgets.loss must be {n_layers} layers x {width} numbers "
                              f"(this model's layers and kept-count steps), got {errors.shape if errors.ndim == 2 else 'no table'}; "
                              "run `ifprune calibrate` again")
        if not np.isfinite(errors).all() or (errors < 0).any():
            raise BundleError(f"{where}: layer_budgets.loss holds negative or non-finite values; "
                              "run `ifprune calibrate` again")
        if not isinstance(budgets.enabled, bool):
            raise BundleError(f"{where}: layer_budgets.enabled must be true or false, got {budgets.enabled!r}")
        return budgets


def layer_errors(h: "mx.array", down, order: np.ndarray, grid: Sequence[int]) -> tuple[np.ndarray, float]:
    """Summed squared output error of one FFN layer at each kept count of `grid`, and the
    summed squared output, over the tokens of h.

    h: [T, d_ffn] activations (position order); down: the layer's down_proj (RowLinear or
    QuantizedRowLinear, rows in position order); order: positions by decreasing score.
    """
    import mlx.core as mx

    w = down.weight
    if "scales" in down:
        w = mx.dequantize(w, down.scales, down.biases, group_size=down.group_size, bits=down.bits)
    idx = mx.array(order.astype(np.int32))
    hs, ws = h.astype(mx.float32)[:, idx], w.astype(mx.float32)[idx]
    bounds = [0, *grid]
    partial = mx.stack([hs[:, a:b] @ ws[a:b] for a, b in zip(bounds[:-1], bounds[1:])])  # [S, T, d]
    kept = mx.cumsum(partial, axis=0)
    full = kept[-1]
    err = mx.sum(mx.square(full[None] - kept), axis=(1, 2))
    return np.array(err, dtype=np.float64), float(mx.sum(mx.square(full)).item())
