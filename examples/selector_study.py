"""Trained predictor vs training-free selector: accuracy, fidelity (KL) and cost.

Writes the generated sections of docs/SELECTORS.md (between its "generated" markers; the
prose around them is kept):

  demo   the shipped demo model, held-out prompts of every skill, greedy exact match, for the
         trained predictor, the training-free (GRIFFIN) selector and static masks, all at the
         demo's density; plus the KL of each mask to the dense model over the dense answers.
  sweep  the same selectors over densities (docs/selectors_density.png).
  kl     a tiny random model: KL to the dense model of activation-selected vs random masks.
  cost   a random 8-layer model (d_model 1024, vocab 32000): selection time vs prefill time.

    python -m examples.selector_study                 # all four (about 15 minutes on 2 cores)
    python -m examples.selector_study --only demo,kl --n 10
    make selectors                                    # the same, with OpenBLAS preloaded on Linux
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

import ifprune_mlx as ifp
from ifprune_mlx.bench.machine import blas_name
from ifprune_mlx.bench.measure import prompt_text, synthetic_bundle
from ifprune_mlx.bench.settings import Settings
from ifprune_mlx.disk_cache import checkpoint_bundle
from ifprune_mlx.fidelity import kl_after_prefill, prefill_dense, random_selection
from ifprune_mlx.selectors import ActivationSelector, Selection, static_top_k
from ifprune_mlx.testing import make_model_folder, model_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "examples" / "train_tiny" / "checkpoint"
DOC = REPO / "docs" / "SELECTORS.md"


# -- the demo model -------------------------------------------------------------------------

def _answer(engine, prompt: str, selection: Selection | None, dense_prefill: bool, max_tokens: int) -> list:
    """Greedy answer under `selection`; with dense_prefill the prompt is prefilled dense first."""
    if not dense_prefill:
        engine.apply(selection)
        return list(engine.stream_responses(prompt, max_tokens=max_tokens))
    ids = engine.prompt_tokens(prompt)
    cache = prefill_dense(engine, ids)
    engine.apply(selection)
    return list(engine.stream_responses(prompt, max_tokens=max_tokens, tokens=ids[-1:], prompt_cache=cache))


def _calibration_scores(engine, prompts: int) -> dict[str, np.ndarray]:
    """Each selector's scores [prompts, n_layers, d_ffn] over training prompts of the demo."""
    from examples.train_tiny import data

    rng = random.Random(99)
    texts = [data.sample(rng).prompt for _ in range(prompts)]
    return {name: np.stack([selector.scores(selector.inputs(t)) for t in texts])
            for name, selector in engine.selectors.items()}


def _static(engine, scores: np.ndarray, k: int) -> Selection:
    return Selection(tuple(static_top_k(scores, k)), engine.d_ffn, source="static")


def _exact_match(engine, examples, mask_of, dense_prefill: bool) -> float:
    """Mean over skills of the exact-match rate of greedy 16-token answers."""
    hits: dict[str, list[bool]] = {}
    for ex in examples:
        text = "".join(r.text for r in _answer(engine, ex.prompt, mask_of(ex.prompt), dense_prefill, 16))
        hits.setdefault(ex.skill, []).append(text.strip() == ex.answer)
    return float(np.mean([np.mean(h) for h in hits.values()]))


def sweep(n: int, calibration_prompts: int, densities: list[float], plot: Path | None, log) -> str:
    """Accuracy vs density on the demo model: where do the selectors part ways?"""
    from examples.train_tiny import data

    from examples.train_tiny.data import distinct

    engine = ifp.load(checkpoint_bundle(DEMO_CHECKPOINT))
    examples = distinct(data.test_set(n))
    calibration = _calibration_scores(engine, calibration_prompts)
    curves = {"trained predictor": [], "training-free, GRIFFIN (dense prefill)": [],
              "training-free, pruned prefill": [], "static mask from predictor scores": [],
              "static mask from activations": [], "random mask": []}
    ks = []
    for density in densities:
        k = engine.kept_count(density)
        ks.append(k)
        static_pred, static_act = (_static(engine, calibration[name], k) for name in ("predictor", "activations"))
        rand = random_selection(engine.d_ffn, engine.n_layers, k, seed=0)
        runs = {
            "trained predictor": (lambda p: engine.select(p, density, "predictor"), False),
            "training-free, GRIFFIN (dense prefill)": (lambda p: engine.select(p, density, "activations"), True),
            "training-free, pruned prefill": (lambda p: engine.select(p, density, "activations"), False),
            "static mask from predictor scores": (lambda p: static_pred, False),
            "static mask from activations": (lambda p: static_act, False),
            "random mask": (lambda p: rand, False),
        }
        for name, (mask_of, dense_prefill) in runs.items():
            curves[name].append(_exact_match(engine, examples, mask_of, dense_prefill))
        log(f"  density {density}: " + ", ".join(f"{name} {c[-1]:.3f}" for name, c in curves.items()))
    dense = _exact_match(engine, examples, lambda p: None, False)
    engine.apply("auto")
    lines = [f"Mean exact match over the 10 skills, {len(examples)} distinct held-out prompts ({n} draws per skill, "
             "repeats dropped), greedy, one run without intervals (see the table above for their size); dense "
             f"model {dense:.3f}. k = channels kept per layer of {engine.d_ffn}; static masks: "
             f"from {calibration_prompts} training prompts' predictor or activation scores.", ""]
    if plot is not None and _plot_sweep(densities, curves, dense, engine.default_density, plot):
        lines += [f"![accuracy vs density]({plot.name})", ""]
    lines += ["| density | " + " | ".join(f"{d} (k={k})" for d, k in zip(densities, ks)) + " |",
              "|---|" + "---|" * len(densities)]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for name, values in curves.items()]
    return "\n".join(lines)


def _plot_sweep(densities, curves, dense: float, trained: float, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("note: no plot (matplotlib is not installed)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, values in curves.items():
        ax.plot(densities, values, marker="o", label=name)
    ax.axhline(dense, color="gray", ls="--", label="dense")
    ax.axvline(trained, color="gray", ls=":", label=f"trained density {trained:.2f}")
    ax.set_xlabel("density (fraction of FFN channels kept per layer)")
    ax.set_ylabel("mean exact match over skills")
    lowest = min(min(values) for values in curves.values())
    ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("demo model: selectors vs density")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def demo(n: int, calibration_prompts: int, log) -> str:
    from examples.train_tiny import data
    from examples.train_tiny.data import distinct, skill_mean, skill_mean_interval

    engine = ifp.load(checkpoint_bundle(DEMO_CHECKPOINT))
    raw = ActivationSelector(engine.model, engine.mlps, engine.prompt_tokens, normalize=False)
    density = engine.default_density
    k = engine.kept_count(density)
    test = distinct(data.test_set(n))
    calibration = _calibration_scores(engine, calibration_prompts)
    log(f"demo: {len(test)} held-out prompts, k={k}/{engine.d_ffn}; static masks from {calibration_prompts} training prompts")
    static_pred, static_act = (_static(engine, calibration[name], k) for name in ("predictor", "activations"))
    rand = random_selection(engine.d_ffn, engine.n_layers, k, seed=0)

    # name -> (mask for a prompt, prefill dense?, KL measured: once per distinct mask)
    variants = {
        "dense (no pruning)": (lambda p: None, False, True),
        "trained predictor (IFPruning)": (lambda p: engine.select(p, density, "predictor"), False, True),
        "training-free, GRIFFIN (dense prefill)": (lambda p: engine.select(p, density, "activations"), True, True),
        "training-free, pruned prefill": (lambda p: engine.select(p, density, "activations"), False, False),
        "training-free, not normalized per token (dense prefill)": (lambda p: engine.select(p, density, raw), True, True),
        "trained predictor, dense prefill": (lambda p: engine.select(p, density, "predictor"), True, False),
        "static mask from predictor scores": (lambda p: static_pred, False, True),
        "static mask from activations (calibrated)": (lambda p: static_act, False, True),
        "random mask": (lambda p: rand, False, True),
    }
    hits = {name: {s: [] for s in data.SKILL_NAMES} for name in variants}
    kl = {name: [] for name in variants}
    overlap = []
    start = time.perf_counter()
    for i, ex in enumerate(test):
        reference = _answer(engine, ex.prompt, None, False, 16)
        continuation = [r.token for r in reference][:-1]
        ids = engine.prompt_tokens(ex.prompt)
        for name, (mask_of, dense_prefill, measure_kl) in variants.items():
            selection = mask_of(ex.prompt)
            responses = reference if selection is None else _answer(engine, ex.prompt, selection, dense_prefill, 16)
            text = "".join(r.text for r in responses)
            hits[name][ex.skill].append(text.strip() == ex.answer)
            if measure_kl:
                kl[name].append(kl_after_prefill(engine, ids, continuation, selection))
        a, b = engine.select(ex.prompt, density, "predictor"), engine.select(ex.prompt, density, "activations")
        overlap.append(np.mean(a.overlap(b)))
        if (i + 1) % 50 == 0:
            log(f"  {i + 1}/{len(test)} prompts, {time.perf_counter() - start:.0f} s")
    engine.apply("auto")

    skills = data.SKILL_NAMES
    lines = [f"Demo model ({engine.n_layers} layers, d_ffn {engine.d_ffn}), density {density:.2f}: "
             f"k = {k} channels kept per layer. {len(test)} distinct held-out prompts ({n} draws per skill of "
             "data.test_set, seed 1234, repeats dropped: row n), greedy, exact match; mean over skills with a 95% "
             "bootstrap interval (prompts resampled within skills). KL: mean KL(dense || masked) in nats of the "
             "next-token distributions over the dense model's answer, the prompt prefilled dense.", "",
             "| selector / mask | " + " | ".join(skills) + " | mean | KL |",
             "|---|" + "---|" * (len(skills) + 2),
             "| n (distinct prompts) | " + " | ".join(str(len(hits["dense (no pruning)"][s])) for s in skills) + " | | |"]
    for name in variants:
        acc = [float(np.mean(hits[name][s])) for s in skills]
        values = np.array([float(h) for s in skills for h in hits[name][s]])
        labels = [s for s in skills for _ in hits[name][s]]
        low, high = skill_mean_interval(values, labels)
        k_l = f"{max(0.0, float(np.mean(kl[name]))):.3f}" if kl[name] else ""  # no "-0.000"
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in acc)
                     + f" | **{skill_mean(values, labels):.3f}** [{low:.3f}, {high:.3f}] | {k_l} |")
    lines += ["", f"Mean per-layer Jaccard overlap of the predictor's and the training-free selector's "
              f"masks on the same prompt: {np.mean(overlap):.2f} (two random masks of this size: "
              f"{k / (2 * engine.d_ffn - k):.2f})."]
    return "\n".join(lines)


# -- fidelity on a random model -------------------------------------------------------------

def fidelity(prompts: int, log) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        config = model_config(hidden_size=128, num_hidden_layers=4, intermediate_size=512, vocab_size=320)
        engine = ifp.load(make_model_folder(Path(tmp) / "m", config, seed=0))
        raw = ActivationSelector(engine.model, engine.mlps, engine.prompt_tokens, normalize=False)
        rng = np.random.default_rng(0)
        lines = [f"Random llama, 4 layers, d_model 128, d_ffn 512. {prompts} prompts of 32 random tokens, "
                 "KL over the next 16 random tokens (mean, nats); random masks: mean of 4 seeds per prompt. "
                 "\"wins\": prompts where the activation mask's KL is below the best of the 4 random masks.", "",
                 "| density | k | activations (GRIFFIN) | not normalized | random | activations / random | wins |",
                 "|---|---|---|---|---|---|---|"]
        for density in (0.25, 0.5, 0.75):
            k = engine.kept_count(density)
            ours, unnormalized, chance, wins = [], [], [], 0
            for _ in range(prompts):
                tokens = rng.integers(3, config["vocab_size"], size=48).tolist()
                prompt, continuation = tokens[:32], tokens[32:]
                ours.append(kl_after_prefill(engine, prompt, continuation,
                                             engine._select(engine.get_selector("activations"), prompt, k)))
                unnormalized.append(kl_after_prefill(engine, prompt, continuation, engine._select(raw, prompt, k)))
                randoms = [kl_after_prefill(engine, prompt, continuation,
                                            random_selection(engine.d_ffn, engine.n_layers, k, seed)) for seed in range(4)]
                chance.append(np.mean(randoms))
                wins += ours[-1] < min(randoms)
            lines.append(f"| {density} | {k} | {np.mean(ours):.4f} | {np.mean(unnormalized):.4f} | "
                         f"{np.mean(chance):.4f} | {np.mean(ours) / np.mean(chance):.2f} | {wins}/{prompts} |")
            log(lines[-1])
        engine.apply("auto")
    return "\n".join(lines)


# -- cost -----------------------------------------------------------------------------------

def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cost(lengths: list[int], reps: int, d_model: int, log) -> str:
    """Time to first token of dense, GRIFFIN and IFPruning generation, all through
    engine.stream_responses, timed in alternation on new prompts; and the scoring pass's
    overhead over a plain dense forward pass."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = ifp.load(synthetic_bundle(Path(tmp) / "b", d_model, Settings()))
        activations = engine.get_selector("activations")
        rows = []
        for n in lengths:
            t = {key: [] for key in ("dense", "griffin", "forward", "scoring", "predictor", "apply",
                                     "pruned", "ifp")}
            for rep in range(reps + 1):
                text, ids = prompt_text(engine, n, salt=rep + 1000 * n)
                engine.apply(None)
                dense = _seconds(lambda: next(engine.stream_responses(text, max_tokens=1)))

                def forward():  # every layer on every token, as the scoring pass needs
                    cache = make_prompt_cache(engine.model)
                    hidden = engine.model.model(mx.array([ids], dtype=mx.int32), cache=cache)
                    mx.eval(hidden, [c.state for c in cache])

                plain = _seconds(forward)
                scoring = _seconds(lambda: activations.scores(ids))
                engine.apply("auto")
                griffin = _seconds(lambda: next(engine.stream_responses(
                    text, density=0.5, selector="activations", max_tokens=1)))
                # IFPruning: predictor, apply (from the GRIFFIN mask: a new task's swaps), pruned prefill
                predictor_s = _seconds(lambda: engine.select(text, 0.5, "predictor"))
                apply_s = _seconds(lambda: engine.apply(engine.select(text, 0.5, "predictor")))
                pruned = _seconds(lambda: next(engine.stream_responses(text, max_tokens=1)))
                if rep == 0:
                    continue  # warm-up
                for key, value in zip(t, (dense, griffin, plain, scoring, predictor_s, apply_s, pruned,
                                          predictor_s + apply_s + pruned)):
                    t[key].append(value)
            med = {key: statistics.median(v) * 1000 for key, v in t.items()}
            rows.append((len(ids), med))
            log(f"  {len(ids)} tokens: " + ", ".join(f"{key} {v:.1f} ms" for key, v in med.items()))
        engine.apply("auto")
    lines = [f"Random llama, 8 layers, d_model {d_model}, d_ffn {engine.d_ffn}, vocab 32000, float32, "
             f"density 0.5, BLAS: {blas_name()}; median of {reps} new prompts per length, the variants "
             "timed in alternation. Milliseconds; TTFT = time to the first token through "
             "engine.stream_responses.", "",
             "| prompt tokens | dense TTFT | GRIFFIN TTFT (/ dense) | scoring pass vs a dense pass | "
             "predictor | apply | pruned prefill | IFPruning TTFT (/ dense) |",
             "|---|---|---|---|---|---|---|---|"]
    for n, m in rows:
        lines.append(f"| {n} | {m['dense']:.0f} | {m['griffin']:.0f} ({m['griffin'] / m['dense']:.2f}) | "
                     f"{m['scoring']:.0f} vs {m['forward']:.0f} ({m['scoring'] / m['forward'] - 1:+.0%}) | "
                     f"{m['predictor']:.1f} | {m['apply']:.1f} | {m['pruned']:.0f} | "
                     f"{m['ifp']:.0f} ({m['ifp'] / m['dense']:.2f}) |")
    return "\n".join(lines)


# -- the document ---------------------------------------------------------------------------

def write_section(doc: Path, name: str, body: str) -> None:
    """Replace the text between <!-- generated: NAME --> and <!-- end: NAME --> in doc."""
    text = doc.read_text()
    begin, end = f"<!-- generated: {name} -->", f"<!-- end: {name} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no {begin} ... {end} markers")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    doc.write_text(pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="demo,sweep,kl,cost", help="comma-separated sections: demo, sweep, kl, cost")
    ap.add_argument("--sweep-n", type=int, default=25, help="held-out prompts per skill (sweep)")
    ap.add_argument("--densities", default="0.05,0.1,0.15,0.2,0.33,0.5", help="densities of the sweep")
    ap.add_argument("--n", type=int, default=50, help="held-out prompts per skill (demo)")
    ap.add_argument("--calibration", type=int, default=300, help="training prompts behind the static masks (demo)")
    ap.add_argument("--prompts", type=int, default=20, help="random prompts per density (kl)")
    ap.add_argument("--lengths", default="64,256,1024", help="prompt lengths in tokens (cost)")
    ap.add_argument("--reps", type=int, default=5, help="prompts per length (cost)")
    ap.add_argument("--d-model", type=int, default=1024, help="width of the random model (cost)")
    ap.add_argument("--doc", type=Path, default=DOC, help="the markdown file to update")
    args = ap.parse_args(argv)
    mx.random.seed(0)
    only = set(args.only.split(","))
    sections = {
        "demo": lambda: demo(args.n, args.calibration, print),
        "sweep": lambda: sweep(args.sweep_n, args.calibration, [float(d) for d in args.densities.split(",")],
                               args.doc.parent / "selectors_density.png", print),
        "kl": lambda: fidelity(args.prompts, print),
        "cost": lambda: cost([int(x) for x in args.lengths.split(",")], args.reps, args.d_model, print),
    }
    for name, run in sections.items():
        if name in only:
            start = time.perf_counter()
            body = run()
            write_section(args.doc, name, body + f"\n\n<sub>`python -m examples.selector_study --only {name}` "
                                                 f"({time.perf_counter() - start:.0f} s)</sub>")
            print(body)


if __name__ == "__main__":
    main()
