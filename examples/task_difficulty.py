"""Which kinds of exact-answer question the DENSE default model mostly gets right.

The exact-answer tasks (ifprune_mlx/tasks) only measure something if the dense model answers
most of them; their kinds were chosen with this script. It runs the default model dense
(greedy, chat template, 32 new tokens: the task's max_gen_toks) on every candidate dev
question, scores each with the task's own check (ifprune_mlx/tasks/exact.py) and prints the
share right per kind; the kinds at or above KEEP make up exact_dev.jsonl, whole (no question
was picked or dropped by its own result), and exact_test.jsonl was written for the same kinds.
Generations are cached by prompt (examples/task_difficulty_cache.jsonl), so a re-run only adds.
Dev questions only: the test split is never run here.

    python -m examples.task_difficulty
    python -m examples.task_difficulty --cache /tmp/fresh.jsonl     # regenerate everything
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from ifprune_mlx.tasks import read_records
from ifprune_mlx.tasks.exact import is_correct

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 32
KEEP = 0.5  # the least share right for a kind to be kept


def generations(prompts: list[str], cache: Path) -> dict[str, str]:
    """prompt -> the dense default model's answer, generating only prompts not in the cache."""
    done = {}
    if cache.exists():
        done = {g["prompt"]: g["response"] for g in map(json.loads, cache.read_text().splitlines())}
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    if todo:
        import ifprune_mlx

        engine = ifprune_mlx.open_model()
        engine.apply(None)  # dense: every FFN channel
        with cache.open("a") as out:
            for n, prompt in enumerate(todo, 1):
                done[prompt] = engine.generate(prompt, max_tokens=MAX_TOKENS)
                out.write(json.dumps({"prompt": prompt, "response": done[prompt]}, ensure_ascii=False) + "\n")
                out.flush()
                print(f"\r{n}/{len(todo)} generated", end="", flush=True)
        print()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "task_difficulty_candidates.jsonl")
    parser.add_argument("--cache", type=Path, default=HERE / "task_difficulty_cache.jsonl")
    args = parser.parse_args()
    if "test" in args.data.name:
        raise SystemExit(f"{args.data} is a test split: it is looked at once, not used to tune the tasks")
    records = read_records(args.data)
    answers = generations([r["prompt"] for r in records], args.cache)
    right = defaultdict(list)
    for r in records:
        right[r["kind"]].append(is_correct(r, answers[r["prompt"]]))
    kept = [k for k, hits in right.items() if sum(hits) / len(hits) >= KEEP]
    print(f"{'kind':16s} {'right':>7s} {'share':>6s}")
    for kind, hits in sorted(right.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        print(f"{kind:16s} {sum(hits):3d}/{len(hits):<3d} {sum(hits) / len(hits):6.0%}{'  kept' if kind in kept else ''}")
    hits = [x for kind in kept for x in right[kind]]
    print(f"{'kept kinds':16s} {sum(hits):3d}/{len(hits):<3d} {sum(hits) / len(hits):6.0%}")
    shipped = {r["kind"] for r in read_records("exact_dev.jsonl")}
    if shipped != set(kept):
        print(f"note: exact_dev.jsonl has the kinds {sorted(shipped)}, this run keeps {sorted(kept)}")


if __name__ == "__main__":
    main()
