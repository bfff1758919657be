"""ifprune calibrate: fidelity at a ladder of densities, the chosen default, where it is stored."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import ifprune_mlx as ifp
from ifprune_mlx.calibrate import DensityFidelity, bootstrap_interval, calibrate, choose_density
from ifprune_mlx.cli import app
from ifprune_mlx.fidelity import fidelity_after_prefill, kl_after_prefill, greedy_tokens

runner = CliRunner()
PROMPTS = ("Sort 3 1 2", "Reverse the letters: a b c", "Add 4 and 5")


def rows(*pairs):
    return [DensityFidelity(d, 0, kl, kl, kl, 1.0) for d, kl in pairs]


def test_choice_is_the_lowest_density_with_everything_above_within_budget():
    ladder = rows((0.3, 0.9), (0.5, 0.2), (0.7, 0.3), (0.9, 0.1))
    assert choose_density(ladder, 0.25) == 0.9  # 0.5 is within, but 0.7 above it is not
    assert choose_density(ladder, 0.35) == 0.5
    assert choose_density(ladder, 1.0) == 0.3
    assert choose_density(ladder, 0.05) == 1.0  # none: dense


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(0).exponential(size=40)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and high - low < values.std()
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_shared_prefill_gives_the_same_figures_as_one_selection_at_a_time(bundle_dir):
    engine = ifp.load(bundle_dir)
    ids = engine.prompt_tokens(PROMPTS[0])
    answer = greedy_tokens(engine.model, ids, 5)
    selections = engine.select_densities(PROMPTS[0], [0.25, 0.5, 1.0], "activations")
    together = fidelity_after_prefill(engine, ids, answer, selections)
    for selection, (kl, agreement) in zip(selections, together):
        assert kl == pytest.approx(kl_after_prefill(engine, ids, answer, selection), abs=1e-5)
    assert together[-1][0] == pytest.approx(0.0, abs=1e-5) and together[-1][1] == 1.0
    assert together[0][0] > together[1][0] > 1e-4


def test_calibrate_measures_every_density_and_leaves_the_engine_unpinned(bundle_dir):
    engine = ifp.load(bundle_dir)
    before = engine.default_density
    result = calibrate(engine, densities=(0.25, 0.5, 1.0), prompts=PROMPTS, answer_tokens=4,
                       selector="activations", kl_budget=1e-6)
    assert [r.density for r in result.rows] == [0.25, 0.5, 1.0]
    assert [r.kept for r in result.rows] == [engine.kept_count(d) for d in (0.25, 0.5, 1.0)]
    assert result.rows[-1].kl == pytest.approx(0.0, abs=1e-5) and result.rows[-1].agreement == 1.0
    assert result.rows[0].kl > result.rows[1].kl > 0
    assert all(r.kl_low <= r.kl <= r.kl_high for r in result.rows)
    assert result.density == 1.0 and result.prompts == 3 and result.selector == "activations"
    assert engine.default_density == before and engine._pin == "auto"


def test_cli_calibrates_a_bundle_and_stores_the_default(tmp_path, bundle_dir):
    bundle = shutil.copytree(bundle_dir, tmp_path / "bundle")
    result = runner.invoke(app, ["calibrate", str(bundle), "--densities", "0.25,0.5,1", "--kl-budget", "100",
                                 "--answer-tokens", "3", "--selector", "activations",
                                 "--out", str(tmp_path / "CAL.md"), "--plot", str(tmp_path / "cal.png")])
    assert result.exit_code == 0, result.output
    assert "| 0.25 **default** |" in result.output
    block = json.loads((bundle / "config.json").read_text())["ifpruning"]
    assert block["default_density"] == 0.25 and block["calibration"]["kl_budget"] == 100
    assert (tmp_path / "cal.png").stat().st_size > 1000
    assert "ifprune calibrate" in (tmp_path / "CAL.md").read_text()
    info = runner.invoke(app, ["info", str(bundle)])
    assert "0.25 -> keeps" in info.output and "calibrated: KL" in info.output
    assert ifp.load(bundle).calibration.density == 0.25


def test_cli_calibrate_mistakes_are_one_line(bundle_dir):
    for args, message in [(["--densities", "0.5,x"], "--densities takes numbers"),
                          (["--densities", "0.5,1.5"], "--densities takes numbers"),
                          (["--kl-budget", "0"], "--kl-budget must be > 0"),
                          (["--answer-tokens", "0"], "--answer-tokens must be at least 1")]:
        result = runner.invoke(app, ["calibrate", str(bundle_dir), *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)


def test_convert_calibrates_a_plain_model_once(tmp_path, plain_dir):
    result = runner.invoke(app, ["convert", str(plain_dir), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    block = json.loads((tmp_path / "b" / "config.json").read_text())["ifpruning"]
    assert block["calibration"]["density"] == block["default_density"]
    assert len(block["calibration"]["rows"]) == 7 and "default density" in result.output
    skipped = runner.invoke(app, ["convert", str(plain_dir), str(tmp_path / "c"), "--no-calibrate"])
    assert "calibration" not in json.loads((tmp_path / "c" / "config.json").read_text())["ifpruning"]
    assert skipped.exit_code == 0
