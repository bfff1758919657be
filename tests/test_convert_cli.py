"""`ifprune convert`: bad inputs give one clear error, exit code != 0 and no partial OUT;
--verify; Ctrl-C; peak memory (slow)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import checkpoints as ck  # noqa: E402
from converters.readers import open_checkpoint  # noqa: E402
from ifprune_mlx.cli import app  # noqa: E402
from ifprune_mlx.errors import ConversionError  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def llama():
    return ck.llm("llama")


@pytest.fixture(scope="module")
def pred():
    return ck.predictor()


def convert(*args):
    return runner.invoke(app, ["convert", "--no-calibrate", *map(str, args)])


def assert_fails_cleanly(result, out: Path, message: str):
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder


def test_convert_hf_layout_with_verify(tmp_path, llama, pred):
    src = ck.hf_folder(llama, tmp_path / "ckpt" / "llm")
    ck.predictor_folder(pred, tmp_path / "ckpt" / "predictor")
    result = convert(tmp_path / "ckpt", tmp_path / "out", "--verify")
    assert result.exit_code == 0, result.output
    for expected in ("hf layout, llama, 2 layers x 256 FFN channels", "PASSED", "selections identical on 3/3",
                     f"wrote {tmp_path / 'out'}", "written as float32"):
        assert expected in result.output, result.output
    assert src.exists() and (tmp_path / "out" / "predictor" / "head.safetensors").is_file()
    info = runner.invoke(app, ["info", str(tmp_path / "out")])
    assert "trained predictor" in info.output


def test_convert_public_layout_quantized(tmp_path, llama, pred):
    paths = ck.public_checkpoint(llama, pred, tmp_path, "bin")
    result = convert(paths["src"], tmp_path / "out", "--config", paths["config"], "--predictor-config",
                     paths["predictor_config"], "--quantize", "8", "--group-size", "32", "--verify")
    assert result.exit_code == 0, result.output
    assert "public layout" in result.output and "8-bit rows (group 32)" in result.output and "PASSED" in result.output


def test_missing_shard(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm", "safetensors", shards=3)
    (src / "model-00002-of-00003.safetensors").unlink()
    assert_fails_cleanly(convert(src, tmp_path / "out"), tmp_path / "out",
                         "shard model-00002-of-00003.safetensors listed in model.safetensors.index.json is missing")


@pytest.mark.parametrize("fmt,message", [("safetensors", "truncated"), ("bin", "truncated or corrupt")])
def test_truncated_file(tmp_path, llama, fmt, message):
    src = ck.hf_folder(llama, tmp_path / "llm", fmt)
    path = next(p for p in src.iterdir() if p.suffix in (".safetensors", ".bin"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_fails_cleanly(convert(src, tmp_path / "out"), tmp_path / "out", message)


def test_wrong_shapes(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm")
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = 32
    (src / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(convert(src, tmp_path / "out"), tmp_path / "out", "the config implies")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp") / f"ifprune-pickle-ran-{os.getpid()}"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_is_not_plain_weights_is_refused_unexecuted(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm", "bin")
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Payload()}, f)
    assert_fails_cleanly(convert(src, tmp_path / "out"), tmp_path / "out", "not plain weights")
    assert not MARKER.exists()
    # a zip-format torch.save of a non-tensor object is refused the same way
    torch.save({"weights": _Payload.__new__(_Payload)}, src / "pytorch_model.bin")
    assert_fails_cleanly(convert(src, tmp_path / "out"), tmp_path / "out", "not plain weights")


def test_a_state_dict_of_other_things_is_refused(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm", "bin")
    torch.save({"epoch": 3, "lr": 0.1}, src / "pytorch_model.bin")
    assert_fails_cleanly(convert(src, tmp_path / "out"), tmp_path / "out", "not a state dict")


def test_unknown_model_type(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(convert(src, tmp_path / "out"), tmp_path / "out",
                         "model_type 'gpt2' is not supported; supported: llama, mistral, phi3, qwen2, qwen3")


def test_existing_out_needs_force(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = convert(src, out)
    assert result.exit_code != 0 and "already exists; pass --force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = convert(src, out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_state_dict_without_config(tmp_path, llama, pred):
    paths = ck.public_checkpoint(llama, pred, tmp_path)
    assert_fails_cleanly(convert(paths["src"], tmp_path / "out"), tmp_path / "out", "pass --config")


def test_bad_options(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm")
    for args, message in [(["--quantize", "3"], "only 4- and 8-bit"), (["--dtype", "float64"], "float64"),
                          (["--density", "1.5"], "density must be in (0, 1]"),
                          (["--layout", "public"], "does not match the checkpoint")]:
        assert_fails_cleanly(convert(src, tmp_path / "out", *args), tmp_path / "out", message)


def test_safetensors_need_no_torch_and_bin_says_how_to_get_it(tmp_path, llama, monkeypatch):
    st = ck.hf_folder(llama, tmp_path / "st")
    bin_ = ck.hf_folder(llama, tmp_path / "bin", "bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    assert len(open_checkpoint(st)) == 21
    with pytest.raises(ConversionError, match=r"pip install 'ifprune-mlx\[torch\]'"):
        open_checkpoint(bin_)


def test_ctrl_c_leaves_no_out(tmp_path, llama):
    """SIGINT to a running `ifprune convert` (slowed down per tensor): exit != 0, nothing left."""
    src = ck.hf_folder(llama, tmp_path / "llm")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import signal, time, converters.write as w
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
        real = w.write_safetensors
        def slow(path, jobs, on_job=None):
            def tick(job):
                time.sleep(0.2)
                if on_job: on_job(job)
            real(path, jobs, tick)
        w.write_safetensors = slow
        from ifprune_mlx.cli import app
        app(["convert", {str(src)!r}, {str(out)!r}])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]:
        assert time.time() < deadline and proc.poll() is None, "the conversion never started"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, output
    assert proc.returncode == 1 and "interrupted" in output and "was not written" in output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- peak memory ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_peak_rss_stays_under_twice_the_model(tmp_path, fmt):
    """Convert a ~250 MB float32 llama in a child process and read its peak RSS."""
    src = tmp_path / "big"
    build = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        import checkpoints as ck
        m = ck.llm("llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                   num_attention_heads=16, num_key_value_heads=4, vocab_size=16000)
        ck.save_weights(m.state_dict(), {str(src)!r}, {fmt!r})
        m.config.to_json_file({str(src / "config.json")!r})
        ck.testing.make_tokenizer({str(src)!r}, 320)
    """)
    subprocess.run([sys.executable, "-c", build], check=True, cwd=Path(__file__).parent.parent)
    size = sum(p.stat().st_size for p in src.iterdir() if p.suffix in (".safetensors", ".bin"))
    def peak(*args):
        measure = textwrap.dedent(f"""
            import resource, subprocess, sys
            r = subprocess.run([sys.executable, "-m", "ifprune_mlx.cli", *{[str(a) for a in args]!r}],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        """)
        out = subprocess.run([sys.executable, "-c", measure], check=True, capture_output=True, text=True,
                             cwd=Path(__file__).parent.parent).stdout.split()
        return int(out[0]), int(out[1])

    code, rss = peak("convert", src, tmp_path / "out")
    _, baseline = peak("convert", "--help")  # the CLI's imports (mlx, mlx-lm, transformers)
    print(f"{fmt}: model {size / 1e6:.0f} MB, peak RSS {rss / 1e6:.0f} MB, of which {baseline / 1e6:.0f} MB "
          "is the CLI's imports")
    assert code == 0
    assert rss < 2 * size


def test_the_demo_trainers_checkpoint_converts_and_verifies(tmp_path):
    """examples/train_tiny writes the hf layout (llm/ + predictor/): a few tiny steps, then convert."""
    from examples.train_tiny.train import Config, train

    tiny = dict(d_model=32, n_layers=2, n_heads=2, d_ffn=96, d_pred=16, pred_layers=1, pred_heads=2,
                pred_ffn=32, vocab_size=300, steps1=2, steps2=2, batch1=4, batch2=4, chunk=8, n_chunks=3,
                warmup=1, eval_every=0)
    train(Config(**tiny), tmp_path / "checkpoint", log=lambda *a: None)
    result = convert(tmp_path / "checkpoint", tmp_path / "bundle", "--verify")
    assert result.exit_code == 0, result.output
    assert "hf layout" in result.output and "PASSED" in result.output
