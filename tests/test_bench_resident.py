"""`ifprune bench --resident kept`: the measurements run and say what they measured."""

import json

import pytest
from typer.testing import CliRunner

from ifprune_mlx import load
from ifprune_mlx.bench import resident as bench_resident
from ifprune_mlx.cli import app


@pytest.fixture(scope="module")
def engines(bundle_dir):
    return load(bundle_dir, cache_size=0), load(bundle_dir, cache_size=0, resident="kept", max_density=0.5)


def test_apply_costs_read_nothing_for_no_change_and_the_changed_rows_otherwise(engines):
    full, res = engines
    rows = bench_resident.apply_costs(full, res, 0.5, (0.0, 0.5), reps=1)
    warm = {r["fraction"]: r for r in rows if not r["cold"]}
    assert warm[0.0]["rows_read"] == 0 and warm[0.0]["mb_read"] == 0
    k = warm[0.5]["k"]
    assert warm[0.5]["rows_read"] == round(0.5 * k) * res.n_layers
    assert warm[0.5]["mb_read"] > 0 and warm[0.5]["apply_ms"] >= warm[0.5]["read_ms"]


def test_ttft_and_decode_pair_the_engines(engines):
    full, res = engines
    t = bench_resident.ttft(full, res, 0.5, prompts=2, prompt_tokens=8)
    assert t["prompts"] == 2 and t["full_ms"] > 0 and t["resident_ms"] > 0
    d = bench_resident.decode(full, res, 0.5, rounds=2, tokens=2, budget=5)
    assert d["rounds"] == 2 and d["ratio_low"] <= d["ratio"] <= d["ratio_high"]


@pytest.mark.slow  # three fresh interpreters
def test_memory_probe_in_fresh_processes(bundle_dir):
    full, res = bench_resident.memory(bundle_dir, 0.5, prompt_tokens=8, tokens=2)
    assert not full["resident"] and res["resident"]
    weights, ffn = bench_resident.file_bytes(bundle_dir)
    assert res["held"] == full["held"] - ffn // 2 and full["held"] == weights
    assert res["bound"] == (weights + res["predictor"] - 0.5 * ffn) * bench_resident.SLACK + res["kv"]
    assert res["tokenizer_rss"] > 0


@pytest.mark.slow
def test_the_command_runs_and_its_report_is_written(tmp_path):
    out = tmp_path / "resident.json"
    result = CliRunner().invoke(app, ["bench", "--resident", "kept", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    text = bench_resident.report(json.loads(out.read_text()))
    assert "| resident kept |" in text and "Decode (" in text and "--resident kept --quick" in text
