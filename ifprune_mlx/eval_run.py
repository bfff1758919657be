"""Run lm-eval tasks on a model at several densities and compare each with a dense reference.

A condition is one model at one density (None: dense) and selector. Each is run with
lm-eval's simple_evaluate over an EngineLM (eval_lm.py); its per-document metric values are
kept so that every score gets a bootstrap 95% interval over the documents and every pruned
condition a paired difference with the reference (the same documents, resampled together;
ifprune_mlx.stats).
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import stats
from .eval_lm import (EngineLM, EvalError, GenerationCache, answers_file, condition_name, decode_rate,
                      request_key)
from .tasks import TASK_DIR  # the offline task files shipped with the package

SEED = 1234


@dataclass
class Condition:
    """One model at one density (None: dense) and selector."""

    model: str     # a short name for tables
    density: float | None
    selector: str | None = None
    reference: bool = False  # the dense reference every other condition is compared with
    budgets: bool | None = None  # per-layer budgets on / off (uniform); None: as the model has them
    prefill: str | None = None  # the trained predictor's prefill, "dense" or "pruned"; None: the model's

    @property
    def name(self) -> str:
        return condition_name(self.density, self.selector, self.budgets, self.prefill)


@dataclass
class MetricResult:
    """One task metric of one condition; values in [0, 1] for accuracies."""

    score: float
    low: float | None = None   # bootstrap 95% interval over the documents
    high: float | None = None
    docs: int = 0
    diff: float | None = None  # score - the reference's, on the same documents
    diff_low: float | None = None
    diff_high: float | None = None
    values: dict | None = None  # doc_id -> [numerator, count], for the paired difference
    items: dict | None = None   # doc_id -> the per-item values of a metric scored per item (IFEval's
                                # instruction-level accuracy: one per instruction), else None


@dataclass
class ConditionResult:
    condition: Condition
    metrics: dict[str, dict[str, MetricResult]] = field(default_factory=dict)  # task -> "metric,filter" -> result
    tokens: int = 0            # generated tokens, and the decode seconds they took (when measured)
    decode_seconds: float = 0.0
    requests: int = 0
    computed: int = 0          # requests answered now (the rest came from the cache)
    seconds: float = 0.0       # wall time of the condition in this run

    @property
    def decode_tps(self) -> float | None:
        return self.tokens / self.decode_seconds if self.decode_seconds > 0 else None

    def to_json(self) -> dict:
        data = asdict(self)
        data["decode_tps"] = self.decode_tps
        return data


def task_manager(include_paths: Sequence[Path] = ()):
    """lm-eval's TaskManager with the shipped offline tasks and `include_paths` added."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in [TASK_DIR, *include_paths] if Path(p).is_dir()]
    return TaskManager(include_path=paths or None)


def check_tasks(names: Sequence[str], manager) -> list[str]:
    """The task names, each known to lm-eval (else EvalError naming the closest ones)."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EvalError(f"unknown task {name!r}{hint} (lm-eval lists its tasks with `lm-eval ls tasks`; "
                            f"task files of your own: --include-path DIR)")
    return list(names)


def load_tasks(names: Sequence[str], manager) -> None:
    """Build the tasks once (reading their data), so a task that cannot load fails before any model runs."""
    try:
        manager.load(list(names))
    except Exception as e:  # datasets and lm-eval raise many types for a task whose data is unavailable
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvalError(f"cannot load the data of {', '.join(names)} ({type(e).__name__}: {first}); tasks "
                        "from the Hub need a network connection once, the shipped tasks run offline") from None


def per_document(samples: list[dict], lm_results: dict) -> dict[str, MetricResult]:
    """Each metric's score, with per-document values where lm-eval's score is their mean."""
    values: dict[str, dict] = {}
    items: dict[str, dict] = {}
    for sample in samples:
        for metric in sample.get("metrics", []):
            label = f"{metric},{sample.get('filter', 'none')}"
            v = sample.get(metric)
            if isinstance(v, (bool, int, float)):
                entry = [float(v), 1.0]
            elif isinstance(v, list) and v and all(isinstance(x, (bool, int, float)) for x in v):
                entry = [float(sum(v)), float(len(v))]  # e.g. IFEval's instruction-level accuracy
                items.setdefault(label, {})[str(sample["doc_id"])] = [float(x) for x in v]
            else:
                entry = None
            values.setdefault(label, {})[int(sample["doc_id"])] = entry
    out = {}
    for label, score in lm_results.items():
        if not isinstance(score, (int, float)) or "," not in label or "_stderr" in label:
            continue  # lm-eval's bookkeeping (sample_len, alias, stderr): "metric,filter" are the scores
        docs = values.get(label, {})
        result = MetricResult(score=float(score), docs=len(docs))
        if docs and all(e is not None for e in docs.values()):
            nums, counts = zip(*docs.values())
            if math.isclose(stats.ratio(nums, counts), score, rel_tol=1e-6, abs_tol=1e-9):
                result.low, result.high = stats.ratio_interval(nums, counts, seed=SEED)
                result.values = {str(k): v for k, v in docs.items()}
                result.items = items.get(label)
        out[label] = result
    return out


def compare(result: ConditionResult, reference: ConditionResult) -> None:
    """Fill the paired differences of `result` with `reference` (same tasks, same documents)."""
    for task, metrics in result.metrics.items():
        for label, m in metrics.items():
            ref = reference.metrics.get(task, {}).get(label)
            if m.values is None or ref is None or ref.values is None or set(m.values) != set(ref.values):
                continue
            docs = sorted(m.values)
            a = ([m.values[d][0] for d in docs], [m.values[d][1] for d in docs])
            b = ([ref.values[d][0] for d in docs], [ref.values[d][1] for d in docs])
            m.diff, m.diff_low, m.diff_high = stats.paired_difference(a, b, seed=SEED)


@contextmanager
def layer_budgets(engine, on: bool | None):
    """Per-layer budgets on (True) or off (False, uniform) while in the block; None: as they are."""
    budgets = engine.budgets
    if on and budgets is None:
        raise EvalError(f"{engine.path or 'this model'} has no per-layer budgets to turn on; `ifprune calibrate "
                        "MODEL` measures them (where they lower the KL it also turns them on)")
    if on is None or budgets is None:
        yield
        return
    before = budgets.enabled
    budgets.enabled = bool(on)
    try:
        yield
    finally:
        budgets.enabled = before


@contextmanager
def prefill_mode(engine, prefill: str | None):
    """The engine's prefill set to `prefill` while in the block; None: as it is."""
    before = engine.prefill
    engine.set_prefill(prefill)
    try:
        yield
    finally:
        engine.prefill = before


def run_condition(engine, condition: Condition, tasks: Sequence[str], manager, cache_root: Path, *,
                  limit: int | None = None, chat_template: bool = True, max_gen_toks: int | None = None,
                  on_progress: Callable[[str, int, int], None] | None = None) -> ConditionResult:
    """Evaluate `tasks` on `engine` in one condition; answers come from / go to the cache."""
    start = time.perf_counter()
    # the cache file names the kept counts the budgets give, and the prefill
    with layer_budgets(engine, condition.budgets), prefill_mode(engine, condition.prefill):
        cache = GenerationCache(answers_file(cache_root, engine, condition.density, condition.selector))
        lm = EngineLM(engine, condition.density, condition.selector, cache, chat_template=chat_template,
                      max_gen_toks=max_gen_toks, on_progress=on_progress)
        output = _evaluate(lm, tasks, manager, limit)
    result = ConditionResult(condition)
    for task, samples in output["samples"].items():
        result.metrics[task] = per_document(samples, output["results"].get(task, {}))
    generated = lm.answered.get("generate_until", [])
    result.tokens, result.decode_seconds = decode_rate(generated)
    result.requests = sum(len(v) for v in lm.answered.values())
    result.computed = cache.added
    result.seconds = time.perf_counter() - start
    return result


def _evaluate(lm, tasks: Sequence[str], manager, limit: int | None) -> dict:
    """lm-eval's simple_evaluate of `lm` on `tasks`, seeded, with the per-sample records."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0,
        apply_chat_template=False, random_seed=SEED, numpy_random_seed=SEED, fewshot_random_seed=SEED,
        torch_random_seed=None)  # a seed for torch would import it: nothing here needs it


def task_requests(tasks: Sequence[str], manager, limit: int | None = None) -> list[tuple[str, tuple]]:
    """The (kind, args) of every request the tasks make (what a condition answers), found by
    running them on a model that answers nothing: to count what a cache still lacks."""
    from lm_eval.api.model import LM

    class Recorder(LM):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[str, tuple]] = []

        def _note(self, kind, requests, blank):
            self.seen += [(kind, r.args) for r in requests]
            return [blank] * len(requests)

        def generate_until(self, requests):
            return self._note("generate_until", requests, "")

        def loglikelihood(self, requests):
            return self._note("loglikelihood", requests, (0.0, False))

        def loglikelihood_rolling(self, requests):
            return self._note("loglikelihood_rolling", requests, 0.0)

    recorder = Recorder()
    _evaluate(recorder, tasks, manager, limit)
    return recorder.seen


def pending_requests(engine, condition: Condition, requests: Sequence[tuple[str, tuple]], cache_root: Path, *,
                     chat_template: bool = True, max_gen_toks: int | None = None) -> int:
    """How many of `requests` (task_requests) the condition's answer cache lacks."""
    with layer_budgets(engine, condition.budgets), prefill_mode(engine, condition.prefill):
        cache = GenerationCache(answers_file(cache_root, engine, condition.density, condition.selector))
    chat = bool(chat_template and getattr(engine.tokenizer, "chat_template", None))
    return sum(cache.get(request_key(kind, args, chat, max_gen_toks)) is None for kind, args in requests)
