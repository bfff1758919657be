"""Instruction-Following Pruning (IFPruning), the PyTorch reference.

The whole method in one file, the oracle for parity tests and the base of the demo trainer
(examples/train_tiny). Paper: "Instruction-Following Pruning for Large Language Models"
(arXiv 2501.02086).

    prompt --> SparsityPredictor --> scores [L, F] --> per-layer top-k --> mask [L, F]
    dense LLM, every layer's SwiGLU FFN:  down_proj(act(gate_proj(x)) * up_proj(x) * mask[l])

Only FFN intermediate channels are pruned: channel j of layer l is row j of gate_proj and
up_proj and column j of down_proj. Attention is untouched. L = layers, F = d_ffn.

Training (two stages, see examples/train_tiny/train.py) makes the top-k differentiable with
SoftTopK: the FFN is scaled by m = lambda * TopK(lambda), lambda a soft mask summing to k.
At inference the mask is hard 0/1, chosen once per prompt by `select_channels`.

The inference rules (how many channels, which ones, tie-breaking) are the numpy functions of
`ifprune_mlx.selectors`, shared with the MLX runtime, so both sides select the same channels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ifprune_mlx.bundle import PAD_MULTIPLE
from ifprune_mlx.selectors import kept_count, top_k

# ----------------------------------------------------------------------------------------------
# SoftTopK: a differentiable top-k (CoDA / CoLT5)
#
# lambda = argmax_{0 <= l <= 1, sum(l) = k}  <s, l> + tau * H(l)   (entropy-regularized top-k)
# has the closed form lambda_i = sigmoid((s_i + b) / tau), with the scalar b chosen so that
# sum(lambda) = k. We find b by bisection (no grad), then take one Newton step on b *with*
# grad: its value is unchanged (the residual is ~0) but autograd now sees db/ds, the implicit
# gradient that keeps sum(lambda) = k to first order. As tau -> 0, lambda -> hard top-k.


def soft_top_k(scores: torch.Tensor, k: int, tau: float = 1.0, iters: int = 40) -> torch.Tensor:
    """Soft top-k mask lambda in [0, 1] over the last axis, summing to k.

    Args:
        scores: [..., F] channel scores.
        k: channels to keep, 0 < k <= F.
        tau: temperature; smaller is closer to a hard top-k.
        iters: bisection steps for the threshold.
    Returns:
        lambda with the shape of scores.
    """
    s = scores.float() / tau  # [..., F]
    with torch.no_grad():
        # sum(sigmoid(s + b)) is increasing in b; bracket b so the sum goes from <k to >k.
        lo = -s.max(-1, keepdim=True).values - 30.0  # [..., 1]  sum ~ 0
        hi = -s.min(-1, keepdim=True).values + 30.0  # [..., 1]  sum ~ F
        for _ in range(iters):
            mid = (lo + hi) / 2
            too_many = torch.sigmoid(s + mid).sum(-1, keepdim=True) > k
            hi = torch.where(too_many, mid, hi)
            lo = torch.where(too_many, lo, mid)
        b = (lo + hi) / 2
    lam = torch.sigmoid(s + b)
    slope = (lam * (1 - lam)).sum(-1, keepdim=True).clamp_min(1e-6)  # d sum / d b
    b = b + (k - lam.sum(-1, keepdim=True)) / slope.detach()  # Newton step: grad of b wrt s
    return torch.sigmoid(s + b).to(scores.dtype)


class SoftTopK(nn.Module):
    """The training mask m = lambda * TopK(lambda) (hard 0/1 top-k, no grad, times lambda).

    forward(scores [..., F]) -> m [..., F]; channels outside the top k are exactly 0, the kept
    ones carry lambda so the loss reaches the scores. `hard(scores)` is the inference mask.
    straight_through=True: the forward value is the hard 0/1 mask (what inference runs), the
    gradient the same as lambda * TopK(lambda)'s.
    """

    def __init__(self, k: int, tau: float = 1.0, straight_through: bool = False):
        super().__init__()
        self.k, self.tau, self.straight_through = k, tau, straight_through

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        lam = soft_top_k(scores, self.k, self.tau)
        hard = hard_top_k(lam, self.k)
        if self.straight_through:
            return hard + hard * (lam - lam.detach())  # value exactly hard
        return lam * hard

    def hard(self, scores: torch.Tensor) -> torch.Tensor:
        return hard_top_k(scores, self.k)


def hard_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the k highest scores over the last axis (ties: lower id, as selectors.top_k)."""
    order = torch.sort(-scores.detach().float(), dim=-1, stable=True).indices[..., :k]
    return torch.zeros_like(scores).scatter_(-1, order, 1.0)


# ----------------------------------------------------------------------------------------------
# Masked SwiGLU FFN for Hugging Face Llama / Qwen2 / Mistral
#
# Their MLP is down_proj(act(gate_proj(x)) * up_proj(x)). A forward pre-hook on down_proj
# multiplies its input (the [B, T, F] intermediate activation) by the layer's mask, so the
# model's own code runs unchanged, generate() and the KV cache included.


def _ffn_layers(llm: nn.Module) -> list[nn.Module]:
    """The MLP of every decoder layer of a transformers causal LM (or its base model)."""
    base = getattr(llm, "model", llm)
    return [layer.mlp for layer in base.layers]


def _mask_hook(mlp: nn.Module, args: tuple) -> tuple | None:
    mask = mlp._ifp_mask
    if mask is None:
        return None
    (h,) = args  # [B, T, F]
    if mask.dim() == 2:  # [B, F] -> [B, 1, F]: one mask per sequence, every position
        mask = mask[:, None, :]
    return (h * mask.to(h.dtype),)  # mask [F], [B, 1, F] or [B, T, F] (per-position, training)


def set_ffn_mask(llm: nn.Module, masks: torch.Tensor | None) -> None:
    """Install per-channel FFN masks on every layer of a HF Llama/Qwen2/Mistral causal LM.

    Args:
        llm: a transformers causal LM (LlamaForCausalLM, Qwen2ForCausalLM, ...).
        masks: [L, F] (one mask for the batch), [B, L, F] (one per sequence), [B, L, T, F]
            (one per position, used for chunked training) or None (dense). Values multiply
            the intermediate activation: 0/1 at inference, lambda * TopK(lambda) in training.
    """
    mlps = _ffn_layers(llm)
    if masks is not None:
        layer_axis = 0 if masks.dim() == 2 else 1
        if masks.shape[layer_axis] != len(mlps):
            raise ValueError(f"masks have {masks.shape[layer_axis]} layers, model has {len(mlps)}")
    for layer, mlp in enumerate(mlps):
        if not hasattr(mlp, "_ifp_mask"):
            mlp.down_proj.register_forward_pre_hook(lambda mod, args, mlp=mlp: _mask_hook(mlp, args))
        mlp._ifp_mask = None if masks is None else masks.select(layer_axis, layer)


def indices_to_mask(indices: list[np.ndarray], d_ffn: int) -> torch.Tensor:
    """Per-layer kept channel ids -> 0/1 mask [L, F] (float32)."""
    mask = torch.zeros(len(indices), d_ffn)
    for layer, ids in enumerate(indices):
        mask[layer, torch.as_tensor(np.asarray(ids), dtype=torch.long)] = 1.0
    return mask


def mask_to_indices(mask: torch.Tensor) -> list[np.ndarray]:
    """0/1 mask [L, F] -> per-layer sorted np.int64 ids of the kept channels."""
    return [np.flatnonzero(row.detach().cpu().numpy() > 0).astype(np.int64) for row in mask]


# ----------------------------------------------------------------------------------------------
# The sparsity predictor
#
# A small causal LM reads the prompt; its last layer's hidden state (after the final norm) at
# the last real token goes through a 2-layer head (no activation between, as the public code):
# d_pred -> 128 -> L * F, reshaped layer-major to [L, F]. The attribute names give the state
# dict keys of the public IFPruning code: feature_extractor.model.*, feature_extractor.lm_head.
# weight, prediction_head1.{weight,bias}, prediction_head2.{weight,bias}.


class SparsityPredictor(nn.Module):
    """Scores every FFN channel of every layer of the LLM from a prompt.

    Args:
        feature_extractor: a transformers causal LM backbone (LlamaForCausalLM, Qwen2ForCausalLM).
        n_layers: L, layers of the pruned LLM.
        d_ffn: F, FFN channels per layer of the pruned LLM.
        d_head: width of the head's bottleneck (128 in the public code).
    """

    def __init__(self, feature_extractor: nn.Module, n_layers: int, d_ffn: int, d_head: int = 128):
        super().__init__()
        self.n_layers, self.d_ffn = n_layers, d_ffn
        d_pred = feature_extractor.config.hidden_size
        self.feature_extractor = feature_extractor
        self.prediction_head1 = nn.Linear(d_pred, d_head)
        self.prediction_head2 = nn.Linear(d_head, n_layers * d_ffn)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last-layer hidden state after the final norm at the last real token: [B, d_pred].

        Padding must be on the right. Equals output_hidden_states=True -> hidden_states[-1].
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.feature_extractor.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.long().sum(-1) - 1  # [B] index of the last real token
        return h[torch.arange(h.shape[0]), last]  # [B, d_pred]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (right-padded) -> scores [B, L, F]."""
        z = self.prediction_head2(self.prediction_head1(self.pooled(input_ids, attention_mask)))
        return z.view(-1, self.n_layers, self.d_ffn)  # layer-major: z[l * F + j] is (l, j)


def predictor_input(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictor's input convention (same as the MLX runtime): the raw prompt text, no chat
    template, `tokenizer(prompt)["input_ids"]` with the tokenizer's default special tokens,
    right-padded with 0 -> (input_ids [B, T], attention_mask [B, T])."""
    return right_pad([tokenizer(p)["input_ids"] for p in prompts])


def right_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids [B, T] right-padded with 0, attention_mask [B, T])."""
    T = max(len(x) for x in seqs)
    input_ids = torch.zeros(len(seqs), T, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, x in enumerate(seqs):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention_mask[i, : len(x)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def predict_scores(predictor: SparsityPredictor, tokenizer, prompts: list[str]) -> np.ndarray:
    """Channel scores for a batch of raw prompts: float32 [B, L, F]."""
    input_ids, attention_mask = predictor_input(tokenizer, prompts)
    return predictor(input_ids, attention_mask).float().cpu().numpy()


def select_channels(predictor: SparsityPredictor, tokenizer, prompt: str, density: float,
                    pad_multiple: int = PAD_MULTIPLE) -> list[np.ndarray]:
    """The FFN channels the pruned LLM keeps for `prompt`: per layer, sorted np.int64 ids.

    k = kept_count(density, F, pad_multiple) channels in every layer, the k highest scores
    (ties broken by lower id), exactly as ifprune_mlx.selectors does on the MLX side.
    """
    scores = predict_scores(predictor, tokenizer, [prompt])[0]  # [L, F]
    return top_k(scores, kept_count(density, predictor.d_ffn, pad_multiple))


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; labels [B, T] with -100 where no loss is taken."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
