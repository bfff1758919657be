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
      the prompt but its last token prefilled dense, the last token and the answer pruned
  (a, a0 and c are prefilled as the artifacts' ifpruning.json says: "dense" as b, else pruned)
  c   one static mask for every prompt, from the trained predictor's scores on the training
      prompts (ifprune_mlx.selectors.static_top_k), on the adapted LLM
  d   random masks (one per prompt, seeded) on the original LLM
  e   the adapted LLM dense (no mask)
  ref the original dense model itself: KL 0; match16 measures batched-generation noise
  ap, bp   a and b with per-layer budgets: kept counts per layer given by the caller
      (measure(layer_counts=...); examples/smollm2/results.py passes each model's calibrated ones)
Values are cached per prompt and condition in --cache (a condition is measured again when the
artifacts or its per-layer counts change, a prompt when its data changes): a re-run, a
--limit run or a new condition computes only what the cache lacks.
Intervals: 95% bootstrap over prompts (2000 resamples, seeded); the ratio a/b and the
differences a-c are paired (the same resampled prompts).

Decode speed per density: `ifprune bench default` (the shipped bundle as `make chat` opens it,
in MLX), run in a child process; its JSON is kept in --speed-json, which --report-only reuses.
"""

from __future__ import annotations

import argparse
import hashlib
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
                    pruned_positions, read_artifacts, sequences)

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


class DensePrefillMask:
    """Masks the FFN at the last position of every forward pass only. With a left-padded batch
    that is the prompt's last token in generate()'s prefill and the new token of each decode
    step: the runtime's dense prefill (the prompt but its last token on every channel)."""

    def __init__(self, llm):
        self.mask = None
        self.hooks = [layer.mlp.down_proj.register_forward_pre_hook(self._hook(i))
                      for i, layer in enumerate(llm.model.layers)]

    def _hook(self, layer):
        def hook(module, args):
            (h,) = args
            if self.mask is None:
                return None
            last = h[:, -1:] * self.mask[:, layer][:, None, :].to(h.dtype)
            return (torch.cat([h[:, :-1], last], 1),)
        return hook


@torch.no_grad()
def greedy(llm, tokenizer, prompts: list[str], masks: torch.Tensor | None,
           dense_prefill: DensePrefillMask | None = None) -> list[list[int]]:
    """First MATCH_TOKENS greedy tokens per prompt, left-padded batch, masks [B, L, F] on every
    position (or, through `dense_prefill`, on the prompt's last token and the answer only)."""
    eos = tokenizer.eos_token_id
    seqs = [data.chat_ids(tokenizer, p) for p in prompts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), eos, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        attn[i, T - len(s):] = 1
    if dense_prefill is not None:
        set_ffn_mask(llm, None)
        dense_prefill.mask = masks
    else:
        set_ffn_mask(llm, masks)
    try:
        out = llm.generate(input_ids=ids, attention_mask=attn, max_new_tokens=MATCH_TOKENS, do_sample=False,
                           pad_token_id=eos, eos_token_id=eos)[:, T:]
    finally:
        set_ffn_mask(llm, None)
        if dense_prefill is not None:
            dense_prefill.mask = None
    return [o.tolist() for o in out]


def matches(answer: list[int], reference: list[int]) -> bool:
    """The first MATCH_TOKENS tokens of `reference` (all of it if shorter, eos included) begin `answer`."""
    ref = reference[:MATCH_TOKENS]
    return answer[: len(ref)] == ref


def condition_names(optional: bool = True, densities=DENSITIES) -> list[str]:
    """The report's conditions: ref, e, then a/a0/b/c/d at each density ("b@0.5"); a0 (the
    predictor without the adapter, an ablation) only with `optional`."""
    return ["ref", "e"] + [f"{c}@{d}" for d in densities for c in MASKED if optional or c != "a0"]


def _parse(name: str) -> tuple[str, float | None]:
    cond, _, d = name.partition("@")
    return cond, float(d) if d else None


TRAINED = {"a", "ap", "a0", "c", "e"}  # conditions that read the artifacts
PER_LAYER = {"ap": "a", "bp": "b"}     # per-layer budgets' variants: kept counts given per layer (layer_counts)
FOLLOW_PREFILL = {"a", "a0", "c"}      # the predictor's conditions: prefilled as the artifacts' "prefill" says


def artifacts_fingerprint(artifacts: Path) -> str:
    """sha1 of the artifacts' files (names and bytes): trained conditions are measured again when it changes."""
    h = hashlib.sha1()
    for file in sorted(p for p in Path(artifacts).rglob("*") if p.is_file() and p.suffix != ".jsonl"):
        h.update(file.relative_to(artifacts).as_posix().encode() + b"\0" + file.read_bytes())
    return h.hexdigest()[:16]


def _row_key(row: dict) -> str:
    """What a prompt's values depend on in the data: its text and the original's answer."""
    return hashlib.sha1(json.dumps([row["prompt"], row["answer_ids"]]).encode()).hexdigest()[:12]


def load_cache(path: Path) -> dict:
    """The per-prompt values of eval_cache.json: {"values": {condition: {prompt id: [kl, match16]}},
    "keys": {condition: what its values depend on}, "rows": {id: row key}, "families": {id: family},
    "order": the held-out ids in order, ...}; a file of the first format (lists over "ids") is
    converted, its trained conditions keyed "legacy" (kept while the artifacts' meta is unchanged)."""
    if not Path(path).exists():
        return {"version": 2, "values": {}, "keys": {}, "rows": {}, "families": {}, "order": [], "seconds": {}}
    stored = json.loads(Path(path).read_text())
    if stored.get("version") == 2:
        return stored
    ids = [str(i) for i in stored["ids"]]
    return {"version": 2, "order": ids, "families": dict(zip(ids, stored["families"])), "rows": {},
            "values": {n: {i: [k, m] for i, k, m in zip(ids, v["kl"], v["match"])} for n, v in stored["values"].items()},
            "keys": {n: "legacy" if _parse(n)[0] in TRAINED else "" for n in stored["values"]},
            "seconds": stored.get("seconds", {}), "per_family_cap": stored.get("per_family_cap"),
            "artifacts_meta": stored.get("artifacts_meta")}


def prefills_dense(cond: str, prefill: str) -> bool:
    """Whether a masked condition runs the prompt (but its last token) dense: the training-free
    selector always (as the runtime runs it), the predictor's conditions as the artifacts say."""
    base = PER_LAYER.get(cond, cond)
    return base == "b" or (base in FOLLOW_PREFILL and prefill == "dense")


def condition_key(name: str, fingerprint: str | None, layer_counts: dict, prefill: str = "pruned") -> str:
    """What a condition's values depend on besides the prompt: the artifacts, per-layer counts,
    a dense prefill."""
    cond, d = _parse(name)
    parts = {}
    if cond in TRAINED:
        parts["artifacts"] = fingerprint
    if cond in PER_LAYER:
        parts["counts"] = [int(k) for k in layer_counts[name]]
    if d is not None and prefills_dense(cond, prefill):
        parts["prefill"] = "dense"
    return json.dumps(parts, sort_keys=True) if parts else ""


def missing(stored: dict, names: list[str], rows: list[dict], keys: dict[str, str]) -> dict[str, set[str]]:
    """Per condition, the ids of `rows` it has no current value for (its key changed, the prompt
    changed, or never measured)."""
    out = {}
    for name in names:
        have = stored["values"].get(name, {}) if stored["keys"].get(name) == keys[name] else {}
        out[name] = {str(r["id"]) for r in rows if str(r["id"]) not in have}
    return out


def _save(stored: dict, cache: Path) -> None:
    tmp = Path(cache).with_suffix(".tmp")
    tmp.write_text(json.dumps(stored) + "\n")
    tmp.replace(cache)


def measure(artifacts: Path | None, data_path: Path, per_family: int, batch: int, threads: int,
            conditions: list[str], cache: Path, seed: int = 0, model: str | None = None, log=print,
            limit: int | None = None, layer_counts: dict[str, list[int]] | None = None) -> dict:
    """Per-prompt KL and match16 of `conditions` on the held-out rows (the first `limit`), merged
    into the JSON `cache` after every batch; only what the cache lacks is computed. Conditions
    a, ap, a0, c, e need `artifacts`; ap and bp (a and b with per-layer budgets) their kept
    counts per layer in `layer_counts` (condition name -> one count per layer)."""
    torch.set_num_threads(threads)
    t0 = time.time()
    layer_counts = layer_counts or {}
    _, rows = data.load(data_path)
    all_held = pick_rows(rows, per_family)
    held = all_held[:limit]
    stored = load_cache(cache)
    trained = {"a", "ap", "a0", "c", "e"} & {_parse(n)[0] for n in conditions}
    if trained and artifacts is None:
        raise SystemExit(f"conditions {sorted(trained)} need --artifacts")
    fingerprint, meta = None, None
    if artifacts is not None:
        fingerprint, meta = artifacts_fingerprint(artifacts), read_artifacts(artifacts)[2]
        legacy_ok = stored.get("artifacts_meta") == meta
        stored["keys"] = {n: ((json.dumps({"artifacts": fingerprint}) if legacy_ok else "stale") if k == "legacy" else k)
                          for n, k in stored["keys"].items()}
        stored["artifacts_meta"] = meta
    prefill = meta.get("prefill", "pruned") if meta else "pruned"
    keys = {n: condition_key(n, fingerprint, layer_counts, prefill) for n in conditions}
    for r in held:  # a prompt or answer changed in the data: its values are measured again, every condition's
        if stored["rows"].get(str(r["id"]), _row_key(r)) != _row_key(r):
            for values in stored["values"].values():
                values.pop(str(r["id"]), None)
    lacking = missing(stored, conditions, held, keys)
    for name in conditions:  # values made under another key are dropped, the rest kept
        if stored["keys"].get(name) != keys[name]:
            stored["values"][name], stored["keys"][name] = {}, keys[name]
    stored.update(per_family_cap=per_family, order=[str(r["id"]) for r in all_held])
    stored["families"].update({str(r["id"]): r["family"] for r in all_held})
    todo_rows = [r for r in held if any(str(r["id"]) in ids for ids in lacking.values())]
    pairs = sum(len(ids) for ids in lacking.values())
    if not todo_rows:
        log(f"{len(held)} held-out prompts x {len(conditions)} conditions: all in {cache}")
        return stored
    log(f"{pairs} (condition, prompt) values to measure on {len(todo_rows)} of {len(held)} held-out prompts")
    _measure_rows(artifacts, todo_rows, rows, conditions, lacking, layer_counts, prefill, stored, cache, batch, seed,
                  model, [str(r["id"]) for r in all_held], log, t0)
    return stored


def _measure_rows(artifacts, todo_rows, rows, conditions, lacking, layer_counts, prefill, stored, cache, batch, seed,
                  model, order, log, t0) -> None:
    """measure()'s work: the conditions' values on todo_rows, saved to `cache` after each batch."""
    todo = [_parse(n) for n in conditions]
    original, tokenizer = data.load_teacher(model)
    L, Fn = original.config.num_hidden_layers, original.config.intermediate_size
    trained = {c for c, _ in todo} & TRAINED
    if trained:
        from converters.reference import predict_scores

        adapted, _ = data.load_teacher(model)
        adapter, _, _ = read_artifacts(artifacts)
        apply_adapter(adapted, adapter)
        pred = build_predictor(original, artifacts)

        def scores_of(prompts):
            return np.concatenate([predict_scores(pred, tokenizer, prompts[i: i + 64])
                                   for i in range(0, len(prompts), 64)])

        held_scores = dict(zip([str(r["id"]) for r in todo_rows], scores_of([r["prompt"] for r in todo_rows])))
        if "c" in trained:
            train_scores = scores_of([r["prompt"] for r in rows if r["split"] == "train"])
            static = {d: indices_to_mask(static_top_k(train_scores, kept_count(d, Fn)), Fn)
                      for c, d in todo if c == "c"}
    log(f"setup: {time.time() - t0:.0f}s")
    dense_prefill = {id(llm): DensePrefillMask(llm) for llm in ([original, adapted] if trained else [original])}
    rng = np.random.default_rng(seed)  # drawn over the whole held-out list: a prompt's mask is its own
    random_ids = {d: dict(zip(order, [[np.sort(rng.permutation(Fn)[: kept_count(d, Fn)]) for _ in range(L)]
                                      for _ in order])) for d in DENSITIES}
    t_rows = time.time()
    for start in range(0, len(todo_rows), batch):
        t_batch = time.time()
        part = todo_rows[start: start + batch]
        ids_of = [str(r["id"]) for r in part]
        prompts = [r["prompt"] for r in part]
        ids, attn, where = sequences(tokenizer, part)
        row_of = where[:, 0]
        set_ffn_mask(original, None)
        t_logp = answer_logprobs(original, ids, attn, where)
        active = [(name, key) for name, key in zip(conditions, todo) if lacking[name] & set(ids_of)]
        griffin = (griffin_scores(original, tokenizer, prompts).numpy()
                   if any(c in ("b", "bp") for _, (c, _) in active) else None)
        for name, (cond, d) in active:
            base = PER_LAYER.get(cond, cond)
            llm = adapted if base in ("a", "c", "e") else original
            masks = None
            prompt_dense = d is not None and prefills_dense(cond, prefill)
            if d is not None:
                k = layer_counts[name] if cond in PER_LAYER else kept_count(d, Fn)
                if base in ("a", "a0"):
                    masks = torch.stack([indices_to_mask(top_k(held_scores[i], k), Fn) for i in ids_of])
                elif base == "b":
                    masks = torch.stack([indices_to_mask(top_k(g, k), Fn) for g in griffin])
                elif base == "c":
                    masks = static[d][None].expand(len(part), -1, -1)
                elif base == "d":
                    masks = torch.stack([indices_to_mask(random_ids[d][i], Fn) for i in ids_of])
            if prompt_dense:  # per position: the prompt but its last token dense, the rest pruned
                pruned = pruned_positions(where, ids.shape[1])
                set_ffn_mask(llm, torch.where(pruned, masks[:, :, None, :], torch.ones(())))
            else:
                set_ffn_mask(llm, masks)
            with torch.no_grad():
                s_logp = answer_logprobs(llm, ids, attn, where)
            set_ffn_mask(llm, None)
            per_token = kl(t_logp, s_logp)
            answers = greedy(llm, tokenizer, prompts, masks, dense_prefill[id(llm)] if prompt_dense else None)
            values = stored["values"].setdefault(name, {})
            for row, i in enumerate(ids_of):
                values[i] = [per_token[row_of == row].mean().item(), float(matches(answers[row], part[row]["answer_ids"]))]
        stored["rows"].update({str(r["id"]): _row_key(r) for r in part})
        for name, _ in active:
            stored["seconds"][name] = round(stored["seconds"].get(name, 0) + (time.time() - t_batch) / len(active), 1)
        _save(stored, cache)
        done = start + len(part)
        left = (time.time() - t_rows) / done * (len(todo_rows) - done)
        log(f"  {done}/{len(todo_rows)} prompts  {time.time() - t0:.0f}s" + (f", ~{left / 60:.0f} min left" if left else ""))


def per_prompt(stored: dict, name: str, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(KL, match16) of condition `name` on the prompts `ids`, in that order."""
    values = stored["values"][name]
    return np.array([values[i][0] for i in ids]), np.array([values[i][1] for i in ids])


def summarize(stored: dict, densities=DENSITIES, ids: list[str] | None = None) -> dict:
    """The report's figures from the per-prompt values of every condition (on `ids`, default the
    whole held-out list)."""
    ids = stored["order"] if ids is None else ids
    measured = {n for n, v in stored["values"].items() if all(i in v for i in ids)}
    missing_names = [n for n in condition_names(optional=False, densities=densities) if n not in measured]
    if missing_names:
        raise SystemExit(f"not measured yet: {', '.join(missing_names)} (run with --conditions {','.join(missing_names)})")
    fam_of = np.array([stored["families"][i] for i in ids])
    families = sorted(set(fam_of.tolist()))
    names = [n for n in condition_names(densities=densities) if n in measured]
    kls, match = {}, {}
    for n in names:
        kls[n], match[n] = per_prompt(stored, n, ids)
    results = {"prompts": len(ids), "families": families, "per_family_cap": stored["per_family_cap"],
               "artifacts_meta": stored.get("artifacts_meta"),
               "seconds": sum(v for k, v in stored["seconds"].items() if k in names),
               "conditions": {}, "held_out_family_names": list(data.HELD_OUT_FAMILIES)}
    for name in names:
        results["conditions"][name] = {
            "kl": float(kls[name].mean()), "kl_ci": bootstrap(kls[name]),
            "match16": float(match[name].mean()), "match16_ci": bootstrap(match[name]),
            "per_family": {f: {"kl": float(kls[name][fam_of == f].mean()),
                               "match16": float(match[name][fam_of == f].mean()), "n": int((fam_of == f).sum())}
                           for f in families}}
    paired = {}
    for d in densities:
        paired.update(kl_ratios(stored, d, ids))
        a, c = kls[f"a@{d}"], kls[f"c@{d}"]
        paired[f"kl_diff_a_minus_c@{d}"] = {"value": float((a - c).mean()), "ci": bootstrap(a - c)}
        ma, mc = match[f"a@{d}"], match[f"c@{d}"]
        paired[f"match16_diff_a_minus_c@{d}"] = {"value": float((ma - mc).mean()), "ci": bootstrap(ma - mc)}
    results["paired"] = paired
    return results


def kl_ratios(stored: dict, density: float, ids: list[str]) -> dict:
    """Paired ratios of mean KL, trained predictor (a) / training-free selector (b), at `density`
    on `ids` and on those of the families never trained (the issue's measure of generalisation)."""
    a, _ = per_prompt(stored, f"a@{density}", ids)
    b, _ = per_prompt(stored, f"b@{density}", ids)
    out = {f"kl_ratio_a_over_b@{density}": {"value": float(a.mean() / b.mean()), "ci": ratio_ci(a, b),
                                             "kl": [float(a.mean()), float(b.mean())], "n": len(ids)}}
    unseen = np.isin([stored["families"][i] for i in ids], list(data.HELD_OUT_FAMILIES))
    if unseen.any():
        au, bu = a[unseen], b[unseen]
        out[f"kl_ratio_a_over_b_never_trained@{density}"] = {
            "value": float(au.mean() / bu.mean()), "ci": ratio_ci(au, bu),
            "kl": [float(au.mean()), float(bu.mean())], "n": int(unseen.sum())}
    return out


def ratio_ci(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """95% paired bootstrap interval of mean(a) / mean(b) over the same resampled prompts."""
    return bootstrap(np.stack([a, b], 1), lambda x: x[:, 0].mean() / x[:, 1].mean())


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
        stored = load_cache(args.cache)
    else:
        stored = measure(args.artifacts, args.data, args.per_family, args.batch, args.threads, names, args.cache)
    if any(len(stored["values"].get(n, {})) < len(stored["order"]) for n in condition_names(optional=False)):
        print(f"measured {', '.join(names)}; the report needs every condition")
        complete = {n for n, v in stored["values"].items() if len(v) == len(stored["order"])}
        for d in sorted({_parse(n)[1] for n in complete if _parse(n)[0] == "a"}):
            if f"b@{d}" in complete:
                for name, r in kl_ratios(stored, d, stored["order"]).items():
                    print(f"{name}: {r['value']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] "
                          f"(KL {r['kl'][0]:.3f} vs {r['kl'][1]:.3f}, {r['n']} prompts)")
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
