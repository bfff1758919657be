"""An lm-eval model over the Engine: one density and selector, generations cached on disk.

EngineLM answers lm-eval's requests as `ifprune generate` would: each request's context is
the user message (the model's chat template applied, as the engine applies it; raw text
without), channels are selected per prompt at the condition's density by its selector
(the trained predictor reads the prompt; the training-free one scores a dense prefill),
decoding is greedy. Density 1.0 runs the full model, with no selection.

Answers are kept in a GenerationCache: one JSON-lines file per (model fingerprint, density,
selector, per-layer kept counts where per-layer budgets make them non-uniform: cache_name),
one line per request, appended as each is answered; a re-run only computes what is new, and
an interrupted run loses nothing it finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from lm_eval.api.model import LM

from .errors import IFPruneError

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say


class EvalError(IFPruneError):
    """An evaluation cannot run: a task, its data, or an option is wrong."""


_DIGESTS: dict[tuple, str] = {}  # (file, size, mtime_ns) -> digest of its bytes, for this process


def _file_digest(file: Path) -> str:
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha1()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _config_text(file: Path) -> str:
    """config.json without what a calibration stores (the default density, the record)."""
    config = json.loads(file.read_text())
    block = dict(config.get("ifpruning") or {})
    for key in ("default_density", "calibration"):
        block.pop(key, None)
    config["ifpruning"] = block
    return json.dumps(config, sort_keys=True)


def model_fingerprint(folder: Path, *, by_content: bool = True) -> str:
    """Changes when what the model folder holds changes: every file's bytes (not its times: a
    re-conversion that writes the same weights keeps it) and its config.json, except what a
    calibration stores there (the default density, the record): what a given density
    computes follows from the files, but for per-layer budgets, which cache_name covers.
    by_content=False: the older key, by file sizes and times (answers_file adopts its files)."""
    folder = Path(folder)
    h = hashlib.sha1()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        if name == "config.json":
            h.update(f"{name}:{_config_text(file)}\n".encode())
        elif by_content:
            h.update(f"{name}:{_file_digest(file)}\n".encode())
        else:
            st = file.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def condition_name(density: float | None, selector: str | None, budgets: bool | None = None,
                   prefill: str | None = None) -> str:
    """"dense" for the full model, else e.g. "0.70-predictor"; "0.70-predictor-dense-prefill"
    when the trained predictor's prompt is prefilled dense; with per-layer budgets set on or
    off, "0.70-predictor-layers" or "0.70-predictor-uniform"."""
    if density is None:
        return "dense"
    return (f"{density:.2f}-{selector}" + ("-dense-prefill" if prefill == "dense" else "")
            + {None: "", True: "-layers", False: "-uniform"}[budgets])


def condition_prefill(engine, selector: str | None) -> str | None:
    """"dense" where a condition of `selector` prefills dense by the engine's setting that the
    condition's name must show (the trained predictor's prefill "dense"), else None: the
    training-free selector always prefills dense, the predictor by default pruned."""
    return "dense" if selector != "activations" and engine.prefill == "dense" else None


def request_key(kind: str, args: tuple, chat_template: bool, max_gen_toks: int | None) -> str:
    """The answer cache's key of one lm-eval request (the generation cap counts for generations only)."""
    return GenerationCache.key(kind, args, chat_template, max_gen_toks if kind == "generate_until" else None)


def cache_name(engine, density: float | None, selector: str | None) -> str:
    """The condition's name, plus a digest of the kept counts per layer when the engine's
    per-layer budgets (from its calibration) make them non-uniform, e.g.
    "0.70-activations-layers-1a2b3c4d": uniform counts follow from the density and the
    bundle's pad multiple, which the fingerprint covers; budgets come with a calibration,
    which it leaves out."""
    name = condition_name(density, selector, prefill=condition_prefill(engine, selector))
    if density is None:
        return name
    counts = engine.kept_counts(density)
    if len(set(counts)) == 1 and counts[0] == engine.kept_count(density):
        return name
    return f"{name}-layers-{hashlib.sha1(json.dumps(list(counts)).encode()).hexdigest()[:8]}"


def answers_file(cache_root: Path, engine, density: float | None, selector: str | None) -> Path:
    """Where a condition's answers are cached: cache_root/FINGERPRINT/cache_name.jsonl. The
    first time, a file kept under the older key (by file times, model_fingerprint's
    by_content=False) is copied in; the older file stays."""
    path = Path(cache_root) / model_fingerprint(engine.path) / f"{cache_name(engine, density, selector)}.jsonl"
    older = Path(cache_root) / model_fingerprint(engine.path, by_content=False) / path.name
    if not path.exists() and older.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(older, path)
    return path


class GenerationCache:
    """Answers to requests of one condition, on disk as JSON lines (appended as they come)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted run: computed again
        self.added = 0

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> dict:
        entry = {"key": key, **entry}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.entries[key] = entry
        self.added += 1
        return entry


def _truncate(text: str, until: list[str]) -> tuple[str, bool]:
    """text up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(u) for u in until if u) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class EngineLM(LM):
    """lm-eval's LM over an Engine at one density (None: dense) and selector.

    Args:
        engine: the loaded model.
        density: fraction of FFN channels kept; None runs the full model.
        selector: "predictor" or "activations" (ignored when dense).
        cache: where answers are kept (a GenerationCache of this condition).
        chat_template: send each context as a user message through the model's chat
            template (False: the raw text, e.g. for a base model).
        max_gen_toks: a cap on the tokens generated per request (None: each task's own).
        on_progress: called as on_progress(kind, done, total) while requests are answered.
    """

    def __init__(self, engine, density: float | None, selector: str | None, cache: GenerationCache, *,
                 chat_template: bool = True, max_gen_toks: int | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None):
        super().__init__()
        self.engine, self.cache, self.on_progress = engine, cache, on_progress
        self.density = None if density is None or density >= 1.0 else float(density)
        self.selector = None if self.density is None else engine.get_selector(selector).name
        self.chat_template = bool(chat_template and getattr(engine.tokenizer, "chat_template", None))
        self.max_gen_toks = max_gen_toks
        self.answered: dict[str, list[dict]] = {}  # kind -> the entries this LM returned

    # -- what every request shares ---------------------------------------------------

    def _prompt_ids(self, context: str) -> list[int]:
        if self.chat_template:
            return self.engine.prompt_tokens(context)
        return list(self.engine.tokenizer.encode(context))

    def _each(self, kind: str, requests, answer: Callable[[tuple], dict]) -> list[dict]:
        """answer(args) for every request not in the cache; the cached entries in order."""
        out = []
        try:
            for i, request in enumerate(requests):
                key = request_key(kind, request.args, self.chat_template, self.max_gen_toks)
                entry = self.cache.get(key)
                if entry is None:
                    entry = self.cache.put(key, answer(request.args))
                out.append(entry)
                self.answered.setdefault(kind, []).append(entry)
                if self.on_progress:
                    self.on_progress(kind, i + 1, len(requests))
        finally:
            self.engine.apply("auto")
        return out

    # -- generation ------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        return [entry["text"] for entry in self._each("generate_until", requests, self._generate)]

    def _generate(self, args: tuple) -> dict:
        context, gen_kwargs = args[0], dict(args[1] or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if self.max_gen_toks is not None:
            max_tokens = min(max_tokens, self.max_gen_toks)
        text, last, stopped = "", None, False
        for last in self._responses(context, max_tokens):
            text += last.text
            if until:
                text, stopped = _truncate(text, until)
                if stopped:
                    break
        generated = last.generation_tokens if last is not None else 0
        seconds = generated / last.generation_tps if last is not None and last.generation_tps > 0 else 0.0
        return {"text": text, "tokens": generated, "decode_seconds": seconds,
                "prompt_tokens": last.prompt_tokens if last is not None else 0}

    def _responses(self, context: str, max_tokens: int):
        """The engine's GenerationResponses for one request, as `ifprune generate` makes them."""
        if self.density is None:
            self.engine.apply(None)
        options = {} if self.density is None else {"density": self.density, "selector": self.selector}
        tokens = None if self.chat_template else self._prompt_ids(context)
        return self.engine.stream_responses(context, max_tokens=max_tokens, tokens=tokens, **options)

    # -- scoring ---------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        entries = self._each("loglikelihood", requests, self._score)
        return [(entry["logprob"], entry["greedy"]) for entry in entries]

    def _score(self, args: tuple) -> dict:
        """log P(continuation | context) and whether it is the greedy continuation, in the
        condition's setting: the context prefilled dense where generation prefills it dense."""
        context, continuation = args[0], args[1]
        ids = self._prompt_ids(context)
        if self.chat_template:
            cont = list(self.engine.tokenizer.encode(continuation, add_special_tokens=False))
        else:
            whole = list(self.engine.tokenizer.encode(context + continuation))
            cont = whole[len(ids):]
        if not cont:
            return {"logprob": 0.0, "greedy": True}
        model, cache = self.engine.model, None
        fed = ids + cont[:-1]
        if self.density is None:
            self.engine.apply(None)
        else:
            prefilled = None
            if self.engine.prefills_dense(self.selector):  # as generation runs it (engine.stream_responses)
                prefilled = self.engine.prefill_dense(context, ids, self.density, self.selector)
            if prefilled is None:
                self.engine.prepare(context, self.density, self.selector)
            else:
                cache, fed = prefilled[0], fed[len(ids) - 1:]
        logits = model(mx.array([fed], dtype=mx.int32), cache=cache)[0, -len(cont):].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.array(cont, dtype=mx.int32)
        total = mx.sum(mx.take_along_axis(logprobs, targets[:, None], axis=-1))
        greedy = mx.all(mx.argmax(logits, axis=-1) == targets)
        return {"logprob": float(total.item()), "greedy": bool(greedy.item())}

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise EvalError("perplexity tasks (lm-eval's loglikelihood_rolling) are not supported: a pruned model "
                        "selects its channels from a prompt, and these tasks have none; use generation or "
                        "multiple-choice tasks")


def decode_rate(entries: list[dict]) -> tuple[int, float]:
    """(tokens generated, decode seconds) over cached generation entries."""
    tokens = sum(int(e.get("tokens", 0)) for e in entries if e.get("decode_seconds"))
    seconds = float(np.sum([e["decode_seconds"] for e in entries if e.get("decode_seconds")]))
    return tokens, seconds
