"""`ifprune eval`: the lm-eval model over the Engine, the cache, intervals, paired differences, errors."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from ifprune_mlx import load, stats  # noqa: E402
from ifprune_mlx.cli import app  # noqa: E402
from ifprune_mlx.eval_lm import EngineLM, EvalError, GenerationCache, model_fingerprint  # noqa: E402
from ifprune_mlx.eval_run import SEED  # noqa: E402

runner = CliRunner()
DOCS = [(a, b) for a, b in [(1, 2), (3, 4), (5, 6), (12, 30), (7, 8), (2, 2), (9, 1), (4, 4), (6, 3), (8, 8)]]


def write_tasks(folder: Path) -> Path:
    """Two tiny offline tasks: a generation (exact match) and a three-way multiple choice."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"What is the sum of {a} and {b}?", "answer": str(a + b), "target": i % 3,
             "choices": [str(a + b), str(a * b), str(a - b)]} for i, (a, b) in enumerate(DOCS)]
    for row in rows:  # the right answer at the target's place
        row["choices"][0], row["choices"][row["target"]] = row["choices"][row["target"]], row["choices"][0]
    (folder / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'tiny.jsonl'}\ntest_split: test\n"
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n', 'um']\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{question}} Answer:'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: target\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("eval-tasks"))


@pytest.fixture(scope="module")
def engine(bundle_dir):
    return load(bundle_dir)


class Request:  # what EngineLM reads of an lm-eval Instance
    def __init__(self, *args):
        self.args = args


# -- the statistics -------------------------------------------------------------------------

def _direct_percentiles(stat):
    return np.percentile(stat, 2.5), np.percentile(stat, 97.5)


def test_intervals_and_paired_differences_match_a_direct_computation():
    rng = np.random.default_rng(5)
    counts = rng.integers(1, 4, size=40).astype(float)
    a, b = rng.binomial(counts.astype(int), 0.6).astype(float), rng.binomial(counts.astype(int), 0.4).astype(float)
    idx = np.random.default_rng(7).integers(0, 40, size=(stats.DRAWS, 40))
    ra, rb = a[idx].sum(1) / counts[idx].sum(1), b[idx].sum(1) / counts[idx].sum(1)
    assert stats.ratio_interval(a, counts, seed=7) == pytest.approx(_direct_percentiles(ra))
    diff, low, high = stats.paired_difference((a, counts), (b, counts), seed=7)
    assert diff == pytest.approx(a.sum() / counts.sum() - b.sum() / counts.sum())
    assert (low, high) == pytest.approx(_direct_percentiles(ra - rb))
    plain = rng.random(30)
    assert stats.bootstrap_interval(plain, seed=3) == pytest.approx(
        stats.ratio_interval(plain, np.ones(30), seed=3))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=30))
def test_a_condition_compared_with_itself_differs_by_zero(docs):
    nums, counts = [float(min(n, c)) for n, c in docs], [float(c) for _, c in docs]
    assert stats.paired_difference((nums, counts), (nums, counts)) == (0.0, 0.0, 0.0)
    low, high = stats.ratio_interval(nums, counts)
    assert min(n / c for n, c in zip(nums, counts)) - 1e-12 <= low <= high <= max(n / c for n, c in zip(nums, counts)) + 1e-12


# -- the lm-eval model ----------------------------------------------------------------------

def _lm(engine, tmp_path, density, selector=None):
    return EngineLM(engine, density, selector, GenerationCache(tmp_path / f"{density}-{selector}.jsonl"))


@pytest.fixture
def dense_prefill(engine):
    """The engine with the trained predictor's prefill "dense" for one test."""
    engine.prefill = "dense"
    yield engine
    engine.prefill = "pruned"


CONDITIONS = [(None, None), (0.5, "predictor"), (0.5, "activations"), (0.5, "predictor-dense-prefill")]


def _condition(request, selector):
    """(selector name, whether the trained predictor's prompt is prefilled dense) of a CONDITIONS entry."""
    if selector == "predictor-dense-prefill":
        request.getfixturevalue("dense_prefill")
        return "predictor", True
    return selector, False


@pytest.mark.parametrize("density,selector", CONDITIONS)
def test_generate_until_is_the_engines_greedy_answer_cut_at_the_stop_strings(engine, tmp_path, density, selector,
                                                                            request):
    selector, _ = _condition(request, selector)
    lm = _lm(engine, tmp_path, density, selector)
    prompt = "Sort these numbers: 5 3 9 1."
    options = {} if density is None else {"density": density, "selector": selector}
    if density is None:
        engine.apply(None)
    full = engine.generate(prompt, max_tokens=8, **options)
    engine.apply("auto")
    stop = full[3:5]
    text, = lm.generate_until([Request(prompt, {"until": [stop], "max_gen_toks": 8})])
    assert text == full[:full.index(stop)]
    whole, = lm.generate_until([Request(prompt, {"until": [], "max_gen_toks": 8})])
    assert whole == full
    assert lm.answered["generate_until"][-1]["tokens"] == 8


def _direct_logits(engine, prompt, ids, cont, density, selector, dense_prefill=False):
    """The condition's logits over the continuation, computed here step by step."""
    from ifprune_mlx.fidelity import prefill_dense

    if density is None:
        engine.apply(None)
        logits = engine.model(mx.array([ids + cont], dtype=mx.int32))[0, len(ids) - 1:-1]
    elif selector == "predictor" and not dense_prefill:  # the prompt and the continuation run pruned
        engine.apply(engine.select(prompt, density, selector))
        logits = engine.model(mx.array([ids + cont], dtype=mx.int32))[0, len(ids) - 1:-1]
    else:  # GRIFFIN (or the predictor's dense prefill): the prompt but its last token dense, the rest pruned
        selection = engine.select(prompt, density, selector)
        cache = prefill_dense(engine, ids)
        engine.apply(selection)
        logits = engine.model(mx.array([ids[-1:] + cont[:-1]], dtype=mx.int32), cache=cache)[0]
    engine.apply("auto")
    return np.asarray(logits.astype(mx.float32))


@pytest.mark.parametrize("density,selector", CONDITIONS)
def test_loglikelihood_is_the_conditions_log_probability(engine, tmp_path, density, selector, request):
    selector, dense_prefill = _condition(request, selector)
    lm = _lm(engine, tmp_path, density, selector)
    prompt, continuation = "What is the sum of 12 and 30?", " The answer is 42."
    ids = engine.prompt_tokens(prompt)
    cont = list(engine.tokenizer.encode(continuation, add_special_tokens=False))
    logits = _direct_logits(engine, prompt, ids, cont, density, selector, dense_prefill)
    if dense_prefill:  # the setting shows: the pruned prefill's log-probability is another one
        pruned = _direct_logits(engine, prompt, ids, cont, density, selector)
        assert np.abs(pruned - logits).max() > 1e-3
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    (logprob, greedy), = lm.loglikelihood([Request(prompt, continuation)])
    assert logprob == pytest.approx(float(sum(logp[i, t] for i, t in enumerate(cont))), rel=1e-4)
    assert greedy == bool((logits.argmax(-1) == np.array(cont)).all())
    # the model's own greedy tokens are called greedy
    argmax = [int(t) for t in logits.argmax(-1)]
    text = engine.tokenizer.decode(argmax[:1])
    if list(engine.tokenizer.encode(text, add_special_tokens=False)) == argmax[:1]:
        (_, greedy_first), = lm.loglikelihood([Request(prompt, text)])
        assert greedy_first


def test_answers_are_cached_and_a_cut_line_is_recomputed(engine, tmp_path):
    lm = _lm(engine, tmp_path, 0.5, "predictor")
    request = Request("Count the letters in pruning.", {"until": [], "max_gen_toks": 4})
    first, = lm.generate_until([request])
    path = lm.cache.path
    with open(path, "a") as f:
        f.write('{"key": "cut sh')  # an interrupted write
    again = _lm(engine, tmp_path, 0.5, "predictor")
    assert again.generate_until([request]) == [first] and again.cache.added == 0


def _calibration(engine, loss_of_layer) -> "Calibration":
    """A calibration record whose per-layer budgets (on) have loss_of_layer(l) at every step."""
    from ifprune_mlx.budgets import LayerBudgets, steps
    from ifprune_mlx.calibrate import Calibration

    width = len(steps(engine.d_ffn, engine.pad_multiple))
    loss = [[loss_of_layer(layer) * (width - s) / width for s in range(width)] for layer in range(engine.n_layers)]
    budgets = LayerBudgets("activations", 3, engine.pad_multiple, loss, enabled=True)
    return Calibration("activations", 5, 16, 0.25, density=0.7, version=2, budget=0.25,
                       layer_budgets=budgets.to_json())


def test_the_fingerprint_ignores_what_a_calibration_stores_only(bundle_dir, tmp_path):
    """A re-calibration rewrites config.json's default density and calibration record: the
    fingerprint stays (the cached answers of the model are kept); anything else in the
    config, or another file, changes it."""
    import shutil

    from ifprune_mlx.bundle import update_ifpruning

    copy = Path(shutil.copytree(bundle_dir, tmp_path / "copy"))
    before = model_fingerprint(copy)
    engine = load(copy)
    for weight in (1.0, 3.0):  # two calibrations with different records and budgets
        record = _calibration(engine, lambda layer: weight * (layer + 1))
        update_ifpruning(copy, {"default_density": 0.9 - weight / 10, "calibration": record.to_json()})
        assert model_fingerprint(copy) == before
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu")))
    assert model_fingerprint(copy) != before
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) == before
    weights = next(copy.glob("*.safetensors"))
    older = model_fingerprint(copy, by_content=False)
    weights.write_bytes(weights.read_bytes())  # a re-conversion writing the same bytes: new times
    assert model_fingerprint(copy) == before and model_fingerprint(copy, by_content=False) != older
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size, one bit of a weight changed
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != before


def test_answers_kept_under_the_older_key_are_copied_in_once(bundle_dir, tmp_path):
    """Caches written under the older key (file times) are found: copied to the new key the
    first time, the older file left as it was; a file already under the new key is kept."""
    from ifprune_mlx.eval_lm import answers_file

    engine = load(bundle_dir)
    older = tmp_path / model_fingerprint(bundle_dir, by_content=False) / "0.50-predictor.jsonl"
    older.parent.mkdir(parents=True)
    older.write_text('{"key": "k", "text": "kept"}\n')
    path = answers_file(tmp_path, engine, 0.5, "predictor")
    assert path.parent.name == model_fingerprint(bundle_dir) != older.parent.name
    assert GenerationCache(path).get("k")["text"] == "kept" and older.is_file()
    path.write_text('{"key": "k", "text": "newer"}\n')
    older.write_text('{"key": "k", "text": "changed"}\n')
    assert GenerationCache(answers_file(tmp_path, engine, 0.5, "predictor")).get("k")["text"] == "newer"
    assert not answers_file(tmp_path, engine, 0.7, "predictor").exists()


def test_answers_are_cached_per_kept_counts_when_layer_budgets_set_them(bundle_dir):
    """Per-layer budgets change what a density computes but live in the calibration, which the
    fingerprint leaves out: the cache file of a pruned condition then names its counts."""
    from ifprune_mlx.eval_lm import cache_name

    engine = load(bundle_dir)
    assert cache_name(engine, None, None) == "dense"
    assert cache_name(engine, 0.5, "activations") == "0.50-activations"  # uniform counts
    engine.use_calibration(_calibration(engine, lambda layer: float(layer + 1)))
    counts = engine.kept_counts(0.5)
    assert len(set(counts)) > 1  # the budgets are not uniform here
    first = cache_name(engine, 0.5, "activations")
    assert first.startswith("0.50-activations-layers-") and cache_name(engine, None, None) == "dense"
    engine.use_calibration(_calibration(engine, lambda layer: float(engine.n_layers - layer)))
    assert engine.kept_counts(0.5) != counts
    assert cache_name(engine, 0.5, "activations") not in (first, "0.50-activations")
    engine.use_calibration(_calibration(engine, lambda layer: float(layer + 1)))
    assert cache_name(engine, 0.5, "activations") == first


def test_perplexity_tasks_say_why_they_are_not_supported(engine, tmp_path):
    with pytest.raises(EvalError, match="loglikelihood_rolling"):
        _lm(engine, tmp_path, 0.5, "predictor").loglikelihood_rolling([Request("text")])


# -- the command ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(bundle_dir, tasks_dir, tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("eval-out"), tmp_path_factory.mktemp("eval-cache")
    args = ["eval", str(bundle_dir), "--tasks", "tiny_gen,tiny_mc", "--include-path", str(tasks_dir),
            "--density", "1.0,0.5", "--selector", "predictor,activations", "--out", str(out), "--cache", str(cache)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return args, out, cache, result


def test_eval_writes_scores_intervals_and_paired_differences(evaluated):
    _, out, _, result = evaluated
    data = json.loads((out / "results.json").read_text())
    conditions = {(c["condition"]["density"], c["condition"]["selector"]): c for c in data["conditions"]}
    assert set(conditions) == {(None, None), (0.5, "predictor"), (0.5, "activations")}
    reference = conditions[(None, None)]
    assert reference["condition"]["reference"] and reference["decode_tps"] > 0
    for c in conditions.values():
        assert set(c["metrics"]) == {"tiny_gen", "tiny_mc"}
        assert c["requests"] == len(DOCS) * 4 and c["tokens"] > 0
        for task, label in (("tiny_gen", "exact_match,none"), ("tiny_mc", "acc,none")):
            m, ref = c["metrics"][task][label], reference["metrics"][task][label]
            docs = sorted(m["values"], key=int)
            assert len(docs) == len(DOCS) == m["docs"]
            v = np.array([m["values"][d][0] for d in docs])
            r = np.array([ref["values"][d][0] for d in docs])
            assert m["score"] == pytest.approx(v.mean())
            idx = np.random.default_rng(SEED).integers(0, len(docs), size=(stats.DRAWS, len(docs)))
            assert (m["low"], m["high"]) == pytest.approx(_direct_percentiles(v[idx].mean(1)))
            if c is not reference:
                assert m["diff"] == pytest.approx(v.mean() - r.mean())
                assert (m["diff_low"], m["diff_high"]) == pytest.approx(_direct_percentiles(v[idx].mean(1) - r[idx].mean(1)))
    table = (out / "results.md").read_text()
    assert "bundle 0.50 predictor | tiny_mc | acc,none" in table and "(reference)" in table
    assert (out / "quality_vs_speed.png").stat().st_size > 1000
    assert "| bundle dense (reference) | tiny_gen | exact_match,none |" in result.output
    assert f"bundle 0.50-activations generate_until: {len(DOCS)}/{len(DOCS)}" in result.output  # progress lines


def test_a_rerun_only_reads_the_cache(evaluated):
    args, out, cache, _ = evaluated
    before = {p: p.read_text() for p in cache.rglob("*.jsonl")}
    assert len(before) == 3
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {p: p.read_text() for p in cache.rglob("*.jsonl")} == before
    data = json.loads((out / "results.json").read_text())
    assert all(c["computed"] == 0 and c["requests"] > 0 for c in data["conditions"])


def test_a_reference_model_is_run_dense_and_compared(bundle_dir, plain_dir, tasks_dir, tmp_path):
    result = runner.invoke(app, ["eval", str(bundle_dir), "--tasks", "tiny_mc", "--include-path", str(tasks_dir),
                                 "--density", "0.5", "--reference", str(plain_dir), "--limit", "4",
                                 "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    ref, pruned = data["conditions"]
    assert ref["condition"] == {"model": "plain", "density": None, "selector": None, "reference": True,
                                "budgets": None, "prefill": None}
    assert pruned["condition"]["density"] == 0.5 and pruned["metrics"]["tiny_mc"]["acc,none"]["docs"] == 4
    assert pruned["metrics"]["tiny_mc"]["acc,none"]["diff"] is not None


def test_budgets_uniform_and_per_layer_are_conditions_of_their_own(bundle_dir, tasks_dir, tmp_path):
    import shutil

    from ifprune_mlx.budgets import LayerBudgets, steps
    from ifprune_mlx.calibrate import Calibration
    from ifprune_mlx.calibration_store import save_calibration

    folder = Path(shutil.copytree(bundle_dir, tmp_path / "calibrated"))
    engine = load(folder)
    grid = steps(engine.d_ffn, engine.pad_multiple)
    loss = [[(5.0 if layer == 0 else 1.0) * (1 - k / engine.d_ffn) for k in grid] for layer in range(engine.n_layers)]
    budgets = LayerBudgets(selector="predictor", prompts=1, pad_multiple=engine.pad_multiple, loss=loss)
    save_calibration(engine, Calibration(selector="predictor", prompts=1, answer_tokens=1, kl_budget=0.25,
                                         rows=[], density=0.5, layer_budgets=budgets.to_json()))
    result = runner.invoke(app, ["eval", str(folder), "--tasks", "tiny_mc", "--include-path", str(tasks_dir),
                                 "--density", "0.5", "--budgets", "uniform,per-layer", "--limit", "2",
                                 "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [c["condition"]["budgets"] for c in data["conditions"]] == [None, False, True]
    names = {p.name for p in (tmp_path / "cache").rglob("*.jsonl")}  # cached apart: named by their kept counts
    assert {n for n in names if not n.startswith("0.50-predictor-layers-")} == {"dense.jsonl", "0.50-predictor.jsonl"}
    assert len(names) == 3
    assert "0.50 predictor per-layer" in (tmp_path / "out" / "results.md").read_text()


def test_a_dense_prefill_is_a_condition_of_its_own(bundle_dir, tasks_dir, tmp_path):
    """--prefill dense runs the trained predictor's conditions with the prompt prefilled dense:
    named and cached apart from the pruned prefill's, the training-free selector's unchanged."""
    from ifprune_mlx.eval_lm import cache_name

    engine = load(bundle_dir)
    assert engine.prefill == "pruned" and cache_name(engine, 0.5, "predictor") == "0.50-predictor"
    engine.prefill = "dense"
    assert cache_name(engine, 0.5, "predictor") == "0.50-predictor-dense-prefill"
    assert cache_name(engine, 0.5, "activations") == "0.50-activations" and cache_name(engine, None, None) == "dense"
    base = ["eval", str(bundle_dir), "--tasks", "tiny_gen", "--include-path", str(tasks_dir), "--density", "0.5",
            "--selector", "predictor,activations", "--limit", "2", "--cache", str(tmp_path / "cache")]
    for prefill in ("pruned", "dense"):
        result = runner.invoke(app, [*base, "--prefill", prefill, "--out", str(tmp_path / prefill)])
        assert result.exit_code == 0, result.output
    dense = json.loads((tmp_path / "dense" / "results.json").read_text())
    assert [(c["condition"]["selector"], c["condition"]["prefill"]) for c in dense["conditions"]] == \
        [(None, None), ("predictor", "dense"), ("activations", None)]
    assert "0.50 predictor dense-prefill" in (tmp_path / "dense" / "results.md").read_text()
    names = sorted(p.name for p in (tmp_path / "cache").rglob("*.jsonl"))
    assert names == ["0.50-activations.jsonl", "0.50-predictor-dense-prefill.jsonl", "0.50-predictor.jsonl",
                     "dense.jsonl"]
    result = runner.invoke(app, [*base, "--prefill", "full", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--prefill takes pruned or dense, got 'full'" in result.output


def test_help_explains_the_command():
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    for words in ("--tasks", "--density", "--reference", "--selector", "paired", "cached", "offline"):
        assert words in result.output


def test_user_mistakes_are_one_line(bundle_dir, tasks_dir, tmp_path, monkeypatch):
    base = ["eval", str(bundle_dir), "--include-path", str(tasks_dir), "--out", str(tmp_path)]
    cases = [
        (base + ["--tasks", "tiny_gne"], "unknown task 'tiny_gne'; did you mean tiny_gen"),
        (base + ["--tasks", "tiny_gen", "--density", "1.5"], "--density: density must be in (0, 1]"),
        (base + ["--tasks", "tiny_gen", "--density", "a,b"], "--density: density must be a number"),
        (base + ["--tasks", "tiny_gen", "--selector", "magic"], "unknown selector 'magic'"),
        (base + ["--tasks", "tiny_gen", "--limit", "0"], "--limit must be at least 1"),
        (base + ["--tasks", " , "], "--tasks is empty"),
        (base + ["--tasks", "tiny_gen", "--budgets", "magic"], "--budgets takes uniform and/or per-layer"),
        (base + ["--tasks", "tiny_gen", "--density", "0.5", "--budgets", "per-layer"], "has no per-layer budgets"),
        (["eval", str(bundle_dir), "--tasks", "x", "--include-path", str(tmp_path / "none")], "no such folder"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        lines = result.output.strip().splitlines()  # progress lines may come first, off a terminal
        assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, result.output
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    result = runner.invoke(app, base + ["--tasks", "tiny_gen"])
    assert result.exit_code == 1 and "lm-eval, which is not installed" in result.output


TORCH_IMPORTER = """
import sys, traceback
class Watch:  # records who imports torch first (not who merely asks whether it is installed)
    first = None
    def find_spec(self, name, path=None, target=None):
        stack = traceback.extract_stack()[:-1]
        if name == "torch" and Watch.first is None and not any(f.name == "find_spec" for f in stack):
            Watch.first = [f.filename for f in stack]
        return None
sys.meta_path.insert(0, Watch())
"""


def test_lm_eval_is_used_without_torch(bundle_dir, tasks_dir, tmp_path):
    """Our lm-eval path never imports PyTorch: lm-eval's modules load without it, and in a whole
    run the only importer is transformers under mlx-lm's tokenizer (the engine, as for every
    command, and only because torch is installed here)."""
    code = TORCH_IMPORTER + (
        "import lm_eval.evaluator, lm_eval.tasks, lm_eval.api.model\n"
        "assert 'torch' not in sys.modules\n"
        "from ifprune_mlx.cli import app; from typer.testing import CliRunner\n"
        f"r = CliRunner().invoke(app, ['eval', {str(bundle_dir)!r}, '--tasks', 'tiny_mc,tiny_gen', '--limit', '2', "
        f"'--include-path', {str(tasks_dir)!r}, '--density', '0.5', '--out', {str(tmp_path)!r}, "
        f"'--cache', {str(tmp_path / 'c')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print([f for f in Watch.first or [] if 'site-packages' in f or 'ifprune_mlx' in f])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    importers = done.stdout.strip().splitlines()[-1]
    assert "lm_eval" not in importers and "eval_" not in importers and "datasets" not in importers
    if importers != "[]":
        assert "mlx_lm/tokenizer_utils.py" in importers


def test_the_shipped_instruction_following_task_runs_offline(bundle_dir, tmp_path):
    """The dev split through the whole path: IFEval's checkers, the instruction-level score as
    followed instructions over all instructions of the documents."""
    from ifprune_mlx.tasks import read_records

    result = runner.invoke(app, ["eval", str(bundle_dir), "--tasks", "ifprune_ifeval_dev", "--limit", "3",
                                 "--density", "0.5", "--max-gen-toks", "12", "--out", str(tmp_path / "out"),
                                 "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    records = read_records("ifeval_dev.jsonl")[:3]
    assert [(c["condition"]["density"], c["condition"]["reference"]) for c in data["conditions"]] == \
        [(None, True), (0.5, False)]  # the reference, density 1.0, runs without being asked for
    for condition in data["conditions"]:
        metrics = condition["metrics"]["ifprune_ifeval_dev"]
        inst = metrics["inst_level_strict_acc,none"]
        assert [inst["values"][str(i)][1] for i in range(3)] == [len(r["instruction_id_list"]) for r in records]
        assert metrics["prompt_level_strict_acc,none"]["low"] is not None
        assert condition["tokens"] <= 3 * 12
