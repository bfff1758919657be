"""Which density to trust: fidelity to the dense model at a ladder of densities.

For each of a set of varied instructions, the dense model's greedy answer is the reference.
At every density the prompt's selection (one scoring pass serves all densities) is applied
and the answer is scored teacher-forced in generation's own setting: the prompt prefilled
dense, the answer pruned (fidelity.fidelity_after_prefill). Two measures per density:

  KL         mean next-token KL(dense || pruned) in nats over the answer's positions
  agreement  share of answer tokens that are also the pruned model's top-1 choice

The calibrated default is the lowest density of the ladder at which, and at every density
above it, the mean KL stays within the budget (dense if none does). It is stored in the
bundle (`ifpruning.default_density`, with the table under `ifpruning.calibration`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from .fidelity import fidelity_after_prefill, greedy_tokens
from .stats import bootstrap_interval

DENSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
KL_BUDGET = 0.25  # nats per token: about 85-90% top-1 agreement with the dense model
ANSWER_TOKENS = 24

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


@dataclass
class DensityFidelity:
    """Fidelity to the dense model at one density, over the calibration prompts."""

    density: float
    kept: int
    kl: float
    kl_low: float   # bootstrap 95% interval of the mean KL over prompts
    kl_high: float
    agreement: float


@dataclass
class Calibration:
    """A model's fidelity ladder and the default density chosen from it."""

    selector: str
    prompts: int
    answer_tokens: int
    kl_budget: float
    rows: list[DensityFidelity] = field(default_factory=list)
    density: float = 1.0  # the chosen default (1.0: no density within the budget)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        rows = [DensityFidelity(**row) for row in data.get("rows", [])]
        return cls(**{**data, "rows": rows})

    def summary(self) -> str:
        """One line: what was chosen and why."""
        row = next((r for r in self.rows if r.density == self.density), None)
        if row is None:
            return (f"calibrated: no density within the KL budget {self.kl_budget:g} "
                    f"({self.selector}, {self.prompts} prompts); dense by default")
        return (f"calibrated: KL {row.kl:.3f} <= {self.kl_budget:g} nats, top-1 agreement "
                f"{row.agreement:.0%} ({self.selector}, {self.prompts} prompts)")

    def table(self) -> list[str]:
        """The ladder as Markdown table lines."""
        lines = ["| density | kept / layer | mean KL (nats) | 95% interval | top-1 agreement |",
                 "|---:|---:|---:|---|---:|"]
        for r in self.rows:
            mark = " **default**" if r.density == self.density else ""
            lines.append(f"| {r.density:.2f}{mark} | {r.kept} | {r.kl:.3f} | {r.kl_low:.3f}-{r.kl_high:.3f} "
                         f"| {r.agreement:.1%} |")
        return lines


def choose_density(rows: Sequence[DensityFidelity], kl_budget: float) -> float:
    """The lowest density at which, and at every density above it, mean KL <= kl_budget (else 1.0)."""
    chosen = 1.0
    for row in sorted(rows, key=lambda r: r.density, reverse=True):
        if row.kl > kl_budget:
            break
        chosen = row.density
    return chosen


def calibrate(engine, *, densities: Sequence[float] = DENSITIES, kl_budget: float = KL_BUDGET,
              prompts: Sequence[str] = PROMPTS, answer_tokens: int = ANSWER_TOKENS,
              selector: str | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Measure fidelity at each density and choose the default (see the module docstring).

    Leaves the engine unpinned (per-prompt selection) and its default density unchanged.
    """
    densities = sorted(densities)
    chooser = engine.get_selector(selector)
    kl = np.zeros((len(prompts), len(densities)))
    agreement = np.zeros_like(kl)
    try:
        for i, prompt in enumerate(prompts):
            ids = engine.prompt_tokens(prompt)
            engine.apply(None)
            answer = greedy_tokens(engine.model, ids, answer_tokens)
            selections = engine.select_densities(prompt, densities, chooser)
            for j, (k, a) in enumerate(fidelity_after_prefill(engine, ids, answer, selections)):
                kl[i, j], agreement[i, j] = k, a
            if on_progress:
                on_progress(i + 1, len(prompts))
    finally:
        engine.apply("auto")
    rows = []
    for j, density in enumerate(densities):
        low, high = bootstrap_interval(kl[:, j])
        rows.append(DensityFidelity(density=float(density), kept=engine.kept_count(density),
                                    kl=float(kl[:, j].mean()), kl_low=low, kl_high=high,
                                    agreement=float(agreement[:, j].mean())))
    result = Calibration(selector=chooser.name, prompts=len(prompts), answer_tokens=answer_tokens,
                         kl_budget=kl_budget, rows=rows)
    result.density = choose_density(rows, kl_budget)
    return result


def report(calibration: Calibration, model_name: str, command: str, plot_name: str | None = None) -> str:
    """A Markdown page: the command, the ladder, the choice and how it was made."""
    c = calibration
    lines = [
        f"# Calibration: {model_name}",
        "",
        f"Written by `{command}`.",
        "",
        f"Selector: {c.selector}. {c.prompts} built-in instructions (ifprune_mlx/calibrate.py), each model's own "
        f"dense greedy answer ({c.answer_tokens} tokens) as the reference, scored teacher-forced with the prompt "
        "prefilled dense and the answer pruned, as generation runs. KL is the mean next-token "
        "KL(dense || pruned) in nats with a bootstrap 95% interval over the prompts; agreement is the share "
        "of answer tokens that are also the pruned model's top-1 choice.",
        "",
        *c.table(),
        "",
        f"Default: density {c.density:.2f}, the lowest density at which, and at every density above it, the "
        f"mean KL stays within {c.kl_budget:g} nats ({c.summary()}).",
    ]
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
