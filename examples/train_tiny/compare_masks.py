"""Per-input vs per-task vs static vs wrong-skill masks at several densities, on held-out prompts.

    python -m examples.train_tiny.compare_masks --ckpt examples/train_tiny/runs/knowledge \
        --n 50 --densities 0.03,0.0625,0.125

Same masks as evaluate.py (static = per layer the k channels most often selected over 1000
training prompts at that k; wrong skill = the next skill's per-task mask), every one at every
density; prints the mean exact match over skills. No narrow baseline, no plot: a quick check.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from converters.reference import indices_to_mask, predict_scores
from ifprune_mlx.selectors import kept_count, top_k

from . import data
from .evaluate import HERE, accuracy, distinct, hits, masks_for, static_indices
from .train import Config, load_checkpoint


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, default=HERE / "checkpoint")
    ap.add_argument("--n", type=int, default=50, help="held-out prompts per skill")
    ap.add_argument("--densities", type=str, default="0.0625,0.125,0.25,0.333")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = Config(**json.loads((args.ckpt / "train_config.json").read_text()))
    data.use(cfg.skills)
    llm, predictor, tok, meta = load_checkpoint(args.ckpt)
    F, pad = llm.config.intermediate_size, meta["pad_multiple"]
    test = distinct(data.test_set(args.n))
    rng = random.Random(99)
    train_scores = predict_scores(predictor, tok, [data.sample(rng).prompt for _ in range(1000)])
    scores = predict_scores(predictor, tok, [ex.prompt for ex in test])
    task = {s.name: predict_scores(predictor, tok, [s.phrasings[0]])[0] for s in data.SKILLS}
    other = {s: data.SKILL_NAMES[(i + 1) % len(data.SKILL_NAMES)] for i, s in enumerate(data.SKILL_NAMES)}
    print(f"dense {accuracy(hits(llm, tok, test), test)['mean']:.3f}")
    print("density k per-input per-task static wrong-skill")
    for d in [float(x) for x in args.densities.split(",")]:
        k = kept_count(d, F, pad)
        per_task = torch.stack([indices_to_mask(top_k(task[ex.skill], k), F) for ex in test])
        wrong = torch.stack([indices_to_mask(top_k(task[other[ex.skill]], k), F) for ex in test])
        accs = [accuracy(hits(llm, tok, test, m), test)["mean"] for m in (
            masks_for(scores, k, F), per_task, indices_to_mask(static_indices(train_scores, k), F), wrong)]
        print(f"{d} {k} " + " ".join(f"{a:.3f}" for a in accs), flush=True)


if __name__ == "__main__":
    main()
