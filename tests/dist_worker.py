"""Run by tests/test_distributed.py under `mlx.launch --backend ring -n N` (one process per rank).

    python tests/dist_worker.py BUNDLE OUT_DIR [--split global|balanced] [--die-after N]

Each rank loads BUNDLE sharded, generates greedy tokens dense and pruned (the predictor's
selection) and writes what it saw to OUT_DIR/rank{r}.json: tokens, the global selection it
applied, its FFN weight bytes and MLX's peak memory while its LLM loaded.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import ifprune_mlx
from ifprune_mlx.distributed import is_ffn_rows, world
from ifprune_mlx.errors import IFPruneError

PROMPT = "Write a Python function that reverses a list."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("out")
    parser.add_argument("--split", default="global")
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--bad-rank", type=int, default=-1, help="this rank loads a folder that does not exist")
    parser.add_argument("--die-rank", type=int, default=-1, help="this rank exits after loading")
    args = parser.parse_args()
    group = world()
    rank = group.rank() if group else 0
    out = Path(args.out) / f"rank{rank}.json"
    try:
        mx.reset_peak_memory()
        path = args.bundle + ("-missing" if rank == args.bad_rank else "")
        peaks = [0]  # MLX's peak memory when the LLM's last layer has loaded (before the predictor)
        engine = ifprune_mlx.load(path, group=group, split=args.split,
                                  on_progress=lambda done, total: peaks.append(mx.get_peak_memory()))
        load_peak = peaks[-1]
        if rank == args.die_rank:
            os._exit(3)
        ids = engine.prompt_tokens(PROMPT)

        def tokens(**options):
            return [r.token for r in engine.stream_responses(PROMPT, max_tokens=args.tokens, **options)]

        engine.apply(None)
        dense = tokens()
        engine.apply("auto")
        pruned = tokens(selector="predictor")
        applied = [ids.tolist() for ids in engine.applied.indices]
        griffin = tokens(selector="activations", density=0.5)
        griffin_applied = [ids.tolist() for ids in engine.applied.indices]
        params = dict(nn.utils.tree_flatten(engine.model.parameters()))
        ffn = sum(v.nbytes for name, v in params.items() if is_ffn_rows(name))
        result = {"rank": rank, "size": group.size() if group else 1, "prompt": ids,
                  "dense": dense, "pruned": pruned, "applied": applied,
                  "griffin": griffin, "griffin_applied": griffin_applied,
                  "ffn_bytes": ffn, "all_bytes": engine.weight_bytes(), "load_peak": load_peak,
                  "kept": [int(m.k) for m in engine.mlps]}
    except IFPruneError as e:
        result = {"rank": rank, "error": f"{type(e).__name__}: {e}"}
    out.write_text(json.dumps(result))
    sys.exit(0 if "error" not in result else 2)


if __name__ == "__main__":
    main()
