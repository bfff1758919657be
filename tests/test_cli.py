"""`ifprune info` and `ifprune generate`: output, and one red line for user mistakes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ifprune_mlx as ifp
from ifprune_mlx.cli import app

ROOT = Path(__file__).parents[1]

runner = CliRunner()


def test_info_describes_a_bundle(bundle_dir):
    result = runner.invoke(app, ["info", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    for expected in ("ifprune bundle", "llama", "FFN channels / layer  256", "predictor = trained predictor (default)",
                     "keeps 96 of 256 channels", "chat template         yes"):
        assert expected in result.output


def _rows(output: str) -> dict[str, str]:
    """`ifprune info`'s table as {key: value} (keys and values are separated by 2+ spaces)."""
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in output.splitlines() if "  " in line)


def test_info_on_a_plain_model(plain_dir):
    result = runner.invoke(app, ["info", str(plain_dir)])
    assert result.exit_code == 0, result.output
    engine = ifp.load(plain_dir)
    rows = _rows(result.stdout)
    assert rows["path"] == str(plain_dir) and rows["kind"] == "plain model (FFN put in row layout at load)"
    assert rows["predictor"] == "none"
    assert rows["selectors"] == "activations (training-free; no trained predictor)"
    assert rows["default density"] == (f"0.50 -> keeps {engine.kept_count(0.5)} of {engine.d_ffn} channels "
                                       "(not calibrated: `ifprune calibrate MODEL` measures which density to trust)")
    assert rows["FFN channels / layer"] == str(engine.d_ffn) and rows["layers"] == str(engine.n_layers)


def test_prefill_is_shown_and_set_by_the_commands(bundle_dir):
    """`info` says what the predictor's prompt is prefilled with; `generate --prefill dense`
    answers as the Python API does with that setting, and says so; a bad value is one line."""
    rows = _rows(runner.invoke(app, ["info", str(bundle_dir)]).stdout)
    assert rows["prefill"].startswith("pruned: the predictor's prompt runs on the kept channels")
    result = runner.invoke(app, ["generate", str(bundle_dir), "-p", "Sort these numbers", "-m", "6",
                                 "--density", "0.5", "--prefill", "dense"])
    assert result.exit_code == 0, result.output
    engine = ifp.load(bundle_dir)
    engine.prefill = "dense"
    assert result.stdout == engine.generate("Sort these numbers", max_tokens=6, density=0.5) + "\n"
    assert "prompt prefilled dense" in result.stderr
    for command in (["generate", str(bundle_dir), "-p", "x"], ["chat", str(bundle_dir)]):
        bad = runner.invoke(app, [*command, "--prefill", "full"])
        assert bad.exit_code == 1 and "--prefill takes pruned or dense, got 'full'" in bad.output


def test_generate_streams_what_the_python_api_generates_and_reports_it(bundle_dir):
    prompt = "Sort these numbers"
    result = runner.invoke(app, ["generate", str(bundle_dir), "-p", prompt, "-m", "6", "--density", "0.5"])
    assert result.exit_code == 0, result.output
    engine = ifp.load(bundle_dir)  # as fresh as the command's: the same rows move
    *_, last = engine.stream_responses(prompt, max_tokens=6, density=0.5)
    assert result.stdout == engine.generate(prompt, max_tokens=6, density=0.5) + "\n"
    report = result.stderr.strip().splitlines()[-1]  # after the stage lines (not a terminal: "loading ...")
    assert re.fullmatch(r"\[density 0\.50, select \d+ ms \(predictor\), apply (\d+) row swaps \| prompt "
                        rf"{last.prompt_tokens} tok [\d.]+ tok/s \| gen {last.generation_tokens} tok [\d.]+ tok/s "
                        r"\| peak [\d.]+ GB\]", report), report
    swaps = int(re.search(r"apply (\d+) row swaps", report).group(1))
    fresh = ifp.load(bundle_dir)
    assert swaps == fresh.apply(fresh.select(prompt, 0.5)).swaps > 0


def test_generate_dense(bundle_dir):
    result = runner.invoke(app, ["generate", str(bundle_dir), "-p", "hi", "-m", "3", "--dense"])
    assert result.exit_code == 0, result.output
    engine = ifp.load(bundle_dir)
    engine.apply(None)
    assert result.stdout == engine.generate("hi", max_tokens=3) + "\n"
    assert result.stderr.splitlines()[-1].startswith("[dense, apply 0 row swaps | prompt ")


def test_user_mistakes_are_one_line_without_traceback(tmp_path, bundle_dir):
    cases = [
        (["info", str(tmp_path / "missing")], "no such model folder"),
        (["generate", str(bundle_dir), "-p", "x", "--density", "2"], "density must be in (0, 1]"),
        (["generate", str(tmp_path), "-p", "x"], "config.json: missing"),
        (["generate", str(bundle_dir), "-p", "x", "--dense", "--density", "0.5"], "cannot be combined with --density"),
        (["generate", str(bundle_dir), "-p", "x", "--dense", "--selector", "activations"], "cannot be combined with --selector"),
        (["info", str(bundle_dir / "config.json")], "is a file, not a model folder"),
        (["generate", str(bundle_dir), "-p", "word " * 2100], "this model's context is 2048; shorten it"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert message in result.output
        assert "Traceback" not in result.output


def test_generate_with_the_training_free_selector(bundle_dir, plain_dir):
    for folder in (bundle_dir, plain_dir):
        result = runner.invoke(app, ["generate", str(folder), "-p", "Sort these numbers", "-m", "4",
                                     "--selector", "activations"])
        assert result.exit_code == 0, result.output
        assert "(activations) = the dense prefill" in result.output


def test_selector_mistakes(plain_dir):
    for args, message in ((["--selector", "predictor"], "no trained predictor"),
                          (["--selector", "nope"], "unknown selector 'nope'")):
        result = runner.invoke(app, ["generate", str(plain_dir), "-p", "x", *args])
        assert result.exit_code == 1 and message in result.output
        assert "Traceback" not in result.output


def test_version():
    import ifprune_mlx

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ifprune-mlx {ifprune_mlx.__version__}"


def test_generation_stops_at_the_end_of_the_context(bundle_dir):
    import ifprune_mlx as ifp

    engine = ifp.load(bundle_dir)
    ids = engine.prompt_tokens("hello")
    engine.config["max_position_embeddings"] = len(ids) + 3
    responses = list(engine.stream_responses("hello", max_tokens=50, density=0.5))
    assert responses[-1].generation_tokens <= 3


def test_info_names_the_blas_in_use(bundle_dir):
    """The command re-runs itself with OpenBLAS preloaded on Linux when it is installed, and
    `ifprune info` names the BLAS of the process that answers."""
    from ifprune_mlx.blas import INSTALL_HINT, openblas_path

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IFPRUNE_BLAS")}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-m", "ifprune_mlx.cli", "info", str(bundle_dir)], capture_output=True,
                         text=True, env=env, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    blas = _rows(run.stdout)["BLAS (CPU)"]
    if sys.platform != "linux":
        assert blas == "the platform's (Accelerate / Metal)"
    elif openblas_path() is not None:
        assert blas == f"OpenBLAS ({openblas_path()})"
    else:
        assert blas == f"the mlx[cpu] wheel's reference BLAS (slow prefill; {INSTALL_HINT})"


def test_blas_threads_are_set_where_openblas_runs():
    """set_threads changes OpenBLAS's thread count in this process (returning the old one) when
    OpenBLAS is preloaded, and changes nothing (None) without it; a count below 1 is refused."""
    from ifprune_mlx.blas import openblas_path, serving_threads, set_threads

    assert serving_threads() == max(1, (os.cpu_count() or 1) - 1) and serving_threads(3) == 3
    with pytest.raises(ValueError):
        set_threads(0)
    code = ("import mlx.core as mx; from ifprune_mlx.blas import set_threads; a = mx.ones((64, 64)); "
            "mx.eval(a @ a); print(set_threads(1), set_threads(3), set_threads(1))")
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IFPRUNE_BLAS", "OPENBLAS_NUM_THREADS")}
    base["PYTHONPATH"] = str(ROOT)
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split() == ["None"] * 3
    if sys.platform == "linux" and openblas_path():
        env = dict(base, LD_PRELOAD=openblas_path(), OPENBLAS_NUM_THREADS="2")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["2", "1", "3"]
