"""ifprune calibrate: fidelity at a ladder of densities, the chosen default, where it is stored."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import ifprune_mlx as ifp
from hypothesis import given, settings, strategies as st

from ifprune_mlx.calibrate import (Calibration, RulePoint, VERSION, bootstrap_interval, calibrate,
                                   choose_default_density)
from ifprune_mlx.cli import app
from ifprune_mlx.fidelity import (batched_fidelity, fidelity_after_prefill, greedy_tokens,
                                  kl_after_prefill)

runner = CliRunner()
PROMPTS = ("Sort 3 1 2", "Reverse the letters: a b c", "Add 4 and 5")


def points(*triples):
    return [RulePoint(d, high, high, high) for d, high in triples]


def test_choice_is_the_lowest_density_with_everything_above_within_budget():
    ladder = points((0.3, 0.9), (0.5, 0.2), (0.7, 0.3), (0.9, 0.1))
    assert choose_default_density(ladder, 0.25) == 0.9  # 0.5 is within, but 0.7 above it is not
    assert choose_default_density(ladder, 0.35) == 0.5
    assert choose_default_density(ladder, 1.0) == 0.3
    assert choose_default_density(ladder, 0.05) == 1.0  # none: dense
    assert choose_default_density([], 1.0) == 1.0


def test_the_rule_reads_the_upper_end_of_the_interval_not_the_estimate():
    assert choose_default_density([RulePoint(0.5, loss=0.1, low=0.0, high=0.3)], 0.25) == 1.0
    assert choose_default_density([RulePoint(0.5, loss=0.1, low=0.0, high=0.2)], 0.25) == 0.5
    assert choose_default_density([RulePoint(0.5, 0.1, 0.0, float("nan"))], 0.25) == 1.0
    # task scores: loss = dense - pruned in points, non-inferiority within 3 points
    assert choose_default_density([RulePoint(0.7, -1.0, -4.0, 2.5), RulePoint(0.5, 2.0, -1.0, 5.0)], 3.0) == 0.7


ladders = st.lists(st.tuples(st.sampled_from([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
                             st.floats(0, 5)), max_size=9, unique_by=lambda t: t[0])


@settings(max_examples=200, deadline=None)
@given(ladders, st.floats(0, 5), st.floats(0, 5))
def test_rule_properties(ladder, budget, more):
    chosen = choose_default_density(points(*ladder), budget)
    assert chosen == 1.0 or chosen in [d for d, _ in ladder]
    assert all(high <= budget for d, high in ladder if d >= chosen)  # everything above passes
    below = [(d, high) for d, high in ladder if d < chosen]
    if below:  # the next density down fails, else it would have been chosen
        assert max(below)[1] > budget
    # a larger budget never raises the density; a larger loss anywhere never lowers it
    assert choose_default_density(points(*ladder), budget + more) <= chosen
    worse = [(d, high + more * (i % 2)) for i, (d, high) in enumerate(ladder)]
    assert choose_default_density(points(*worse), budget) >= chosen


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


def test_batched_masks_give_the_figures_of_applied_selections(bundle_dir, q4_bundle_dir):
    for folder in (bundle_dir, q4_bundle_dir):
        engine = ifp.load(folder)
        ids = engine.prompt_tokens(PROMPTS[1])
        answer = greedy_tokens(engine.model, ids, 6)
        counts = engine.kept_counts(0.5)
        uneven = [c if i % 2 else max(1, c // 2) for i, c in enumerate(counts)]
        selections = [*engine.select_densities(PROMPTS[1], [0.25, 0.5], "activations"),
                      *engine.selections(engine.scores(engine.get_selector("activations"), ids), [uneven])]
        # the same positions: fidelity_after_prefill scores the last prompt position and the continuation
        one_by_one = [fidelity_after_prefill(engine, ids, answer[:-1], [s])[0] for s in selections]
        engine.apply(None)
        batched = batched_fidelity(engine, ids, answer, selections)
        for (kl, _), (kl_b, agreement) in zip(one_by_one, batched):
            assert kl_b == pytest.approx(kl, rel=1e-3, abs=1e-5) and 0 <= agreement <= 1
        assert batched[0][0] > batched[1][0] > 1e-4


@pytest.mark.parametrize("selector", ["activations", "predictor"])
def test_one_dense_pass_gives_what_a_pass_per_prompt_gives(bundle_dir, q4_bundle_dir, selector):
    """calibrate's batched dense pass (prompts of different lengths, padded) gives every prompt
    the answer, the selector's scores and the dense prefill a pass of its own gives."""
    from ifprune_mlx.calibrate import _dense_pass
    from ifprune_mlx.fidelity import prefill_dense

    prompts = (*PROMPTS, "Write one long sentence about the sea, the wind, the boats and the gulls above them.")
    for folder in (bundle_dir, q4_bundle_dir):
        engine = ifp.load(folder)
        chooser = engine.get_selector(selector)
        stops = set(engine.tokenizer.eos_token_ids or [])
        references = _dense_pass(engine, chooser, prompts, 6)
        assert len({len(ids) for _, ids, _, _ in references}) > 1
        for prompt, (scores, ids, cache, answer) in zip(prompts, references):
            assert ids == engine.prompt_tokens(prompt)
            alone = greedy_tokens(engine.model, ids, 6)
            assert answer == alone[:len(answer)] and (len(answer) == 6 or answer[-1] in stops)
            np.testing.assert_allclose(scores, engine.scores(chooser, chooser.inputs(prompt)), rtol=1e-4, atol=1e-6)
            for mine, own in zip(cache, prefill_dense(engine, ids)):
                assert mine.offset == own.offset == len(ids) - 1
                for a, b in ((mine.keys, own.keys), (mine.values, own.values)):
                    assert np.allclose(np.array(a[..., :mine.offset, :]), np.array(b[..., :own.offset, :]),
                                       rtol=1e-4, atol=1e-5)


def test_calibrate_measures_every_density_and_leaves_the_engine_unpinned(bundle_dir):
    engine = ifp.load(bundle_dir)
    before = engine.default_density
    result = calibrate(engine, densities=(0.25, 0.5, 1.0), prompts=PROMPTS, answer_tokens=4,
                       selector="activations", kl_budget=1e-6, budget_prompts=PROMPTS[:2])
    assert [r.density for r in result.rows] == [0.25, 0.5, 1.0]
    assert [r.kept for r in result.rows] == [engine.kept_count(d) for d in (0.25, 0.5, 1.0)]
    assert result.rows[-1].kl == pytest.approx(0.0, abs=1e-5) and result.rows[-1].agreement == 1.0
    assert result.rows[0].kl > 0
    assert all(r.kl_low <= r.kl <= r.kl_high for r in result.rows)
    assert result.density == 1.0 and result.prompts == 3 and result.selector == "activations"
    assert result.version == VERSION and result.measure == "kl" and result.budget == 1e-6
    assert [c.density for c in result.comparison] == [0.25, 0.5, 1.0]
    assert all(c.diff_low <= c.diff <= c.diff_high for c in result.comparison)
    assert len(result.layer_budgets["loss"]) == engine.n_layers and result.budget_prompts == 2
    assert engine.default_density == before and engine._pin == "auto" and engine.budgets is None


def test_an_older_calibration_record_still_loads_and_says_so():
    old = {"selector": "activations", "prompts": 24, "answer_tokens": 24, "kl_budget": 0.25, "density": 0.9,
           "rows": [{"density": 0.9, "kept": 1408, "kl": 0.218, "kl_low": 0.16, "kl_high": 0.279, "agreement": 0.8}]}
    c = Calibration.from_json(old)
    assert c.version == 1 and c.layer_budgets is None and "older rule" in c.summary()
    assert Calibration.from_json({**c.to_json(), "from_the_future": 1}).density == 0.9


def test_cli_calibrates_a_bundle_and_stores_the_default(tmp_path, bundle_dir):
    bundle = shutil.copytree(bundle_dir, tmp_path / "bundle")
    result = runner.invoke(app, ["calibrate", str(bundle), "--densities", "0.25,0.5,1", "--kl-budget", "100",
                                 "--answer-tokens", "3", "--selector", "activations",
                                 "--out", str(tmp_path / "CAL.md"), "--plot", str(tmp_path / "cal.png")])
    assert result.exit_code == 0, result.output
    assert "| 0.25 **default** |" in result.output
    block = json.loads((bundle / "config.json").read_text())["ifpruning"]
    assert block["default_density"] == 0.25 and block["calibration"]["budget"] == 100
    assert block["calibration"]["measure"] == "kl" and block["calibration"]["version"] == VERSION
    assert (tmp_path / "cal.png").stat().st_size > 1000
    assert "ifprune calibrate" in (tmp_path / "CAL.md").read_text()
    info = runner.invoke(app, ["info", str(bundle)])
    assert "0.25 -> keeps" in info.output and "calibrated: lowest density" in info.output
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
    assert "calibrating" in result.output  # a stage line: the runner is not a terminal
    skipped = runner.invoke(app, ["convert", str(plain_dir), str(tmp_path / "c"), "--no-calibrate"])
    assert "calibration" not in json.loads((tmp_path / "c" / "config.json").read_text())["ifpruning"]
    assert skipped.exit_code == 0
