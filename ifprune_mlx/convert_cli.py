"""`ifprune convert SRC OUT`: a PyTorch IFPruning checkpoint, a plain LLM, an mlx-lm folder or a GGUF file to a bundle."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import typer

from converters.artifacts import ADAPTER_FILE, FILES as ARTIFACT_FILES, is_artifacts, read_artifacts
from converters.gguf import is_gguf, open_gguf
from converters.layouts import LAYOUTS, detect
from converters import write

from .bundle import DEFAULT_DENSITY, PAD_MULTIPLE, PLAIN_DEFAULT_DENSITY, refuse_overwrite
from .console import fail, friendly_errors, in_megabytes, progress_bar
from .errors import ConversionError
from .selectors import check_density


@friendly_errors
def convert(
    src: Path = typer.Argument(..., help="The LLM: a Hugging Face folder, an mlx-lm folder (float, or quantized "
                                         "as mlx-community models are: copied as is, down_proj re-quantized "
                                         "once by rows), a GGUF file (llama, qwen2; Q8_0/Q4_0/Q4_1 kept "
                                         "quantized, down_proj as floats), a state-dict file or folder, or a "
                                         "folder with llm/ and predictor/."),
    out: Path = typer.Argument(..., help="The bundle folder to create."),
    predictor: Optional[Path] = typer.Option(None, "--predictor", "-p", help="The sparsity predictor: a folder "
                                             "(config.json, weights, head.safetensors) or a state-dict file; "
                                             "with a GGUF file, a trained artifacts folder (adapter.safetensors, "
                                             "head.safetensors, ifpruning.json): the adapter is merged and the "
                                             "predictor built from the file's first layers."),
    layout: str = typer.Option("auto", help=f"Source layout: {', '.join(LAYOUTS)} (detected by default; "
                               "mlx: an mlx-lm folder)."),
    config: Optional[Path] = typer.Option(None, "--config", help="The LLM's config.json or its folder "
                                          "(required for state dicts)."),
    predictor_config: Optional[Path] = typer.Option(None, "--predictor-config", help="The predictor "
                                                    "backbone's config.json or folder (required for state dicts)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Folder of the LLM's tokenizer files "
                                             "(default: next to its config)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=f"{' | '.join(write.DTYPES)} (default: the source's; "
                                        "a quantized mlx-lm folder keeps its own; a GGUF file: float32, also "
                                        "for the scales of its quantized tensors)."),
    dequantize: bool = typer.Option(False, "--dequantize", help="GGUF file: write every weight as floats "
                                    "instead of keeping Q8_0/Q4_0/Q4_1 quantized."),
    quantize: Optional[int] = typer.Option(None, "--quantize", "-q", help="Quantize the LLM by rows: 4 or 8 bits "
                                           "(not for an already quantized mlx-lm folder)."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size: 32, 64 or 128."),
    density: Optional[float] = typer.Option(None, "--density", help="The bundle's default density "
                                            f"(default: ifpruning.json's, else {DEFAULT_DENSITY} with a predictor, {PLAIN_DEFAULT_DENSITY} without)."),
    pad_multiple: Optional[int] = typer.Option(None, "--pad-multiple", help="Round kept channels up to a "
                                               f"multiple of this (default: ifpruning.json's, else {PAD_MULTIPLE})."),
    verify: bool = typer.Option(False, "--verify", help="Compare with the PyTorch reference on a few prompts "
                                "(needs torch), with mlx-lm's own model for an mlx-lm folder, or with "
                                "transformers' GGUF model for a GGUF file (needs torch; a trained adapter merged into it); the bundle "
                                "is only written if it passes."),
    calibrate_default: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Without --density: measure "
                                           "fidelity vs density once (as `ifprune calibrate`) and store the default "
                                           "density the rule chooses, and the per-layer budgets, in the bundle."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
):
    """Convert a PyTorch IFPruning checkpoint (LLM + sparsity predictor), an mlx-lm folder or a GGUF file (with
    --predictor: plus a trained predictor and adapter, no torch needed) to an MLX bundle."""
    if density is not None:
        check_density(density)
    refuse_overwrite(out, force)
    with ExitStack() as stack:
        gguf = is_gguf(src)
        source = _open_source(stack, src, gguf=gguf, predictor=predictor, layout=layout, config=config,
                              predictor_config=predictor_config, tokenizer=tokenizer, dtype=dtype,
                              dequantize=dequantize, quantize=quantize)
        _convert(source, src, out, gguf=gguf, predictor=predictor, dtype=dtype, quantize=quantize,
                 group_size=group_size, density=density, pad_multiple=pad_multiple, verify=verify, force=force)
    if calibrate_default and density is None:
        from .console import calibrate_with_progress, load_with_progress
        from .calibration_store import save_calibration

        engine = load_with_progress(out)
        result = calibrate_with_progress(engine)
        save_calibration(engine, result)
        typer.echo(f"default density {result.density:.2f} ({result.summary()}); `ifprune calibrate {out}` "
                   "shows the table")


def _open_source(stack: ExitStack, src: Path, *, gguf: bool, predictor, layout, config, predictor_config,
                 tokenizer, dtype, dequantize: bool, quantize):
    """The converter's Source for SRC (a GGUF file, opened in `stack`, or what detect() finds),
    after refusing the options that do not go with it."""
    if gguf:
        given = [flag for flag, value in (("--layout", layout != "auto"),
                                          ("--config", config), ("--predictor-config", predictor_config),
                                          ("--tokenizer", tokenizer)) if value]
        if given:
            raise ConversionError(f"{src} is a GGUF file, which carries its own config and tokenizer; "
                                  f"drop {', '.join(given)}")
        if predictor is not None and not is_artifacts(predictor):
            raise ConversionError(f"--predictor {predictor}: with a GGUF file it names a trained IFPruning "
                                  f"artifacts folder ({', '.join(ARTIFACT_FILES)}, as examples/smollm2/"
                                  "train.py exports), and this is not one")
        return stack.enter_context(open_gguf(src, dtype=dtype, dequantize=dequantize or quantize is not None,
                                             artifacts=predictor))
    if predictor is not None and (Path(predictor) / ADAPTER_FILE).is_file():
        raise ConversionError(f"--predictor {predictor} is a trained artifacts folder (it has an adapter); it is "
                              "assembled with the GGUF file it was trained on: ifprune convert MODEL.gguf OUT "
                              "--predictor ARTIFACTS")
    if dequantize:
        raise ConversionError("--dequantize is for GGUF files; other sources are floats or mlx-lm folders "
                              "(convert the float model for a float bundle)")
    return detect(src, predictor=predictor, layout=layout, config=config,
                  predictor_config=predictor_config, tokenizer=tokenizer)


def _convert(source, src: Path, out: Path, *, gguf: bool, predictor: Path | None, dtype, quantize, group_size,
             density, pad_multiple, verify: bool, force: bool) -> None:
    typer.echo(f"{src}: {source.layout} layout, {source.config['model_type']}, {source.n_layers} layers x "
               f"{source.d_ffn} FFN channels, predictor: "
               f"{source.predictor_config['model_type'] if source.predictor else 'none'}", err=True)
    reports = []

    def check(folder: Path) -> None:
        if gguf:
            from converters.gguf_verify import verify_gguf

            adapter = None if predictor is None else read_artifacts(predictor).adapter
            report = verify_gguf(folder, source, src, density=density, adapter=adapter)
        else:
            from converters.verify import verify as run_verify

            report = run_verify(folder, source, density=density)
        reports.append(report)
        for line in report.lines():
            typer.echo(line, err=True)
        if not report.passed:
            raise ConversionError(f"verification failed: the bundle does not match the reference ({report.reference}) "
                                  "within tolerance; nothing was written")

    try:
        tensors = len(source.llm) + len(source.predictor or {}) + len(source.head or {})
        with progress_bar(f"converting {tensors} tensors (MB)") as update:
            summary = write.convert(source, out, dtype=dtype, bits=quantize, group_size=group_size,
                                   default_density=density, pad_multiple=pad_multiple, force=force,
                                   on_progress=in_megabytes(update),
                                   check=check if verify else None)
    except KeyboardInterrupt:
        fail(f"interrupted: {out} was not written (the partial files were removed)")
    for line in summary.lines():
        typer.echo(line)
