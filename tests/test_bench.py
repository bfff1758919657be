"""`ifprune bench --quick` end to end on tiny models, and the pieces it compares (no timings asserted)."""

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

import ifprune_mlx
from ifprune_mlx import bench
from ifprune_mlx.cli import app
from ifprune_mlx.selectors import Selection


@pytest.fixture(scope="module")
def engine(bundle_dir):
    return ifprune_mlx.load(bundle_dir)


def test_quick_bench_writes_the_report(tmp_path):
    out, png, raw = tmp_path / "B.md", tmp_path / "b.png", tmp_path / "b.json"
    result = CliRunner().invoke(app, ["bench", "--quick", "--synthetic", "64", "--bits", "0",
                                      "--out", str(out), "--plot", str(png), "--json", str(raw)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for heading in ("## Targets", "### Decode (tokens/s)", "### Time to first token",
                    "### Re-selection", "### Memory", "## Mac (Metal)"):
        assert heading in text
    decode_header = next(line for line in text.splitlines() if line.startswith("| density |"))
    for column in ("in place", "reference", "in place / reference", "speed-up vs dense",
                   "MB read / token", "roofline tok/s", "Mac (Metal)"):
        assert column in decode_header
    for density in bench.Settings.quick().densities:
        assert f"\n| {density:.2f} |" in text
    for fraction in bench.Settings.quick().changed:
        assert f"\n| {fraction:.0%} |" in text
    assert "BLAS:" in text
    command = next(line for line in text.splitlines() if line.startswith("- command:"))
    assert "ifprune bench" in command and "--quick" in command
    assert png.stat().st_size > 0 and raw.stat().st_size > 0


def test_bench_rejects_bad_options(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--quick", "--bits", "3", "--out", str(tmp_path / "B.md")])
    assert result.exit_code == 1
    assert "--bits" in result.output


def test_physically_small_model_computes_what_the_engine_keeps(engine):
    ids = mx.array([engine.tokenizer.encode("Write a Python function that reverses a list.")])
    dense = bench.plain_model(engine)
    assert type(dense.layers[0].mlp).__name__ == "MLP"  # plain mlx-lm, not PrunableMLP
    engine.apply(engine.select("Translate the sentence into French.", density=0.25))
    k = engine.mlps[0].k
    small = bench.plain_model(engine, k)
    assert small.layers[0].mlp.gate_proj.weight.shape == (k, engine.config["hidden_size"])
    np.testing.assert_allclose(np.array(small(ids)), np.array(engine.model(ids)), atol=1e-4)
    engine.apply(None)
    np.testing.assert_allclose(np.array(dense(ids)), np.array(engine.model(ids)), atol=1e-4)


def test_quantized_physically_small_model_runs(q4_bundle_dir):
    engine = ifprune_mlx.load(q4_bundle_dir)
    engine.apply(engine.select("Sort these numbers.", density=0.5))
    small = bench.plain_model(engine, engine.mlps[0].k)
    assert "scales" in small.layers[0].mlp.down_proj
    assert bench.decode_tps(small, [1, 2, 3], 2) > 0


def test_changed_selection_differs_by_the_fraction(engine):
    base = engine.select("Translate the sentence into French.", density=0.33)
    rng = np.random.default_rng(0)
    for fraction in (0.0, 0.5, 1.0):
        target = Selection.from_indices(bench._changed(base, fraction, engine.d_ffn, rng),
                                        engine.d_ffn, engine.n_layers)
        for old, new in zip(base.indices, target.indices):
            assert len(new) == len(old)
            assert len(np.setdiff1d(new, old)) == round(fraction * len(old))


def test_bytes_per_token_counts_kept_rows(engine):
    full = bench.bytes_per_token(engine, engine.d_ffn, 0)
    half = bench.bytes_per_token(engine, engine.d_ffn // 2, 0)
    ffn = sum(bench._array_bytes(m.parameters()) for m in engine.mlps)
    assert full["weights"] - half["weights"] == pytest.approx(ffn / 2)
    assert full["weights"] < engine.weight_bytes()  # one embedding row, not the table
    assert bench.bytes_per_token(engine, engine.d_ffn, 10)["kv"] > 0


def test_bench_runs_on_a_model_folder(plain_dir):
    """A plain model (no predictor): decode and re-selection with the training-free selector."""
    info = bench.run(model=plain_dir, widths=[], bits=[None], dtype="float32",
                     settings=bench.Settings.quick(), log=lambda _: None)
    (result,) = info["results"]
    assert [d["density"] for d in result["decode"]] == [1.0, 0.5, 0.25]
    assert result["ttft"] == [] and result["memory"] == {}  # both need a predictor
    assert [x["swaps"] for x in result["reselect"]][0] == 0
