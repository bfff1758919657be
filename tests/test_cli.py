"""`ifprune info` and `ifprune generate`: output, and one red line for user mistakes."""

import pytest
from typer.testing import CliRunner

from ifprune_mlx.cli import app

runner = CliRunner()


def test_info_describes_a_bundle(bundle_dir):
    result = runner.invoke(app, ["info", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    for expected in ("ifprune bundle", "llama", "FFN channels / layer  256", "predictor = trained predictor (default)",
                     "keeps 96 of 256 channels", "chat template         yes"):
        assert expected in result.output


def test_info_on_a_plain_model(plain_dir):
    result = runner.invoke(app, ["info", str(plain_dir)])
    assert result.exit_code == 0
    assert "plain model" in result.output and "training-free" in result.output


def test_generate_streams_and_reports(bundle_dir):
    result = runner.invoke(app, ["generate", str(bundle_dir), "-p", "Sort these numbers", "-m", "6", "--density", "0.5"])
    assert result.exit_code == 0, result.output
    assert "density 0.50" in result.output and "row swaps" in result.output


def test_generate_dense(bundle_dir):
    result = runner.invoke(app, ["generate", str(bundle_dir), "-p", "hi", "-m", "3", "--dense"])
    assert result.exit_code == 0 and "[dense" in result.output


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
    """`ifprune` re-runs itself with OpenBLAS preloaded on Linux when it is installed."""
    import os
    import shutil
    import subprocess
    import sys

    from ifprune_mlx.blas import openblas_path

    script = shutil.which("ifprune", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the ifprune entry point is not installed in this environment")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IFPRUNE_BLAS")}
    out = subprocess.run([script, "info", str(bundle_dir)], capture_output=True, text=True, env=env,
                         timeout=120).stdout
    line = next(l for l in out.splitlines() if l.startswith("BLAS"))
    if sys.platform == "linux":
        assert ("OpenBLAS" in line) == (openblas_path() is not None), line
