"""The selector interface: the trained predictor and the training-free (GRIFFIN) selector."""

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache

import ifprune_mlx as ifp
from ifprune_mlx import selectors, testing
from ifprune_mlx.fidelity import kl_after_prefill, random_selection
from ifprune_mlx.testing import make_model_folder, model_config

PROMPT = "Summarize the following paragraph in one sentence."


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return ifp.load(make_model_folder(tmp_path_factory.mktemp("plain") / "m",
                                      model_config(num_hidden_layers=3)))


@pytest.fixture(scope="module")
def with_predictor(bundle_dir):
    return ifp.load(bundle_dir)


def test_activations_is_deterministic_and_respects_density(plain):
    activations = plain.get_selector("activations")
    for density in (0.1, 0.33, 0.5, 1.0):
        first = plain.select(PROMPT, density=density, selector="activations")
        plain._cache.clear()
        calls = activations.calls
        again = plain.select(PROMPT, density=density, selector="activations")
        assert activations.calls == calls + 1, "the cache was cleared: the selector must run again"
        assert all((a == b).all() for a, b in zip(first.indices, again.indices))
        k = ifp.kept_count(density, plain.d_ffn)
        assert first.kept_counts == [k] * plain.n_layers and first.source == "activations"
        for ids in first.indices:
            assert len(np.unique(ids)) == k and ids.min() >= 0 and ids.max() < plain.d_ffn
    other = plain.select("Translate this sentence into French.", density=0.33, selector="activations")
    assert other.overlap(plain.select(PROMPT, density=0.33, selector="activations")) != [1.0] * plain.n_layers


def test_scores_do_not_depend_on_the_applied_selection(plain):
    activations = plain.get_selector("activations")
    tokens = activations.inputs(PROMPT)
    plain.apply(None)
    dense = activations.scores(tokens)
    plain.apply([np.arange(0, plain.d_ffn, 4)] * plain.n_layers)  # rows permuted, k small
    assert np.allclose(activations.scores(tokens), dense, atol=1e-5)
    assert [m.k for m in plain.mlps] == [plain.d_ffn // 4] * plain.n_layers, "scoring left k alone"
    plain.apply("auto")


def test_chunked_scoring_equals_one_pass(plain, monkeypatch):
    activations = plain.get_selector("activations")
    tokens = activations.inputs(PROMPT * 3)
    whole = activations.scores(tokens)
    monkeypatch.setattr(selectors, "PREFILL_CHUNK", 7)
    assert np.allclose(activations.scores(tokens), whole, rtol=1e-4, atol=1e-5)


def test_scoring_pass_holds_one_layer_of_activations_at_a_time(tmp_path):
    """The pass's activations [T, d_ffn] are reduced layer by layer; left lazy to the end, all
    layers' would be alive at once (8 x 1 MB here)."""
    import gc

    engine = ifp.load(make_model_folder(tmp_path / "m", model_config(num_hidden_layers=8, intermediate_size=1024)))
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 320, 256)]
    activations = engine.get_selector("activations")

    def peak(run) -> int:
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        run()
        return mx.get_peak_memory() - base

    def dense_prefill():
        cache = make_prompt_cache(engine.model)
        engine.model(mx.array([tokens]), cache=cache)
        mx.eval([c.state for c in cache])

    one_layer = len(tokens) * 1024 * 4
    assert peak(lambda: activations.scores(tokens)) <= peak(dense_prefill) + 3 * one_layer


@settings(max_examples=25, deadline=None)
@given(token=st.integers(0, 11), scale=st.floats(1e-3, 1e4), seed=st.integers(0, 2**16))
def test_normalization_keeps_one_token_from_dominating(token, scale, seed):
    """Per-token scaling: a channel's score does not change when one token's activations are
    scaled (made huge, or tiny); without it, that token decides the scores."""
    h = mx.array(np.random.default_rng(seed).normal(size=(12, 64)).astype(np.float32))
    scaled = h * mx.array(np.where(np.arange(12) == token, scale, 1.0).astype(np.float32))[:, None]
    normalized, raw = selectors._channel_energy(True), selectors._channel_energy(False)
    assert np.allclose(np.array(normalized(scaled)), np.array(normalized(h)), rtol=1e-4)
    squares = np.array(h[token]) ** 2  # unnormalized, the token's share grows with scale**2
    assert np.allclose(np.array(raw(scaled)), np.array(raw(h)) + (scale**2 - 1) * squares, rtol=1e-4)


def test_normalized_scores_give_every_token_unit_weight(plain):
    activations = plain.get_selector("activations")
    tokens = activations.inputs(PROMPT)
    raw = selectors.ActivationSelector(plain.model, plain.mlps, plain.prompt_tokens, normalize=False)
    normalized, unnormalized = activations.scores(tokens), raw.scores(tokens)
    # every row of normalized activations has unit norm, so a layer's squared scores sum to T
    assert np.allclose((normalized ** 2).sum(-1), len(tokens), rtol=1e-3)
    assert not np.allclose(unnormalized ** 2, normalized ** 2)


def test_activations_beat_random_masks_in_kl(tmp_path):
    """After a dense prefill, the activation-selected channels reproduce the dense model's
    next-token distributions better than random masks of the same size (fixed seeds)."""
    engine = ifp.load(make_model_folder(tmp_path / "m", model_config(
        hidden_size=128, num_hidden_layers=4, intermediate_size=512), seed=0))
    rng = np.random.default_rng(0)
    k = engine.kept_count(0.25)
    wins = 0
    for trial in range(4):
        tokens = rng.integers(3, 320, size=40).tolist()
        prompt, continuation = tokens[:28], tokens[28:]
        chosen = engine._select(engine.get_selector("activations"), prompt, k)
        ours = kl_after_prefill(engine, prompt, continuation, chosen)
        chance = [kl_after_prefill(engine, prompt, continuation,
                                   random_selection(engine.d_ffn, engine.n_layers, k, seed))
                  for seed in range(3)]
        wins += ours < min(chance)
    assert wins == 4
    assert kl_after_prefill(engine, prompt, continuation, None) < 1e-8  # dense vs itself


def test_generation_prefills_dense_then_decodes_pruned(plain):
    """generate(selector="activations") = the dense prefill that selects, then pruned decoding."""
    ids = plain.prompt_tokens(PROMPT)
    selection = plain.select(PROMPT, density=0.25, selector="activations")
    plain.apply(None)
    cache = make_prompt_cache(plain.model)
    plain.model(mx.array([ids[:-1]]), cache=cache)
    plain.apply(selection)
    token, expected = ids[-1], []
    for _ in range(6):
        token = int(mx.argmax(plain.model(mx.array([[token]]), cache=cache)[0, -1]).item())
        expected.append(token)
    plain.apply("auto")

    activations = plain.get_selector("activations")
    calls = activations.calls
    responses = list(plain.stream_responses(PROMPT, density=0.25, selector="activations", max_tokens=6))
    assert activations.calls == calls + 1, "the scoring pass is the prefill: it runs every time"
    assert [r.token for r in responses] == expected[: len(responses)]
    assert responses[-1].prompt_tokens == len(ids)
    assert [(a == b).all() for a, b in zip(plain.applied.indices, selection.indices)] == [True] * plain.n_layers
    again = plain.generate(PROMPT, density=0.25, selector="activations", max_tokens=6)
    assert again == "".join(r.text for r in responses), "the same prompt generates the same text"


def test_predictor_stays_the_default_where_there_is_one(with_predictor, plain):
    assert with_predictor.selector.name == "predictor" and with_predictor.has_predictor
    assert set(with_predictor.selectors) == {"predictor", "activations"}
    assert with_predictor.select(PROMPT).source == "predictor"
    assert with_predictor.select(PROMPT, selector="activations").source == "activations"
    responses = list(with_predictor.stream_responses(PROMPT, selector="activations", max_tokens=3))
    assert with_predictor.applied.source == "activations"
    assert [r.token for r in responses] == testing.reference_tokens(with_predictor, PROMPT, len(responses),
                                                                    dense_prefill=True)
    with_predictor.apply("auto")
    assert plain.selector.name == "activations" and list(plain.selectors) == ["activations"]


def _first_logits(engine, ids, selection, dense_prefill):
    """The first answer token's logits under `selection`, the prompt but its last token
    prefilled dense (the dense model, rows in channel order) or pruned, computed here."""
    from ifprune_mlx.fidelity import prefill_dense

    if dense_prefill:
        cache = prefill_dense(engine, ids)
        engine.apply(selection)
        logits = engine.model(mx.array([ids[-1:]]), cache=cache)
    else:
        engine.apply(selection)
        logits = engine.model(mx.array([ids]))
    engine.apply("auto")
    return np.asarray(logits[0, -1].astype(mx.float32))


def test_the_trained_predictor_can_prefill_dense_and_decode_pruned(with_predictor):
    """prefill "dense": the predictor selects from the prompt, the prompt (but its last token)
    runs on every channel, the answer on the selection; "pruned" (the default, the paper's
    setting) runs both on the selection. A call's prefill= overrides the engine's."""
    engine = with_predictor
    ids = engine.prompt_tokens(PROMPT)
    selection = engine.select(PROMPT, density=0.25)
    dense_first = _first_logits(engine, ids, selection, dense_prefill=True)
    pruned_first = _first_logits(engine, ids, selection, dense_prefill=False)
    assert np.abs(dense_first - pruned_first).max() > 1e-3, "the two settings differ on this model"
    assert engine.prefill == "pruned" and not engine.prefills_dense()
    try:
        engine.prefill = "dense"
        assert engine.prefills_dense() and engine.prefills_dense("activations")
        responses = list(engine.stream_responses(PROMPT, density=0.25, max_tokens=6))
        assert engine.applied is selection, "the predictor's selection (cached), applied for the answer"
        first = np.asarray(responses[0].logprobs.astype(mx.float32))
        expected = dense_first - np.log(np.exp(dense_first - dense_first.max()).sum()) - dense_first.max()
        np.testing.assert_allclose(first, expected, atol=1e-4)
        assert [r.token for r in responses] == testing.reference_tokens(engine, PROMPT, len(responses),
                                                                        dense_prefill=True)
        assert responses[-1].prompt_tokens == len(ids)
        engine.apply("auto")
        pruned = list(engine.stream_responses(PROMPT, density=0.25, max_tokens=6, prefill="pruned"))
        assert [r.token for r in pruned] == testing.reference_tokens(engine, PROMPT, len(pruned))
        engine.apply(selection)  # a pin prefills pruned unless the call asks
        pinned = next(iter(engine.stream_responses(PROMPT, max_tokens=1)))
        np.testing.assert_allclose(np.asarray(pinned.logprobs), np.asarray(pruned[0].logprobs), atol=1e-5)
        asked = next(iter(engine.stream_responses(PROMPT, max_tokens=1, prefill="dense")))
        np.testing.assert_allclose(np.asarray(asked.logprobs), first, atol=1e-4)
    finally:
        engine.prefill = "pruned"
        engine.apply("auto")
    with pytest.raises(ifp.SelectionError, match="prefill must be one of pruned, dense"):
        next(iter(engine.stream_responses(PROMPT, max_tokens=1, prefill="full")))


@settings(max_examples=12, deadline=None)
@given(seeds=st.lists(st.one_of(st.none(), st.integers(0, 2**31)), min_size=1, max_size=4),
       k=st.sampled_from([8, 32, 64]))
def test_a_dense_pass_under_any_selection_is_the_dense_prefill_and_moves_no_row(plain, seeds, k):
    """Property: whatever selection is applied (None: dense), Engine.dense_pass fills the KV
    cache the dense model fills (float rounding aside: the channels sum in another order) and
    the model then computes that selection exactly as before."""
    from ifprune_mlx.fidelity import prefill_dense, random_selection

    ids = plain.prompt_tokens(PROMPT)
    expected = prefill_dense(plain, ids)
    probe = mx.array([ids[:5]])
    for seed in seeds:
        selection = None if seed is None else random_selection(plain.d_ffn, plain.n_layers, k, seed)
        plain.apply(selection)
        before = [np.array(m.perm) for m in plain.mlps]
        logits = plain.model(probe)
        cache = make_prompt_cache(plain.model)
        plain.dense_pass(ids[:-1], cache)
        for mine, dense in zip(cache, expected):
            np.testing.assert_allclose(np.asarray(mine.keys[..., :mine.offset, :]),
                                       np.asarray(dense.keys[..., :dense.offset, :]), atol=1e-4)
            np.testing.assert_allclose(np.asarray(mine.values[..., :mine.offset, :]),
                                       np.asarray(dense.values[..., :dense.offset, :]), atol=1e-4)
        assert all((a == np.array(m.perm)).all() for a, m in zip(before, plain.mlps))
        assert mx.array_equal(plain.model(probe), logits), "the selection computes as before, to the bit"
        assert plain.applied is selection
    plain.apply("auto")


def test_selector_errors(plain):
    with pytest.raises(ifp.SelectionError, match="no trained predictor"):
        plain.select(PROMPT, selector="predictor")
    with pytest.raises(ifp.SelectionError, match="unknown selector 'griffin'"):
        plain.generate(PROMPT, selector="griffin")
    with pytest.raises(ifp.SelectionError, match="no tokens"):
        plain.get_selector("activations").scores([])


class Constant:
    """A Selector of one's own: keeps the same channels whatever the prompt."""

    name, calls = "constant", 0

    def __init__(self, n_layers, d_ffn):
        self.table = np.tile(np.arange(d_ffn)[::-1], (n_layers, 1)).astype(np.float32)

    def inputs(self, prompt):
        return [0]

    def scores(self, tokens):
        self.calls += 1
        return self.table


def test_a_selector_object_can_be_passed(plain):
    mine = Constant(plain.n_layers, plain.d_ffn)
    selection = plain.select(PROMPT, density=0.25, selector=mine)
    k = plain.kept_count(0.25)
    assert all((ids == np.arange(k)).all() for ids in selection.indices)  # the highest scores
    assert selection.source == "constant"
    plain.generate(PROMPT, selector=mine, density=0.25, max_tokens=2)
    assert plain.applied is selection


@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c.update(model_type="gpt2"), ifp.UnsupportedArchitectureError, "'gpt2' is not supported"),
    (lambda c: c.update(hidden_act="gelu"), ifp.UnsupportedArchitectureError, "SwiGLU"),
    (lambda c: c.update(quantization_config={"quant_method": "gptq"}), ifp.BundleError, "gptq checkpoint"),
    (lambda c: c.update(quantization={"group_size": 32, "bits": 4, "mode": "mxfp4"}), ifp.BundleError, "mxfp4"),
])
def test_folders_mlx_lm_cannot_read_or_we_cannot_prune(tmp_path, edit, error, match):
    """Each refused with a typed error that says why."""
    folder = make_model_folder(tmp_path / "m", model_config())
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=match):
        ifp.load(folder)


def test_without_a_trimmable_cache_it_selects_then_prefills_dense(plain, monkeypatch):
    """The scoring pass cannot be the prefill (its cache cannot drop the last token): the
    selection comes first, then the prompt but its last token is prefilled dense."""
    from ifprune_mlx import engine as engine_module

    monkeypatch.setattr(engine_module, "can_trim_prompt_cache", lambda cache: False)
    activations = plain.get_selector("activations")
    expected = plain.select("a prompt for the fallback", density=0.25, selector="activations")
    calls = activations.calls
    responses = list(plain.stream_responses("a prompt for the fallback", density=0.25,
                                            selector="activations", max_tokens=3))
    assert activations.calls == calls, "the cached selection is reused: no dense pass"
    assert plain.applied is expected and responses[-1].prompt_tokens == len(
        plain.prompt_tokens("a prompt for the fallback"))
    assert [r.token for r in responses] == testing.reference_tokens(plain, "a prompt for the fallback",
                                                                    len(responses), dense_prefill=True)
