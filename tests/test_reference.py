"""The PyTorch reference of IFPruning (converters/reference.py): SoftTopK, masked FFN, predictor."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from converters.reference import (SoftTopK, SparsityPredictor, hard_top_k, indices_to_mask,  # noqa: E402
                                  mask_to_indices, select_channels, set_ffn_mask, soft_top_k)
from ifprune_mlx.selectors import kept_count  # noqa: E402

L, F, V = 2, 128, 100


def tiny_llama(seed=0, hidden=64, ffn=F, layers=L):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=V,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_predictor(seed=1):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    return SparsityPredictor(transformers.Qwen2ForCausalLM(cfg), n_layers=L, d_ffn=F).eval()


class CharTokenizer:
    """Enough of a HF tokenizer for select_channels: tokenizer(text)["input_ids"]."""

    def __call__(self, text):
        return {"input_ids": [ord(c) % V for c in text]}


# --- SoftTopK -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 10, 64])
def test_soft_top_k_sums_to_k(k):
    torch.manual_seed(0)
    scores = torch.randn(3, 4, F) * 3
    lam = soft_top_k(scores, k, tau=1.0)
    assert lam.min() >= 0 and lam.max() <= 1
    torch.testing.assert_close(lam.sum(-1), torch.full((3, 4), float(k)), atol=1e-3, rtol=0)


def test_soft_top_k_approaches_hard_top_k_as_tau_falls():
    torch.manual_seed(0)
    scores = torch.randn(4, F)
    hard = hard_top_k(scores, 16)
    errors = [(soft_top_k(scores, 16, tau) - hard).abs().max().item() for tau in (1.0, 0.1, 0.01, 1e-4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3


def test_soft_top_k_gradient_keeps_the_sum():
    scores = torch.randn(2, F, requires_grad=True)
    (soft_top_k(scores, 8) * torch.randn(2, F)).sum().backward()
    torch.testing.assert_close(scores.grad.sum(-1), torch.zeros(2), atol=1e-5, rtol=0)


def test_training_mask_is_lambda_on_the_top_k_and_zero_elsewhere():
    scores = torch.randn(3, F, requires_grad=True)
    m = SoftTopK(k=20, tau=0.5)(scores)
    hard = hard_top_k(scores, 20)
    assert ((m > 0) == (hard > 0)).all()
    torch.testing.assert_close(m, soft_top_k(scores, 20, 0.5) * hard)
    m.sum().backward()
    assert scores.grad.abs().sum() > 0


# --- masked FFN -----------------------------------------------------------------------------


def test_all_ones_mask_equals_the_dense_model():
    llm = tiny_llama()
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        dense = llm(x).logits
        for masks in (torch.ones(L, F), torch.ones(2, L, F)):
            set_ffn_mask(llm, masks)
            torch.testing.assert_close(llm(x).logits, dense)
        set_ffn_mask(llm, None)
        torch.testing.assert_close(llm(x).logits, dense)


def test_zeroing_channel_j_equals_zeroing_its_gate_and_up_rows():
    llm, ref = tiny_llama(), tiny_llama()
    x = torch.randint(0, V, (2, 9))
    drop = {0: [3, 77], 1: [0, 5, 127]}
    masks = torch.ones(L, F)
    with torch.no_grad():
        for layer, ids in drop.items():
            masks[layer, ids] = 0
            mlp = ref.model.layers[layer].mlp
            mlp.gate_proj.weight[ids] = 0  # act(0) * 0 = 0: the channel contributes nothing
            mlp.up_proj.weight[ids] = 0
        set_ffn_mask(llm, masks)
        torch.testing.assert_close(llm(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_masks_work_on_other_swiglu_families(family):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(hidden_size=64, intermediate_size=F, num_hidden_layers=L,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
    llm = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    x = torch.randint(0, V, (1, 5))
    masks = torch.ones(L, F)
    masks[1, :64] = 0
    with torch.no_grad():
        set_ffn_mask(llm, masks)
        masked = llm(x).logits
        set_ffn_mask(llm, None)
        llm.model.layers[1].mlp.up_proj.weight[:64] = 0
        torch.testing.assert_close(masked, llm(x).logits, atol=1e-5, rtol=1e-5)


def test_per_sequence_masks_equal_running_each_sequence_alone():
    llm = tiny_llama()
    x = torch.randint(0, V, (2, 7))
    masks = (torch.rand(2, L, F) > 0.5).float()
    with torch.no_grad():
        set_ffn_mask(llm, masks)
        both = llm(x).logits
        for b in range(2):
            set_ffn_mask(llm, masks[b])
            torch.testing.assert_close(both[b], llm(x[b: b + 1]).logits[0], atol=1e-5, rtol=1e-5)


def test_mask_with_wrong_layer_count_is_refused():
    with pytest.raises(ValueError, match="layers"):
        set_ffn_mask(tiny_llama(), torch.ones(L + 1, F))


def test_indices_and_masks_round_trip():
    ids = [np.array([0, 5, 9]), np.array([127])]
    mask = indices_to_mask(ids, F)
    assert mask.shape == (L, F) and mask.sum() == 4
    assert [a.tolist() for a in mask_to_indices(mask)] == [a.tolist() for a in ids]


# --- predictor ------------------------------------------------------------------------------


def test_predictor_state_dict_has_the_public_layout():
    keys = tiny_predictor().state_dict().keys()
    assert {"prediction_head1.weight", "prediction_head1.bias", "prediction_head2.weight",
            "prediction_head2.bias", "feature_extractor.lm_head.weight"} <= set(keys)
    rest = [k for k in keys if not k.startswith("prediction_head")]
    assert all(k.startswith("feature_extractor.model.") or k == "feature_extractor.lm_head.weight" for k in rest)
    sd = tiny_predictor().state_dict()
    assert sd["prediction_head1.weight"].shape == (128, 32)
    assert sd["prediction_head2.weight"].shape == (L * F, 128)


def test_predictor_scores_are_layer_major_from_the_last_real_token():
    pred = tiny_predictor()
    ids = torch.randint(0, V, (2, 6))
    attn = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        scores = pred(ids, attn)
        assert scores.shape == (2, L, F)
        # hidden_states[-1] (after the final norm) at the last real token, through the head
        hs = pred.feature_extractor(ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
        pooled = torch.stack([hs[0, 5], hs[1, 3]])
        flat = pred.prediction_head2(pred.prediction_head1(pooled))  # [2, L*F]
        torch.testing.assert_close(scores[:, 1, 7], flat[:, 1 * F + 7])
        torch.testing.assert_close(scores.reshape(2, -1), flat)
        # padding on the right does not change a sequence's scores
        torch.testing.assert_close(scores[1], pred(ids[1:, :4])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("density", [0.1, 1 / 3, 0.5, 1.0])
def test_select_channels_keeps_kept_count_sorted_channels(density):
    ids = select_channels(tiny_predictor(), CharTokenizer(), "Sort the letters: c a b", density)
    k = kept_count(density, F, 32)
    assert len(ids) == L
    for row in ids:
        assert row.dtype == np.int64 and len(row) == k and len(np.unique(row)) == k
        assert (np.diff(row) > 0).all() and row.min() >= 0 and row.max() < F


def test_select_channels_picks_the_highest_scores():
    pred, tok = tiny_predictor(), CharTokenizer()
    prompt = "Reverse: x y z"
    with torch.no_grad():
        scores = pred(torch.tensor([tok(prompt)["input_ids"]]))[0]  # [L, F]
    for layer, row in enumerate(select_channels(pred, tok, prompt, 0.25)):
        kept = scores[layer, row]
        dropped = np.delete(scores[layer].numpy(), row)
        assert kept.min().item() >= dropped.max()


def test_straight_through_soft_top_k_forwards_the_hard_mask_with_lambdas_gradient():
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    st = SoftTopK(8, tau=0.5, straight_through=True)
    m = st(scores)
    assert torch.equal(m.detach(), st.hard(scores))
    (m * weights).sum().backward()
    grad_st = scores.grad.clone()
    scores.grad = None
    (SoftTopK(8, tau=0.5)(scores) * weights).sum().backward()
    assert torch.allclose(grad_st, scores.grad) and grad_st.abs().sum() > 0
