"""What converting an mlx-lm (mlx-community) quantized folder costs, against loading it directly.

mlx-lm quantizes down_proj [d_model, d_ffn] in groups along d_ffn; the row layout needs them
along d_model, so down_proj is dequantized, transposed and quantized again (same bits and group
size): once by `ifprune convert`, or at every `ifprune_mlx.load` of the folder. This script
measures what that second rounding costs and what converting once saves. The quantized folders
are made with mlx-lm's own `mlx_lm.convert` (affine, groups of 64 or 32) in a temporary folder.

    python examples/mlx_folder_costs.py accuracy                  # tiny random llama + demo model
    python examples/mlx_folder_costs.py accuracy --exact-match 50 # + demo exact match, 50 per skill
    python examples/mlx_folder_costs.py time --size 1b            # convert once vs load every time

accuracy: on prompts (the demo's held-out prompts, chat template applied) followed by mlx-lm's
own greedy continuation, KL(mlx-lm's quantized model || bundle) of the next-token distributions,
max |logit diff| (absolute, and relative to max |logit|), same top-1 token, identical greedy
continuations; for scale, KL(float model || mlx-lm's quantized model), what quantizing costs in
the first place. "down 8-bit" is the same bundle with down_proj re-quantized at 8 bits instead
(not a converter option: measured to see whether it would be worth one).

time: a random model shaped like a 1B Llama (or smaller), bfloat16, quantized by mlx_lm.convert;
the time (median of 3 fresh processes) and peak RSS of `ifprune convert` (once), and of
mlx_lm.load(folder), ifprune_mlx.load(folder) (re-quantizes) and ifprune_mlx.load(bundle), and
the size on disk of each. On Linux CPU; preload OpenBLAS as `make bench` does if you like, loads
do not multiply matrices.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ifprune_mlx as ifp  # noqa: E402
from converters.layouts import detect  # noqa: E402
from converters.verify import PROMPTS  # noqa: E402
from converters.write import convert  # noqa: E402
from examples.train_tiny import data  # noqa: E402
from ifprune_mlx import testing  # noqa: E402
from ifprune_mlx.fidelity import greedy_tokens, next_token_kl  # noqa: E402

DEMO = ROOT / "examples" / "train_tiny" / "checkpoint"
SETTINGS = [(4, 64), (4, 32), (8, 64), (8, 32)]  # (bits, group size), as mlx_lm.convert -q takes them
CONTINUATION = 16
SIZES = {  # random llamas for the timing
    "medium": testing.model_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                   num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "1b": testing.model_config(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}


def quietly(fn, *args, **kwargs):
    """Call fn with mlx_lm.convert's [INFO] prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def mlx_lm_quantize(src: Path, out: Path, bits: int, group_size: int, dtype: str | None = None) -> Path:
    """What an mlx-community folder holds: mlx_lm.convert(quantize=True), affine."""
    from mlx_lm import convert as mlx_lm_convert

    quietly(mlx_lm_convert, str(src), str(out), quantize=True, q_bits=bits, q_group_size=group_size, dtype=dtype)
    return out


def to_bundle(src: Path, out: Path, predictor: Path | None = None) -> None:
    """`ifprune convert src out [--predictor]`."""
    convert(detect(src, predictor=predictor), out, force=True)


# -- accuracy ------------------------------------------------------------------------------------


def logits(model, ids: list[int]) -> mx.array:
    return model(mx.array([ids]))[0].astype(mx.float32)


def down_at_8_bits(engine, mlx_lm_model, group_size: int) -> None:
    """Replace the engine's re-quantized down_proj rows by 8-bit ones (measurement only)."""
    for layer, mlp in zip(mlx_lm_model.layers, engine.mlps):
        d = layer.mlp.down_proj
        dense = mx.dequantize(d.weight, d.scales, d.biases, group_size=d.group_size, bits=d.bits)
        rows = mlp.down_proj
        rows.weight, rows.scales, rows.biases = mx.quantize(mx.contiguous(dense.T), group_size=group_size, bits=8)
        rows.bits = 8


def compare(reference, candidates: dict, float_model, prompts: list[list[int]]) -> dict:
    """Per candidate model: KL, max |diff|, top-1 and greedy agreement with `reference`."""
    out = {name: {"kl": [], "diff": 0.0, "scale": 0.0, "top1": 0, "greedy": 0} for name in candidates}
    positions, quant_kl = 0, []
    for ids in prompts:
        theirs = greedy_tokens(reference, ids, CONTINUATION)
        seq = ids + theirs
        ref = logits(reference, seq)
        quant_kl.append(np.array(next_token_kl(logits(float_model, seq), ref)))
        positions += len(seq)
        for name, model in candidates.items():
            got = logits(model, seq)
            row = out[name]
            row["kl"].append(np.array(next_token_kl(ref, got)))
            row["diff"] = max(row["diff"], float(mx.abs(got - ref).max()))
            row["scale"] = max(row["scale"], float(mx.abs(ref).max()))
            row["top1"] += int(mx.sum(ref.argmax(-1) == got.argmax(-1)))
            row["greedy"] += greedy_tokens(model, ids, CONTINUATION) == theirs
    for row in out.values():
        all_kl = np.concatenate(row.pop("kl"))
        row.update(kl_mean=float(all_kl.mean()), kl_max=float(all_kl.max()), top1=row["top1"] / positions,
                   rel=row["diff"] / max(1.0, row["scale"]), greedy=f"{row['greedy']}/{len(prompts)}",
                   quant_kl=float(np.concatenate(quant_kl).mean()))
    return out


def accuracy(tmp: Path, exact_match: int) -> None:
    from mlx_lm import load as mlx_lm_load

    tiny = testing.make_model_folder(tmp / "tiny", testing.model_config(hidden_size=128, intermediate_size=512,
                                                                       num_hidden_layers=4))
    models = {"tiny random llama (4 layers, d_model 128, d_ffn 512)": (tiny, None),
              "demo model (examples/train_tiny, 4 layers, d_model 192, d_ffn 768)": (DEMO / "llm", DEMO / "predictor")}
    print("| model | bits, group | KL(float ‖ mlx-lm q), for scale | bundle | KL mean | KL max | max |Δlogit| "
          "(rel.) | same top-1 | greedy 16 identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    demo_prompts = [ex.prompt for ex in data.test_set(3)]
    for title, (src, _) in models.items():
        float_model, tokenizer = mlx_lm_load(str(src))
        texts = demo_prompts if src != tiny else list(PROMPTS) + demo_prompts
        prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True))
                   for t in texts]
        for bits, group in SETTINGS:
            folder = mlx_lm_quantize(src, tmp / f"{src.name}-q{bits}g{group}", bits, group)
            bundle = tmp / f"{src.name}-q{bits}g{group}-bundle"
            to_bundle(folder, bundle)
            reference, _ = mlx_lm_load(str(folder))
            engine = ifp.load(bundle)
            candidates = {"converted": engine.model}
            if bits == 4:
                engine8 = ifp.load(bundle)
                down_at_8_bits(engine8, reference, group)
                candidates["down 8-bit"] = engine8.model
            for name, r in compare(reference, candidates, float_model, prompts).items():
                print(f"| {title} | {bits}, {group} | {r['quant_kl']:.2e} | {name} | {r['kl_mean']:.2e} | "
                      f"{r['kl_max']:.2e} | {r['diff']:.3f} ({r['rel']:.3f}) | {100 * r['top1']:.1f}% | "
                      f"{r['greedy']} |")
    if exact_match:
        demo_exact_match(tmp, exact_match)


def answers(model, tokenizer, examples, engine=None, density: float | None = None) -> list[str]:
    """Greedy answers (16 tokens at most) to the chat-formatted prompts; with engine and density,
    each prompt runs pruned on the predictor's selection for it (IFPruning per input)."""
    from mlx_lm.generate import generate

    out = []
    for ex in examples:
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True))
        if engine is not None:
            engine.apply(None if density is None else engine.select(ex.prompt, density))
        out.append(generate(model, tokenizer, ids, max_tokens=16).strip())
    return out


def demo_exact_match(tmp: Path, per_skill: int) -> None:
    """Exact match on the demo's held-out prompts: float, mlx-lm quantized, converted bundles."""
    from mlx_lm import load as mlx_lm_load

    examples = data.test_set(per_skill)
    truth = [ex.answer for ex in examples]

    def score(got: list[str], baseline: list[str] | None = None) -> str:
        hit = np.mean([a == t for a, t in zip(got, truth)])
        same = "" if baseline is None else f"{100 * np.mean([a == b for a, b in zip(got, baseline)]):.1f}%"
        return f"{hit:.3f} | {same}"

    density = 0.33
    float_model, tokenizer = mlx_lm_load(str(DEMO / "llm"))
    float_answers = answers(float_model, tokenizer, examples)
    print(f"\nDemo model, exact match over {len(examples)} held-out prompts ({per_skill} per skill), greedy, "
          "16 tokens; 'same answers' = answers identical to mlx-lm's quantized model's\n")
    print("| model | exact match | same answers as mlx-lm q |")
    print("|---|---|---|")
    print(f"| float (mlx-lm) | {score(float_answers)} |")
    float_bundle = tmp / "demo-float-bundle"
    to_bundle(DEMO, float_bundle)
    engine = ifp.load(float_bundle)
    print(f"| float bundle, IFPruning per input at density {density} | "
          f"{score(answers(engine.model, tokenizer, examples, engine, density))} |")
    for bits, group in SETTINGS:
        folder = tmp / f"llm-q{bits}g{group}"
        if not folder.exists():
            mlx_lm_quantize(DEMO / "llm", folder, bits, group)
        bundle = tmp / f"llm-q{bits}g{group}-predictor-bundle"
        to_bundle(folder, bundle, predictor=DEMO / "predictor")
        reference, _ = mlx_lm_load(str(folder))
        theirs = answers(reference, tokenizer, examples)
        engine = ifp.load(bundle)
        print(f"| {bits}-bit g{group}: mlx-lm | {score(theirs)} |")
        dense = answers(engine.model, tokenizer, examples, engine)
        print(f"| {bits}-bit g{group}: converted bundle, dense | {score(dense, theirs)} |")
        if bits == 4:
            engine8 = ifp.load(bundle)
            down_at_8_bits(engine8, reference, group)
            print(f"| {bits}-bit g{group}: bundle with down 8-bit, dense | "
                  f"{score(answers(engine8.model, tokenizer, examples, engine8), theirs)} |")
        print(f"| {bits}-bit g{group}: converted bundle, IFPruning per input at density {density} | "
              f"{score(answers(engine.model, tokenizer, examples, engine, density))} |")


# -- time ----------------------------------------------------------------------------------------


STEPS = {  # timed in fresh processes
    "(imports only)": "pass",
    "ifprune convert (once)": "convert(detect({folder!r}), {bundle!r}, force=True)",
    "mlx_lm.load(folder)": "from mlx_lm import load; load({folder!r})",
    "ifprune_mlx.load(folder)": "import ifprune_mlx; ifprune_mlx.load({folder!r})",
    "ifprune_mlx.load(bundle)": "import ifprune_mlx; ifprune_mlx.load({bundle!r})",
}


PEAK_RSS = """
def peak_mb():  # VmHWM: on Linux ru_maxrss keeps the parent's peak across fork + exec
    try:
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
"""


def timed(code: str, runs: int = 3) -> tuple[float, float]:
    """(median seconds, peak RSS in MB) of `code` in fresh processes (the time of the imports not
    counted, their memory counted: see the "(imports only)" row)."""
    script = ("import resource, sys, time\nimport mlx.core, mlx_lm, ifprune_mlx\n"
              f"from converters.layouts import detect\nfrom converters.write import convert\n{PEAK_RSS}\n"
              f"start = time.perf_counter()\n{code}\n"
              "print(time.perf_counter() - start, peak_mb())")
    seconds, rss = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
        s, r = out.stdout.split()[-2:]
        seconds.append(float(s))
        rss.append(float(r))
    return statistics.median(seconds), max(rss)


def disk_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1e6


def timing(tmp: Path, size: str, bits_list: list[int]) -> None:
    config = SIZES[size]
    src = testing.make_model_folder(tmp / f"random-{size}", config)
    print(f"random llama '{size}': {config['num_hidden_layers']} layers, d_model {config['hidden_size']}, "
          f"d_ffn {config['intermediate_size']}, vocab {config['vocab_size']}; bfloat16, quantized by mlx_lm.convert\n")
    print("| bits, group | step | seconds | peak RSS (MB) | on disk (MB) |")
    print("|---|---|---|---|---|")
    for bits in bits_list:
        folder = mlx_lm_quantize(src, tmp / f"{size}-q{bits}", bits, 64, dtype="bfloat16")
        bundle = tmp / f"{size}-q{bits}-bundle"
        for name, code in STEPS.items():
            s, rss = timed(code.format(folder=str(folder), bundle=str(bundle)))
            size_mb = f"{disk_mb(bundle if 'bundle' in name else folder):.0f}" if "load" in name else ""
            print(f"| {bits}, 64 | {name} | {s:.2f} | {rss:.0f} | {size_mb} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    acc = sub.add_parser("accuracy", help="KL, logit diff and greedy agreement vs mlx-lm's quantized model")
    acc.add_argument("--exact-match", type=int, default=0, metavar="N",
                     help="also the demo model's exact match on N held-out prompts per skill (slow)")
    tim = sub.add_parser("time", help="convert once vs re-quantize at every load; disk sizes")
    tim.add_argument("--size", choices=sorted(SIZES), default="medium")
    tim.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlx-folder-costs-") as tmp:
        if args.what == "accuracy":
            accuracy(Path(tmp), args.exact_match)
        else:
            timing(Path(tmp), args.size, args.bits)


if __name__ == "__main__":
    main()
