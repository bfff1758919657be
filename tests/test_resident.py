"""Resident mode (load(..., resident="kept")): only the kept FFN rows in memory, the rows that
enter a selection read from the bundle by byte range; the same logits as the full engine."""

import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ifprune_mlx import load, resident
from ifprune_mlx.cli import app
from ifprune_mlx.engine import LOST
from ifprune_mlx.errors import BundleChangedError, ResidentError
from ifprune_mlx.resident import channel_runs, plan_layer
from ifprune_mlx.selectors import Selection

MAX_DENSITY = 0.5
TOKENS = mx.array([[3, 17, 42, 5, 99, 7, 64]])


@pytest.fixture(scope="module")
def pairs(bundle_dir, q4_bundle_dir):
    """(full-memory engine, resident engine) of the float32 and the 4-bit bundle."""
    return {name: (load(folder), load(folder, resident="kept", max_density=MAX_DENSITY))
            for name, folder in (("float32", bundle_dir), ("q4", q4_bundle_dir))}


def _selection(engine, rng, counts):
    ids = [np.sort(rng.choice(engine.d_ffn, k, replace=False)) for k in counts]
    return Selection.from_indices(ids, engine.d_ffn, engine.n_layers)


def _same_logits(full, res, tokens=TOKENS):
    a, b = full.model(tokens), res.model(tokens)
    assert a.shape == b.shape
    assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item(), float(mx.abs(a - b).max())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["float32", "q4"]), seed=st.integers(0, 2**31 - 1),
       steps=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5), same_width=st.booleans())
def test_logits_equal_the_full_engine_over_random_selection_sequences(pairs, name, seed, steps, same_width):
    full, res = pairs[name]
    cap = res.residency.capacity
    rng = np.random.default_rng(seed)
    for fraction in steps:
        k = max(1, round(fraction * cap))
        counts = [k] * res.n_layers if same_width else [int(c) for c in rng.integers(1, cap + 1, res.n_layers)]
        selection = _selection(res, rng, counts)
        full.apply(selection)
        stats = res.apply(selection)
        assert stats.bytes_read >= stats.rows_read * _row_bytes(res)  # gaps of a few rows are read through
        for mlp, ids in zip(res.mlps, selection.indices):
            assert np.array_equal(mlp.perm[: mlp.k], ids)  # canonical: ascending channel order
            assert len(set(mlp.perm.tolist())) == cap  # every slot holds a distinct channel
        _same_logits(full, res)


def _row_bytes(engine):
    """Bytes of one channel's rows in all row arrays of a layer."""
    return sum(module[name][0].nbytes for module, name, _ in engine.mlps[0].row_tensors())


def test_rows_that_stay_are_not_read_again(pairs):
    full, res = pairs["float32"]
    rng = np.random.default_rng(1)
    base = _selection(res, rng, [64] * res.n_layers)
    res.apply(base)
    assert res.apply(base).rows_read == 0  # the same selection: nothing moves
    changed = [np.sort(np.concatenate([ids[8:], np.setdiff1d(np.arange(res.d_ffn), res.mlps[i].perm)[:8]]))
               for i, ids in enumerate(base.indices)]
    stats = res.apply(changed)
    assert stats.rows_read == 8 * res.n_layers
    assert stats.read_seconds > 0 and stats.seconds >= stats.read_seconds
    full.apply(changed)
    _same_logits(full, res)


def test_load_reads_only_the_first_capacity_rows_and_holds_only_them(bundle_dir):
    full = load(bundle_dir)
    res = load(bundle_dir, resident="kept", max_density=MAX_DENSITY)
    cap, d_ffn = res.residency.capacity, res.d_ffn
    assert cap == 128 < d_ffn
    ffn = sum(v.nbytes for mlp in full.mlps for _, v in _flat(mlp))
    assert res.residency.source.bytes_read == ffn * cap // d_ffn
    assert res.weight_bytes() == full.weight_bytes() - ffn * (d_ffn - cap) // d_ffn
    assert res.applied.source == "initial" and res.mlps[0].k == res.kept_count()
    full.apply(res.applied)
    _same_logits(full, res)


def _flat(module):
    import mlx.nn as nn

    return nn.utils.tree_flatten(module.parameters())


@pytest.mark.parametrize("name", ["float32", "q4"])
def test_training_free_scoring_streams_the_missing_rows(pairs, name):
    full, res = pairs[name]
    res.apply(_selection(res, np.random.default_rng(2), [32] * res.n_layers))
    before = [mlp.perm.copy() for mlp in res.mlps]
    tokens = [5, 9, 12, 40, 41, 42, 3]
    a = full.selectors["activations"].scores(tokens)
    b = res.selectors["activations"].scores(tokens)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert all(np.array_equal(p, mlp.perm) for p, mlp in zip(before, res.mlps))  # nothing moved
    assert res.generate("Sort these numbers", max_tokens=6, selector="activations", density=0.3) == \
        full.generate("Sort these numbers", max_tokens=6, selector="activations", density=0.3)


def test_generation_with_the_predictor_matches_the_full_engine(pairs):
    full, res = pairs["float32"]
    full.apply("auto")
    res.apply("auto")
    for prompt in ("Sort these numbers: 5 3 9 1.", "Translate the sentence into French", "What is 12 + 30?"):
        assert res.generate(prompt, max_tokens=8) == full.generate(prompt, max_tokens=8)
        assert np.array_equal(np.concatenate(res.applied.indices), np.concatenate(full.applied.indices))


def test_per_turn_chat_on_a_resident_engine_matches_the_full_engine(pairs):
    from ifprune_mlx.chat import ChatSession

    full, res = pairs["float32"]
    answers = []
    for engine in (full, res):
        session = ChatSession(engine, policy="per-turn", density=0.4, max_tokens=6)
        answers.append(["".join(r.text for r in session.send(m)) for m in ("Sort 5 3 9", "Count letters")])
    assert answers[0] == answers[1]
    assert session.last.read_bytes >= session.last.rows_read * _row_bytes(res) > 0


def test_a_density_above_the_capacity_is_refused(pairs):
    _, res = pairs["float32"]
    applied = res.applied
    with pytest.raises(ResidentError, match=r"holds at most 128 per layer.*--max-density"):
        res.select("Sort these numbers", density=0.9)
    with pytest.raises(ResidentError, match="layer 0 would keep 200 channels"):
        res.apply([np.arange(200)] * res.n_layers)
    assert res.applied is applied


def test_dense_is_refused_below_full_capacity_and_exact_at_max_density_one(pairs, bundle_dir):
    full, res = pairs["float32"]
    with pytest.raises(ResidentError, match="without --resident, or with --max-density 1"):
        res.apply(None)
    assert res.swap_cost(None) == (res.d_ffn - res.residency.capacity) * res.n_layers  # a cost, not an error
    whole = load(bundle_dir, resident="kept", max_density=1.0)
    assert whole.residency.capacity == whole.d_ffn
    whole.apply(None)
    full.apply(None)
    _same_logits(full, whole)
    assert whole.residency.source.bytes_read > 0


def test_plain_folders_and_bad_options_are_refused(plain_dir, bundle_dir):
    with pytest.raises(ResidentError, match="ifprune convert"):
        load(plain_dir, resident="kept")
    with pytest.raises(ResidentError, match="resident must be one of kept"):
        load(bundle_dir, resident="all")
    with pytest.raises(ResidentError, match="max_density"):
        load(bundle_dir, max_density=0.5)


@pytest.fixture
def own_bundle(bundle_dir, tmp_path):
    """A copy of the float bundle this test may break."""
    return shutil.copytree(bundle_dir, tmp_path / "bundle")


def _failing_reads(monkeypatch, fail_at):
    """Make the fail_at-th (1-based) and later calls in `fail_at` raise OSError."""
    calls = {"n": 0}
    real = resident.read_row_runs

    def read(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in fail_at:
            raise OSError(5, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(resident, "read_row_runs", read)
    return calls


def test_a_read_error_mid_apply_leaves_the_previous_selection(own_bundle, monkeypatch):
    full, res = load(own_bundle), load(own_bundle, resident="kept", max_density=MAX_DENSITY)
    rng = np.random.default_rng(3)
    before = _selection(res, rng, [100] * res.n_layers)
    res.apply(before)
    full.apply(before)
    reads_per_layer = len(res.mlps[0].row_tensors())
    _failing_reads(monkeypatch, {reads_per_layer + 1})  # layer 1's first read: layer 0 is done by then
    with pytest.raises(ResidentError, match="Input/output error.*previous selection stays applied"):
        res.apply(_selection(res, rng, [120] * res.n_layers))
    assert res.applied is before
    assert [mlp.k for mlp in res.mlps] == [100] * res.n_layers
    _same_logits(full, res)
    after = _selection(res, rng, [90] * res.n_layers)  # the next apply works
    res.apply(after)
    full.apply(after)
    _same_logits(full, res)


def test_a_failed_restore_marks_the_rows_lost_and_the_next_apply_reads_them(own_bundle, monkeypatch):
    full, res = load(own_bundle), load(own_bundle, resident="kept", max_density=MAX_DENSITY)
    rng = np.random.default_rng(4)
    before = _selection(res, rng, [128] * res.n_layers)  # full capacity: every change evicts prefix rows
    res.apply(before)
    res.apply("auto")
    n = len(res.mlps[0].row_tensors())
    _failing_reads(monkeypatch, {n + 1, n + 2})  # layer 1's read, then the restore of layer 0
    with pytest.raises(ResidentError, match="could not be read back"):
        res.apply(_selection(res, rng, [128] * res.n_layers))
    assert res.applied is LOST and not res.residency.intact(res.mlps)
    res.apply(before)
    assert res.residency.intact(res.mlps)
    full.apply(before)
    _same_logits(full, res)


def test_a_bundle_changed_on_disk_is_detected(own_bundle):
    res = load(own_bundle, resident="kept", max_density=MAX_DENSITY)
    full = load(own_bundle)
    rng = np.random.default_rng(5)
    before = _selection(res, rng, [64] * res.n_layers)
    res.apply(before)
    full.apply(before)
    weights = own_bundle / "model.safetensors"
    stamp = os.stat(weights)
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    with pytest.raises(BundleChangedError, match="modification time.*load the model again"):
        res.apply(_selection(res, rng, [64] * res.n_layers))
    assert res.applied is before
    _same_logits(full, res)
    weights.rename(own_bundle / "moved.safetensors")
    with pytest.raises(BundleChangedError, match="moved or deleted"):
        res.generate("Sort these numbers", max_tokens=2, density=0.2)


def test_plan_layer_puts_the_selection_first_in_channel_order():
    perm = np.array([7, 2, 9, 4, 0, 5])
    keep = np.array([1, 2, 5, 8])
    incoming, new_perm, rounds = plan_layer(perm, 3, keep, 12)
    assert incoming.tolist() == [1, 8]
    # victims: slots not kept past the prefix first (4: channel 0, 3: channel 4), by position
    assert sorted(new_perm.tolist()) == sorted([7, 2, 9, 1, 8, 5])
    moved = new_perm.copy()
    for a, b in rounds:
        moved[a], moved[b] = moved[b], moved[a].copy()
    assert moved[:4].tolist() == [1, 2, 5, 8]


def test_channel_runs_coalesce_consecutive_ids():
    assert channel_runs(np.array([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]
    assert channel_runs(np.array([0, 1, 2, 5, 7, 8]), gap=1) == [(0, 3), (5, 9)]
    assert channel_runs(np.array([0, 1, 2, 3, 4, 9]), gap=4, most=4) == [(0, 4), (4, 8), (8, 10)]
    assert channel_runs(np.array([], dtype=np.int64)) == []


@pytest.fixture(scope="module")
def sources(bundle_dir, q4_bundle_dir, tmp_path_factory):
    """(RowSource, every tensor) of a float32, a 4-bit and a bfloat16 bundle."""
    from ifprune_mlx import testing
    from ifprune_mlx.bundle import read_safetensors, weight_files

    bf16 = testing.make_bundle(tmp_path_factory.mktemp("bf16") / "b", dtype="bfloat16", predictor=False)
    return [(resident.RowSource(weight_files(f)), read_safetensors(weight_files(f)))
            for f in (bundle_dir, q4_bundle_dir, bf16)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), gap=st.sampled_from([0, 300, 5000]), span=st.sampled_from([600, 5000, 1 << 20]))
def test_row_source_reads_exactly_the_rows_asked(sources, monkeypatch, data, gap, span):
    """Whatever the merging of nearby runs and the read size, read(name, ids) is tensor[ids]."""
    monkeypatch.setattr(resident, "GAP_BYTES", gap)
    monkeypatch.setattr(resident, "SPAN_BYTES", span)
    source, whole = data.draw(st.sampled_from(sources))
    name = data.draw(st.sampled_from(sorted(source.where)))
    n = whole[name].shape[0]
    ids = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n))), dtype=np.int64)
    rows = source.read(name, ids)
    assert rows.shape[0] == ids.size
    if ids.size:
        want = whole[name][mx.array(ids)]
        want = want.view(mx.uint16) if want.dtype == mx.bfloat16 else want
        np.testing.assert_array_equal(rows, np.array(want))


runner = CliRunner()


def test_cli_info_and_generate_show_resident_mode(bundle_dir):
    result = runner.invoke(app, ["info", str(bundle_dir), "--resident", "kept", "--max-density", "0.5"])
    assert result.exit_code == 0, result.output
    assert "kept: 128 of 256 FFN rows per layer in memory (max density 0.50)" in result.output
    result = runner.invoke(app, ["generate", str(bundle_dir), "-p", "Sort these numbers", "-m", "4",
                                 "--resident", "kept", "--max-density", "0.5", "--density", "0.4"])
    assert result.exit_code == 0, result.output
    assert "read " in result.output and " MB (" in result.output
    result = runner.invoke(app, ["generate", str(bundle_dir), "-p", "x", "--resident", "kept", "--dense"])
    assert result.exit_code == 1 and "--max-density 1" in result.output
    result = runner.invoke(app, ["generate", str(bundle_dir), "-p", "x", "--max-density", "0.5"])
    assert result.exit_code == 1 and "pass --resident kept" in result.output


def test_chat_stats_show_the_last_apply_read(bundle_dir, capsys):
    from ifprune_mlx.chat import ChatSession
    from ifprune_mlx.chat_cli import ChatREPL

    engine = load(bundle_dir, resident="kept", max_density=MAX_DENSITY)
    session = ChatSession(engine, policy="per-turn", density=0.4, max_tokens=4)
    for _ in session.send("Sort these numbers: 5 3 9 1."):
        pass
    capsys.readouterr()
    ChatREPL(session, interactive=False).stats("")
    out = capsys.readouterr().out
    assert f"row swaps, read {session.last.read_bytes / 1e6:.1f} MB ({session.last.rows_read} rows) in" in out
    assert "kept: 128 of 256 FFN rows per layer in memory" in out


@pytest.mark.parametrize("stored", [0.3, 0.9])
def test_the_default_density_is_capped_at_the_capacity_however_it_is_set(bundle_dir, tmp_path, stored):
    """One rule for the resident engine's default density, whether it comes from the bundle
    at load or from a calibration afterwards: at most max_density; a full engine keeps it."""
    from ifprune_mlx.bundle import update_ifpruning
    from ifprune_mlx.calibrate import Calibration

    folder = shutil.copytree(bundle_dir, tmp_path / "b")
    update_ifpruning(folder, {"default_density": stored})
    full, res = load(folder), load(folder, resident="kept", max_density=MAX_DENSITY)
    assert full.default_density == stored and res.default_density == min(stored, MAX_DENSITY)
    for density in (0.2, 0.8):
        calibration = Calibration("activations", 3, 16, 0.25, density=density, version=2, budget=0.25)
        full.use_calibration(calibration)
        res.use_calibration(calibration)
        assert full.default_density == density and res.default_density == min(density, MAX_DENSITY)
        assert res.kept_count() <= res.residency.capacity
