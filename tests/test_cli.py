"""`ifprune info` and `ifprune generate`: output, and one red line for user mistakes."""

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
