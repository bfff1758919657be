"""What the chat selection policies cost: selection time, row swaps and prefill per turn.

Runs one scripted conversation (the user comes back to earlier topics, as people do) under
each policy with a ChatSession, the same object `ifprune chat` drives, and prints a markdown
table. Without --model it builds a random bundle (nothing downloaded): the costs of selecting,
swapping and prefilling do not depend on the weights' values. Its lm_head rows are zeroed
except those of single characters that no BPE merge uses: the end token never wins, so every
answer has exactly --max-tokens tokens, and the answers re-tokenize to the tokens generated,
as real text does (random bytes would not, and would hide the KV cache reuse).

    python examples/chat_costs.py                      # tiny random model
    python examples/chat_costs.py --size medium        # 8 layers, d_model 512, d_ffn 2048
    python examples/chat_costs.py --model path/to/bundle   # or any model name `ifprune chat` takes

On Linux CPU preload OpenBLAS for realistic prefill (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from string import ascii_letters

import mlx.core as mx
import numpy as np

import ifprune_mlx as ifp
from ifprune_mlx.resolve import resolve
from ifprune_mlx import bundle, testing
from ifprune_mlx.chat import ChatSession

CONVERSATION = [
    "Write a Python function that reverses a list.",
    "Make it work for strings too.",
    "Translate the sentence into French, please.",
    "Write a Python function that reverses a list.",
    "What is the sum of 12 and 30?",
    "Make it work for strings too.",
]
SIZES = {
    "tiny": testing.model_config(),
    "medium": testing.model_config(hidden_size=512, num_hidden_layers=8, intermediate_size=2048),
}


def random_bundle(folder: Path, size: str) -> Path:
    path = testing.make_bundle(folder / size, SIZES[size])
    tokenizer = ifp.load(path).tokenizer._tokenizer
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merged = set("".join(" ".join(m) if isinstance(m, list) else m for m in merges))
    special = set(tokenizer.all_special_ids)
    keep = [i for t, i in tokenizer.get_vocab().items()
            if t in ascii_letters and t not in merged and i not in special]
    files = bundle.weight_files(path)
    weights = bundle.read_safetensors(files)
    mask = mx.zeros((weights["lm_head.weight"].shape[0], 1))
    mask[mx.array(keep)] = 1.0
    weights["lm_head.weight"] = weights["lm_head.weight"] * mask
    bundle.save_safetensors(files[0], weights)
    return path


def run(engine, policy: str, max_tokens: int, max_caches: int = 4, density=None,
        conversation=CONVERSATION) -> tuple[dict, list]:
    """The costs of one conversation under `policy` (the table's columns) and each turn's mask."""
    session = ChatSession(engine, policy=policy, max_tokens=max_tokens, max_caches=max_caches,
                          density=density)
    masks = []
    for text in conversation:
        for _ in session.send(text):
            pass
        masks.append(session.mask.selection)
    turns = session.turns
    return masks, {
        "selector runs": sum(t.selected for t in turns),
        "select ms": sum(t.select_ms for t in turns),
        "apply ms": sum(t.apply_ms for t in turns),
        "rows swapped": sum(t.swaps for t in turns),
        "cache hits": sum(t.cache_hit for t in turns),
        "conversation tokens": sum(t.reused_tokens + t.prefill_tokens for t in turns),
        "prefill tokens": sum(t.prefill_tokens for t in turns),
        "prefill ms": sum(1000 * t.prefill_tokens / t.prefill_tps for t in turns),
        "mean TTFT ms": sum(t.ttft_ms for t in turns) / len(turns),
        "decode tok/s": sum(t.decode_tps for t in turns) / len(turns),
    }


def mean_overlap(masks: list) -> float:
    """Mean per-layer Jaccard overlap of consecutive turns' masks (1.0: the same channels)."""
    pairs = [np.mean(a.overlap(b)) for a, b in zip(masks, masks[1:])]
    return float(np.mean(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model as `ifprune chat` takes it, e.g. examples/train_tiny/checkpoint "
                                        "(default: a random bundle)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--density", type=float, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="runs per policy; times: the fastest")
    parser.add_argument("--prompts", type=Path, help="the user messages, one a line (default: built in)")
    args = parser.parse_args()
    conversation = CONVERSATION
    if args.prompts:
        conversation = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        path = resolve(args.model).path if args.model else random_bundle(Path(tmp), args.size)
        rows, per_turn_masks = {}, []
        for policy, caches in (("per-task", 4), ("per-turn", 4), ("per-turn", 1), ("off", 4)):
            runs = []
            for _ in range(args.repeat):
                engine = ifp.load(path)  # a fresh selection cache: every run pays its own
                engine.apply(engine.select("Warm up the selector and the allocator."))
                for _ in engine.stream("Warm up.", max_tokens=4):
                    pass
                masks, costs = run(engine, policy, args.max_tokens, caches, args.density, conversation)
                runs.append(costs)
                if policy == "per-turn":
                    per_turn_masks = masks
            label = policy + ("" if caches == 4 else ", 1 cache")
            rows[label] = {k: (max if k == "decode tok/s" else min)(r[k] for r in runs)
                           for k in runs[0]}
    c = engine.config
    print(f"{path if args.model else args.size + ' random bundle'}: {c['num_hidden_layers']} layers, "
          f"d_model {c['hidden_size']}, d_ffn {engine.d_ffn}, density {args.density or engine.default_density:.2f}; "
          f"{len(conversation)} turns, at most {args.max_tokens} tokens per answer")
    columns = list(next(iter(rows.values())))
    print("| policy | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, row in rows.items():
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nper-turn: mean Jaccard overlap of consecutive turns' masks {mean_overlap(per_turn_masks):.2f} "
          f"(two random masks of this size: {engine.kept_count() / (2 * engine.d_ffn - engine.kept_count()):.2f})")


if __name__ == "__main__":
    main()
