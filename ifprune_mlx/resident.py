"""Resident mode: each layer's FFN holds only the rows it may keep; the rest stay in the bundle.

`load(path, resident="kept", max_density=d)` builds every layer's FFN with `capacity` =
kept_count(d) row slots instead of d_ffn (attention, norms, embeddings and the predictor are
loaded as usual). A slot holds one channel's rows (gate and up rows, down's row in the row
layout; weight, scales and biases rows together when quantized); `perm` maps slot -> channel.

Applying a selection S (|S| <= capacity) per layer:
  missing  = channels of S in no slot; they are read from the bundle's safetensors by byte
             range (a bundle stores every row array row-major, so a run of consecutive channel
             ids is one range of bytes; each row array's runs are read through one open file),
             BEFORE anything in the layer changes;
  victims  = slots whose channel is not in S (first those outside the current prefix, whose
             rows no computation uses) get the missing channels;
  then, as the full engine does with canonical=True, rounds of in-place swaps put S in
  ascending channel order in slots [0, |S|), and the rows read are written into the slots
  their channels end up in. Rows that stay resident are never read again. The kept prefix
  is the full engine's, row for row, so logits are the same for the same selection.

Transactional as prune.apply_selection: a read that fails (I/O error, a bundle that changed)
leaves the layers done so far swapped back; rows evicted from the previous prefix are read
again, so the previous selection computes as before. Before any read, the files' size, mtime
and header hash are compared with those at load (BundleChangedError).

The training-free selector's dense scoring pass (prune.observing sets k = d_ffn) streams the
channels that are not resident through each layer, in chunks of CHUNK_BYTES per row array,
evaluated layer by layer, so the whole FFN is never in memory.

Load reads the first `capacity` channels of every layer (one byte range per row array) and
computes on the first kept_count(default density) of them until a selection is applied.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu

from .bundle import DEFAULT_DENSITY, PAD_MULTIPLE, SAFETENSORS_DTYPES, file_stamp, read_row_runs, safetensors_header, weight_files
from .distributed import is_ffn_rows
from .errors import BundleChangedError, BundleError, ResidentError, SelectionError
from .prune import ApplyStats, PrunableMLP, QuantizedRowLinear, _host_view, _move_layer, _swap_layer, plan_canonical
from .quantized import quantized_product
from .selectors import Selection, check_density, kept_count

MODES = ("kept",)
CHUNK_BYTES = 16 * 2**20  # bytes of one row array streamed at a time in the scoring pass
GAP_BYTES = 32 * 2**10  # rows at most this far apart are read in one range
SPAN_BYTES = 8 * 2**20  # the most one read brings in at a time
_EMPTY = -1  # a slot whose rows could not be restored after a failed apply


def channel_runs(ids: np.ndarray, gap: int = 0, most: int | None = None) -> list[tuple[int, int]]:
    """Sorted channel ids -> ranges [start, stop) to read: runs of consecutive ids, merged when
    at most `gap` rows apart, split to at most `most` rows."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) > gap + 1) + 1
    starts = ids[np.r_[0, breaks]].tolist()
    stops = (ids[np.r_[breaks - 1, ids.size - 1]] + 1).tolist()
    step = most or max(stops)
    return [(a, min(stop, a + step)) for start, stop in zip(starts, stops) for a in range(start, stop, step)]


def _batches(runs: list[tuple[int, int]], most: int):
    """Consecutive runs grouped so that each group spans at most `most` rows (or one run)."""
    batch, rows = [], 0
    for run in runs:
        if batch and rows + run[1] - run[0] > most:
            yield batch
            batch, rows = [], 0
        batch.append(run)
        rows += run[1] - run[0]
    if batch:
        yield batch


class RowSource:
    """The FFN rows of a bundle's safetensors files, read by byte range, with a guard that the
    files are those that were loaded. Counts what it reads (bytes, seconds)."""

    def __init__(self, files: Sequence[Path]):
        self.where: dict[str, tuple[Path, dict]] = {}
        self.stamps: dict[Path, tuple] = {}
        for path in map(Path, files):
            self.stamps[path] = file_stamp(path)
            header = safetensors_header(path)
            self.where.update({name: (path, header) for name in header if is_ffn_rows(name)})
        self.bytes_read, self.read_seconds = 0, 0.0

    def total_bytes(self) -> int:
        """Bytes of every FFN row array in the files (the whole FFN)."""
        return sum(header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                   for name, (_, header) in self.where.items())

    def check(self) -> None:
        """Raise BundleChangedError if a file changed on disk (size, mtime or header) since load."""
        for path, stamp in self.stamps.items():
            try:
                now = file_stamp(path)
            except OSError as e:
                raise BundleChangedError(f"{path}: cannot be opened any more ({e.strerror or e}): it was moved or "
                                         "deleted while loaded; load the model again") from e
            if now != stamp:
                what = "size" if now[0] != stamp[0] else "modification time" if now[1] != stamp[1] else "header"
                raise BundleChangedError(
                    f"{path}: changed on disk since it was loaded (its {what} differs), so its rows may not "
                    "match those in memory; load the model again (the previous selection stays applied)")

    def read(self, name: str, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `ids` (sorted, distinct) of tensor `name`, in that order, as NumPy (into `out`
        when given: e.g. a view of an MLX array's buffer)."""
        if out is None:
            info = self.where[name][1][name]
            out = np.empty((len(ids), *info["shape"][1:]),
                           dtype="uint16" if info["dtype"] == "BF16" else SAFETENSORS_DTYPES[info["dtype"]][0])
        for part, rows in self.batches(name, ids):
            out[part] = rows
        return out

    def batches(self, name: str, ids: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        """Rows `ids` (sorted, distinct) of tensor `name` as (part, rows of ids[part]) pieces of
        at most SPAN_BYTES read each. Runs of ids closer than GAP_BYTES are read as one range
        (the gap's rows are dropped): fewer reads, and a cold disk reads sequentially."""
        path, header = self.where[name]
        info = header[name]
        row_bytes = max(1, (info["data_offsets"][1] - info["data_offsets"][0]) // max(1, info["shape"][0]))
        most = max(1, SPAN_BYTES // row_bytes)
        done = 0
        for batch in _batches(channel_runs(ids, GAP_BYTES // row_bytes, most), most):
            start = time.perf_counter()
            try:
                data = read_row_runs(path, header, name, batch)
            except OSError as e:
                raise ResidentError(f"{path}: reading {len(ids)} rows of {name} failed ({e.strerror or e}); "
                                    "the previous selection stays applied; check the disk and try again") from e
            finally:
                self.read_seconds += time.perf_counter() - start
            self.bytes_read += data.nbytes
            starts = np.array([a for a, _ in batch])
            offsets = np.cumsum([0] + [b - a for a, b in batch])[:-1]
            chunk = ids[done: np.searchsorted(ids, batch[-1][1])]
            at = np.searchsorted(starts, chunk, side="right") - 1
            yield slice(done, done + chunk.size), data[offsets[at] + chunk - starts[at]]
            done += chunk.size


def _as_mlx(rows: np.ndarray, like: mx.array) -> mx.array:
    """NumPy rows as an MLX array of `like`'s dtype (bfloat16 arrives as its uint16 bytes)."""
    out = mx.array(rows)
    return out if out.dtype == like.dtype else out.view(like.dtype)


def _row_product(module: nn.Module, x: mx.array, rows: dict[str, mx.array]) -> mx.array:
    """What `module` (a RowLinear or QuantizedRowLinear) computes with the given rows instead
    of its own: gate/up, x @ W.T (+ their bias rows); down (channel_in), h @ W (no bias:
    the resident part adds it once)."""
    n = rows["weight"].shape[0]
    if isinstance(module, QuantizedRowLinear):
        y = quantized_product(x, rows["weight"], rows["scales"], rows["biases"], n, group_size=module.group_size,
                              bits=module.bits, channel_in=module.channel_in)
    else:
        y = x @ rows["weight"] if module.channel_in else x @ rows["weight"].T
    return y + rows["bias"] if "bias" in rows else y


class ResidentMLP(PrunableMLP):
    """A PrunableMLP with `capacity` row slots for a d_ffn-channel FFN (perm: slot -> channel).

    Computes on its first k slots as PrunableMLP does; with k = d_ffn > capacity (the
    training-free selector's dense pass) it streams the other channels' rows from `source`.
    """

    def __init__(self, d_model: int, d_ffn: int, capacity: int, bias: bool = False):
        super().__init__(d_model, capacity, bias)
        self.d_ffn, self.capacity = d_ffn, capacity
        self.source: RowSource | None = None
        self.prefix = ""  # this MLP's tensor names' prefix in the bundle, e.g. "model.layers.3.mlp"

    def __call__(self, x: mx.array) -> mx.array:
        if self.k <= self.capacity:
            return super().__call__(x)
        return self._streamed(x)

    def row_tensors(self) -> list[tuple[nn.Module, str, str]]:
        """(module, array name, tensor name in the bundle) of every row array."""
        return [(getattr(self, proj), name, f"{self.prefix}.{proj}.{name}")
                for proj in ("gate_proj", "up_proj", "down_proj") for name in getattr(self, proj).row_arrays()]

    def missing(self) -> np.ndarray:
        """Channels in no slot, ascending."""
        return np.setdiff1d(np.arange(self.d_ffn), self.perm)

    def channel_order(self) -> np.ndarray:
        """The dense pass's order (observers see all channels): the slots, then missing()."""
        return np.concatenate([self.perm, self.missing()])

    def _streamed(self, x: mx.array) -> mx.array:
        """The dense FFN: the resident slots, then the missing channels read chunk by chunk
        (each chunk evaluated before the next is read, so at most one is in memory)."""
        if self.source is None or (self.perm == _EMPTY).any():
            raise ResidentError("this layer cannot run dense: its rows are not all known; apply a selection first")
        h = swiglu(self.gate_proj(x, self.capacity), self.up_proj(x, self.capacity))
        out = self.down_proj(h, self.capacity)
        parts = [h]
        missing = self.missing()
        tensors = self.row_tensors()
        row_bytes = max(module[name][0].nbytes for module, name, _ in tensors)
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        for i in range(0, missing.size, step):
            ids = missing[i:i + step]
            rows: dict[str, dict[str, mx.array]] = {"gate_proj": {}, "up_proj": {}, "down_proj": {}}
            for module, name, tensor in tensors:
                rows[tensor.split(".")[-2]][name] = _as_mlx(self.source.read(tensor, ids), module[name])
            hc = swiglu(_row_product(self.gate_proj, x, rows["gate_proj"]),
                        _row_product(self.up_proj, x, rows["up_proj"]))
            out = out + _row_product(self.down_proj, hc, rows["down_proj"])
            parts.append(hc)
            mx.eval(out, hc)
        h = mx.concatenate(parts, axis=-1)
        if self.observer is not None:
            self.observer(h)
        return out


def plan_layer(perm: np.ndarray, k_now: int, keep: np.ndarray, d_ffn: int) -> tuple[np.ndarray, np.ndarray, list]:
    """How one layer takes selection `keep` (sorted ids): (incoming channels to read, ascending;
    perm with their slots relabelled; canonical swap rounds on that perm).

    Victim slots for the incoming channels: empty ones first, then those past the prefix
    (no computation uses their rows), then prefix slots, each by position. Empty slots beyond
    what `keep` needs are refilled with the lowest channels in no slot.
    """
    keep = np.asarray(keep, dtype=np.int64)
    empty = perm == _EMPTY
    missing = np.setdiff1d(keep, perm[~empty])
    free = np.flatnonzero(~np.isin(perm, keep))
    rank = np.where(empty[free], 0, np.where(free >= k_now, 1, 2))
    victims = free[np.lexsort((free, rank))][:max(missing.size, int(empty.sum()))]
    extra = victims.size - missing.size
    if extra:
        spare = np.setdiff1d(np.arange(d_ffn), np.concatenate([perm, keep]))
        missing = np.sort(np.concatenate([missing, spare[:extra]]))
    new_perm = perm.copy()
    new_perm[victims] = missing
    ordered = np.sort(new_perm)
    local = np.searchsorted(ordered, new_perm)  # slot -> rank of its channel: a permutation of slots
    rounds = plan_canonical(local, np.searchsorted(ordered, keep))
    return missing, new_perm, rounds


def _write_rows(module: nn.Module, name: str, slots: np.ndarray, rows: np.ndarray) -> None:
    """module[name][slots] = rows, in the array's own buffer (prune._swap_rows' ways)."""
    w = module[name]
    mx.eval(w)
    mx.synchronize()  # nothing in flight still reads the rows we overwrite
    host = _host_view(w)
    if host is not None:
        host[slots] = rows
        return
    w[mx.array(slots.astype(np.int32))] = _as_mlx(rows, w)
    mx.eval(w)


def _slots_of(perm: np.ndarray, channels: np.ndarray) -> np.ndarray:
    where = {int(c): i for i, c in enumerate(perm)}
    return np.array([where[int(c)] for c in channels], dtype=np.int64)


class Residency:
    """Resident mode of one engine: the capacity, the bundle's rows, and applies that read them.

    Attributes:
        capacity: row slots per layer (kept_count(max_density)); d_ffn: channels per layer.
        max_density: the density the capacity was made for. source: the RowSource.
    """

    def __init__(self, files: Sequence[Path], d_ffn: int, capacity: int, max_density: float):
        self.d_ffn, self.capacity, self.max_density = d_ffn, capacity, max_density
        self.source = RowSource(files)

    def ffn_bytes(self) -> int:
        """Bytes of the whole FFN's rows in the bundle."""
        return self.source.total_bytes()

    # -- loading -------------------------------------------------------------------------

    def shape_model(self, model: nn.Module, bias: bool) -> None:
        """Give every layer a ResidentMLP of `capacity` slots."""
        for layer in model.layers:
            d_model = layer.mlp.down_proj.weight.shape[1]
            layer.mlp = ResidentMLP(d_model, self.d_ffn, self.capacity, bias)

    def local_weights(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The weights with every FFN row array cut to its first `capacity` rows, read from the
        files by byte range (the others are never read); the rest as given (lazy)."""
        missing = [name for name in weights if is_ffn_rows(name) and name not in self.source.where]
        if missing:
            raise BundleError(f"tensor {missing[0]!r} is in no weight file the bundle lists; re-convert the model")
        first = np.arange(self.capacity)
        return {name: self._first_rows(name, value, first) if is_ffn_rows(name) else value
                for name, value in weights.items()}

    def _first_rows(self, name: str, like: mx.array, ids: np.ndarray) -> mx.array:
        """Rows `ids` of tensor `name` as an MLX array of like's dtype, read into its buffer."""
        rows = mx.zeros((ids.size, *like.shape[1:]), dtype=like.dtype)
        mx.eval(rows)
        host = _host_view(rows)
        if host is None:
            return _as_mlx(self.source.read(name, ids), like)
        self.source.read(name, ids, out=host)
        return rows

    def attach(self, model: nn.Module) -> None:
        """Tell every ResidentMLP where its rows are (after the model's weights are loaded)."""
        for name, module in model.named_modules():
            if isinstance(module, ResidentMLP):
                module.source, module.prefix = self.source, name

    # -- applying ------------------------------------------------------------------------

    def check_counts(self, kept: Sequence[int], what: str | None = None) -> None:
        """ResidentError if a layer would keep more channels than it has slots (`what`: the
        density asked for, named in the message)."""
        over = [(layer, n) for layer, n in enumerate(kept) if n > self.capacity]
        if over:
            layer, n = over[0]
            asked = f"{what} keeps {n} channels per layer" if what else f"layer {layer} would keep {n} channels"
            raise ResidentError(
                f"{asked}, but this resident model holds at most {self.capacity} per layer (max_density "
                f"{self.max_density:.2f}); use a lower density, or load with a higher --max-density "
                "(or without --resident)")

    def start(self, mlps: list[ResidentMLP], k: int) -> Selection:
        """After load (slots = the first `capacity` channels): compute on the first k; that Selection."""
        for mlp in mlps:
            mlp.k = k
        return Selection(tuple(np.arange(k) for _ in mlps), self.d_ffn, source="initial")

    def intact(self, mlps: list[ResidentMLP]) -> bool:
        """Whether every slot's rows are known (False after an apply failed and could not restore)."""
        return not any((mlp.perm == _EMPTY).any() for mlp in mlps)

    def _keep(self, mlps: list[ResidentMLP], keep: list[np.ndarray] | None) -> list[np.ndarray]:
        """Per-layer ids to keep; None (dense) only when every row fits."""
        if keep is not None:
            return [np.asarray(ids, dtype=np.int64) for ids in keep]
        if self.capacity < self.d_ffn:
            raise ResidentError(
                f"the dense model (density 1.0) needs all {self.d_ffn} FFN rows per layer, and this resident "
                f"model holds {self.capacity} (max_density {self.max_density:.2f}); load it without "
                "--resident, or with --max-density 1")
        return [np.arange(self.d_ffn)] * len(mlps)

    def rows_to_read(self, mlps: list[ResidentMLP], keep: list[np.ndarray] | None) -> int:
        """Rows apply(mlps, keep) would read now (nothing moves; None: every channel, which
        apply refuses when they do not fit)."""
        keep = [np.arange(self.d_ffn)] * len(mlps) if keep is None else keep
        return sum(np.setdiff1d(ids, mlp.perm).size for mlp, ids in zip(mlps, keep))

    def apply(self, mlps: list[ResidentMLP], keep: list[np.ndarray] | None) -> ApplyStats:
        """Make every layer compute on exactly its `keep` channels (sorted ids; None: all, if
        they fit), in ascending channel order, reading the missing rows. Transactional (see the
        module docstring)."""
        keep = self._keep(mlps, keep)
        if len(keep) != len(mlps):
            raise SelectionError(f"selection has {len(keep)} layers, the model has {len(mlps)}")
        self.check_counts([len(ids) for ids in keep])
        self.source.check()
        start = time.perf_counter()
        bytes0, read0 = self.source.bytes_read, self.source.read_seconds
        done: list[tuple[ResidentMLP, np.ndarray, int, list]] = []
        swaps, rows = [], 0
        try:
            for mlp, ids in zip(mlps, keep):
                incoming, rounds = self._apply_layer(mlp, ids, done)
                swaps.append(sum(len(a) for a, _ in rounds))
                rows += incoming.size
        except BaseException:
            self._undo(done)
            raise
        return ApplyStats(swaps, time.perf_counter() - start, rows_read=rows,
                          bytes_read=self.source.bytes_read - bytes0,
                          read_seconds=self.source.read_seconds - read0)

    def _apply_layer(self, mlp: ResidentMLP, keep: np.ndarray, done: list) -> tuple[np.ndarray, list]:
        """One layer of apply(): relabel the victim slots, swap into canonical order, then read
        the incoming rows into their slots a piece at a time (no layer-sized buffer). Once its
        rows move it joins `done`, whose undo swaps them back and reads the evicted rows again."""
        incoming, new_perm, rounds = plan_layer(mlp.perm, mlp.k, keep, self.d_ffn)
        old_perm, old_k = mlp.perm, mlp.k
        mlp.perm = new_perm
        try:
            _move_layer(mlp, rounds)  # undoes its own rounds on failure
        except BaseException:
            mlp.perm = old_perm
            raise
        done.append((mlp, old_perm, old_k, rounds))
        if incoming.size:
            slots = _slots_of(mlp.perm, incoming)
            for module, name, tensor in mlp.row_tensors():
                for part, rows in self.source.batches(tensor, incoming):
                    _write_rows(module, name, slots[part], rows)
        mlp.k = keep.size
        return incoming, rounds

    def _undo(self, done: list) -> None:
        """Put the layers in `done` back to their previous selection (newest first): swaps
        undone, and the slots that took new channels read back (the rows evicted from them).
        If that read fails too, those slots are marked empty (the next apply refills them) and
        a ResidentError says the previous selection is lost."""
        failed = None
        for mlp, old_perm, old_k, rounds in reversed(done):
            for a, b in reversed(rounds):
                _swap_layer(mlp, a, b)
            changed = mlp.perm != old_perm
            mlp.perm[changed & (old_perm == _EMPTY)] = _EMPTY
            lost = np.flatnonzero(changed & (old_perm != _EMPTY))
            try:
                if lost.size:
                    channels = old_perm[lost]
                    order = np.argsort(channels)
                    for module, name, tensor in mlp.row_tensors():
                        _write_rows(module, name, lost[order], self.source.read(tensor, channels[order]))
                mlp.perm[lost] = old_perm[lost]
            except Exception as e:
                mlp.perm[lost] = _EMPTY
                failed = failed or e
            mlp.k = old_k
        if failed is not None:
            raise ResidentError(f"an apply failed and the previous selection could not be read back ({failed}); "
                                "apply a selection again once the bundle can be read") from failed


def residency_for(folder: Path, config: dict, block: dict | None, max_density: float | None) -> Residency:
    """Resident mode for the bundle in `folder` (its config and "ifpruning" block): capacity =
    kept_count(max_density), by default the bundle's default density's."""
    if block is None:
        raise ResidentError(f"{folder}: a plain model folder; resident mode reads FFN rows by byte range from a "
                            f"bundle's row layout: convert it once (`ifprune convert {folder} BUNDLE`) and load the bundle")
    density = check_density(block.get("default_density") or DEFAULT_DENSITY if max_density is None else max_density)
    d_ffn = int(config["intermediate_size"])
    capacity = kept_count(density, d_ffn, block.get("pad_multiple", PAD_MULTIPLE))
    return Residency(weight_files(folder), d_ffn, capacity, density)


def describe(engine) -> str:
    """A line on an engine's resident mode for `info` and /stats ("off" for a full-memory engine)."""
    residency = engine.residency
    if residency is None:
        return "off (the whole model in memory)"
    held = sum(v.nbytes for mlp in engine.mlps for _, v in nn.utils.tree_flatten(mlp.parameters()))
    return (f"kept: {residency.capacity} of {residency.d_ffn} FFN rows per layer in memory (max density "
            f"{residency.max_density:.2f}), {held / 1e6:.1f} MB of the bundle's {residency.ffn_bytes() / 1e6:.1f} MB "
            "of FFN rows; the rows a selection adds are read from the bundle")


def read_cost(stats: ApplyStats) -> str:
    """What an apply read: e.g. "read 5.3 MB (1024 rows) in 4.1 ms"."""
    return f"read {stats.bytes_read / 1e6:.1f} MB ({stats.rows_read} rows) in {stats.read_seconds * 1e3:.1f} ms"
