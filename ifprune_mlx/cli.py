"""`ifprune`: the command line. Each command is a thin layer over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .console import friendly_errors, load_with_progress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Instruction-following pruning on MLX: select FFN channels per prompt, in place.",
)


@app.command()
@friendly_errors
def info(path: Path = typer.Argument(..., help="A bundle or a plain mlx-lm / Hugging Face model folder.")):
    """Describe a model: architecture, sizes, predictor, default density, weight bytes."""
    engine = load_with_progress(path)
    c = engine.config
    q = c.get("quantization")
    if "ifpruning" in c:
        kind = "ifprune bundle"
    elif q:
        kind = "plain quantized model (down_proj re-quantized by rows at every load; `ifprune convert` does it once)"
    else:
        kind = "plain model (FFN put in row layout at load)"
    rows = [
        ("path", str(path)),
        ("kind", kind),
        ("architecture", c["model_type"]),
        ("layers", engine.n_layers),
        ("d_model", c["hidden_size"]),
        ("FFN channels / layer", engine.d_ffn),
        ("weights", f"{engine.weight_bytes() / 1e6:.1f} MB" + (f" ({q['bits']}-bit, group {q['group_size']})" if q else "")),
        ("selectors", "predictor = trained predictor (default), activations = training-free" if engine.has_predictor
         else "activations (training-free; no trained predictor)"),
        ("default density", f"{engine.default_density:.2f} -> keeps {engine.kept_count()} of {engine.d_ffn} channels"),
        ("chat template", "yes" if getattr(engine.tokenizer, "chat_template", None) else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


@app.command()
@friendly_errors
def generate(
    path: Path = typer.Argument(..., help="A bundle or a plain model folder."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user prompt."),
    density: Optional[float] = typer.Option(None, help="Fraction of FFN channels to keep, in (0, 1]. Default: the bundle's."),
    selector: Optional[str] = typer.Option(None, "--selector", help="Who selects: predictor (the trained one; default where the bundle has one) or activations (training-free: a dense prefill scores the channels, decode runs pruned)."),
    dense: bool = typer.Option(False, "--dense", help="Do not prune: run the full model."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-m", help="Most tokens to generate."),
    temp: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, help="Random seed, for reproducible sampling."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Print selection and speed figures to stderr."),
):
    """Select channels for PROMPT, prune in place and stream the answer."""
    engine = load_with_progress(path)
    engine.get_selector(selector)  # an unknown selector, or "predictor" without one, fails here
    if dense:
        engine.apply(None)
        selector = None
    last = None
    for last in engine.stream_responses(prompt, max_tokens=max_tokens, density=density,
                                        selector=selector, temp=temp, top_p=top_p, seed=seed):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if verbose and last is not None:
        sel = engine.applied
        kept = "dense" if sel is None else f"density {sel.density:.2f}, select {sel.seconds * 1000:.0f} ms ({sel.source})"
        if sel is not None and sel.source == "activations":
            kept += " = the dense prefill that scores the channels"
        typer.echo(
            f"[{kept}, apply {engine.last_apply.swaps} row swaps | prompt {last.prompt_tokens} tok "
            f"{last.prompt_tps:.1f} tok/s | gen {last.generation_tokens} tok {last.generation_tps:.1f} tok/s | "
            f"peak {last.peak_memory:.2f} GB]",
            err=True,
        )


# Commands in their own modules register here.
from converters.cli import convert  # noqa: E402
app.command()(convert)
from .bench import bench  # noqa: E402
app.command()(bench)
from .chat_cli import chat  # noqa: E402

app.command()(chat)
from .serve_cli import serve  # noqa: E402
app.command()(serve)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
