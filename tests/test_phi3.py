"""Phi-3: the fused gate_up_proj is split at load into ordinary prunable gate/up rows."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load

import ifprune_mlx as ifp
from ifprune_mlx import testing
from ifprune_mlx.models import split_gate_up

TOKENS = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
PROMPT = "Write a Python function that reverses a list."


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    """A plain mlx-lm phi3 folder (fused gate_up_proj), float32, random weights."""
    return testing.make_model_folder(tmp_path_factory.mktemp("phi3") / "plain", testing.model_config("phi3"))


def random_keep(d_ffn: int, n_layers: int, count: int = 100) -> list[np.ndarray]:
    return [np.sort(np.random.default_rng(i).choice(d_ffn, count, replace=False)) for i in range(n_layers)]


def zero_dropped_gate_rows(model: nn.Module, keep: list[np.ndarray], d_ffn: int) -> None:
    """Prune mlx-lm's phi3 by hand: zero the gate rows (first half of gate_up_proj) not kept."""
    for layer, ids in zip(model.layers, keep):
        mask = np.ones(2 * d_ffn, dtype=np.float32)
        mask[:d_ffn] = 0
        mask[ids] = 1
        fused = layer.mlp.gate_up_proj
        if isinstance(fused, nn.QuantizedLinear):
            fused.scales, fused.biases = fused.scales * mx.array(mask)[:, None], fused.biases * mx.array(mask)[:, None]
        else:
            fused.weight = fused.weight * mx.array(mask)[:, None]


def max_diff(a: mx.array, b) -> float:
    return float(np.abs(np.array(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


def test_split_is_exact_for_quantized_rows_and_a_no_op_on_split_weights():
    fused = mx.random.normal((64, 128))
    q = dict(zip(("weight", "scales", "biases"), mx.quantize(fused, group_size=64, bits=4)))
    split = split_gate_up({f"model.layers.0.mlp.gate_up_proj.{k}": v for k, v in q.items()})
    for half, rows in (("gate_proj", fused[:32]), ("up_proj", fused[32:])):
        for k, v in zip(("weight", "scales", "biases"), mx.quantize(rows, group_size=64, bits=4)):
            assert mx.array_equal(split[f"model.layers.0.mlp.{half}.{k}"], v)
    assert not any("gate_up_proj" in name for name in split)
    assert split_gate_up(split).keys() == split.keys()
    assert all(split_gate_up(split)[k] is v for k, v in split.items())


def test_mlx_lm_phi3_folder_matches_mlx_lm_dense_and_pruned(phi3_dir):
    engine = ifp.load(phi3_dir)
    model, _ = mlx_lm_load(str(phi3_dir))
    assert engine.config["model_type"] == "phi3" and engine.d_ffn == 256
    assert max_diff(engine.model(TOKENS), model(TOKENS)) <= 1e-4
    keep = random_keep(engine.d_ffn, engine.n_layers)
    stats = engine.apply(keep)
    assert stats.swaps > 0 and [m.k for m in engine.mlps] == [100] * engine.n_layers
    zero_dropped_gate_rows(model, keep, engine.d_ffn)
    assert max_diff(engine.model(TOKENS), model(TOKENS)) <= 1e-4


def test_phi3_generates_and_saves_a_bundle_that_loads_back(phi3_dir, tmp_path):
    engine = ifp.load(phi3_dir)
    responses = list(engine.stream_responses(PROMPT, max_tokens=8))  # selects, applies, decodes
    assert engine.applied.source == "activations"  # a plain folder: GRIFFIN, the prompt prefilled dense
    assert [r.token for r in responses] == testing.reference_tokens(engine, PROMPT, len(responses),
                                                                    dense_prefill=True)
    engine.apply(random_keep(engine.d_ffn, engine.n_layers))  # rows permuted before saving
    engine.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "phi3"
    again = ifp.load(tmp_path / "saved")
    names = {name for name, _ in nn.utils.tree_flatten(again.model.parameters())}
    assert "model.layers.0.mlp.gate_proj.weight" in names and not any("gate_up" in n for n in names)
    engine.apply(None)
    assert max_diff(engine.model(TOKENS), again.model(TOKENS)) <= 1e-5
    keep = random_keep(engine.d_ffn, engine.n_layers, count=64)
    engine.apply(keep)
    again.apply(keep)
    assert max_diff(engine.model(TOKENS), again.model(TOKENS)) <= 1e-5


def test_phi3_bundle_with_a_predictor_generates(tmp_path):
    engine = ifp.load(testing.make_bundle(tmp_path / "bundle", testing.model_config("phi3")))
    assert engine.has_predictor
    responses = list(engine.stream_responses(PROMPT, max_tokens=8, density=0.33))
    assert [r.token for r in responses] == testing.reference_tokens(engine, PROMPT, len(responses))
    assert engine.applied.kept_counts == [ifp.kept_count(0.33, engine.d_ffn)] * engine.n_layers


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_mlx_lm_phi3_folder(tmp_path, bits):
    """gate/up rows are split exactly; only down_proj's re-quantization moves the logits."""
    config = testing.model_config("phi3", hidden_size=128, intermediate_size=512)
    folder = testing.make_model_folder(tmp_path / "q", config)
    model = testing.quantize_model_folder(folder, bits)
    engine = ifp.load(folder)
    reference = model(TOKENS)
    diff, spread = max_diff(engine.model(TOKENS), reference), mx.abs(reference).max().item()
    assert diff <= (0.05 if bits == 4 else 0.01) * spread, f"{bits}-bit: logits moved by {diff:.4f} (max {spread:.2f})"
    # with mlx-lm's down_proj replaced by our re-quantized rows, the models are the same
    for layer, mlp in zip(model.layers, engine.mlps):
        d = mlp.down_proj
        dense_down = mx.dequantize(d.weight, d.scales, d.biases, group_size=64, bits=bits).T
        layer.mlp.down_proj = nn.Linear(*dense_down.shape[::-1], bias=False)
        layer.mlp.down_proj.weight = dense_down
    assert max_diff(engine.model(TOKENS), model(TOKENS)) <= 1e-4
    keep = random_keep(engine.d_ffn, engine.n_layers, count=160)
    engine.apply(keep)
    zero_dropped_gate_rows(model, keep, engine.d_ffn)
    assert max_diff(engine.model(TOKENS), model(TOKENS)) <= 1e-4


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.25 * i for i in range(6)],
            "long_factor": [1.0 + 0.25 * i for i in range(6)], "partial_rotary_factor": 0.75}


@pytest.mark.parametrize("rope", [None, LONGROPE], ids=["default-rope", "longrope-partial-tied"])
def test_hugging_face_phi3_matches_transformers(tmp_path, rope):
    """A Phi3ForCausalLM folder; longrope, partial rotary and tied embeddings given only in
    transformers 5's rope_parameters (short = long factors: transformers switches between
    them by length, mlx-lm always uses long_factor)."""
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    extra = {"tie_word_embeddings": True, "max_position_embeddings": 131072,
             "rope_parameters": {"rope_theta": 10000.0, **rope}} if rope else {}
    config = transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                     bos_token_id=None, eos_token_id=0, pad_token_id=0, **extra)
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    if rope:  # only under rope_parameters, as transformers 5 may write it
        written.pop("partial_rotary_factor", None)
        written["rope_parameters"].pop("type", None)
        (tmp_path / "config.json").write_text(json.dumps(written))
        assert "rope_scaling" not in written and written["rope_parameters"]["rope_type"] == "longrope"
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    testing.make_tokenizer(tmp_path)
    engine = ifp.load(tmp_path)
    tokens = [[3, 14, 15, 92, 65, 35, 89, 79] * 4]
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    assert max_diff(engine.model(mx.array(tokens)), expected) <= 1e-4
    keep = random_keep(engine.d_ffn, engine.n_layers, count=64)
    engine.apply(keep)
    with torch.no_grad():
        for layer, ids in zip(hf.model.layers, keep):
            dropped = np.setdiff1d(np.arange(engine.d_ffn), ids)
            layer.mlp.gate_up_proj.weight[torch.from_numpy(dropped)] = 0  # gate rows come first
        expected = hf(torch.tensor(tokens)).logits.numpy()
    assert max_diff(engine.model(mx.array(tokens)), expected) <= 1e-4


def test_a_hugging_face_phi3_converts_and_verifies(tmp_path):
    """The converter splits the fused gate_up_proj too; --verify re-fuses it for PyTorch."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from typer.testing import CliRunner

    from ifprune_mlx.cli import app

    torch.manual_seed(0)
    config = transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                     bos_token_id=None, eos_token_id=0, pad_token_id=0)
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path / "hf")
    testing.make_tokenizer(tmp_path / "hf", 320)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--verify"])
    assert result.exit_code == 0 and "PASSED" in result.output, result.output
    bundle, folder = ifp.load(tmp_path / "out"), ifp.load(tmp_path / "hf")
    keep = random_keep(128, 2, count=40)
    for selection in (None, keep):
        bundle.apply(selection)
        folder.apply(selection)
        assert max_diff(bundle.model(TOKENS), folder.model(TOKENS)) <= 1e-5
