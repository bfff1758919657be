"""`ifprune`: the command line. Each command is a thin layer over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .console import (DENSITY_OPTION, MAX_DENSITY_OPTION, MODEL_ARGUMENT, PREFILL_OPTION, RESIDENT_OPTION,
                      SEED_OPTION, TEMP_OPTION, TOP_P_OPTION, calibrate_with_progress, checked_prefill, density_origin,
                      fail, friendly_errors, open_model, quiet_rank, resident_options)
from .distributed import DEFAULT_SPLIT, SPLITS, world
from .selectors import check_sampling
from .blas import active_blas

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Instruction-following pruning on MLX: select FFN channels per prompt, in place.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ifprune-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Instruction-following pruning on MLX: select FFN channels per prompt, in place."""


@app.command()
@friendly_errors
def info(model: Optional[str] = MODEL_ARGUMENT, resident: Optional[str] = RESIDENT_OPTION,
         max_density: Optional[float] = MAX_DENSITY_OPTION):
    """Describe a model: where it is, architecture, sizes, predictor, default density, weight bytes."""
    from .resident import describe

    engine, found = open_model(model, **resident_options(resident, max_density))
    c = engine.config
    q = c.get("quantization")
    if "ifpruning" in c:
        kind = "ifprune bundle"
    elif q:
        kind = "plain quantized model (down_proj re-quantized by rows at every load; `ifprune convert` does it once)"
    else:
        kind = "plain model (FFN put in row layout at load)"
    rows = [
        ("path", str(found.path)),
        ("kind", kind),
        ("architecture", c["model_type"]),
        ("layers", engine.n_layers),
        ("d_model", c["hidden_size"]),
        ("FFN channels / layer", engine.d_ffn),
        ("weights", f"{engine.weight_bytes() / 1e6:.1f} MB" + (f" ({q['bits']}-bit, group {q['group_size']})" if q else "")
         + (" in memory" if engine.residency else "")),
        ("resident", describe(engine)),
        ("predictor", _predictor_summary(engine)),
        ("selectors", "predictor = trained predictor (default), activations = training-free" if engine.has_predictor
         else "activations (training-free; no trained predictor)"),
        ("prefill", (f"{engine.prefill}: " + {"pruned": "the predictor's prompt runs on the kept channels",
                                              "dense": "the predictor's prompt runs on every channel, the answer pruned"}
                     [engine.prefill] + "; the training-free selector's always dense")
         if engine.has_predictor else "dense (the training-free selector's pass scores the channels)"),
        ("default density", f"{engine.default_density:.2f} -> keeps {_kept(engine)} of {engine.d_ffn} channels "
                            f"({density_origin(engine)})"),
        ("context", f"{engine.context_length} tokens" if engine.context_length else "not stated"),
        ("chat template", "yes" if getattr(engine.tokenizer, "chat_template", None) else "no"),
        ("BLAS (CPU)", active_blas()),
    ]
    if found.origin == "default":
        from .resolve import PRETRAINED, default_gguf

        rows.insert(1, ("made from", f"{default_gguf()} (the plain model: name this file) + the IFPruning "
                                     f"artifacts trained for it in {PRETRAINED}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def _kept(engine) -> str:
    counts = engine.kept_counts()
    if len(set(counts)) == 1:
        return str(counts[0])
    return f"{min(counts)}-{max(counts)} (per-layer budgets, mean {sum(counts) / len(counts):.0f})"


def _predictor_summary(engine) -> str:
    if not engine.has_predictor:
        return "none"
    predictor = engine.get_selector("predictor").predictor
    return (f"trained: {len(predictor.backbone.model.layers)}-layer backbone + head, "
            f"{predictor.n_layers} x {predictor.d_ffn} channel scores per prompt")


@app.command()
@friendly_errors
def generate(
    model: Optional[str] = MODEL_ARGUMENT,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user prompt."),
    density: Optional[float] = DENSITY_OPTION,
    selector: Optional[str] = typer.Option(None, "--selector", help="Who selects: predictor (the trained one; default where the bundle has one) or activations (training-free: a dense prefill scores the channels, decode runs pruned)."),
    prefill: Optional[str] = PREFILL_OPTION,
    dense: bool = typer.Option(False, "--dense", help="Do not prune: run the full model."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-m", help="Most tokens to generate."),
    temp: float = TEMP_OPTION,
    top_p: float = TOP_P_OPTION,
    seed: Optional[int] = SEED_OPTION,
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Print selection and speed figures to stderr."),
    split: str = typer.Option(DEFAULT_SPLIT, "--split", help="Under mlx.launch (the FFN sharded over the ranks): "
                              "global (the single-process top-k) or balanced (top-k/N within each rank's channels)."),
    resident: Optional[str] = RESIDENT_OPTION,
    max_density: Optional[float] = MAX_DENSITY_OPTION,
):
    """Select channels for PROMPT, prune in place and stream the answer.

    Under `mlx.launch -n N` each rank holds 1/N of every layer's FFN; rank 0 prints
    (docs/DISTRIBUTED.md).
    """
    if dense and density is not None:
        fail("--dense runs the full model; it cannot be combined with --density")
    if dense and selector is not None:
        fail("--dense runs the full model; it cannot be combined with --selector")
    if split not in SPLITS:
        fail(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    check_sampling(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)  # the engine's check, before loading
    checked_prefill(prefill)
    group = world()
    if group is not None and group.rank() != 0:
        quiet_rank()
        verbose = False
    engine, _ = open_model(model, group, **({"split": split} if group else {}), **resident_options(resident, max_density))
    engine.get_selector(selector)  # an unknown selector, or "predictor" without one, fails here
    engine.set_prefill(prefill)
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
        elif sel is not None and engine.prefills_dense(selector):
            kept += ", prompt prefilled dense"
        if engine.residency is not None:
            from .resident import read_cost

            kept += f", {read_cost(engine.last_apply)}"
        typer.echo(
            f"[{kept}, apply {engine.last_apply.swaps} row swaps | prompt {last.prompt_tokens} tok "
            f"{last.prompt_tps:.1f} tok/s | gen {last.generation_tokens} tok {last.generation_tps:.1f} tok/s | "
            f"peak {last.peak_memory:.2f} GB]",
            err=True,
        )


@app.command("calibrate")
@friendly_errors
def calibrate_command(
    model: Optional[str] = MODEL_ARGUMENT,
    densities: str = typer.Option("0.3,0.4,0.5,0.6,0.7,0.8,0.9", "--densities",
                                  help="The ladder of densities to measure, comma-separated."),
    kl_budget: Optional[float] = typer.Option(None, "--kl-budget", help="The fidelity budget: mean next-token "
                                              "KL to the dense model, in nats, that the default may cost "
                                              "[default: 0.25]."),
    selector: Optional[str] = typer.Option(None, "--selector", help="predictor or activations (default: the model's)."),
    answer_tokens: Optional[int] = typer.Option(None, "--answer-tokens", help="Most tokens of each reference answer (cut after its end token) [default: 16]."),
    layer_budgets: bool = typer.Option(True, "--layer-budgets/--no-layer-budgets", help="Also set per-layer budgets "
                                       "from separate prompts and measure them against uniform (used only if they "
                                       "lower the KL)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the report as Markdown to this file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw KL and agreement vs density to this PNG."),
    save: bool = typer.Option(True, "--save/--no-save", help="Store the chosen density as the model's default "
                              "(bundles: in config.json; plain folders: in the cache)."),
):
    """Measure fidelity to the dense model at a ladder of densities and choose the default density.

    For built-in varied instructions, the dense model's own answer is scored with each
    density's pruned model (KL and top-1 agreement); the default is the lowest density at which
    (and above which) the upper end of the mean KL's 95% interval stays within the KL budget.
    Per-layer budgets are set from other prompts and kept only if they lower the KL.
    """
    from . import calibrate
    from .calibration_store import save_calibration
    from .resolve import DEFAULT_NAME
    from .selectors import check_density

    try:
        ladder = sorted({check_density(float(d)) for d in densities.split(",") if d.strip()})
    except ValueError:
        fail(f"--densities takes numbers in (0, 1] separated by commas, got {densities!r}")
    if not ladder:
        fail("--densities is empty")
    if kl_budget is not None and not kl_budget > 0:
        fail(f"--kl-budget must be > 0 nats, got {kl_budget}")
    if answer_tokens is not None and answer_tokens < 1:
        fail(f"--answer-tokens must be at least 1, got {answer_tokens}")
    engine, found = open_model(model)
    engine.get_selector(selector)
    options = {"densities": ladder, "selector": selector}
    if not layer_budgets:
        options["budget_prompts"] = ()
    if kl_budget is not None:
        options["kl_budget"] = kl_budget
    if answer_tokens is not None:
        options["answer_tokens"] = answer_tokens
    result = calibrate_with_progress(engine, **options)
    name = {"default": f"{DEFAULT_NAME} with its trained predictor (the default model)",
            "gguf": f"{Path(str(model)).name} (converted GGUF file)"}.get(found.origin, found.path.name)
    for line in result.table() + [""] + result.comparison_table():
        typer.echo(line)
    if result.comparison:
        typer.echo(f"per-layer budgets: {'on' if result.layer_budgets_on else 'off'} (per-layer - uniform KL, paired)")
    typer.echo(f"default density {result.density:.2f}: {result.summary()}")
    if plot is not None:
        if calibrate.plot(result, plot, f"{name}: fidelity vs density ({result.selector})"):
            typer.echo(f"plot: {plot}", err=True)
        else:
            typer.echo("plot skipped: matplotlib is not installed (pip install matplotlib)", err=True)
    if out is not None:
        command = "ifprune calibrate" + (f" {model}" if model else "") + (f" --plot {plot}" if plot else "") + f" --out {out}"
        plot_name = None if plot is None else plot.name if plot.parent == out.parent else str(plot)
        out.write_text(f"# Calibration\n\n{calibrate.report(result, name, command, plot_name)}")
        typer.echo(f"report: {out}", err=True)
    if save:
        typer.echo(f"stored as the default: {save_calibration(engine, result)}", err=True)


# Commands in their own modules register here.
from .convert_cli import convert  # noqa: E402
app.command()(convert)
from .bench.cli import bench  # noqa: E402
app.command()(bench)
from .chat_cli import chat  # noqa: E402

app.command()(chat)
from .serve_cli import serve  # noqa: E402
app.command()(serve)
from .eval_cli import eval_command  # noqa: E402
app.command(name="eval")(eval_command)


def main() -> None:
    """The `ifprune` entry point: on Linux, re-run with OpenBLAS if it is installed (see blas.py)."""
    from .blas import use_openblas

    use_openblas()
    app()


if __name__ == "__main__":
    main()
