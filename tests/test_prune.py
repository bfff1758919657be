"""The in-place selection engine: exactness, memory, cost proportional to the change."""

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ifprune_mlx as ifp
from ifprune_mlx.bench.machine import resident_memory
from ifprune_mlx.models import build_model
from ifprune_mlx.prune import QuantizedRowLinear, RowLinear, apply_selection, plan_canonical, plan_swaps
from ifprune_mlx.testing import make_bundle, model_config

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 64]])
# Over quantized.DEQUANTIZE_ROWS: quantized products take the dequantize-then-BLAS path on the CPU.
LONG_TOKENS = mx.array([[(37 * i + 5) % 251 for i in range(40)]])


def zeroed_reference(reference, selection):
    """Make `reference` (a dense, never permuted engine) compute with only `selection` kept,
    by zeroing the gate rows (weights, or scales and biases) of the dropped channels."""
    for mlp, pristine, keep in zip(reference.mlps, reference._pristine, selection):
        mask = np.zeros(mlp.d_ffn, dtype=np.float32)
        mask[np.arange(mlp.d_ffn) if keep is None else keep] = 1
        mask = mx.array(mask)[:, None]
        for name, value in pristine.items():
            mlp.gate_proj[name] = value * mask.astype(value.dtype)


def make_reference(path):
    reference = ifp.load(path)
    names = ["scales", "biases"] if isinstance(reference.mlps[0].gate_proj, QuantizedRowLinear) else ["weight"]
    reference._pristine = [{n: mlp.gate_proj[n] for n in names} for mlp in reference.mlps]
    return reference


@pytest.fixture(scope="module", params=["float32", "4-bit", "3-bit", "6-bit"])
def engines(request, bundle_dir, q4_bundle_dir, tmp_path_factory):
    if request.param == "float32":
        path = bundle_dir
    elif request.param == "4-bit":
        path = q4_bundle_dir
    else:  # every affine width MLX has works in row layout; these two pack rows unevenly
        bits = int(request.param[0])
        path = make_bundle(tmp_path_factory.mktemp("bits") / f"q{bits}", quantize_bits=bits)
    return ifp.load(path), make_reference(path)


def random_selection(rng, n_layers, d_ffn):
    return [np.sort(rng.choice(d_ffn, size=int(rng.integers(1, d_ffn + 1)), replace=False))
            for _ in range(n_layers)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seeds=st.lists(st.one_of(st.none(), st.integers(0, 2**31)), min_size=1, max_size=5))
def test_pruned_equals_dense_with_dropped_channels_zeroed(engines, seeds):
    engine, reference = engines
    for seed in seeds:
        if seed is None:
            keep = [None] * engine.n_layers
            engine.apply(None)
        else:
            keep = random_selection(np.random.default_rng(seed), engine.n_layers, engine.d_ffn)
            engine.apply(keep)
            assert [m.kept_ids().tolist() for m in engine.mlps] == [k.tolist() for k in keep]
        zeroed_reference(reference, keep)
        for tokens in (TOKENS, LONG_TOKENS):
            diff = mx.abs(engine.model(tokens) - reference.model(tokens)).max().item()
            assert diff <= 1e-4


def test_apply_a_b_a_equals_a_fresh(bundle_dir):
    rng = np.random.default_rng(0)
    engine = ifp.load(bundle_dir)
    a = random_selection(rng, engine.n_layers, engine.d_ffn)
    b = random_selection(rng, engine.n_layers, engine.d_ffn)
    for sel in (a, b, a):
        engine.apply(sel)
    fresh = ifp.load(bundle_dir)
    fresh.apply(a)
    assert mx.abs(engine.model(TOKENS) - fresh.model(TOKENS)).max().item() <= 1e-5


def test_float_pruned_matches_mlx_lm_with_zeroed_channels(plain_dir):
    """Against mlx-lm's own MLP: drop channels by zeroing gate rows of the original weights."""
    from mlx_lm import load as mlx_lm_load

    engine = ifp.load(plain_dir)
    model, _ = mlx_lm_load(str(plain_dir))
    keep = random_selection(np.random.default_rng(1), engine.n_layers, engine.d_ffn)
    engine.apply(keep)
    for layer, ids in zip(model.layers, keep):
        mask = np.zeros(engine.d_ffn, dtype=np.float32)
        mask[ids] = 1
        layer.mlp.gate_proj.weight = layer.mlp.gate_proj.weight * mx.array(mask)[:, None]
    assert mx.abs(engine.model(TOKENS) - model(TOKENS)).max().item() <= 1e-4


def test_plan_swaps_moves_only_what_changes():
    perm = np.arange(10)
    incoming, outgoing = plan_swaps(perm, np.array([0, 1, 7]))
    assert incoming.tolist() == [7] and outgoing.tolist() == [2]
    assert [len(x) for x in plan_swaps(perm, np.arange(4))] == [0, 0]


def big_mlps(d_model=512, d_ffn=2048, layers=4):
    """Prunable MLPs of a ~50 MB model with random weights, built in memory."""
    config = model_config(hidden_size=d_model, intermediate_size=d_ffn, num_hidden_layers=layers)
    model = build_model(config)
    mx.random.seed(0)
    for layer in model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            proj.weight = mx.random.normal(proj.weight.shape)
    mx.eval(model.parameters())
    return model, [layer.mlp for layer in model.layers]


def test_apply_writes_in_place_without_copying_weights():
    """Neither MLX's peak nor the process's resident memory grows by a copy of any weight (a
    copy of one matrix of this model would be 6.5% of its weights)."""
    _, tiny = big_mlps(d_model=64, d_ffn=256, layers=2)
    apply_selection(tiny, [np.arange(0, 256, 3)] * 2)  # first-call costs (imports, probes) paid here
    model, mlps = big_mlps()
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert weight_bytes >= 50e6
    rng = np.random.default_rng(0)
    d_ffn = mlps[0].d_ffn
    mx.eval(model.parameters())
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    rss_before, _ = resident_memory(reset_peak=True)  # the NumPy swap path allocates outside MLX
    for _ in range(3):
        apply_selection(mlps, [np.sort(rng.choice(d_ffn, d_ffn // 3, replace=False)) for _ in mlps])
    growth = mx.get_peak_memory() - before
    rss_growth = resident_memory()[1] - rss_before
    assert growth < 0.02 * weight_bytes, f"apply grew MLX memory by {growth / weight_bytes:.1%} of the weights"
    # malloc's own growth for the swap's row buffers measures 0.2-2.1% here; one copy, 6.8%
    assert rss_growth < 0.04 * weight_bytes, f"apply grew resident memory by {rss_growth / weight_bytes:.1%} of the weights"


@pytest.mark.parametrize("changed", [0, 32, 256, 682])
def test_apply_cost_is_the_number_of_changed_channels(changed):
    _, mlps = big_mlps(d_model=64, d_ffn=2048, layers=3)
    rng = np.random.default_rng(changed)
    d_ffn, k = 2048, 682
    first = [np.sort(rng.choice(d_ffn, k, replace=False)) for _ in mlps]
    apply_selection(mlps, first)
    second = []
    for ids in first:
        dropped = rng.choice(ids, changed, replace=False)
        added = rng.choice(np.setdiff1d(np.arange(d_ffn), ids), changed, replace=False)
        second.append(np.sort(np.concatenate([np.setdiff1d(ids, dropped), added])))
    stats = apply_selection(mlps, second)
    assert stats.swaps_per_layer == [changed] * len(mlps)


@pytest.mark.parametrize("deterministic", [True, False])
def test_failed_apply_rolls_back_every_layer(bundle_dir, monkeypatch, deterministic):
    import ifprune_mlx.prune as prune

    engine = ifp.load(bundle_dir, deterministic=deterministic)
    engine.apply([np.arange(64)] * engine.n_layers)
    before_text = engine.generate("hello", max_tokens=8)
    before_perm = [m.perm.copy() for m in engine.mlps]
    real, calls = prune._swap_rows, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 5:  # fail in the second layer, after the first layer moved
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(prune, "_swap_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        engine.apply([np.arange(100, 200)] * engine.n_layers)
    monkeypatch.setattr(prune, "_swap_rows", real)
    assert all((m.perm == p).all() for m, p in zip(engine.mlps, before_perm))
    assert [m.k for m in engine.mlps] == [64] * engine.n_layers
    assert engine.generate("hello", max_tokens=8) == before_text


def test_quantized_rows_match_quantizing_sliced_rows():
    w = mx.random.normal((128, 64))
    layer = RowLinear(*w.shape)
    layer.weight = w
    q = QuantizedRowLinear.from_row_linear(layer, 32, 4)
    wq, s, b = mx.quantize(w[:40], group_size=32, bits=4)
    assert mx.array_equal(q.weight[:40], wq) and mx.array_equal(q.scales[:40], s)



@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("channel_in", [False, True])
def test_dequantized_matmul_equals_quantized_matmul(bits, channel_in, monkeypatch):
    import ifprune_mlx.quantized as prune

    monkeypatch.setattr(prune, "DEQUANTIZE_BLOCK_BYTES", 4 * 64 * 40)  # blocks of 40 rows
    w, s, b = mx.quantize(mx.random.normal((160, 64), key=mx.random.key(bits)), group_size=32, bits=bits)
    k = 130  # a prefix, in blocks of 40, 40, 40, 10
    x = mx.random.normal((1, 40, k if channel_in else 64), key=mx.random.key(1))
    want = mx.quantized_matmul(x, w[:k], s[:k], b[:k], transpose=not channel_in, group_size=32, bits=bits)
    got = prune.dequantized_matmul(x, w, s, b, k, group_size=32, bits=bits, channel_in=channel_in)
    assert got.shape == want.shape
    assert mx.abs(got - want).max().item() <= 1e-4 * mx.abs(want).max().item()


def test_quantized_model_prefills_through_blas_and_agrees_with_mlx_lm(tmp_path):
    """Quantized linears and embeddings outside the FFN become their BLAS twins (the same
    parameters); over a prompt the logits stay those of mlx-lm's own layers, for a few tokens
    (quantized_matmul either way) they are equal."""
    import mlx.nn as nn
    from mlx.utils import tree_map_with_path

    from ifprune_mlx.fidelity import compact_model
    from ifprune_mlx.quantized import BlasQuantizedEmbedding, BlasQuantizedLinear, many_rows_on_cpu

    config = dict(model_config("llama"), tie_word_embeddings=True)  # as_linear is the output layer
    engine = ifp.load(make_bundle(tmp_path / "q4-tied", config, quantize_bits=4))
    plain = compact_model(engine, rows=True)  # the same FFN rows, then mlx-lm's own other layers
    assert type(engine.model.layers[0].self_attn.q_proj) is BlasQuantizedLinear
    assert type(engine.model.model.embed_tokens) is BlasQuantizedEmbedding
    assert many_rows_on_cpu(mx.zeros((1, LONG_TOKENS.shape[1], 8))) == (mx.default_device() == mx.cpu)

    def mlx_lm_layer(_, m):
        if isinstance(m, BlasQuantizedLinear):
            own = nn.QuantizedLinear(m.group_size, 1, "bias" in m, m.group_size, m.bits)
        elif isinstance(m, BlasQuantizedEmbedding):
            own = nn.QuantizedEmbedding(1, m.group_size, m.group_size, m.bits)
        else:
            return m
        own.update(m.parameters())
        return own

    plain.update_modules(tree_map_with_path(mlx_lm_layer, plain.leaf_modules(), is_leaf=nn.Module.is_module))
    assert type(plain.model.embed_tokens) is nn.QuantizedEmbedding
    few = TOKENS[:, :4]  # below quantized.DEQUANTIZE_ROWS
    assert not many_rows_on_cpu(mx.zeros((1, few.shape[1], 8)))
    for tokens, tolerance in ((LONG_TOKENS, 1e-3), (few, 0.0)):
        assert mx.abs(engine.model(tokens) - plain(tokens)).max().item() <= tolerance


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("path", ["host view", "mlx scatter"])
def test_swap_rows_swaps_exactly_the_pairs(dtype, path, monkeypatch):
    import ifprune_mlx.prune as prune
    from ifprune_mlx.prune import _swap_rows

    if path == "mlx scatter":  # the fallback for backends whose buffers NumPy cannot write
        monkeypatch.setattr(prune, "_host_view", lambda w: None)

    layer = RowLinear(200, 8)
    layer.weight = (mx.arange(200)[:, None] + mx.zeros((1, 8))).astype(dtype)  # exact in bfloat16
    rng = np.random.default_rng(0)
    a = np.sort(rng.choice(100, 40, replace=False)).astype(np.int32)
    b = np.sort(100 + rng.choice(100, 40, replace=False)).astype(np.int32)
    expected = np.repeat(np.arange(200, dtype=np.float32)[:, None], 8, axis=1)
    expected[np.concatenate([a, b])] = expected[np.concatenate([b, a])]
    _swap_rows(layer, "weight", mx.array(a), mx.array(b))
    assert np.array_equal(np.array(layer.weight.astype(mx.float32)), expected)


@settings(max_examples=30, deadline=None)
@given(seeds=st.lists(st.one_of(st.none(), st.integers(0, 2**31)), min_size=1, max_size=6),
       canonical=st.lists(st.booleans(), min_size=6, max_size=6))
def test_canonical_order_depends_on_the_selection_only(seeds, canonical):
    """After any history of applies, a canonical apply puts the kept channels in ascending
    order (dense: the original order) and computes bit for bit what a fresh model does."""
    _, mlps = big_mlps(d_model=32, d_ffn=160, layers=2)
    pristine = [[np.array(m[n]) for m, n in mlp.row_arrays()] for mlp in mlps]
    x = mx.random.normal((1, 3, 32), key=mx.random.key(1))
    keep = None
    for seed, canon in zip(seeds, canonical):
        keep = None if seed is None else random_selection(np.random.default_rng(seed), len(mlps), 160)
        apply_selection(mlps, keep, canonical=canon)
    apply_selection(mlps, keep, canonical=True)
    for layer, mlp in enumerate(mlps):
        want = np.arange(160) if keep is None else keep[layer]
        assert np.array_equal(mlp.perm[: len(want)], want)
        for (module, name), rows in zip(mlp.row_arrays(), pristine[layer]):
            assert np.array_equal(np.array(module[name]), rows[mlp.perm])
    fresh_model, fresh = big_mlps(d_model=32, d_ffn=160, layers=2)
    for mlp, rows in zip(fresh, pristine):
        for (module, name), value in zip(mlp.row_arrays(), rows):
            module[name] = mx.array(value)
    apply_selection(fresh, keep, canonical=True)
    for mlp, other in zip(mlps, fresh):
        assert np.array_equal(np.array(mlp(x)), np.array(other(x)))


def test_canonical_plan_is_rounds_of_disjoint_swaps():
    rng = np.random.default_rng(3)
    perm = rng.permutation(64)
    keep = np.sort(rng.choice(64, 20, replace=False))
    rounds = plan_canonical(perm, keep)
    assert 1 <= len(rounds) <= 2
    moved = perm.copy()
    for a, b in rounds:
        assert len(set(a) | set(b)) == 2 * len(a)  # disjoint pairs: each round is an involution
        moved[a], moved[b] = moved[b], moved[a].copy()
    assert np.array_equal(moved[:20], keep)
    assert plan_canonical(moved, keep) == []


@pytest.mark.parametrize("deterministic", [True, False])
def test_engine_gives_the_same_logits_whatever_ran_before(bundle_dir, deterministic):
    """Deterministic engines give identical logits; without the canonical order they move
    (by float rounding only), which is why it is the default."""
    engine = ifp.load(bundle_dir, deterministic=deterministic)
    prompt = "Reverse the letters: a b c"
    target = engine.select(prompt, density=0.5)
    engine.apply(target)
    first = np.array(engine.model(TOKENS))
    rng = np.random.default_rng(0)
    for _ in range(3):
        engine.apply(random_selection(rng, engine.n_layers, engine.d_ffn))
        engine.apply(None)
    engine.apply(target)
    again = np.array(engine.model(TOKENS))
    assert np.array_equal(again, first) == deterministic
    assert np.abs(again - first).max() < 1e-4


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_every_float_dtype_swaps_in_place_through_the_host_view(dtype):
    """bfloat16, which NumPy lacks, moves its rows through a uint16 view of the same buffer."""
    from ifprune_mlx.prune import _host_view

    w = mx.random.normal((64, 16)).astype(dtype)
    mx.eval(w)
    host = _host_view(w)
    assert host is not None and host.shape == (64, 16) and host.dtype.itemsize == dtype.size
    before = np.array(w.astype(mx.float32))
    host[[0, 5]] = host[[5, 0]]
    after = np.array(w.astype(mx.float32))
    assert np.array_equal(after[0], before[5]) and np.array_equal(after[5], before[0])


def test_bfloat16_bundle_prunes_exactly(tmp_path):
    """A bfloat16 model after a random history of applies equals a fresh load with the same
    channels kept: the integer-view swaps move whole rows, bits and all."""
    path = make_bundle(tmp_path / "bf16", dtype="bfloat16")
    engine, fresh = ifp.load(path), ifp.load(path)
    rng = np.random.default_rng(0)
    for _ in range(3):
        engine.apply(random_selection(rng, engine.n_layers, engine.d_ffn))
    keep = random_selection(rng, engine.n_layers, engine.d_ffn)
    engine.apply(keep)
    fresh.apply(keep)
    assert mx.array_equal(engine.model(TOKENS), fresh.model(TOKENS))


def test_float_copies_compute_what_the_quantized_weights_do_and_go_away(tmp_path):
    """Inside quantized.float_copies the model's quantized layers multiply by float copies
    (CPU): the logits stay those outside, for a prompt and for a few tokens; rows that move
    inside (a selection applied) drop their layer's copy, so the pruned model is still right;
    after the block no copy is left. A zero allowance copies nothing."""
    from ifprune_mlx import quantized

    config = dict(model_config("llama"), tie_word_embeddings=True)
    engine = ifp.load(make_bundle(tmp_path / "q4", config, quantize_bits=4))
    few = TOKENS[:, :4]
    keep = [np.arange(0, engine.d_ffn, 2) for _ in engine.mlps]
    dense_long, dense_few = engine.model(LONG_TOKENS), engine.model(few)
    engine.apply(keep)
    pruned = engine.model(LONG_TOKENS)
    engine.apply(None)
    with quantized.float_copies(engine.model, max_bytes=0) as copied:
        assert copied == 0 and not quantized._float_copies
    with quantized.float_copies(engine.model) as copied:
        on_cpu = mx.default_device() == mx.cpu
        assert (copied > 0) == on_cpu and (len(quantized._float_copies) > 0) == on_cpu
        for got, want in ((engine.model(LONG_TOKENS), dense_long), (engine.model(few), dense_few)):
            assert mx.abs(got - want).max().item() <= 1e-4 * mx.abs(want).max().item()
        engine.apply(keep)
        assert all(id(m.gate_proj.weight) not in quantized._float_copies for m in engine.mlps)
        got = engine.model(LONG_TOKENS)
        assert mx.abs(got - pruned).max().item() <= 1e-4 * mx.abs(pruned).max().item()
        engine.apply(None)
    assert not quantized._float_copies
