"""Per-layer budgets: the allocation, its storage and checks, and selection by them."""

import itertools
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ifprune_mlx as ifp
from ifprune_mlx.budgets import LayerBudgets, allocate, steps
from ifprune_mlx.calibrate import calibrate
from ifprune_mlx.errors import BundleError
from ifprune_mlx.fidelity import masks_for
from ifprune_mlx.prune import masking
from ifprune_mlx.calibration_store import save_calibration
from ifprune_mlx.selectors import kept_count

PROMPTS = ("Sort 3 1 2", "Reverse the letters: a b c", "Add 4 and 5")


def curves(rng, n_layers, width):
    """Random decreasing convex loss curves ending at 0 (all channels kept)."""
    drops = np.sort(rng.exponential(size=(n_layers, width - 1)), axis=1)[:, ::-1]  # decreasing drops
    return np.concatenate([np.cumsum(drops[:, ::-1], axis=1)[:, ::-1], np.zeros((n_layers, 1))], axis=1)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(8, 300), st.sampled_from([1, 8, 32]), st.floats(0.01, 1.0), st.integers(0, 99))
def test_allocation_keeps_the_uniform_total_padded_and_in_bounds(n_layers, d_ffn, pad, density, seed):
    grid = steps(d_ffn, pad)
    loss = curves(np.random.default_rng(seed), n_layers, len(grid))
    k = kept_count(density, d_ffn, pad)
    counts = allocate(loss, n_layers * k, d_ffn, pad)
    assert len(counts) == n_layers and all(c in grid for c in counts)
    assert all(1 <= c <= d_ffn for c in counts)
    assert sum(counts) <= n_layers * k
    if d_ffn % pad == 0 or k == d_ffn:  # every step is pad wide (or all kept): exactly uniform's total
        assert sum(counts) == n_layers * k


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 3), st.integers(0, 99), st.integers(3, 9))
def test_allocation_is_optimal_for_convex_curves(n_layers, seed, total_steps):
    grid = steps(40, 8)  # 8, 16, 24, 32, 40
    loss = curves(np.random.default_rng(seed), n_layers, len(grid))
    total = 8 * max(n_layers, min(total_steps, 5 * n_layers))
    counts = allocate(loss, total, 40, 8)
    best = min(sum(loss[l, grid.index(c)] for l, c in enumerate(combo))
               for combo in itertools.product(grid, repeat=n_layers) if sum(combo) <= total)
    got = sum(loss[l, grid.index(c)] for l, c in enumerate(counts))
    assert got == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_more_sensitive_layers_keep_more():
    grid = steps(64, 16)  # 16, 32, 48, 64
    loss = np.array([[3.0, 2.0, 1.0, 0.0], [30.0, 20.0, 10.0, 0.0]])
    assert allocate(loss, 64, 64, 16) == [16, 48]


def stored(n_layers=2, d_ffn=64, pad=32, **changes):
    width = len(steps(d_ffn, pad))
    data = {"selector": "activations", "prompts": 2, "pad_multiple": pad,
            "loss": [[1.0] * (width - 1) + [0.0]] * n_layers, "enabled": True}
    return {**data, **changes}


@pytest.mark.parametrize("changes, message", [
    ({"loss": [[1.0, 0.0]]}, "must be 2 layers x 2 numbers"),
    ({"loss": [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]}, "must be 2 layers x 2 numbers"),
    ({"loss": [[1.0, 0.0], [1.0]]}, "must be 2 layers x 2 numbers"),
    ({"loss": [[1.0, -1.0], [1.0, 0.0]]}, "negative or non-finite"),
    ({"loss": [[float("nan"), 0.0], [1.0, 0.0]]}, "negative or non-finite"),
    ({"enabled": "yes"}, "enabled must be true or false"),
    ({"pad_multiple": 0}, "pad_multiple must be a positive integer"),
    ({"surprise": 1}, "malformed"),
])
def test_stored_budgets_are_checked_against_the_model(changes, message):
    with pytest.raises(BundleError, match=message):
        LayerBudgets.from_json(stored(**changes), n_layers=2, d_ffn=64, where="X")
    assert LayerBudgets.from_json(stored(), 2, 64, "X").counts(0.5, 64) == [32, 32]


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, bundle_dir):
    """A copy of the test bundle calibrated with per-layer budgets, switched on."""
    folder = shutil.copytree(bundle_dir, tmp_path_factory.mktemp("budgets") / "bundle")
    engine = ifp.load(folder)
    result = calibrate(engine, densities=(0.25, 0.5), prompts=PROMPTS, answer_tokens=3,
                       selector="activations", budget_prompts=PROMPTS[:2])
    result.layer_budgets["enabled"] = True
    # make the budgets uneven whatever the random model measured: layer 0 matters most
    loss = np.asarray(result.layer_budgets["loss"])
    loss[0] *= 100.0
    result.layer_budgets["loss"] = loss.tolist()
    save_calibration(engine, result)
    return folder


def test_budgets_are_stored_loaded_and_used_by_both_selectors(budgeted):
    block = json.loads((budgeted / "config.json").read_text())["ifpruning"]
    assert block["calibration"]["layer_budgets"]["enabled"] is True
    engine = ifp.load(budgeted)
    counts = engine.kept_counts(0.5)
    assert engine.budgets.enabled and len(set(counts)) > 1
    assert sum(counts) == engine.n_layers * engine.kept_count(0.5)
    assert all(c % engine.pad_multiple == 0 or c == engine.d_ffn for c in counts)
    for selector in ("predictor", "activations"):
        assert engine.select(PROMPTS[2], 0.5, selector).kept_counts == list(counts)
    engine.budgets.enabled = False
    engine._counts.clear()
    assert engine.select(PROMPTS[2], 0.5, "predictor").kept_counts == [engine.kept_count(0.5)] * engine.n_layers


def test_a_per_layer_selection_computes_what_its_masks_do_and_the_same_each_time(budgeted):
    engine = ifp.load(budgeted)
    ids = engine.prompt_tokens(PROMPTS[0])
    selection = engine.select(PROMPTS[0], 0.5, "predictor")
    x = mx.array([ids])
    engine.apply(selection)
    first = engine.model(x)
    engine.apply(engine.select(PROMPTS[1], 0.25, "predictor"))
    engine.apply(selection)
    assert mx.array_equal(engine.model(x), first)  # bit for bit, whatever was applied between
    engine.apply(None)
    with masking(engine.mlps, masks_for(engine, [selection])):
        masked = engine.model(x)
    assert np.allclose(np.array(masked), np.array(first), atol=1e-4)


def test_a_bundle_with_broken_budgets_is_refused_at_load(tmp_path, budgeted):
    folder = shutil.copytree(budgeted, tmp_path / "broken")
    config = json.loads((folder / "config.json").read_text())
    config["ifpruning"]["calibration"]["layer_budgets"]["loss"] = [[0.0]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="layer_budgets.loss must be"):
        ifp.load(folder)
