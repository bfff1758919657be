"""Evaluate the tiny IFPruning model; write RESULTS.md and density.png next to this file.

    python -m examples.train_tiny.evaluate [--ckpt examples/train_tiny/checkpoint]
                                           [--narrow examples/train_tiny/runs/narrow]

Exact match (greedy, PyTorch) on held-out prompts of every skill, for: the dense model; IFPruning
at the trained density with per-input masks and with per-task masks (the mask of the bare
instruction, reused for every input of the skill); a static mask of the same size for every
task (per layer, the channels most often selected over training prompts); a dense model trained
from scratch with only the kept width (train.py --narrow; trained here if missing). Controls: a
random mask, no FFN at all, and each skill given the next skill's per-task mask. Hand-written
sections after the KEEP marker line of an existing RESULTS.md are kept.

Prompts are distinct: the test bucket of a skill can be small (brackets, French, add), so the
`--n` draws per skill are deduplicated and the table says how many distinct inputs each skill
has. Means are over skills (each skill's mean over its prompts); intervals are 95% bootstrap
over prompts, resampled within each skill; differences between two masks are paired (same
prompts).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from converters.reference import indices_to_mask, predict_scores, set_ffn_mask
from ifprune_mlx.selectors import kept_count, overlap, top_k
from ifprune_mlx.selectors import static_top_k as static_indices  # one mask for all tasks

from . import data
from .data import distinct, skill_mean, skill_mean_interval
from .train import Config, chat_prefix, load_checkpoint, train

HERE = Path(__file__).parent
KEEP = "<!-- kept by evaluate.py: everything below is written by hand -->"


@torch.no_grad()
def generate(llm, tokenizer, prompts: list[str], masks: torch.Tensor | None = None,
             max_new_tokens: int = 16, batch: int = 125) -> list[str]:
    """Greedy answers for the chat-formatted prompts; masks [B, L, F] (0/1), [L, F] or None."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer([chat_prefix(tokenizer, p) for p in prompts[i: i + batch]], return_tensors="pt",
                        padding=True)
        m = masks if masks is None or masks.dim() == 2 else masks[i: i + batch]
        set_ffn_mask(llm, m)
        ids = llm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    set_ffn_mask(llm, None)
    return [s.strip() for s in out]


def hits(llm, tokenizer, examples, masks=None) -> np.ndarray:
    """1.0 where the greedy answer is exactly right, per example."""
    answers = generate(llm, tokenizer, [ex.prompt for ex in examples], masks)
    return np.array([a == ex.answer for ex, a in zip(examples, answers)], dtype=np.float64)


def accuracy(values: np.ndarray, examples) -> dict[str, float]:
    """Exact match per skill, 'mean' over skills and its interval 'low'/'high'."""
    skills = [ex.skill for ex in examples]
    acc = {name: float(values[[s == name for s in skills]].mean()) for name in set(skills)}
    acc["mean"] = skill_mean(values, skills)
    acc["low"], acc["high"] = skill_mean_interval(values, skills)
    return acc


def masks_for(scores: np.ndarray, k: int, d_ffn: int) -> torch.Tensor:
    """Scores [B, L, F] -> hard masks [B, L, F] of the per-layer top k (selectors.top_k)."""
    return torch.stack([indices_to_mask(top_k(s, k), d_ffn) for s in scores])


def jaccard(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean per-layer Jaccard overlap of two masks (selectors.overlap)."""
    return float(np.mean(overlap(a, b)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, default=HERE / "checkpoint")
    ap.add_argument("--narrow", type=Path, default=HERE / "runs" / "narrow")
    ap.add_argument("--n", type=int, default=50, help="held-out prompts per skill")
    ap.add_argument("--n_sweep", type=int, default=25, help="prompts per skill for the density sweep")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--densities", type=str, default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                    help="comma-separated densities of the accuracy-vs-density sweep")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()

    llm, predictor, tokenizer, meta = load_checkpoint(args.ckpt)
    cfg = Config(**{k: v for k, v in __import__("json").loads((args.ckpt / "train_config.json").read_text()).items()})
    data.use(cfg.skills)
    L, F = llm.config.num_hidden_layers, llm.config.intermediate_size
    density, pad = meta["default_density"], meta["pad_multiple"]
    k = kept_count(density, F, pad)
    test = distinct(data.test_set(args.n))
    test_ph = distinct(data.test_set(args.n, seed=4321, heldout_phrasing=True))
    n_distinct = {name: sum(ex.skill == name for ex in test) for name in data.SKILL_NAMES}
    rng = random.Random(99)
    train_prompts = [data.sample(rng).prompt for _ in range(1000)]

    scores = predict_scores(predictor, tokenizer, [ex.prompt for ex in test])  # [N, L, F]
    scores_ph = predict_scores(predictor, tokenizer, [ex.prompt for ex in test_ph])
    train_scores = predict_scores(predictor, tokenizer, train_prompts)
    task_scores = {s.name: predict_scores(predictor, tokenizer, [s.phrasings[0]])[0] for s in data.SKILLS}
    task_masks = torch.stack([indices_to_mask(top_k(task_scores[ex.skill], k), F) for ex in test])

    scored = {}  # name -> hits per test prompt
    scored["dense (full model, no mask)"] = hits(llm, tokenizer, test)
    scored[f"IFPruning per-input (k={k}/{F})"] = hits(llm, tokenizer, test, masks_for(scores, k, F))
    scored[f"IFPruning per-task (k={k}/{F})"] = hits(llm, tokenizer, test, task_masks)
    scored[f"static mask, same for all tasks (k={k}/{F})"] = hits(
        llm, tokenizer, test, indices_to_mask(static_indices(train_scores, k), F))
    # controls: does *which* channels matter? a random mask, and the per-task mask of another skill
    random_ids = [np.sort(np.random.default_rng(layer).choice(F, k, replace=False)) for layer in range(L)]
    scored[f"random mask, same for all tasks (k={k}/{F})"] = hits(llm, tokenizer, test, indices_to_mask(random_ids, F))
    scored["no FFN at all (every channel masked)"] = hits(llm, tokenizer, test, torch.zeros(L, F))
    other = {s: data.SKILL_NAMES[(i + 1) % len(data.SKILL_NAMES)] for i, s in enumerate(data.SKILL_NAMES)}
    wrong_masks = torch.stack([indices_to_mask(top_k(task_scores[other[ex.skill]], k), F) for ex in test])
    scored[f"IFPruning, the next skill's per-task mask (k={k}/{F})"] = hits(llm, tokenizer, test, wrong_masks)
    if not (args.narrow / "llm").exists():
        print(f"training the narrow baseline into {args.narrow}")
        train(Config(**{**cfg.__dict__, "narrow": True}), args.narrow)
    narrow, _, ntok, _ = load_checkpoint(args.narrow)
    scored[f"dense from scratch, d_ffn={narrow.config.intermediate_size}"] = hits(narrow, ntok, test)
    rows = {name: accuracy(v, test) for name, v in scored.items()}
    names = list(scored)
    skills_of = [ex.skill for ex in test]
    paired = {}  # IFPruning per-input minus each other condition, same prompts
    for other_name in [names[0], names[2], names[3], names[6], names[7]]:
        diff = scored[names[1]] - scored[other_name]
        for label, keep in (("all skills", None), ("without brackets", "brackets")):
            sub = [i for i, s in enumerate(skills_of) if s != keep]
            paired[(other_name, label)] = (skill_mean(diff[sub], [skills_of[i] for i in sub]),
                                           *skill_mean_interval(diff[sub], [skills_of[i] for i in sub]))
    heldout = {
        "dense": accuracy(hits(llm, tokenizer, test_ph), test_ph),
        "IFPruning per-input": accuracy(hits(llm, tokenizer, test_ph, masks_for(scores_ph, k, F)), test_ph),
        "narrow": accuracy(hits(narrow, ntok, test_ph), test_ph),
    }
    print("table done", f"{time.time() - t0:.0f}s")

    # accuracy vs density, on the first n_sweep prompts of every skill
    densities = [float(d) for d in args.densities.split(",")]
    sub = [i for i, ex in enumerate(test) if sum(e.skill == ex.skill for e in test[:i]) < args.n_sweep]
    sweep = [test[i] for i in sub]
    curve = {"IFPruning per-input": [], "static": []}
    for d in densities:
        kd = kept_count(d, F, pad)
        curve["IFPruning per-input"].append(
            accuracy(hits(llm, tokenizer, sweep, masks_for(scores[sub], kd, F)), sweep)["mean"])
        curve["static"].append(
            accuracy(hits(llm, tokenizer, sweep, indices_to_mask(static_indices(train_scores, kd), F)), sweep)["mean"])
        print(f"density {d}: k={kd} ifp {curve['IFPruning per-input'][-1]:.3f} static {curve['static'][-1]:.3f}")

    # are masks task-specific? Jaccard of kept channels within vs across skills
    sel = [top_k(s, k) for s in scores]
    within, across = [], []
    pair_rng = np.random.default_rng(0)
    for _ in range(4000):
        i, j = pair_rng.choice(len(test), 2, replace=False)
        (within if test[i].skill == test[j].skill else across).append(jaccard(sel[i], sel[j]))
    task_vs_input = np.mean([jaccard(top_k(task_scores[ex.skill], k), sel[n]) for n, ex in enumerate(test)])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curve.items():
        ax.plot(densities, ys, marker="o", label=name)
    ax.axhline(rows[names[0]]["mean"], color="gray", ls="--", label="dense (no mask)")
    ax.axvline(density, color="gray", ls=":", label=f"trained density {density:.2f}")
    ax.set_xlabel("density (fraction of FFN channels kept per layer)")
    ax.set_ylabel("mean exact match over skills")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("tiny IFPruning model: accuracy vs density")
    fig.tight_layout()
    fig.savefig(args.out / "density.png", dpi=120)

    skills = data.SKILL_NAMES
    lines = ["# Tiny IFPruning demo model: results", "",
             "Reproduce (one thread, seeded):", "", "```",
             "python -m examples.train_tiny.train --out examples/train_tiny/checkpoint",
             "python -m examples.train_tiny.train --narrow --out examples/train_tiny/runs/narrow",
             "python -m examples.train_tiny.evaluate", "```", "",
             f"LLM: Llama, {L} layers, d_model {llm.config.hidden_size}, d_ffn {F}; predictor: Llama "
             f"{predictor.feature_extractor.config.num_hidden_layers} layers, d {predictor.feature_extractor.config.hidden_size}. "
             f"Target density {density:.3f}: k = {k} of {F} FFN channels kept in every layer.",
             f"Held-out prompts: {args.n} draws per skill of inputs from the test bucket (never trained on), "
             f"training phrasings, seed 1234, deduplicated: {len(test)} distinct prompts. Small test buckets "
             f"repeat inputs, so some skills have fewer distinct prompts (row n). Greedy decoding, exact match; "
             "mean = mean over skills, [95% bootstrap interval] over prompts resampled within skills.", "",
             "| model / mask | " + " | ".join(skills) + " | mean |",
             "|---|" + "---|" * (len(skills) + 1),
             "| n (distinct prompts) | " + " | ".join(str(n_distinct[s]) for s in skills) + " | |"]
    for name, acc in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{acc[s]:.2f}" for s in skills)
                     + f" | **{acc['mean']:.3f}** [{acc['low']:.3f}, {acc['high']:.3f}] |")
    lines += ["", f"IFPruning per-input minus each other condition, paired on the same prompts (mean over skills "
              "[95% interval]); the brackets skill, with few distinct inputs, alone and left out:", "",
              "| minus | all skills | without brackets |", "|---|---|---|"]
    for other_name in dict.fromkeys(name for name, _ in paired):
        cells = [paired[(other_name, label)] for label in ("all skills", "without brackets")]
        lines.append(f"| {other_name} | " + " | ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in cells) + " |")
    lines += ["", f"Unseen phrasing of every instruction (phrasing 4 of each skill, never trained on; {len(test_ph)} "
              "distinct prompts), mean exact match:", "", "| model | mean [95% interval] |", "|---|---|"]
    lines += [f"| {n} | {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}] |" for n, v in heldout.items()]
    lines += ["", "## Accuracy vs density", "",
              f"Mean exact match over skills on the first {args.n_sweep} distinct held-out prompts of every skill; "
              "k = kept_count(density, d_ffn, 32) per layer; static = per layer the k channels most often "
              "selected over 1000 training prompts at that k.", "", "![accuracy vs density](density.png)", "",
              "| density | " + " | ".join(str(d) for d in densities) + " |",
              "|---|" + "---|" * len(densities)]
    for name, ys in curve.items():
        lines.append(f"| {name} | " + " | ".join(f"{y:.3f}" for y in ys) + " |")
    lines += ["", "## Are the masks task-specific?", "",
              f"Mean Jaccard overlap of kept channels (per layer, averaged) between two held-out prompts at k={k}: "
              f"**{np.mean(within):.3f} within a skill** vs **{np.mean(across):.3f} across skills** "
              f"({len(within)} / {len(across)} pairs). Per-task mask vs per-input mask of the same skill: "
              f"{task_vs_input:.3f}. Two random masks of this size would overlap {k / (2 * F - k):.3f}.", "",
              f"Evaluation wall time: {time.time() - t0:.0f} s (one thread).", "",
              "What these numbers say (and do not): see README.md, section \"What the results say\"."]
    path = args.out / "RESULTS.md"
    kept = ""  # hand-written experiment sections after KEEP survive a re-run
    if path.exists() and KEEP in path.read_text():
        kept = "\n" + KEEP + path.read_text().split(KEEP, 1)[1]
    path.write_text("\n".join(lines) + "\n" + kept)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
