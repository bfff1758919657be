"""Which density to trust: fidelity to the dense model at a ladder of densities, and one
rule that turns measured quality into the default density.

For each of a set of varied instructions, the dense model's greedy answer is the reference.
At every density the prompt's selection (one scoring pass serves all densities) is scored
teacher-forced with the prompt prefilled dense and the answer pruned: generation's own setting
for the training-free selector and for a trained predictor whose prefill is "dense" (one that
prefills pruned loses more than this measures).
One batched dense pass over all the prompts gives each its selector scores, its dense prefill
and, decoded on together, its answer (_dense_pass). All densities of a prompt run as the rows
of one batched forward pass with the channels masked (fidelity.batched_fidelity): what the
CPU's BLAS runs fast. A 4-bit model on the CPU multiplies by float copies of its weights made
once for the whole run (quantized.float_copies). Two measures per density:

  KL         mean next-token KL(dense || pruned) in nats over the answer's positions
  agreement  share of answer tokens that are also the pruned model's top-1 choice

The rule (choose_default_density), for any measure of loss vs the dense model with a paired
95% interval (KL here; task scores, dense minus pruned in points, where they are measured):
the lowest density of the ladder at which, and at every density above it, the interval's
upper end stays within the budget (non-inferiority within the budget); dense if none does.

Per-layer budgets (ifprune_mlx.budgets) are set from separate prompts (BUDGET_PROMPTS), then
measured against uniform on the ladder prompts, paired; they are turned on only if they lower
the KL (the paired interval of the mean difference over the ladder below 0), and the default
density is then chosen from their ladder. Everything is stored in the bundle
(`ifpruning.default_density`, the record under `ifpruning.calibration`; docs/FORMAT.md).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import numpy as np

from .budgets import LayerBudgets, layer_errors, steps
from .fidelity import batched_fidelity
from .quantized import float_copies
from .stats import bootstrap_interval

DENSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
KL_BUDGET = 0.25  # nats per token: about 85-90% top-1 agreement with the dense model
ANSWER_TOKENS = 16  # answers are cut at their end token too; the intervals in docs/CALIBRATION.md show what this buys
REFERENCE_DENSITY = 0.5  # where each layer's sensitivity (its KL pruned alone) is measured
VERSION = 2  # 1: the rule was mean KL <= budget; 2: the interval's upper end, and layer budgets

# Varied instructions: facts, code, arithmetic, translation, lists, rewriting, explanations,
# formats, classification, creative writing. Not used for training anything.
PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the largest number in a list.",
    "Translate to Spanish: The weather is nice today.",
    "Give three tips for staying focused while studying.",
    "What is 17 multiplied by 6?",
    "Explain what photosynthesis is in two sentences.",
    "Write a haiku about the ocean.",
    "Rewrite this sentence in the passive voice: The cat chased the mouse.",
    "Is the following review positive or negative? 'The food was cold and the service slow.'",
    "Convert 5 kilometers to miles.",
    "List the planets of the solar system in order from the sun.",
    "Summarize in one sentence: The city council voted on Tuesday to expand the bike lane "
    "network, citing rising ridership and fewer accidents on streets that already have lanes.",
    "Write a SQL query that counts the rows of a table named orders.",
    "Who wrote the play Romeo and Juliet?",
    "Explain the difference between a list and a tuple in Python.",
    "Return a JSON object with the fields name and age for a person called Ana who is 31.",
    "Suggest a name for a bakery that sells bread made with local flour.",
    "A train travels 60 miles in 1.5 hours. What is its average speed?",
    "Write a short, polite email declining a meeting invitation.",
    "What are the primary colors?",
    "Write a JavaScript function that reverses a string.",
    "Why is the sky blue?",
    "Give an antonym for the word 'generous'.",
    "Describe a sunrise in the mountains in three sentences.",
)


# Prompts that set the per-layer budgets: distinct from PROMPTS, on which budgets are judged.
BUDGET_PROMPTS = (
    "Name three animals that live in the Arctic.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is 144 divided by 12?",
    "Explain what a black hole is to a ten-year-old.",
    "Translate to French: Where is the train station?",
    "Write a limerick about a cat who loves cheese.",
)


@dataclass
class DensityFidelity:
    """Fidelity to the dense model at one density, over the calibration prompts."""

    density: float
    kept: int       # mean channels kept per layer (per-layer budgets: they differ by layer)
    kl: float
    kl_low: float   # bootstrap 95% interval of the mean KL over prompts
    kl_high: float
    agreement: float


@dataclass
class LayerComparison:
    """Per-layer budgets vs uniform at one density: the paired mean KL difference (layer -
    uniform, negative: budgets help) with its bootstrap 95% interval over the ladder prompts."""

    density: float
    uniform_kl: float
    layer_kl: float
    diff: float
    diff_low: float
    diff_high: float


@dataclass
class Calibration:
    """A model's fidelity ladder, the rule's record and the default density it chose.

    measure/budget: what chose the density ("kl": the upper end of the mean KL's 95% interval
    <= budget nats); rows: the ladder the rule read (per-layer budgets' when they are on),
    uniform_rows: uniform's ladder when it is not the one read; comparison: per-layer vs uniform;
    layer_budgets: LayerBudgets.to_json() or None. version 1 records (older ifprune-mlx) chose
    by mean KL <= kl_budget and have no budgets; they load as they are.
    """

    selector: str
    prompts: int
    answer_tokens: int
    kl_budget: float
    rows: list[DensityFidelity] = field(default_factory=list)
    density: float = 1.0  # the chosen default (1.0: no density within the budget)
    version: int = 1
    measure: str = "kl"
    budget: float | None = None
    uniform_rows: list[DensityFidelity] = field(default_factory=list)
    comparison: list[LayerComparison] = field(default_factory=list)
    layer_budgets: dict | None = None
    budget_prompts: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # a newer writer's extra fields
        return cls(**{**data, "rows": [DensityFidelity(**r) for r in data.get("rows", [])],
                      "uniform_rows": [DensityFidelity(**r) for r in data.get("uniform_rows", [])],
                      "comparison": [LayerComparison(**r) for r in data.get("comparison", [])]})

    @property
    def layer_budgets_on(self) -> bool:
        return bool(self.layer_budgets and self.layer_budgets.get("enabled"))

    def summary(self) -> str:
        """One line: what was chosen, by which measure and budget."""
        layers = ", per-layer budgets" if self.layer_budgets_on else ""
        where = f"{self.selector}, {self.prompts} prompts{layers}"
        if self.version < 2:
            row = next((r for r in self.rows if r.density == self.density), None)
            if row is None:
                return f"calibrated (older rule): no density within KL {self.kl_budget:g}; dense by default ({where})"
            return (f"calibrated (older rule: mean KL {row.kl:.3f} <= {self.kl_budget:g} nats; "
                    f"`ifprune calibrate` re-measures) ({where})")
        row = next((r for r in self.rows if r.density == self.density), None)
        if row is None:
            return (f"calibrated: no density keeps {self.measure.upper()} within the budget {self.budget:g} "
                    f"(95% upper end); dense by default ({where})")
        return (f"calibrated: lowest density with mean KL to dense <= {self.budget:g} nats at the 95% upper end "
                f"({row.kl:.3f}, up to {row.kl_high:.3f}; top-1 agreement {row.agreement:.0%}; {where})")

    def table(self) -> list[str]:
        """The ladder the rule read as Markdown table lines."""
        lines = ["| density | kept / layer | mean KL (nats) | 95% interval | top-1 agreement |",
                 "|---:|---:|---:|---|---:|"]
        for r in self.rows:
            mark = " **default**" if r.density == self.density else ""
            lines.append(f"| {r.density:.2f}{mark} | {r.kept} | {r.kl:.3f} | {r.kl_low:.3f}-{r.kl_high:.3f} "
                         f"| {r.agreement:.1%} |")
        return lines

    def comparison_table(self) -> list[str]:
        """Per-layer budgets vs uniform as Markdown table lines (empty without budgets)."""
        if not self.comparison:
            return []
        lines = ["| density | uniform KL | per-layer KL | per-layer - uniform | 95% interval (paired) |",
                 "|---:|---:|---:|---:|---|"]
        for c in self.comparison:
            lines.append(f"| {c.density:.2f} | {c.uniform_kl:.3f} | {c.layer_kl:.3f} | {c.diff:+.3f} "
                         f"| {c.diff_low:+.3f} to {c.diff_high:+.3f} |")
        return lines


@dataclass(frozen=True)
class RulePoint:
    """One density's measured loss vs the dense model: point estimate and paired 95% interval."""

    density: float
    loss: float
    low: float
    high: float


def choose_default_density(points: Sequence[RulePoint], budget: float) -> float:
    """The lowest density at which, and at every measured density above it, the loss's 95%
    upper end is <= budget (non-inferiority within the budget); 1.0 (dense) if none is.

    The loss is vs dense, larger is worse: mean KL in nats, or dense score - pruned score in
    points for a task. Requiring every density above to pass too keeps one lucky low density
    from being chosen over failing ones between it and dense.
    """
    chosen = 1.0
    for point in sorted(points, key=lambda p: p.density, reverse=True):
        if not point.high <= budget:  # NaN fails
            break
        chosen = point.density
    return chosen


def _dense_pass(engine, chooser, prompts: Sequence[str], answer_tokens: int) -> list[tuple]:
    """For every prompt: (selector scores, token ids, KV cache of all its tokens but the last,
    the dense model's greedy answer), from ONE batched dense pass over all the prompts
    (right-padded) and a batched greedy decode from it, instead of a scoring pass per prompt
    and another prefill for the answers. Answers are cut after their first end token (what a
    user sees is what is scored). The training-free selector's energies are taken in the same
    pass (each prompt's own tokens); other selectors (or a sharded model, whose ranks must
    agree) score each prompt on their own (engine.scores)."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

    from .prune import observing
    from .selectors import ActivationSelector

    ids = [engine.prompt_tokens(p) for p in prompts]
    lengths = [len(i) for i in ids]
    cache = make_prompt_cache(engine.model)
    energies: list = []
    in_pass = isinstance(chooser, ActivationSelector) and engine.sharding is None
    energy = chooser.energy() if in_pass else None

    def observe(h):  # [B, T, d_ffn] -> each prompt's (d_ffn,) energy over its own tokens
        energies.append([energy(h[b, :n]) for b, n in enumerate(lengths)])
        mx.async_eval(energies[-1])

    batch = mx.array([i + [0] * (max(lengths) - len(i)) for i in ids], dtype=mx.int32)
    with observing(engine.mlps, observe) if in_pass else nullcontext():
        logits = engine.model(batch, cache=cache)
    first = mx.argmax(logits[mx.arange(len(ids)), mx.array(lengths) - 1], axis=-1)
    mx.eval(first, energies, [c.state for c in cache])

    def rows(b: int, n: int) -> list:  # prompt b's first n positions of the batched cache
        out = [KVCache() for _ in cache]
        for one, c in zip(out, cache):
            one.keys, one.values = mx.contiguous(c.keys[b:b + 1, :, :n]), mx.contiguous(c.values[b:b + 1, :, :n])
            one.offset = n
        return out

    decode = [BatchKVCache.merge(layer) for layer in zip(*(rows(b, n) for b, n in enumerate(lengths)))]
    tokens = [first]
    for _ in range(answer_tokens - 1):
        tokens.append(mx.argmax(engine.model(tokens[-1][:, None], cache=decode)[:, -1], axis=-1))
        mx.async_eval(tokens[-1])
    answers = mx.stack(tokens, axis=1).tolist()
    stops = set(getattr(engine.tokenizer, "eos_token_ids", None) or [])
    out = []
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        end = next((i + 1 for i, t in enumerate(answer) if t in stops), len(answer))
        scores = (chooser.scores_from([e[b] for e in energies]) if in_pass
                  else engine.scores(chooser, chooser.inputs(prompt)))
        out.append((scores, ids[b], rows(b, lengths[b] - 1), answer[:end]))
    return out


def _budget_loss(engine, reference: tuple) -> np.ndarray:
    """[n_layers, steps] estimated KL of pruning each layer alone to each kept-count step, on
    the dense answer of one prompt: the layer's measured KL when it alone keeps
    kept_count(REFERENCE_DENSITY) channels, scaled along the layer's own output-error curve
    (budgets.layer_errors). One batched pass: row 0 dense, row l + 1 layer l pruned."""
    grid = steps(engine.d_ffn, engine.pad_multiple)
    scores, ids, cache, answer = reference
    k_ref = engine.kept_count(REFERENCE_DENSITY)
    ks = [[k_ref if i == layer else engine.d_ffn for i in range(engine.n_layers)] for layer in range(engine.n_layers)]
    seen: list = []
    alone = batched_fidelity(engine, ids, answer, engine.selections(scores, ks), cache,
                             observe=lambda h: seen.append(h[0]))
    ref = int(np.searchsorted(grid, k_ref))
    loss = np.zeros((engine.n_layers, len(grid)))
    for layer, (mlp, h) in enumerate(zip(engine.mlps, seen)):
        order = np.argsort(-scores[layer][mlp.perm], kind="stable")  # positions, best first
        err, _ = layer_errors(h, mlp.down_proj, order, grid)
        loss[layer] = max(alone[layer][0], 0.0) * err / max(err[ref], 1e-30)
    return loss


def calibrate(engine, *, densities: Sequence[float] = DENSITIES, kl_budget: float = KL_BUDGET,
              prompts: Sequence[str] = PROMPTS, answer_tokens: int = ANSWER_TOKENS,
              selector: str | None = None, budget_prompts: Sequence[str] = BUDGET_PROMPTS,
              on_progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Measure fidelity at each density, set and judge per-layer budgets (none when
    budget_prompts is empty) and choose the default (see the module docstring).

    Leaves the engine dense and unpinned (per-prompt selection), its defaults unchanged.
    on_progress(done, total) counts prompts; the first step is all prompts' dense answers.
    """
    start = time.perf_counter()
    densities = sorted(densities)
    chooser = engine.get_selector(selector)
    if engine.sharding is not None:  # a rank holds part of each layer: no per-layer error curves
        budget_prompts = ()
    total = 1 + len(budget_prompts) + len(prompts)
    engine.apply(None)
    try:
        with float_copies(engine.model):  # 4-bit on the CPU: dequantized once, not at every pass
            references = _dense_pass(engine, chooser, [*budget_prompts, *prompts], answer_tokens)
            if on_progress:
                on_progress(1, total)
            budgets = None
            if budget_prompts:
                loss = sum(_budget_loss(engine, r) for r in references[:len(budget_prompts)])
                budgets = LayerBudgets(selector=chooser.name, prompts=len(budget_prompts),
                                       pad_multiple=engine.pad_multiple, loss=(loss / len(budget_prompts)).tolist())
                if on_progress:
                    on_progress(1 + len(budget_prompts), total)
            ks = [[engine.kept_count(d)] * engine.n_layers for d in densities]
            if budgets is not None:
                ks += [budgets.counts(d, engine.d_ffn) for d in densities]
            kl = np.zeros((len(prompts), len(ks)))
            agreement = np.zeros_like(kl)
            for i, (scores, ids, cache, answer) in enumerate(references[len(budget_prompts):]):
                selections = engine.selections(scores, ks, chooser.name)
                kl[i], agreement[i] = np.array(batched_fidelity(engine, ids, answer, selections, cache)).T
                if on_progress:
                    on_progress(1 + len(budget_prompts) + i + 1, total)
    finally:
        engine.apply("auto")
    result = Calibration(selector=chooser.name, prompts=len(prompts), answer_tokens=answer_tokens,
                         kl_budget=kl_budget, version=VERSION, budget=kl_budget,
                         budget_prompts=len(budget_prompts))
    _choose(result, densities, ks, kl, agreement, budgets)
    result.seconds = time.perf_counter() - start
    return result


def _choose(result: Calibration, densities, ks, kl, agreement, budgets: LayerBudgets | None) -> None:
    """Fill result's ladders and comparison, turn budgets on if they help, apply the rule."""
    n = len(densities)
    result.rows = _ladder(densities, ks[:n], kl[:, :n], agreement[:, :n])
    if budgets is not None:
        layer_rows = _ladder(densities, ks[n:], kl[:, n:], agreement[:, n:])
        diff = kl[:, n:] - kl[:, :n]
        result.comparison = [LayerComparison(d, float(kl[:, j].mean()), float(kl[:, n + j].mean()),
                                             float(diff[:, j].mean()), *bootstrap_interval(diff[:, j]))
                             for j, d in enumerate(densities)]
        budgets.enabled = bool(bootstrap_interval(diff.mean(axis=1))[1] < 0)
        if budgets.enabled:
            result.uniform_rows, result.rows = result.rows, layer_rows
        result.layer_budgets = budgets.to_json()
    points = [RulePoint(r.density, r.kl, r.kl_low, r.kl_high) for r in result.rows]
    result.density = choose_default_density(points, result.budget)


def _ladder(densities, ks, kl: np.ndarray, agreement: np.ndarray) -> list[DensityFidelity]:
    rows = []
    for j, density in enumerate(densities):
        low, high = bootstrap_interval(kl[:, j])
        rows.append(DensityFidelity(density=float(density), kept=round(float(np.mean(ks[j]))),
                                    kl=float(kl[:, j].mean()), kl_low=low, kl_high=high,
                                    agreement=float(agreement[:, j].mean())))
    return rows


def report(calibration: Calibration, model_name: str, command: str, plot_name: str | None = None) -> str:
    """A Markdown section: the command, the ladder, per-layer vs uniform, the choice and its rule."""
    c = calibration
    lines = [
        f"## {model_name}",
        "",
        f"Written by `{command}` ({c.seconds:.0f} s).",
        "",
        f"Selector: {c.selector}. {c.prompts} built-in instructions (`PROMPTS` in ifprune_mlx/calibrate.py), "
        f"each model's own dense greedy answer (at most {c.answer_tokens} tokens, cut after its end token) as "
        "the reference, scored teacher-forced with the prompt prefilled dense and the answer pruned, as "
        "generation runs with the training-free selector or a predictor whose prefill is dense (one that "
        "prefills pruned is measured here in the dense-prefill setting). KL is the mean next-token "
        "KL(dense || pruned) in nats with a bootstrap 95% interval over the prompts; agreement is the share "
        "of answer tokens that are also the pruned model's top-1 choice.",
        "",
        *c.table(),
        "",
    ]
    if c.comparison:
        on = "on" if c.layer_budgets_on else "off"
        lines += [
            f"Per-layer budgets, set from {c.budget_prompts} other prompts (`BUDGET_PROMPTS`), vs uniform at "
            f"the same average density (the same FFN channels in all) on the {c.prompts} prompts above; the "
            "difference is paired per prompt (negative: per-layer budgets are closer to dense):",
            "",
            *c.comparison_table(),
            "",
            f"Per-layer budgets are **{on}** for this model: on only when the 95% interval of the per-prompt "
            "mean difference over the ladder lies below 0."
            + (" The ladder above is theirs." if c.layer_budgets_on else ""),
            "",
        ]
    lines.append(f"Default: density {c.density:.2f}, the lowest density at which, and at every density above "
                 f"it, the upper end of the mean KL's 95% interval stays within {c.budget:g} nats ({c.summary()}).")
    if plot_name:
        lines += ["", f"![KL and agreement vs density]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(calibration: Calibration, path, title: str) -> bool:
    """KL (with its interval) and agreement vs density as a PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = calibration.rows
    x = [r.density for r in rows]
    fig, left = plt.subplots(figsize=(6.4, 4.0))
    left.plot(x, [r.kl for r in rows], "o-", color="tab:red", label="mean KL to dense (nats)")
    left.fill_between(x, [r.kl_low for r in rows], [r.kl_high for r in rows], color="tab:red", alpha=0.2)
    left.axhline(calibration.kl_budget, color="tab:red", linestyle=":", label=f"budget {calibration.kl_budget:g}")
    left.axvline(calibration.density, color="gray", linestyle="--", label=f"default {calibration.density:.2f}")
    left.set_xlabel("density (fraction of FFN channels kept)")
    left.set_ylabel("KL (nats / token)")
    right = left.twinx()
    right.plot(x, [100 * r.agreement for r in rows], "s-", color="tab:blue", label="top-1 agreement (%)")
    right.set_ylabel("top-1 agreement with dense (%)")
    right.set_ylim(0, 100)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    left.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
