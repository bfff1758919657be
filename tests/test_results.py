"""examples/smollm2/results.py (`make results`) on tiny trained artifacts, and its hooks: per-layer
budgets on/off per eval condition, the static-mask selector, the instruction-kind split."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

import checkpoints  # noqa: E402
from ifprune_mlx import load  # noqa: E402
from ifprune_mlx.budgets import LayerBudgets, steps  # noqa: E402
from ifprune_mlx.eval_run import Condition, MetricResult, layer_budgets  # noqa: E402
from ifprune_mlx.selectors import StaticSelector, static_scores, static_top_k, top_k  # noqa: E402

PROMPTS = ["Write a Python function that reverses a list.", "Translate the sentence into French, please.",
           "What is the sum of 12 and 30?", "Sort these numbers: 5 3 9 1."]


def _calibrated(folder: Path, selector: str) -> Path:
    """A small calibration with per-layer budgets stored in the bundle."""
    from ifprune_mlx.calibrate import calibrate
    from ifprune_mlx.calibration_store import save_calibration

    engine = load(folder)
    result = calibrate(engine, densities=(0.5,), prompts=PROMPTS[:2], answer_tokens=3, selector=selector,
                       budget_prompts=PROMPTS[2:])
    save_calibration(engine, result)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Q4_1 GGUF (the original), its data, two training steps exported, the adapted bundle
    (convert --predictor) and the plain one, both calibrated with per-layer budgets."""
    from typer.testing import CliRunner

    from ifprune_mlx.cli import app

    root = tmp_path_factory.mktemp("results")
    gguf, data_file, _, artifacts = checkpoints.smollm2_artifacts(root)
    for out, extra in (("adapted", ["--predictor", str(artifacts)]), ("original", [])):
        result = CliRunner().invoke(app, ["convert", str(gguf), str(root / out), *extra, "--no-calibrate"])
        assert result.exit_code == 0, result.output
    _calibrated(root / "adapted", "predictor")
    _calibrated(root / "original", "activations")
    return {"root": root, "gguf": gguf, "artifacts": artifacts, "data": data_file,
            "adapted": root / "adapted", "original": root / "original"}


def _args(tiny, out: Path, *extra) -> list[str]:
    return ["--limit", "2", "--densities", "1.0,0.5", "--max-gen-toks", "6", "--out-dir", str(out),
            "--model", str(tiny["adapted"]), "--original", str(tiny["original"]), "--artifacts", str(tiny["artifacts"]),
            "--teacher", str(tiny["gguf"]), "--data", str(tiny["data"]), "--per-family", "1", "--threads", "1",
            "--batch", "8", "--cache", str(tiny["root"] / "answers"), "--kl-cache", str(tiny["root"] / "kl.json"),
            *extra]


@pytest.fixture(scope="module")
def first_run(tiny):
    from examples.smollm2 import results

    out = tiny["root"] / "out"
    return results.main(_args(tiny, out)), out


CELLS = {"original", "adapted", "ifp@0.5", "ifp_layers@0.5", "free@0.5", "free_layers@0.5", "static@0.5"}


def test_every_condition_appears_with_scores_kl_and_intervals(first_run):
    figures, out = first_run
    assert {c["id"] for c in figures["cells"]} == CELLS
    assert set(figures["tasks"]["cells"]) == CELLS and set(figures["kl"]["conditions"]) == CELLS
    for cell_id, t in figures["tasks"]["cells"].items():
        for name in ("prompt", "inst", "exact"):
            m = t["metrics"][name]
            assert m["docs"] == 2 and None not in m["ci"] and m["ci"][0] <= m["score"] <= m["ci"][1]
            if cell_id == "original":  # the reference
                assert m["diff"] is None
            else:
                assert m["diff"] is not None and m["diff_ci"][0] <= m["diff"] <= m["diff_ci"][1]
        assert set(t["kinds"]) == {"never trained", "trained"}
        assert t["kinds"]["trained"]["prompts"] == 0  # the tiny data's header trains no instruction kind
        unseen = t["kinds"]["never trained"]["prompt_level_strict_acc"]
        assert unseen["docs"] == 2 and (unseen["diff"] is None) == (cell_id == "original")
    for cell_id, k in figures["kl"]["conditions"].items():
        assert k["all"]["prompts"] == 2 and k["all"]["ci"][0] <= k["all"]["kl"] + 1e-9 <= k["all"]["ci"][1] + 1e-9
    assert figures["kl"]["conditions"]["original"]["all"]["kl"] < 1e-5
    assert figures["kl"]["conditions"]["free@0.5"]["all"]["kl"] > 0
    text = (out / "RESULTS.md").read_text()
    for label in ("original dense (reference)", "adapted dense", "IFPruning, uniform", "IFPruning, per-layer budgets",
                  "training-free, uniform", "training-free, per-layer budgets", "static mask", "--limit 2: a smoke run",
                  "never trained", "never-trained families"):
        assert label in text, label
    assert (out / "results.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["meta"]["limit"] == 2


def test_a_second_run_computes_nothing(tiny, first_run):
    from examples.smollm2 import results

    files = sorted((tiny["root"] / "answers").rglob("*.jsonl")) + [tiny["root"] / "kl.json"]
    before = {p: p.read_text() for p in files}
    assert len(files) == len(CELLS) + 1
    figures = results.main(_args(tiny, tiny["root"] / "again"))
    assert {p: p.read_text() for p in files} == before
    assert all(t["computed"] == 0 and t["requests"] > 0 for t in figures["tasks"]["cells"].values())
    assert figures["kl"]["conditions"] == first_run[0]["kl"]["conditions"]


def test_test_split_warns_and_smoke_runs_stay_out_of_the_committed_results(tiny, capsys):
    from examples.smollm2 import results

    results.main(_args(tiny, tiny["root"] / "test-split", "--split", "test", "--no-tasks", "--no-kl"))
    assert results.TEST_WARNING in capsys.readouterr().err
    assert "held-out test split" in (tiny["root"] / "test-split" / "RESULTS.md").read_text()
    with pytest.raises(SystemExit):
        results.parse(["--limit", "3"])  # would overwrite examples/smollm2/RESULTS.md
    assert "--out-dir" in capsys.readouterr().err


# -- the hooks ----------------------------------------------------------------------------------

def _skewed_budgets(engine) -> LayerBudgets:
    """Budgets whose first layer loses far more per dropped channel than the others."""
    grid = steps(engine.d_ffn, engine.pad_multiple)
    loss = [[(10.0 if layer == 0 else 1.0) * (1 - k / engine.d_ffn) for k in grid] for layer in range(engine.n_layers)]
    return LayerBudgets(selector="predictor", prompts=1, pad_multiple=engine.pad_multiple, loss=loss, enabled=False)


def test_budgets_on_and_off_change_the_kept_counts_of_a_condition(bundle_dir, tmp_path):
    from ifprune_mlx.eval_lm import EngineLM, EvalError, GenerationCache

    engine = load(bundle_dir)
    with pytest.raises(EvalError, match="no per-layer budgets"):
        with layer_budgets(engine, True):
            pass
    engine.budgets = _skewed_budgets(engine)
    uniform = [engine.kept_count(0.5)] * engine.n_layers
    kept = {}
    for on in (True, False):
        condition = Condition("m", 0.5, "predictor", budgets=on)
        lm = EngineLM(engine, 0.5, "predictor", GenerationCache(tmp_path / f"{condition.name}.jsonl"))
        with layer_budgets(engine, condition.budgets):
            engine.generate(PROMPTS[0], density=0.5, selector="predictor", max_tokens=2)
            kept[on] = engine.applied.kept_counts
        assert lm.density == 0.5
    assert kept[False] == uniform
    assert kept[True] != uniform and sum(kept[True]) == sum(uniform) and kept[True][0] > uniform[0]
    assert engine.budgets.enabled is False  # restored
    names = {Condition("m", 0.5, "predictor", budgets=b).name for b in (None, True, False)}
    assert names == {"0.50-predictor", "0.50-predictor-layers", "0.50-predictor-uniform"}
    assert Condition("m", None, budgets=True).name == "dense"


def test_the_static_selector_keeps_one_mask_for_every_prompt(bundle_dir):
    engine = load(bundle_dir)
    chooser = engine.get_selector("predictor")
    scores = [engine.scores(chooser, chooser.inputs(p)) for p in PROMPTS]
    k = engine.kept_count(0.5)
    engine.selectors["static"] = static = StaticSelector(lambda: static_scores(iter(scores), [k])[0])
    applied = []
    for prompt in PROMPTS:
        engine.generate(prompt, density=0.5, selector="static", max_tokens=2)
        applied.append(engine.applied.indices)
    want = static_top_k(np.stack(scores), k)
    for indices in applied:
        assert all(np.array_equal(a, b) for a, b in zip(indices, want))
    assert static.calls == 1  # one selection, shared by every prompt (cached)
    per_prompt = [engine.select(p, 0.5, "predictor").indices for p in PROMPTS]
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(per_prompt, per_prompt[1:]))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(2, 12), st.data())
def test_static_scores_are_the_frequency_rule_in_one_pass(n, layers, width, draw):
    rng = np.random.default_rng(draw.draw(st.integers(0, 10_000)))
    scores = rng.normal(size=(n, layers, width)).astype(np.float32)
    ks = sorted(draw.draw(st.lists(st.integers(1, width), min_size=1, max_size=3)))
    for k, fixed in zip(ks, static_scores(iter(scores), ks)):
        frequency = np.zeros((layers, width))
        for one in scores:
            for layer, ids in enumerate(top_k(one, k)):
                frequency[layer, ids] += 1
        assert np.array_equal(np.round(fixed * n), frequency)  # the tie-break stays far below one prompt
        direct = frequency / n + 1e-3 * (scores.mean(0) - scores.mean()) / (scores.std() + 1e-9)
        assert all(np.array_equal(a, b) for a, b in zip(top_k(fixed, k), top_k(direct, k)))


def test_instruction_kinds_never_trained_and_trained_are_scored_apart():
    from examples.smollm2.results import kind_groups

    records = [{"instruction_id_list": kinds} for kinds in (["a"], ["b"], ["a", "b"], ["b", "b"])]
    followed = {"0": [1.0], "1": [0.0], "2": [1.0, 0.0], "3": [1.0, 1.0]}
    ref = {"0": [0.0], "1": [1.0], "2": [1.0, 1.0], "3": [1.0, 0.0]}

    def metrics(items):
        prompt = {d: [float(all(v)), 1.0] for d, v in items.items()}
        inst = {d: [sum(v), float(len(v))] for d, v in items.items()}
        return {"prompt_level_strict_acc,none": MetricResult(0.0, values=prompt),
                "inst_level_strict_acc,none": MetricResult(0.0, values=inst, items=items)}

    groups = kind_groups(metrics(followed), metrics(ref), records, trained={"a"})
    trained, unseen = groups["trained"], groups["never trained"]
    assert trained["prompts"] == 1 and trained["prompt_level_strict_acc"]["score"] == 1.0  # doc 0 only
    assert trained["inst_level_strict_acc"]["score"] == 1.0 and trained["inst_level_strict_acc"]["docs"] == 2
    assert trained["inst_level_strict_acc"]["diff"] == pytest.approx(0.5)  # ref follows 1 of the 2 "a"s
    assert unseen["prompts"] == 2 and unseen["prompt_level_strict_acc"]["score"] == 0.5  # docs 1, 3
    assert unseen["inst_level_strict_acc"]["score"] == pytest.approx(2 / 4)  # the b's of docs 1, 2, 3 (two)
    assert unseen["inst_level_strict_acc"]["diff"] == pytest.approx(2 / 4 - 3 / 4)
    reference = metrics(ref)
    itself = kind_groups(reference, reference, records, trained={"a"})["never trained"]
    assert itself["prompt_level_strict_acc"]["diff"] is None and itself["inst_level_strict_acc"]["diff"] is None
    same = kind_groups(metrics(ref), reference, records, trained={"a"})["never trained"]  # equal values, another run
    assert same["prompt_level_strict_acc"]["diff"] == 0.0 and same["inst_level_strict_acc"]["diff"] == 0.0


def test_trained_kinds_come_from_the_training_data_headers(tmp_path):
    from examples.smollm2.results import trained_kinds

    plain, tagged = tmp_path / "plain.jsonl", tmp_path / "tagged.jsonl"
    plain.write_text(json.dumps({"meta": {"instructions": 0}}) + "\n")
    tagged.write_text(json.dumps({"meta": {"constraint_kinds_trained": ["change_case:english_lowercase"]}}) + "\n")
    (tmp_path / "train_config.json").write_text(json.dumps({"data": f"{plain},{tagged}"}))
    assert trained_kinds(tmp_path) == ({"change_case:english_lowercase"}, [str(plain), str(tagged)])
    (tmp_path / "train_config.json").write_text(json.dumps({"data": str(plain)}))
    assert trained_kinds(tmp_path)[0] == set()
    assert trained_kinds(tmp_path, f"{tagged}")[0] == {"change_case:english_lowercase"}
    (tmp_path / "train_config.json").write_text(json.dumps({"data": str(tmp_path / "gone.jsonl")}))
    with pytest.raises(SystemExit, match="gone.jsonl"):
        trained_kinds(tmp_path)
