"""The engine API: parity with mlx-lm, selection, pinning, caching, failures."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate as mlx_lm_generate
from mlx_lm import load as mlx_lm_load

import ifprune_mlx as ifp
from ifprune_mlx import testing
from ifprune_mlx.bundle import write_bundle
from ifprune_mlx.errors import SelectionError

PROMPT = "Write a Python function that reverses a list."


@pytest.fixture(scope="module")
def engine(bundle_dir):
    return ifp.load(bundle_dir)


def test_dense_path_matches_mlx_lm(plain_dir):
    engine = ifp.load(plain_dir)
    model, tokenizer = mlx_lm_load(str(plain_dir))
    tokens = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    assert mx.abs(engine.model(tokens) - model(tokens)).max().item() <= 1e-4
    engine.apply(None)
    ids = engine.prompt_tokens(PROMPT)
    ours = engine.generate(PROMPT, max_tokens=24)
    theirs = mlx_lm_generate(model, tokenizer, ids, max_tokens=24)
    assert ours == theirs


def test_saved_plain_model_reloads_as_an_equal_bundle(plain_dir, tmp_path):
    engine = ifp.load(plain_dir)
    engine.apply([np.arange(0, 256, 3)] * engine.n_layers)  # permute rows before saving
    engine.save(tmp_path / "saved")
    again = ifp.load(tmp_path / "saved")
    engine.apply(None)
    tokens = mx.array([[1, 2, 3, 4]])
    assert mx.abs(engine.model(tokens) - again.model(tokens)).max().item() <= 1e-5
    with pytest.raises(ifp.BundleError, match="already exists"):
        engine.save(tmp_path / "saved")


def test_select_is_deterministic_and_cached(engine):
    first = engine.select(PROMPT, density=0.33)
    calls = engine.selector.calls
    again = engine.select(PROMPT, density=0.33)
    assert engine.selector.calls == calls, "a cache hit must not run the backbone"
    assert again is first
    engine._cache.clear()
    fresh = engine.select(PROMPT, density=0.33)
    assert engine.selector.calls == calls + 1
    assert all((a == b).all() for a, b in zip(first.indices, fresh.indices))
    assert first.kept_counts == [ifp.kept_count(0.33, engine.d_ffn)] * engine.n_layers
    assert first.source == "predictor" and first.seconds > 0


def test_selection_cache_is_bounded(bundle_dir):
    engine = ifp.load(bundle_dir, cache_size=2)
    for prompt in ("a", "b", "c"):
        engine.select(prompt)
    calls = engine.selector.calls
    engine.select("c")
    engine.select("b")
    assert engine.selector.calls == calls, "the two most recent stay cached"
    engine.select("a")
    assert engine.selector.calls == calls + 1, "the oldest was dropped"


def test_selections_differ_between_prompts_and_densities(engine):
    a = engine.select("Sort these numbers: 5 3 9 1.", density=0.5)
    b = engine.select("Once upon a time there was a model.", density=0.5)
    assert any(not np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    assert engine.select("Sort these numbers: 5 3 9 1.", density=0.25).kept_counts[0] < a.kept_counts[0]


def test_generate_selects_per_prompt_and_pins(engine):
    engine.apply("auto")
    engine.generate(PROMPT, max_tokens=4)
    assert engine.applied is engine.select(PROMPT)
    pinned = engine.select("Translate the sentence into French.", density=0.5)
    engine.apply(pinned)
    engine.generate(PROMPT, max_tokens=4)
    assert engine.applied is pinned
    engine.generate(PROMPT, max_tokens=4, density=0.25)  # overrides the pin for one call
    assert engine.applied.kept_counts[0] == ifp.kept_count(0.25, engine.d_ffn)
    engine.generate(PROMPT, max_tokens=4)
    assert engine.applied is pinned
    engine.apply(None)
    engine.generate(PROMPT, max_tokens=4)
    assert engine.applied is None and all(m.k == m.d_ffn for m in engine.mlps)
    engine.apply("auto")
    engine.generate(PROMPT, max_tokens=4)
    assert engine.applied is engine.select(PROMPT)


def test_stream_yields_the_generated_text(engine):
    pieces = list(engine.stream(PROMPT, max_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == engine.generate(PROMPT, max_tokens=12)


def test_sampling_is_reproducible_with_a_seed(engine):
    a = engine.generate(PROMPT, max_tokens=12, temp=1.0, seed=7)
    b = engine.generate(PROMPT, max_tokens=12, temp=1.0, seed=7)
    assert a == b
    # the seed is what makes them equal: other seeds sample other texts, and none is the greedy one
    others = {engine.generate(PROMPT, max_tokens=12, temp=1.0, seed=seed) for seed in (1, 2, 3)}
    assert others - {a} and a != engine.generate(PROMPT, max_tokens=12)


def test_chat_messages_select_from_the_last_user_message(engine):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": PROMPT}]
    engine.apply("auto")
    engine.generate(messages, max_tokens=2)
    assert engine.applied is engine.select(PROMPT)


def test_training_free_selector_on_a_plain_model(plain_dir):
    engine = ifp.load(plain_dir)
    assert not engine.has_predictor and engine.default_density == 0.5
    selection = engine.select(PROMPT)
    assert selection.source == "activations"
    assert selection.kept_counts == [128] * engine.n_layers
    engine.apply([np.arange(32)] * engine.n_layers)
    tokens = engine.selector.inputs("other prompt")
    assert (engine.selector.scores(tokens) == engine.selector.scores(tokens)).all()
    # scoring runs dense and leaves the applied selection alone
    assert [m.k for m in engine.mlps] == [32] * engine.n_layers


BAD_SELECTIONS = [
    (lambda e: [np.arange(10)] * (e.n_layers + 1), "one index array per layer"),
    (lambda e: [np.array([0, 1, e.d_ffn])] * e.n_layers, "out of range"),
    (lambda e: [np.array([-1, 2])] * e.n_layers, "out of range"),
    (lambda e: [np.array([3, 3, 4])] * e.n_layers, "appears 2 times"),
    (lambda e: [np.array([], dtype=int)] * e.n_layers, "keeps no channel"),
    (lambda e: [np.array([0.5, 1.5])] * e.n_layers, "integers"),
    (lambda e: "dense", "auto"),
]


@pytest.mark.parametrize("make, message", BAD_SELECTIONS)
def test_bad_selection_is_refused_and_the_engine_still_works(engine, make, message):
    engine.apply([np.arange(64)] * engine.n_layers)
    before = engine.generate(PROMPT, max_tokens=8)
    with pytest.raises(SelectionError, match=message):
        engine.apply(make(engine))
    assert engine.generate(PROMPT, max_tokens=8) == before


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "lots"])
def test_bad_density_is_refused(engine, density):
    engine.apply("auto")
    before = engine.generate(PROMPT, max_tokens=8)
    with pytest.raises(SelectionError, match=r"density must be"):
        engine.generate(PROMPT, max_tokens=8, density=density)
    with pytest.raises(SelectionError, match=r"density must be"):
        engine.select(PROMPT, density=density)
    assert engine.generate(PROMPT, max_tokens=8) == before


def test_failed_swap_leaves_the_selection_and_the_text(engine, monkeypatch):
    import ifprune_mlx.prune as prune

    engine.apply(engine.select(PROMPT, density=0.25))
    before = engine.generate(PROMPT, max_tokens=8)
    applied = engine.applied

    def broken(*args):
        raise MemoryError("simulated allocation failure")

    monkeypatch.setattr(prune, "_swap_rows", broken)
    with pytest.raises(MemoryError):
        engine.apply(engine.select(PROMPT, density=0.75))
    monkeypatch.undo()
    assert engine.applied is applied
    assert engine.generate(PROMPT, max_tokens=8) == before


def test_quantized_bundle_generates(q4_bundle_dir):
    engine = ifp.load(q4_bundle_dir)
    assert engine.config["quantization"]["bits"] == 4
    responses = list(engine.stream_responses(PROMPT, max_tokens=8))
    assert engine.applied is not None and engine.mlps[0].k < engine.d_ffn
    assert [r.token for r in responses] == testing.reference_tokens(engine, PROMPT, len(responses))
    assert engine.generate(PROMPT, max_tokens=8) == "".join(r.text for r in responses)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("bits", [None, 8])
def test_every_architecture_matches_mlx_lm_dense_and_pruned(tmp_path, model_type, bits):
    """Dense logits equal mlx-lm's on the same weights; pruning equals zeroing gate rows."""
    config = testing.model_config(model_type)
    folder = testing.make_model_folder(tmp_path / model_type, config)
    model, _ = mlx_lm_load(str(folder))
    if bits:  # quantize both the same way: mlx-lm's model and our row-layout bundle
        nn.quantize(model, group_size=32, bits=bits)
        weights, qconfig = testing.quantize_rows(testing.to_row_layout(testing.random_weights(config)), config, bits)
        engine_dir = tmp_path / "bundle"
        write_bundle(engine_dir, config=qconfig, weights=weights, tokenizer_dir=folder)
        engine = ifp.load(engine_dir)
        # mlx-lm quantizes down_proj along d_ffn, we along d_model: compare to dequantized rows
        for layer, mlp in zip(model.layers, engine.mlps):
            d = mlp.down_proj
            dense_down = mx.dequantize(d.weight, d.scales, d.biases, group_size=32, bits=bits).T
            layer.mlp.down_proj = nn.Linear(*dense_down.shape[::-1], bias=False)
            layer.mlp.down_proj.weight = dense_down
    else:
        engine = ifp.load(folder)
    tokens = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    assert mx.abs(engine.model(tokens) - model(tokens)).max().item() <= 1e-4
    keep = [np.sort(np.random.default_rng(i).choice(engine.d_ffn, 100, replace=False)) for i in range(engine.n_layers)]
    engine.apply(keep)
    for layer, ids in zip(model.layers, keep):
        mask = np.zeros(engine.d_ffn, dtype=np.float32)
        mask[ids] = 1
        mask = mx.array(mask)[:, None]
        gate = layer.mlp.gate_proj
        if bits:
            gate.scales, gate.biases = gate.scales * mask, gate.biases * mask
        else:
            gate.weight = gate.weight * mask
    assert mx.abs(engine.model(tokens) - model(tokens)).max().item() <= 1e-4


def mixed_4_6(path, module):
    """mlx-lm's mixed_4_6 recipe in miniature: 6-bit down_proj in the first layer, 4-bit elsewhere."""
    return {"group_size": 64, "bits": 6 if path == "model.layers.0.mlp.down_proj" else 4}


# bits -> largest logit change re-quantizing down_proj may cause, relative to the largest logit
QUANTIZED_FOLDERS = {3: 0.08, 4: 0.05, 6: 0.02, 8: 0.01, "mixed_4_6": 0.03}


@pytest.mark.parametrize("bits", list(QUANTIZED_FOLDERS))
def test_quantized_mlx_lm_folder_loads_in_row_layout(tmp_path, bits):
    """An mlx-lm quantized folder (any affine width, mixed recipes too): down_proj is
    re-quantized along d_model at load, with its own bits."""
    folder = testing.make_model_folder(tmp_path / "q", testing.model_config(hidden_size=128, intermediate_size=512))
    mixed = bits == "mixed_4_6"
    model = testing.quantize_model_folder(folder, 4 if mixed else bits, predicate=mixed_4_6 if mixed else None)
    engine = ifp.load(folder)
    if mixed:
        assert [mlp.down_proj.bits for mlp in engine.mlps] == [6, 4]
    tokens = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    reference = model(tokens)
    diff = mx.abs(engine.model(tokens) - reference).max().item()
    spread = mx.abs(reference).max().item()
    assert diff <= QUANTIZED_FOLDERS[bits] * spread, f"{bits}: re-quantization moved logits by {diff:.4f} (max |logit| {spread:.2f})"
    engine.apply([np.arange(0, 512, 3)] * engine.n_layers)
    responses = list(engine.stream_responses("Sort these numbers", max_tokens=4))
    assert [r.token for r in responses] == testing.reference_tokens(engine, "Sort these numbers", len(responses))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_hugging_face_folder_loads_with_its_rope_theta(tmp_path, model_type):
    """transformers 5 nests rope_theta in rope_parameters; mlx-lm alone would miss it."""
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    config_class = transformers.LlamaConfig if model_type == "llama" else transformers.Qwen2Config
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=320, rope_theta=5e5 if model_type == "llama" else 5e4)
    model_class = transformers.LlamaForCausalLM if model_type == "llama" else transformers.Qwen2ForCausalLM
    hf = model_class(config).eval()
    hf.save_pretrained(tmp_path)
    testing.make_tokenizer(tmp_path)
    engine = ifp.load(tmp_path)
    tokens = [[3, 14, 15, 92, 65, 35, 89, 79] * 4]
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.array(engine.model(mx.array(tokens))) - expected).max() <= 1e-4
