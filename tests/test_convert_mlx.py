"""`ifprune convert` from an mlx-lm folder (float, or quantized by mlx_lm.convert): the bundle
computes what ifprune_mlx.load computes from the folder, close to mlx-lm's own model; bad
inputs give one red line and no OUT."""

import contextlib
import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import convert as mlx_lm_convert
from mlx_lm import load as mlx_lm_load
from typer.testing import CliRunner

import ifprune_mlx as ifp
from converters.layouts import detect
from converters.verify import requantization_tolerance
from ifprune_mlx import testing
from ifprune_mlx.bundle import save_safetensors
from ifprune_mlx.cli import app

runner = CliRunner()
TOKENS = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    """A random float32 llama as mlx-lm folders hold it (groups of 64 divide d_model and d_ffn)."""
    config = testing.model_config(hidden_size=128, intermediate_size=256)
    return testing.make_model_folder(tmp_path_factory.mktemp("mlx") / "float", config)


def mlx_lm_folder(src: Path, out: Path, bits: int | None = None, group_size: int | None = None,
                  mode: str = "affine", predicate=None) -> Path:
    """What mlx_lm.convert writes (an mlx-community folder): quantized if bits (or mode) given."""
    quantize = bits is not None or mode != "affine"
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_lm_convert(str(src), str(out), quantize=quantize, q_bits=bits, q_group_size=group_size, q_mode=mode,
                       quant_predicate=predicate)
    return out


def down_8_bit_in_layer_1(path: str, module) -> dict:
    """A per-module override, as mlx-lm's mixed recipes write them in config.json."""
    bits = 8 if path == "model.layers.1.mlp.down_proj" else 4
    return {"group_size": 64, "bits": bits, "mode": "affine"}


def convert(*args):
    return runner.invoke(app, ["convert", "--no-calibrate", *map(str, args)])


def assert_fails_cleanly(result, out: Path, message: str):
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def mixed_3_6(path, module):
    """mlx-lm's mixed_3_6 recipe in miniature: 3-bit gate/up, 6-bit down_proj, 4-bit elsewhere."""
    bits = 3 if "gate_proj" in path or "up_proj" in path else 6 if "down_proj" in path else 4
    return {"group_size": 64, "bits": bits, "mode": "affine"}


@pytest.mark.parametrize("kind", ["float32", "4-bit g64", "8-bit g32", "override", "mixed_3_6"])
def test_mlx_lm_folder_converts_to_what_load_computes(tmp_path, float_folder, kind):
    bits, group, predicate = {"float32": (None, None, None), "4-bit g64": (4, 64, None),
                              "8-bit g32": (8, 32, None), "override": (4, 64, down_8_bit_in_layer_1),
                              "mixed_3_6": (4, 64, mixed_3_6)}[kind]
    src = mlx_lm_folder(float_folder, tmp_path / "src", bits, group, predicate=predicate)
    out = tmp_path / "out"
    result = convert(src, out, "--verify")
    assert result.exit_code == 0, result.output
    assert "mlx layout, llama" in result.output and "PASSED" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["ifpruning"]["ffn_layout"] == "rows"
    if bits:
        assert f"{bits}-bit rows (group {group})" in result.output
        assert "down_proj re-quantized along d_model in 2 layers" in result.output
        assert config["quantization"] == json.loads((src / "config.json").read_text())["quantization"]

    bundle, folder = ifp.load(out), ifp.load(src)  # the folder: re-quantized at load, the same way
    assert max_diff(bundle.model(TOKENS), folder.model(TOKENS)) <= 1e-5
    keep = [np.sort(np.random.default_rng(i).choice(256, 96, replace=False)) for i in range(2)]
    bundle.apply(keep)
    folder.apply(keep)
    assert max_diff(bundle.model(TOKENS), folder.model(TOKENS)) <= 1e-5
    if predicate:  # mlx-lm's overrides are honoured: each down_proj keeps its bits
        assert [mlp.down_proj.bits for mlp in bundle.mlps] == ([6, 6] if kind == "mixed_3_6" else [4, 8])
        assert kind != "mixed_3_6" or [mlp.gate_proj.bits for mlp in bundle.mlps] == [3, 3]

    bundle.apply(None)
    reference, _ = mlx_lm_load(str(src))
    expected = reference(TOKENS)
    bound = 1e-4 if bits is None else requantization_tolerance(bits) * max(1.0, mx.abs(expected).max().item())
    assert max_diff(bundle.model(TOKENS), expected) <= bound


def test_a_quantized_phi3_folder_has_its_fused_ffn_split(tmp_path):
    """phi3's gate_up_proj becomes gate and up rows (models.split_gate_up); verify fuses them back."""
    config = testing.model_config("phi3", hidden_size=128, intermediate_size=256)
    src = mlx_lm_folder(testing.make_model_folder(tmp_path / "float", config), tmp_path / "src", 4, 64)
    result = convert(src, tmp_path / "out", "--verify")
    assert result.exit_code == 0, result.output
    assert "mlx layout, phi3" in result.output and "PASSED" in result.output
    assert max_diff(ifp.load(tmp_path / "out").model(TOKENS), ifp.load(src).model(TOKENS)) <= 1e-5


def test_copied_tensors_are_bytes_equal_and_down_proj_in_rows(tmp_path, float_folder):
    src = mlx_lm_folder(float_folder, tmp_path / "src", 4, 64)
    assert convert(src, tmp_path / "out").exit_code == 0
    before, after = mx.load(str(src / "model.safetensors")), mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    rows = {"weight": (256, 128 * 4 // 32), "scales": (256, 128 // 64), "biases": (256, 128 // 64)}
    for name in before:
        if ".mlp.down_proj." in name:  # [d_ffn, d_model] in groups of 64 along d_model
            assert after[name].shape == rows[name.rsplit(".", 1)[1]], name
        else:
            assert after[name].dtype == before[name].dtype and mx.array_equal(after[name], before[name]).item(), name


def test_layout_is_detected_and_can_be_forced(tmp_path, float_folder):
    q = mlx_lm_folder(float_folder, tmp_path / "q", 8, 64)
    source = detect(q)
    assert source.layout == "mlx" and source.quantization["bits"] == 8 and source.folder == q
    assert detect(float_folder).layout == "mlx"  # float, tagged {"format": "mlx"} by mx.save_safetensors
    assert convert(q, tmp_path / "out", "--layout", "mlx").exit_code == 0
    assert_fails_cleanly(convert(q, tmp_path / "hf", "--layout", "hf"), tmp_path / "hf",
                         "does not match the checkpoint")
    # the same weights tagged as PyTorch writes them are a Hugging Face folder
    hf = tmp_path / "hf-folder"
    testing.make_tokenizer(hf)
    (hf / "config.json").write_text((float_folder / "config.json").read_text())
    mx.save_safetensors(str(hf / "model.safetensors"), mx.load(str(float_folder / "model.safetensors")),
                        metadata={"format": "pt"})
    assert detect(hf).layout == "plain"


def test_force_and_a_failed_verify_keep_the_previous_out(tmp_path, float_folder, monkeypatch):
    src = mlx_lm_folder(float_folder, tmp_path / "src", 4, 64)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = convert(src, out)
    assert result.exit_code == 1 and "already exists; pass --force" in result.output
    monkeypatch.setattr("converters.verify.requantization_tolerance", lambda bits: 0.0)
    result = convert(src, out, "--force", "--verify")
    assert result.exit_code == 1 and "FAILED" in result.output and "nothing was written" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    monkeypatch.undo()
    result = convert(src, out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def _missing_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weights = mx.load(str(folder / "model.safetensors"))
    names = sorted(weights)
    save_safetensors(folder / "model-00001-of-00002.safetensors", {k: weights[k] for k in names[:10]})
    (folder / "model.safetensors").unlink()
    index["weight_map"] = {k: f"model-0000{1 + (i >= 10)}-of-00002.safetensors" for i, k in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        if "quantization_config" in changes:
            config.pop("quantization", None)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _bundle(folder: Path) -> None:
    _config(ifpruning={"format_version": 1, "ffn_layout": "rows"})(folder)


@pytest.mark.parametrize("make,args,message", [
    (dict(bits=4, group_size=64), _missing_shard,
     "shard model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing"),
    (dict(), _config(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128}),
     "this is a gptq checkpoint; convert the float"),
    (dict(mode="mxfp4"), None, "mxfp4 quantization cannot be converted"),
    (dict(bits=4, group_size=64), _config(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(bits=4, group_size=64), ["--quantize", "8"], "is already quantized"),
    (dict(bits=4, group_size=64), _bundle, "is already an ifprune bundle"),
], ids=["missing-shard", "gptq", "mxfp4", "unknown-model-type", "requantize", "a-bundle"])
def test_bad_inputs_fail_in_one_line_and_leave_no_out(tmp_path, float_folder, make, args, message):
    src = mlx_lm_folder(float_folder, tmp_path / "src", **make)
    options = args if isinstance(args, list) else []
    if callable(args):
        args(src)
    assert_fails_cleanly(convert(src, tmp_path / "out", *options), tmp_path / "out", message)


def test_a_quantized_mlx_lm_llm_takes_a_pytorch_predictor(tmp_path, float_folder):
    """The IFPruning predictor (trained on the float LLM) with an mlx-community quantized LLM."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import checkpoints as ck

    src = mlx_lm_folder(float_folder, tmp_path / "src", 4, 64)
    predictor = ck.predictor_folder(ck.predictor(d_ffn=256), tmp_path / "predictor")
    result = convert(src, tmp_path / "out", "--predictor", predictor, "--verify")
    assert result.exit_code == 0, result.output
    assert "predictor: qwen2" in result.output and "selections identical on 3/3" in result.output
    assert ifp.load(tmp_path / "out").has_predictor


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_conversion_holds_no_second_copy_of_the_model(tmp_path, dtype):
    """The converter streams tensor by tensor: converting a ~76 MB model grows the resident
    memory of a fresh process by a few tensors (9-13 MB measured), never by a copy of the
    model. The default suite's small twin of test_convert_cli's slow 250 MB check."""
    import subprocess
    import sys

    config = testing.model_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, vocab_size=4000)
    src = testing.make_model_folder(tmp_path / "src", config)
    size = (src / "model.safetensors").stat().st_size
    code = ("import sys; from pathlib import Path; from converters.layouts import detect; "
            "from converters.write import convert; from ifprune_mlx.bench.machine import resident_memory; "
            "source = detect(Path(sys.argv[1])); before, _ = resident_memory(reset_peak=True); "
            "convert(source, Path(sys.argv[2]), dtype=sys.argv[3]); print(resident_memory()[1] - before)")
    out = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out"), dtype], check=True,
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    growth = int(out.stdout.split()[-1])
    assert (tmp_path / "out" / "config.json").is_file()
    assert growth < 0.5 * size, f"converting grew resident memory by {growth / size:.0%} of the model's size"
