"""What the prompt is prefilled with, measured by task score (issue 22, item 4).

The trained predictor picks the channels from the prompt; the runtime then prefills the prompt
and decodes the answer with those channels only (the paper's setting). The training-free
selector prefills the prompt with the dense model (its pass scores the channels) and decodes
pruned. This study runs the trained predictor's selection with a dense prefill, so the two
questions -- which channels, and what the prompt saw -- are measured apart:

    python -m examples.prefill_study --density 0.9 --limit 40 --out /tmp/prefill

writes results.json / results.md like `ifprune eval` (condition "0.90-predictor-dense-prefill"),
with the paired difference against the original dense model (the plain GGUF, run dense) and
its answers cached beside `ifprune eval`'s (compare with `ifprune eval --density 0.9`, whose
predictor condition prefills pruned, on the same documents).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from ifprune_mlx import eval_run
from ifprune_mlx.eval_lm import EngineLM

DENSE_PREFILL = "predictor-dense-prefill"


class DensePrefillLM(EngineLM):
    """EngineLM whose generation, for the DENSE_PREFILL selector, prefills the prompt dense,
    then decodes with the trained predictor's selection (the prompt's KV cache is the dense
    model's); other selectors run as in `ifprune eval`."""

    def __init__(self, engine, density, selector, cache, **options):
        self.dense_prefill = selector == DENSE_PREFILL
        super().__init__(engine, density, "predictor" if self.dense_prefill else selector, cache, **options)

    def _responses(self, context: str, max_tokens: int):
        if not self.dense_prefill or self.density is None:
            return super()._responses(context, max_tokens)
        engine = self.engine
        selection = engine.select(context, self.density, "predictor")
        ids = engine.prompt_tokens(context)
        engine.apply(None)
        cache = make_prompt_cache(engine.model)
        mx.eval(engine.model(mx.array(ids[:-1])[None], cache=cache))
        engine.apply(selection)
        return stream_generate(engine.model, engine.tokenizer, mx.array(ids[-1:]), max_tokens=max_tokens,
                               sampler=make_sampler(temp=0.0), prompt_cache=cache)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--density", type=float, default=0.9)
    ap.add_argument("--tasks", default="ifprune_ifeval_dev")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("prefill-study"))
    args = ap.parse_args(argv)

    from ifprune_mlx.disk_cache import cache_dir
    from ifprune_mlx.eval_cli import _write
    from ifprune_mlx.opener import open_model
    from ifprune_mlx.resolve import default_gguf

    eval_run.EngineLM = DensePrefillLM  # run_condition builds its LM from this name
    engine = open_model()
    reference = open_model(default_gguf())
    manager = eval_run.task_manager()
    tasks = args.tasks.split(",")
    cache_root = cache_dir() / "eval"
    ref = eval_run.run_condition(reference, eval_run.Condition("original dense", None, reference=True), tasks,
                                 manager, cache_root, limit=args.limit)
    result = eval_run.run_condition(engine, eval_run.Condition("default model", args.density, DENSE_PREFILL), tasks,
                                    manager, cache_root, limit=args.limit)
    command = "python -m examples.prefill_study " + " ".join(argv if argv is not None else sys.argv[1:])
    _write([ref, result], args.out, {"tasks": tasks, "limit": args.limit, "model": "default model",
                                     "command": command})


if __name__ == "__main__":
    main()
