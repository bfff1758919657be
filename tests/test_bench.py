"""`ifprune bench --quick` and the report writer end to end on tiny models, and the pieces they
compare (no timings asserted)."""

import json

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
import numpy as np
import pytest
from typer.testing import CliRunner

import ifprune_mlx
from ifprune_mlx.bench import measure, run
from ifprune_mlx.bench.settings import Settings
from examples import benchmark_report
from ifprune_mlx.bundle import DEFAULT_DENSITY
from ifprune_mlx.cli import app
from ifprune_mlx.fidelity import compact_model
from ifprune_mlx.selectors import Selection


@pytest.fixture(scope="module")
def engine(bundle_dir):
    return ifprune_mlx.load(bundle_dir)


def test_quick_bench_prints_and_the_report_writes(tmp_path):
    raw = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["bench", "--quick", "--synthetic", "64", "--bits", "0",
                                      "--json", str(raw)])
    assert result.exit_code == 0, result.output
    assert "d64-float32" in result.output and "bytes bound" in result.output
    info = json.loads(raw.read_text())
    assert "ifprune bench" in info["command"] and "--quick" in info["command"]
    assert info["settings"]["quick"] is True

    out, png = tmp_path / "B.md", tmp_path / "b.png"
    (out).write_text("old\n" + benchmark_report.NOTES + "\nmy notes\n")
    benchmark_report.main(["--from-json", str(raw), "--out", str(out), "--plot", str(png)])
    text = out.read_text()
    for heading in ("## Targets", "## Checks", "### Decode (tokens/s)", "### Time to first token",
                    "### Re-selection", "### Memory"):
        assert heading in text
    assert "Mac (Metal)" not in text and "shared with other jobs" not in text
    assert text.endswith(benchmark_report.NOTES + "\nmy notes\n")
    decode_header = next(line for line in text.splitlines() if line.startswith("| density |"))
    for column in ("in place", "small", "same kernels", "in place / same kernels", "bytes bound",
                   "MB read / token", "roofline tok/s"):
        assert column in decode_header
    for density in Settings.quick_run().densities:
        assert f"\n| {density:.2f} |" in text
    for fraction in Settings.quick_run().changed:
        assert f"\n| {fraction:.0%} |" in text
    assert f"density {DEFAULT_DENSITY}" in text
    assert "BLAS:" in text
    assert png.stat().st_size > 0


def test_the_report_flags_speedups_above_the_bytes_bound(tmp_path):
    """A speed-up larger than dense bytes / pruned bytes is marked and listed, not quoted plain."""
    def row(density, bpt, speedup, ratio=1.0):
        return {"density": density, "k": int(density * 64), "inplace_tps": 10 * speedup, "small_tps": 10.0,
                "ratio_small": ratio, "ratio_mlx_lm": ratio if density == 1.0 else None, "speedup": speedup,
                "bytes_per_token": bpt, "mlx_lm_tps": 10.0, "ratio_best": 1.0, "reps": 4,
                "block_tokens": 8, "max_logit_diff": 0.0}
    result = {"name": "m", "d_model": 16, "d_ffn": 64, "layers": 2, "vocab": 320, "quant": "float32",
              "weight_bytes": 10**6, "decode": [row(1.0, 200.0, 1.0), row(0.5, 100.0, 1.9),
                                                  row(0.25, 80.0, 4.0, ratio=1.3)],
              "ttft": [], "reselect": [], "memory": {}, "seconds": 1.0, "detailed": True}
    info = {"results": [result]}
    found = {(v["density"], v["figure"]) for v in run.bound_violations(info)}
    assert found == {(0.25, "speed-up vs mlx-lm dense"), (0.25, "in place / mlx-lm layout")}
    assert run.bytes_bound(result, result["decode"][2]) == pytest.approx(2.5)
    checks = "\n".join(benchmark_report._checks(info))
    assert checks.count("\n| m | ") == 2
    assert "4.00x **(> bound)**" in benchmark_report._decode({"bandwidth": {"stream_gbs": 1, "gemv_gbs": 1}},
                                                             result)[-2]


@pytest.mark.parametrize("flags, message", [
    (["--bits", "3"], "--bits takes 0 (float), 4 or 8; got '3'"),
    (["--dtype", "float8"], "--dtype takes float32, float16, bfloat16 (comma-separated), got 'float8'"),
    (["--synthetic", "wide"], "--synthetic takes widths like 512,1024 and --bits like 0,4; got 'wide', '0,4'"),
])
def test_bench_rejects_bad_options(flags, message):
    result = CliRunner().invoke(app, ["bench", "--quick", *flags])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {message}"  # one line, before measuring anything


def test_physically_small_model_computes_what_the_engine_keeps(engine):
    ids = mx.array([engine.tokenizer.encode("Write a Python function that reverses a list.")])
    dense = compact_model(engine)
    assert type(dense.layers[0].mlp).__name__ == "MLP"  # plain mlx-lm, not PrunableMLP
    engine.apply(engine.select("Translate the sentence into French.", density=0.25))
    k = engine.mlps[0].k
    small = compact_model(engine, k)
    same_kernels = compact_model(engine, k, rows=True)
    assert small.layers[0].mlp.gate_proj.weight.shape == (k, engine.config["hidden_size"])
    assert small.layers[0].mlp.down_proj.weight.shape == (engine.config["hidden_size"], k)
    assert same_kernels.layers[0].mlp.down_proj.weight.shape == (k, engine.config["hidden_size"])
    np.testing.assert_allclose(np.array(small(ids)), np.array(engine.model(ids)), atol=1e-4)
    np.testing.assert_allclose(np.array(same_kernels(ids)), np.array(engine.model(ids)), atol=1e-4)
    engine.apply(None)
    np.testing.assert_allclose(np.array(dense(ids)), np.array(engine.model(ids)), atol=1e-4)


def test_quantized_physically_small_model_runs(q4_bundle_dir):
    engine = ifprune_mlx.load(q4_bundle_dir)
    engine.apply(engine.select("Sort these numbers.", density=0.5))
    ids = mx.array([[1, 2, 3, 4]])
    for rows in (False, True):
        small = compact_model(engine, engine.mlps[0].k, rows=rows)
        assert "scales" in small.layers[0].mlp.down_proj
        # the mlx-lm layout re-quantizes down_proj along d_ffn: equal up to that rounding
        np.testing.assert_allclose(np.array(small(ids)), np.array(engine.model(ids)), atol=0 if rows else 0.5)
        cache = make_prompt_cache(small)
        assert measure.decode_tps(small, [1, 2, 3], 2, cache) > 0
        # on `cache`: the prompt, then the first token and the 2 timed ones (mlx-lm's generate_step
        # runs one step ahead, so the last token decoded is fed too)
        assert cache[0].offset == 3 + 1 + 2


def test_changed_selection_differs_by_the_fraction(engine):
    base = engine.select("Translate the sentence into French.", density=0.33)
    rng = np.random.default_rng(0)
    for fraction in (0.0, 0.5, 1.0):
        target = Selection.from_indices(measure.changed_selection(base, fraction, engine.d_ffn, rng),
                                        engine.d_ffn, engine.n_layers)
        for old, new in zip(base.indices, target.indices):
            assert len(new) == len(old)
            assert len(np.setdiff1d(new, old)) == round(fraction * len(old))


def test_bytes_per_token_counts_kept_rows(engine):
    full = measure.bytes_per_token(engine, engine.d_ffn, 0)
    half = measure.bytes_per_token(engine, engine.d_ffn // 2, 0)
    ffn = sum(measure.array_bytes(m.parameters()) for m in engine.mlps)
    assert full["weights"] - half["weights"] == pytest.approx(ffn / 2)
    assert full["weights"] < engine.weight_bytes()  # one embedding row, not the table
    assert measure.bytes_per_token(engine, engine.d_ffn, 10)["kv"] > 0


def test_bytes_per_token_counts_a_tied_embedding_table_whole(tmp_path):
    """A tied table is the output projection too: every token reads all of it."""
    from ifprune_mlx import testing

    untied = ifprune_mlx.load(testing.make_model_folder(tmp_path / "untied"))
    tied = ifprune_mlx.load(testing.make_model_folder(
        tmp_path / "tied", dict(testing.model_config("llama"), tie_word_embeddings=True)))
    table = tied.model.model.embed_tokens.weight.nbytes
    assert measure.bytes_per_token(tied, tied.d_ffn, 0)["weights"] == pytest.approx(tied.weight_bytes())
    assert measure.bytes_per_token(untied, untied.d_ffn, 0)["weights"] == pytest.approx(
        untied.weight_bytes() - table + table / untied.config["vocab_size"])


def test_bench_runs_on_a_model_folder(plain_dir):
    """A plain model (no predictor): every measurement, with the training-free selector."""
    info = run.run(models=[plain_dir], widths=[], bits=[None], dtypes=["float32"],
                     settings=Settings.quick_run(), log=lambda _: None)
    (result,) = info["results"]
    assert result["real"] and result["name"] == plain_dir.name
    assert [d["density"] for d in result["decode"]] == list(Settings.quick_run().real_densities)
    assert {t["selector"] for t in result["ttft"]} == {"activations"}
    assert result["memory"]["predictor"] == 0 and result["memory"]["peak"] >= result["memory"]["weights"]
    assert [x["swaps"] for x in result["reselect"]][0] == 0


def test_bench_of_a_gguf_measures_each_conversion_and_reports_the_real_model_targets(tmp_path):
    """`ifprune bench FILE.gguf`: one model per float dtype and quantization, no synthetic ones;
    the training-free selector's TTFT split; the report's real-model section and targets."""
    pytest.importorskip("gguf")
    from ifprune_mlx import testing

    gguf_file = testing.make_gguf(tmp_path / "tiny.gguf", "llama", "F32")
    raw = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["bench", str(gguf_file), "--quick", "--dtype", "float32,bfloat16",
                                      "--bits", "0,4", "--json", str(raw)])
    assert result.exit_code == 0, result.output
    info = json.loads(raw.read_text())
    assert [r["name"] for r in info["results"]] == ["tiny-float32", "tiny-bfloat16", "tiny-q4"]
    assert [r["quant"] for r in info["results"]] == ["float32", "bfloat16", "4-bit (group 32)"]
    for r in info["results"]:
        assert r["real"] and r["memory"] and r["load"]
        assert [d["density"] for d in r["decode"]] == list(Settings.quick_run().real_densities)
        pruned = [d for d in r["decode"] if d["density"] < 1.0]
        assert pruned and all("dense" in d["samples"] for d in pruned)  # speed-ups are paired
        assert {t["selector"] for t in r["ttft"]} == {"activations"}  # a GGUF has no predictor
        for t in r["ttft"]:
            assert t["total"] == pytest.approx(t["select"] + t["apply"] + t["prefill"])
    out = tmp_path / "B.md"
    benchmark_report.main(["--from-json", str(raw), "--out", str(out), "--plot", str(tmp_path / "b.png")])
    text = out.read_text()
    assert "## Real model: tiny-bfloat16" in text and "## Scaling" not in text
    assert "tiny-float32: speed-up at density 0.5 >= 0.9x the bytes bound" in text
    assert "tiny-q4: training-free selection <= 1.0x the dense prefill" in text
    assert "| training-free |" in text


def test_mlx_lm_reference_reads_a_nested_rope_theta(tmp_path):
    """transformers 5 nests rope_theta in rope_parameters; mlx-lm alone would use 10000."""
    from ifprune_mlx import testing

    config = {k: v for k, v in testing.model_config("llama").items() if k != "rope_theta"}
    theta = 1000.0
    folder = testing.make_model_folder(tmp_path / "m", dict(config, rope_parameters={"rope_theta": theta,
                                                                                        "rope_type": "default"}))
    engine = ifprune_mlx.load(folder)
    dense = compact_model(engine)
    assert dense.args.rope_theta == theta
    ids = mx.array([list(range(3, 40))])
    np.testing.assert_allclose(np.array(dense(ids)), np.array(engine.model(ids)), atol=1e-4)
