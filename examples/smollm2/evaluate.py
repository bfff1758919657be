"""Evaluate trained IFPruning on SmolLM2-135M-Instruct against the original dense model.

    python -m examples.smollm2.evaluate --artifacts ifprune_mlx/pretrained/smollm2_135m_instruct      # RESULTS.md + PNG

On held-out prompts (data.jsonl split "heldout", at most --per-family of each family), at
densities 0.3 / 0.5 / 0.7, every condition is measured against the ORIGINAL dense model on
its own answers (the answers stored in data.jsonl):
  - kl: mean over the answer tokens of KL(original || condition), teacher-forced;
  - match16: the condition's greedy answer has the same first 16 tokens (fewer if the
    original's answer is shorter) as the original's.
Conditions (issue 14):
  a   trained predictor's per-prompt masks on the adapted LLM (what ships)
  a0  trained predictor's masks on the original LLM (no adapter: what the adapter adds)
  b   training-free selector (GRIFFIN activations) on the original, as the runtime runs it:
      dense prefill of the prompt, pruned answer
  c   one static mask for every prompt, from the trained predictor's scores on the training
      prompts (ifprune_mlx.selectors.static_top_k), on the adapted LLM
  d   random masks (one per prompt, seeded) on the original LLM
  e   the adapted LLM dense (no mask)
  ref the original dense model itself: KL 0; match16 measures batched-generation noise
Intervals: 95% bootstrap over prompts (2000 resamples, seeded); the ratio a/b and the
differences a-c are paired (the same resampled prompts).

Decode speed per density: `ifprune bench default` (the shipped bundle as `make chat` opens it,
in MLX), run in a child process; its JSON is kept in --speed-json, which --report-only reuses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from converters.reference import indices_to_mask, set_ffn_mask
from ifprune_mlx.resolve import PRETRAINED
from ifprune_mlx.selectors import kept_count, static_top_k, top_k

from . import data
from .train import (answer_logprobs, apply_adapter, build_predictor, griffin_scores, kl,
                    read_artifacts, sequences)

HERE = Path(__file__).parent
DENSITIES = (0.3, 0.5, 0.7)
MASKED = ("a", "a0", "b", "c", "d")
NAMES = {"a": "IFPruning: predictor + adapted LLM", "a0": "predictor, original LLM",
         "b": "training-free (GRIFFIN), original", "c": "static mask (predictor scores), adapted LLM",
         "d": "random mask, original", "e": "adapted LLM, dense", "ref": "original dense"}
MATCH_TOKENS = 16


def pick_rows(rows: list[dict], per_family: int) -> list[dict]:
    """Held-out rows, the first `per_family` of each family (file order)."""
    taken: dict[str, int] = {}
    out = []
    for r in rows:
        if r["split"] == "heldout" and taken.get(r["family"], 0) < per_family:
            taken[r["family"]] = taken.get(r["family"], 0) + 1
            out.append(r)
    return out


def bootstrap(values: np.ndarray, stat=np.mean, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of stat over prompts resampled with replacement (values [N, ...])."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n, len(values)))
    stats = np.array([stat(values[i]) for i in idx])
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


class DecodeOnlyMask:
    """Masks the FFN only for single-token steps (decode): GRIFFIN's dense prefill in generate()."""

    def __init__(self, llm):
        self.mask = None
        self.hooks = [layer.mlp.down_proj.register_forward_pre_hook(self._hook(i))
                      for i, layer in enumerate(llm.model.layers)]

    def _hook(self, layer):
        def hook(module, args):
            (h,) = args
            if self.mask is None or h.shape[1] != 1:
                return None
            return (h * self.mask[:, layer][:, None, :].to(h.dtype),)
        return hook


@torch.no_grad()
def greedy(llm, tokenizer, prompts: list[str], masks: torch.Tensor | None, decode_only=None) -> list[list[int]]:
    """First MATCH_TOKENS greedy tokens per prompt, left-padded batch, masks [B, L, F] on every
    position (or on decode steps only, through `decode_only`)."""
    eos = tokenizer.eos_token_id
    seqs = [data.chat_ids(tokenizer, p) for p in prompts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), eos, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        attn[i, T - len(s):] = 1
    if decode_only is not None:
        set_ffn_mask(llm, None)
        decode_only.mask = masks
    else:
        set_ffn_mask(llm, masks)
    try:
        out = llm.generate(input_ids=ids, attention_mask=attn, max_new_tokens=MATCH_TOKENS, do_sample=False,
                           pad_token_id=eos, eos_token_id=eos)[:, T:]
    finally:
        set_ffn_mask(llm, None)
        if decode_only is not None:
            decode_only.mask = None
    return [o.tolist() for o in out]


def matches(answer: list[int], reference: list[int]) -> bool:
    """The first MATCH_TOKENS tokens of `reference` (all of it if shorter, eos included) begin `answer`."""
    ref = reference[:MATCH_TOKENS]
    return answer[: len(ref)] == ref


def condition_names(optional: bool = True) -> list[str]:
    """The report's conditions: ref, e, then a/a0/b/c/d at each density ("b@0.5"); a0 (the
    predictor without the adapter, an ablation) only with `optional`."""
    return ["ref", "e"] + [f"{c}@{d}" for d in DENSITIES for c in MASKED if optional or c != "a0"]


def _parse(name: str) -> tuple[str, float | None]:
    cond, _, d = name.partition("@")
    return cond, float(d) if d else None


def measure(artifacts: Path | None, data_path: Path, per_family: int, batch: int, threads: int,
            conditions: list[str], cache: Path, seed: int = 0, model: str | None = None, log=print) -> dict:
    """Per-prompt KL and match16 of `conditions` on the held-out rows, merged into the JSON
    `cache` (so conditions that need no training can be measured while it runs). Conditions
    a, a0, c, e need `artifacts`."""
    torch.set_num_threads(threads)
    t0 = time.time()
    _, rows = data.load(data_path)
    held = pick_rows(rows, per_family)
    ids_key = [r["id"] for r in held]
    stored = json.loads(Path(cache).read_text()) if Path(cache).exists() else {}
    if stored.get("ids") != ids_key:
        stored = {"ids": ids_key, "values": {}, "seconds": {}}
    todo = [_parse(n) for n in conditions]
    original, tokenizer = data.load_teacher(model)
    L, Fn = original.config.num_hidden_layers, original.config.intermediate_size
    trained = {"a", "a0", "c", "e"} & {c for c, _ in todo}
    if trained:
        if artifacts is None:
            raise SystemExit(f"conditions {sorted(trained)} need --artifacts")
        from converters.reference import predict_scores

        adapted, _ = data.load_teacher(model)
        adapter, _, meta = read_artifacts(artifacts)
        apply_adapter(adapted, adapter)
        stored["artifacts_meta"] = meta
        pred = build_predictor(original, artifacts)

        def scores_of(prompts):
            return np.concatenate([predict_scores(pred, tokenizer, prompts[i: i + 64])
                                   for i in range(0, len(prompts), 64)])

        held_scores = scores_of([r["prompt"] for r in held])
        if "c" in trained:
            train_scores = scores_of([r["prompt"] for r in rows if r["split"] == "train"])
            static = {d: indices_to_mask(static_top_k(train_scores, kept_count(d, Fn)), Fn) for d in DENSITIES}
    log(f"{len(held)} held-out prompts, setup: {time.time() - t0:.0f}s")
    decode_only = DecodeOnlyMask(original)
    rng = np.random.default_rng(seed)
    random_ids = {d: [[np.sort(rng.permutation(Fn)[: kept_count(d, Fn)]) for _ in range(L)] for _ in held]
                  for d in DENSITIES}
    kls = {key: np.zeros(len(held)) for key in todo}
    match = {key: np.zeros(len(held)) for key in todo}
    for start in range(0, len(held), batch):
        part = held[start: start + batch]
        idx = list(range(start, start + len(part)))
        prompts = [r["prompt"] for r in part]
        ids, attn, where = sequences(tokenizer, part)
        row_of = where[:, 0]
        set_ffn_mask(original, None)
        t_logp = answer_logprobs(original, ids, attn, where)
        griffin = griffin_scores(original, tokenizer, prompts).numpy() if any(c == "b" for c, _ in todo) else None
        for key in todo:
            cond, d = key
            llm = adapted if cond in ("a", "c", "e") else original
            masks, prompt_dense = None, False
            if d is not None:
                k = kept_count(d, Fn)
                if cond in ("a", "a0"):
                    masks = torch.stack([indices_to_mask(top_k(held_scores[i], k), Fn) for i in idx])
                elif cond == "b":
                    masks = torch.stack([indices_to_mask(top_k(g, k), Fn) for g in griffin])
                    prompt_dense = True
                elif cond == "c":
                    masks = static[d][None].expand(len(part), -1, -1)
                elif cond == "d":
                    masks = torch.stack([indices_to_mask(random_ids[d][i], Fn) for i in idx])
            if masks is not None and prompt_dense:  # per position: prompt dense, answer pruned
                per_pos = torch.ones(len(part), L, ids.shape[1], Fn)
                for row, r in enumerate(part):
                    n_prompt = len(data.chat_ids(tokenizer, r["prompt"]))
                    per_pos[row, :, n_prompt:, :] = masks[row][:, None, :]
                set_ffn_mask(llm, per_pos)
            else:
                set_ffn_mask(llm, masks)
            with torch.no_grad():
                s_logp = answer_logprobs(llm, ids, attn, where)
            set_ffn_mask(llm, None)
            per_token = kl(t_logp, s_logp)
            for row, i in enumerate(idx):
                kls[key][i] = per_token[row_of == row].mean().item()
            answers = greedy(llm, tokenizer, prompts, masks, decode_only if prompt_dense else None)
            for row, i in enumerate(idx):
                match[key][i] = matches(answers[row], held[i]["answer_ids"])
        log(f"  {start + len(part)}/{len(held)} prompts  {time.time() - t0:.0f}s")
    for (cond, d), name in zip(todo, conditions):
        stored["values"][name] = {"kl": kls[(cond, d)].tolist(), "match": match[(cond, d)].tolist()}
        stored["seconds"][name] = round((time.time() - t0) / len(todo))
    stored.update(per_family_cap=per_family, families=[r["family"] for r in held])
    tmp = Path(cache).with_suffix(".tmp")
    tmp.write_text(json.dumps(stored) + "\n")
    tmp.replace(cache)
    return stored


def summarize(stored: dict) -> dict:
    """The report's figures from the per-prompt values of every condition."""
    missing = [n for n in condition_names(optional=False) if n not in stored["values"]]
    if missing:
        raise SystemExit(f"not measured yet: {', '.join(missing)} (run with --conditions {','.join(missing)})")
    fam_of = np.array(stored["families"])
    families = sorted(set(stored["families"]))
    kls = {n: np.array(v["kl"]) for n, v in stored["values"].items()}
    match = {n: np.array(v["match"]) for n, v in stored["values"].items()}
    results = {"prompts": len(fam_of), "families": families, "per_family_cap": stored["per_family_cap"],
               "artifacts_meta": stored.get("artifacts_meta"), "seconds": sum(stored["seconds"].values()),
               "conditions": {}, "held_out_family_names": list(data.HELD_OUT_FAMILIES)}
    for name in [n for n in condition_names() if n in stored["values"]]:
        results["conditions"][name] = {
            "kl": float(kls[name].mean()), "kl_ci": bootstrap(kls[name]),
            "match16": float(match[name].mean()), "match16_ci": bootstrap(match[name]),
            "per_family": {f: {"kl": float(kls[name][fam_of == f].mean()),
                               "match16": float(match[name][fam_of == f].mean()), "n": int((fam_of == f).sum())}
                           for f in families}}
    paired = {}
    for d in DENSITIES:
        a, b, c = kls[f"a@{d}"], kls[f"b@{d}"], kls[f"c@{d}"]
        paired[f"kl_ratio_a_over_b@{d}"] = {"value": float(a.mean() / b.mean()),
                                            "ci": bootstrap(np.stack([a, b], 1), lambda x: x[:, 0].mean() / x[:, 1].mean())}
        paired[f"kl_diff_a_minus_c@{d}"] = {"value": float((a - c).mean()), "ci": bootstrap(a - c)}
        ma, mc = match[f"a@{d}"], match[f"c@{d}"]
        paired[f"match16_diff_a_minus_c@{d}"] = {"value": float((ma - mc).mean()), "ci": bootstrap(ma - mc)}
    results["paired"] = paired
    return results


def measure_speed(out_json: Path, decode_seconds: float = 10.0) -> dict:
    """`ifprune bench default` in a child process (MLX, the shipped bundle): its JSON figures."""
    exe = shutil.which("ifprune", path=str(Path(sys.executable).parent)) or shutil.which("ifprune")
    cmd = [exe, "bench", "default", "--decode-seconds", str(decode_seconds), "--json", str(out_json)]
    subprocess.run(cmd, check=True)
    return json.loads(Path(out_json).read_text())


def speed_lines(speed: dict, default_density: float | None) -> list[str]:
    """The decode table of an `ifprune bench default` JSON, as markdown lines."""
    result = speed["results"][0]
    rows = {round(r["density"], 3): r for r in result["decode"]}
    dense = rows.get(1.0)
    lines = ["## Decode speed", "",
             f"`{speed['command']}` ({speed['date']}, {result['name']}: {result['weight_bytes'] / 1e6:.0f} MB of "
             f"weights, {speed['machine'].get('blas', '')}; load average {speed['load_start']} -> {speed['load_end']} "
             "on this shared machine). Medians over rounds in which every variant decodes in turn; ratios are paired "
             "per round. *small*: a compact copy of exactly the kept rows; bytes bound: dense bytes / bytes read per "
             "token at that density.", "",
             "| density | kept | tok/s | vs this model dense | vs mlx-lm dense | bytes bound | in place / small |",
             "|---|---|---|---|---|---|---|"]
    for d, r in sorted(rows.items(), reverse=True):
        own = r["inplace_tps"] / dense["inplace_tps"] if dense else float("nan")
        mark = " (default)" if default_density is not None and abs(d - default_density) < 1e-6 else ""
        lines.append(f"| {d:g}{mark} | {r['k']} | {r['inplace_tps']:.1f} | {own:.2f}x | {r['speedup']:.2f}x | "
                     f"{r['bytes_bound']:.2f}x | {'' if d == 1.0 else format(r['ratio_small'], '.3f')} |")
    return lines + [""]


def write_report(results: dict, out_md: Path, out_png: Path, command: str, speed: dict | None = None) -> None:
    c, p = results["conditions"], results["paired"]

    def cell(name, metric, digits=3):
        lo, hi = c[name][f"{metric}_ci"]
        return f"{c[name][metric]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    lines = ["# IFPruning on SmolLM2-135M-Instruct: results", "",
             f"Generated by `{command}` ({results['seconds']} s). {results['prompts']} held-out prompts "
             f"(at most {results['per_family_cap']} per family, {len(results['families'])} families; "
             f"families held out whole from training: {', '.join(results['held_out_family_names'])}). "
             "Against the ORIGINAL dense model on its own greedy answers: mean next-token KL (nats, teacher-forced "
             "on the answer) and the share of answers whose first 16 greedy tokens match. Brackets: 95% bootstrap "
             "intervals over prompts.", "",
             "| condition | density | KL | match16 |", "|---|---|---|---|"]
    for name in ("ref", "e"):
        lines.append(f"| {NAMES[name]} | 1.0 | {cell(name, 'kl')} | {cell(name, 'match16', 2)} |")
    for d in DENSITIES:
        for cond in [x for x in MASKED if f"{x}@{d}" in c]:
            lines.append(f"| {NAMES[cond]} | {d} | {cell(f'{cond}@{d}', 'kl')} | {cell(f'{cond}@{d}', 'match16', 2)} |")
    lines += ["", "Paired comparisons (same resampled prompts):", "", "| | value | 95% interval |", "|---|---|---|"]
    for key, v in p.items():
        lines.append(f"| {key} | {v['value']:.3f} | [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] |")
    if speed is not None:
        lines += [""] + speed_lines(speed, results.get("artifacts_meta", {}).get("default_density"))
    else:
        lines += [""]
    lines += ["Per family, density 0.5, KL (match16):", "",
              "| family | n | " + " | ".join(NAMES[x] for x in ("a", "b", "c", "d")) + " |",
              "|---|---|" + "---|" * 4]
    for f in results["families"]:
        row = [f"{c[f'{x}@0.5']['per_family'][f]['kl']:.2f} ({c[f'{x}@0.5']['per_family'][f]['match16']:.2f})"
               for x in ("a", "b", "c", "d")]
        held = " (held-out family)" if f in results["held_out_family_names"] else ""
        lines.append(f"| {f}{held} | {c['a@0.5']['per_family'][f]['n']} | " + " | ".join(row) + " |")
    out_md.write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for cond in [x for x in MASKED if f"{x}@0.5" in c]:
        for ax, metric in zip(axes, ("kl", "match16")):
            vals = [c[f"{cond}@{d}"][metric] for d in DENSITIES]
            lo = [vals[i] - c[f"{cond}@{d}"][f"{metric}_ci"][0] for i, d in enumerate(DENSITIES)]
            hi = [c[f"{cond}@{d}"][f"{metric}_ci"][1] - vals[i] for i, d in enumerate(DENSITIES)]
            ax.errorbar(DENSITIES, vals, yerr=[lo, hi], marker="o", capsize=3, label=NAMES[cond])
    for ax, metric in zip(axes, ("kl", "match16")):
        ax.axhline(c["e"][metric], color="gray", ls="--", label=NAMES["e"])
        ax.set_xlabel("density (share of FFN channels kept)")
        ax.set_ylabel({"kl": "mean KL to the original (nats)", "match16": "first 16 tokens match"}[metric])
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct, {results['prompts']} held-out prompts, 95% bootstrap intervals")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=PRETRAINED)
    ap.add_argument("--data", type=Path, default=HERE / "data.jsonl")
    ap.add_argument("--per-family", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conditions", default="all", help="comma-separated (e.g. ref,b@0.5) or all")
    ap.add_argument("--cache", type=Path, default=HERE / "eval_cache.json", help="per-prompt values, merged")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: the report from --cache")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--plot", type=Path, default=HERE / "results.png")
    ap.add_argument("--json", type=Path, default=HERE / "results.json")
    ap.add_argument("--speed-json", type=Path, default=HERE / "speed.json",
                    help="decode speed figures of `ifprune bench default` (measured unless --no-speed or --report-only)")
    ap.add_argument("--no-speed", action="store_true", help="do not measure decode speed")
    args = ap.parse_args(argv)
    names = condition_names() if args.conditions == "all" else args.conditions.split(",")
    if args.report_only:
        stored = json.loads(args.cache.read_text())
    else:
        stored = measure(args.artifacts, args.data, args.per_family, args.batch, args.threads, names, args.cache)
    if any(n not in stored["values"] for n in condition_names(optional=False)):
        print(f"measured {', '.join(names)}; the report needs every condition")
        return
    results = summarize(stored)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    command = "python -m examples.smollm2.evaluate" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("artifacts", "per_family") and v != ap.get_default(k))
    if not (args.report_only or args.no_speed):
        speed = measure_speed(args.speed_json)
    else:
        speed = json.loads(args.speed_json.read_text()) if args.speed_json.exists() else None
    write_report(results, args.out, args.plot, command, speed)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
