"""Loading validates before trusting: each bad input gets a typed error that says what to fix."""

import json
import shutil

import mlx.core as mx
import pytest

import ifprune_mlx as ifp
from ifprune_mlx import bundle, testing
from ifprune_mlx.errors import BundleError, PredictorError, UnsupportedArchitectureError


@pytest.fixture
def copy(tmp_path, bundle_dir, plain_dir):
    def make(which="bundle"):
        dst = tmp_path / which
        shutil.copytree(bundle_dir if which == "bundle" else plain_dir, dst)
        return dst

    return make


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_folder(tmp_path):
    with pytest.raises(BundleError, match="no such model folder"):
        ifp.load(tmp_path / "nope")


def test_missing_config(copy):
    folder = copy()
    (folder / "config.json").unlink()
    with pytest.raises(BundleError, match="config.json: missing"):
        ifp.load(folder)


def test_config_not_json(copy):
    folder = copy()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        ifp.load(folder)


def test_config_without_model_type(copy):
    folder = copy()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(BundleError, match="model_type"):
        ifp.load(folder)


def test_unknown_architecture(copy):
    folder = copy()
    edit_config(folder, model_type="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported; supported: llama, mistral, phi3, qwen2, qwen3"):
        ifp.load(folder)


def test_unsupported_format_version(copy):
    folder = copy()
    config = json.loads((folder / "config.json").read_text())
    config["ifpruning"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        ifp.load(folder)


def test_the_predictors_prefill_is_read_and_checked(copy):
    folder = copy()
    config = json.loads((folder / "config.json").read_text())
    assert config["ifpruning"]["prefill"] == "pruned"  # what a writer writes by default
    assert ifp.load(folder).prefill == "pruned"
    config["ifpruning"]["prefill"] = "dense"
    (folder / "config.json").write_text(json.dumps(config))
    engine = ifp.load(folder)
    assert engine.prefill == "dense" and engine.prefills_dense()
    engine.set_prefill(None)  # what --prefill unset means: the bundle's stays
    assert engine.prefill == "dense"
    engine.set_prefill("pruned")
    assert engine.prefill == "pruned" and not engine.prefills_dense()
    with pytest.raises(ifp.SelectionError, match="prefill must be one of pruned, dense"):
        engine.set_prefill("full")
    assert engine.prefill == "pruned"
    del config["ifpruning"]["prefill"]  # a bundle written before the field: the paper's setting
    (folder / "config.json").write_text(json.dumps(config))
    assert ifp.load(folder).prefill == "pruned"
    config["ifpruning"]["prefill"] = "full"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="ifpruning prefill must be one of pruned, dense, got 'full'"):
        ifp.load(folder)
    assert "prefill" not in bundle.new_ifpruning_block(has_predictor=False)  # only a predictor has one


def test_missing_weights(copy):
    folder = copy()
    (folder / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="no model\\*.safetensors"):
        ifp.load(folder)


@pytest.mark.parametrize("keep", [4, 100, 0.6])
def test_truncated_safetensors(copy, keep):
    folder = copy()
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(BundleError, match="truncated|corrupt"):
        ifp.load(folder)


def test_shape_mismatch(copy):
    folder = copy()
    edit_config(folder, intermediate_size=512)
    with pytest.raises(BundleError, match=r"has shape \(256, 64\), config.json implies \(512, 64\)"):
        ifp.load(folder)


def test_missing_and_unexpected_tensors(copy):
    folder = copy()
    weights = mx.load(str(folder / "model.safetensors"))
    weights["extra.weight"] = weights.pop("model.norm.weight")
    bundle.save_safetensors(folder / "model.safetensors", weights)
    with pytest.raises(BundleError, match="'model.norm.weight'"):
        ifp.load(folder)


def test_sharded_weights_and_a_missing_shard(copy, bundle_dir):
    folder = copy()
    weights = mx.load(str(folder / "model.safetensors"))
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    (folder / "model.safetensors").unlink()
    for file, keys in halves.items():
        bundle.save_safetensors(folder / file, {k: weights[k] for k in keys})
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    tokens = mx.array([[5, 17, 42, 99]])
    assert mx.array_equal(ifp.load(folder).model(tokens), ifp.load(bundle_dir).model(tokens)).item()
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BundleError, match="shard model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing"):
        ifp.load(folder)


def test_plain_folder_with_dtype_mismatch(copy):
    folder = copy("plain")
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"].astype(mx.uint32)
    bundle.save_safetensors(folder / "model.safetensors", weights)
    with pytest.raises(BundleError, match="dtype uint32"):
        ifp.load(folder)


def test_missing_tokenizer(copy):
    folder = copy()
    for name in bundle.TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(BundleError, match="tokenizer"):
        ifp.load(folder)


def test_predictor_head_that_does_not_fit(tmp_path):
    config = testing.model_config(intermediate_size=256)
    predictor = testing.random_predictor(testing.model_config(intermediate_size=128))
    weights = testing.to_row_layout(testing.random_weights(config))
    tok = testing.make_tokenizer(tmp_path / "tok")
    bundle.write_bundle(tmp_path / "b", config=config, weights=weights, tokenizer_dir=tok, predictor=predictor)
    with pytest.raises(PredictorError, match=r"head2.weight has shape \(256, 128\), expected \(512, 128\).*trained for another LLM"):
        ifp.load(tmp_path / "b")


def test_missing_predictor_head(copy):
    folder = copy()
    (folder / "predictor" / "head.safetensors").unlink()
    with pytest.raises(PredictorError, match="head.safetensors: missing"):
        ifp.load(folder)


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "out"

    def fill(tmp):
        (tmp / "a").write_text("1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bundle.write_atomic(out, fill)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    bundle.write_atomic(out, lambda tmp: (tmp / "a").write_text("1"))
    with pytest.raises(BundleError, match=r"already exists; pass --force \(force=True\)"):
        bundle.write_atomic(out, lambda tmp: (tmp / "b").write_text("2"))
    assert (out / "a").exists()
    bundle.write_atomic(out, lambda tmp: (tmp / "b").write_text("2"), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "b").exists()
