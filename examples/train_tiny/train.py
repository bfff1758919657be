"""Train the tiny IFPruning demo model (a Llama LLM + a smaller sparsity predictor) on CPU.

    python -m examples.train_tiny.train --out examples/train_tiny/checkpoint            # shipped
    python -m examples.train_tiny.train --narrow --out examples/train_tiny/runs/narrow   # baseline

Two stages, as in the paper, on the synthetic skills of data.py:
  1. LM + predictor on skill text in chunks: the mask predicted from chunk c is used for chunk
     c+1 (chunk 0 runs dense), so the predictor learns to read text and pick channels for what
     comes next.
  2. SFT: the predictor reads the raw user prompt, the LLM runs the chat-formatted prompt +
     answer with that mask; loss on the answer. A quarter of the rows run dense, so the
     unpruned model stays a usable "dense" reference.
The mask in training is m = lambda * TopK(lambda) (converters.reference.SoftTopK), k channels
per layer (k = kept_count(density, d_ffn, 32)); at inference it is the hard top-k.
--narrow trains the baseline: a dense model whose FFN physically has k channels, same data,
same steps, no predictor.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from converters.reference import SoftTopK, SparsityPredictor, masked_lm_loss, predictor_input, set_ffn_mask
from ifprune_mlx.selectors import kept_count, top_k

from . import data

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]


@dataclass
class Config:
    seed: int = 0
    # LLM (Llama)
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    d_ffn: int = 768
    # predictor backbone (Llama, shares the tokenizer)
    d_pred: int = 128
    pred_layers: int = 2
    pred_heads: int = 4
    pred_ffn: int = 384
    vocab_size: int = 512
    # method
    density: float = 1 / 3
    pad_multiple: int = 32
    tau: float = 0.5  # SoftTopK temperature
    dense_frac: float = 0.25  # stage-2 rows trained dense
    center_scores: int = 1  # load balancing: scores minus their batch mean (see centered())
    # training
    steps1: int = 300
    steps2: int = 1200
    batch1: int = 32
    batch2: int = 64
    chunk: int = 16
    n_chunks: int = 4
    lr: float = 2e-3
    warmup: int = 50
    narrow: bool = False  # baseline: dense, d_ffn = k, no predictor
    threads: int = 1
    eval_every: int = 250  # log held-out exact match every this many steps (0: never)
    skills: str = "default"  # data.SKILLSETS: "default" (ten skills) or "knowledge" (six fact tables)

    @property
    def k(self) -> int:
        return kept_count(self.density, self.d_ffn, self.pad_multiple)


# ---------------------------------------------------------------------------------------------
# tokenizer and models


def build_tokenizer(cfg: Config) -> PreTrainedTokenizerFast:
    """Byte-level BPE (digits split one by one) trained on the skills' text, with the chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(data.corpus(20000, seed=cfg.seed), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=256)


def build_models(cfg: Config, tokenizer) -> tuple[LlamaForCausalLM, SparsityPredictor | None]:
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=256, rms_norm_eps=1e-5,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    llm = LlamaForCausalLM(LlamaConfig(
        hidden_size=cfg.d_model, intermediate_size=cfg.k if cfg.narrow else cfg.d_ffn,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        tie_word_embeddings=False, **common))
    if cfg.narrow:
        return llm, None
    backbone = LlamaForCausalLM(LlamaConfig(
        hidden_size=cfg.d_pred, intermediate_size=cfg.pred_ffn, num_hidden_layers=cfg.pred_layers,
        num_attention_heads=cfg.pred_heads, num_key_value_heads=cfg.pred_heads, tie_word_embeddings=True,
        **common))
    return llm, SparsityPredictor(backbone, cfg.n_layers, cfg.d_ffn)


def chat_prefix(tokenizer, prompt: str) -> str:
    """The text a chat UI feeds the LLM for one user turn, up to the answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def encode_sft(tokenizer, ex: data.Example) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + eos) of one example, chat-formatted."""
    prompt = tokenizer(chat_prefix(tokenizer, ex.prompt))["input_ids"]
    answer = tokenizer(ex.answer)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, answer


# ---------------------------------------------------------------------------------------------
# batches


def stage1_batch(cfg: Config, tokenizer, rng: random.Random) -> torch.Tensor:
    """[B, n_chunks * chunk] windows of a stream of chat-formatted skill examples."""
    T = cfg.chunk * cfg.n_chunks
    rows = []
    for _ in range(cfg.batch1):
        ids = []
        while len(ids) < T + rng.randrange(cfg.chunk * 2):
            p, a = encode_sft(tokenizer, data.sample(rng))
            ids += p + a + tokenizer("\n")["input_ids"]
        rows.append(ids[-T:])  # random offset: chunk borders fall anywhere in an example
    return torch.tensor(rows)


def sft_batch(tokenizer, examples: list[data.Example]):
    """Right-padded (input_ids, attention_mask, labels) with loss on answer + eos only."""
    pairs = [encode_sft(tokenizer, ex) for ex in examples]
    T = max(len(p) + len(a) for p, a in pairs)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(pairs), T), pad)
    attention_mask = torch.zeros(len(pairs), T, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100)
    for i, (p, a) in enumerate(pairs):
        n = len(p) + len(a)
        input_ids[i, :n] = torch.tensor(p + a)
        attention_mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(a)
    return input_ids, attention_mask, labels


# ---------------------------------------------------------------------------------------------
# the two stages' losses


def centered(cfg: Config, scores: torch.Tensor) -> torch.Tensor:
    """Scores [B, L, F] minus each channel's mean over the batch (if cfg.center_scores).

    Load balancing. Trained from scratch together, the LLM and the predictor otherwise settle on
    the easy solution: one fixed set of channels for every prompt (the head's bias decides,
    the prompt does not; our first run did exactly that). Centered, a channel is kept for a
    prompt only if the prompt scores it higher than prompts on average do, so the mask must
    come from what the prompt says. At save time the mean score over training prompts is
    folded into prediction_head2.bias, so inference needs no batch and no extra state.
    """
    return scores - scores.mean(0, keepdim=True) if cfg.center_scores else scores


def stage1_loss(cfg, llm, predictor, soft_topk, ids: torch.Tensor) -> torch.Tensor:
    """Chunked LM loss: chunk c+1 runs with the mask predicted from chunk c; chunk 0 dense."""
    B, T = ids.shape
    C, N, L, F = cfg.chunk, cfg.n_chunks, cfg.n_layers, cfg.d_ffn
    masks = None
    if predictor is not None:
        chunks = ids[:, : (N - 1) * C].reshape(B * (N - 1), C)  # chunks 0 .. N-2
        m = soft_topk(centered(cfg, predictor(chunks))).view(B, N - 1, L, F)  # mask for chunks 1 .. N-1
        m = torch.cat([torch.ones(B, 1, L, F), m], 1)  # [B, N, L, F], chunk 0 dense
        masks = m.permute(0, 2, 1, 3).repeat_interleave(C, dim=2)  # [B, L, T, F] per position
    set_ffn_mask(llm, masks)
    return masked_lm_loss(llm(ids).logits, ids)


def stage2_loss(cfg, llm, predictor, soft_topk, tokenizer, examples, dense_rows=None):
    """SFT loss on the answers, the FFN masked by the predictor's mask for the raw prompt."""
    input_ids, attention_mask, labels = sft_batch(tokenizer, examples)
    masks = None
    if predictor is not None:
        p_ids, p_mask = predictor_input(tokenizer, [ex.prompt for ex in examples])
        masks = soft_topk(centered(cfg, predictor(p_ids, p_mask)))  # [B, L, F]
        if dense_rows is not None:
            masks = torch.where(dense_rows[:, None, None], torch.ones_like(masks), masks)
    set_ffn_mask(llm, masks)
    loss = masked_lm_loss(llm(input_ids, attention_mask=attention_mask).logits, labels)
    set_ffn_mask(llm, None)
    return loss


# ---------------------------------------------------------------------------------------------
# checkpoint (the layout the converter reads)


def save_checkpoint(out: Path, cfg: Config, llm, predictor, tokenizer) -> None:
    out = Path(out)
    set_ffn_mask(llm, None)
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    # the chat template also goes into tokenizer_config.json (some loaders only look there)
    tc_path = out / "llm" / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     do_sample=False).save_pretrained(out / "llm")
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    if predictor is None:
        return
    predictor.feature_extractor.save_pretrained(out / "predictor")
    head = {f"{name}.{p}": getattr(getattr(predictor, name), p).detach().contiguous()
            for name in ("prediction_head1", "prediction_head2") for p in ("weight", "bias")}
    save_file(head, out / "predictor" / "head.safetensors")
    meta = {"default_density": cfg.density, "pad_multiple": cfg.pad_multiple, "pooling": "last"}
    (out / "predictor" / "ifpruning.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(path: Path):
    """(llm, predictor or None, tokenizer, ifpruning meta or None), all in eval mode."""
    path = Path(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "llm")
    llm = LlamaForCausalLM.from_pretrained(path / "llm").eval()
    if not (path / "predictor").exists():
        return llm, None, tokenizer, None
    backbone = AutoModelForCausalLM.from_pretrained(path / "predictor")
    predictor = SparsityPredictor(backbone, llm.config.num_hidden_layers, llm.config.intermediate_size)
    head = load_file(path / "predictor" / "head.safetensors")
    predictor.load_state_dict({**predictor.state_dict(), **head})
    meta = json.loads((path / "predictor" / "ifpruning.json").read_text())
    return llm, predictor.eval(), tokenizer, meta


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def fold_mean_score(predictor, tokenizer, rng: random.Random, n: int = 2048) -> None:
    """prediction_head2.bias -= the mean score over n training prompts (see centered())."""
    prompts = [data.sample(rng).prompt for _ in range(n)]
    mean = sum(predictor(*predictor_input(tokenizer, prompts[i: i + 256])).sum(0)
               for i in range(0, n, 256)) / n  # [L, F]
    predictor.prediction_head2.bias -= mean.flatten()


def _quick_eval(cfg, llm, predictor, tokenizer) -> str:
    """Mean held-out exact match, dense and (if any) with the predictor's hard masks."""
    from .evaluate import accuracy, distinct, hits, jaccard, masks_for  # evaluate imports this module
    from converters.reference import predict_scores

    llm.eval()
    test = distinct(data.test_set(10, seed=7))
    out = f"dense {accuracy(hits(llm, tokenizer, test), test)['mean']:.3f}"
    if predictor is not None:
        predictor.eval()
        scores = predict_scores(predictor, tokenizer, [ex.prompt for ex in test])
        if cfg.center_scores:  # as centered() in training; fold_mean_score does it for good at the end
            scores = scores - scores.mean(0, keepdims=True)
        pruned = accuracy(hits(llm, tokenizer, test, masks_for(scores, cfg.k, cfg.d_ffn)), test)
        out += f"  pruned {pruned['mean']:.3f}"
        sel = [top_k(s, cfg.k) for s in scores]
        within = [jaccard(sel[i], sel[j]) for i in range(len(test)) for j in range(i) if test[i].skill == test[j].skill]
        across = [jaccard(sel[i], sel[j]) for i in range(len(test)) for j in range(i) if test[i].skill != test[j].skill]
        out += f"  mask Jaccard within skill {np.mean(within):.2f} across {np.mean(across):.2f}"
        predictor.train()
    return out


def train(cfg: Config, out: Path, log=print) -> None:
    torch.set_num_threads(cfg.threads)
    data.use(cfg.skills)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    t0 = time.time()
    tokenizer = build_tokenizer(cfg)
    llm, predictor = build_models(cfg, tokenizer)
    params = list(llm.parameters()) + (list(predictor.parameters()) if predictor else [])
    n_llm = sum(p.numel() for p in llm.parameters())
    n_pred = sum(p.numel() for p in predictor.parameters()) if predictor else 0
    log(f"vocab {len(tokenizer)}  llm {n_llm / 1e6:.2f}M  predictor {n_pred / 1e6:.2f}M  k={cfg.k}/{cfg.d_ffn}"
        f"{'  (narrow baseline)' if cfg.narrow else ''}")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    total = cfg.steps1 + cfg.steps2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / total))))
    soft_topk = SoftTopK(cfg.k, cfg.tau)
    llm.train()
    if predictor is not None:
        predictor.train()
    for step in range(total):
        if step < cfg.steps1:
            loss = stage1_loss(cfg, llm, predictor, soft_topk, stage1_batch(cfg, tokenizer, rng))
        else:
            examples = [data.sample(rng) for _ in range(cfg.batch2)]
            dense_rows = torch.tensor([rng.random() < cfg.dense_frac for _ in examples])
            loss = stage2_loss(cfg, llm, predictor, soft_topk, tokenizer, examples, dense_rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == total - 1:
            log(f"step {step:5d}  stage {1 if step < cfg.steps1 else 2}  loss {loss.item():.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s")
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step == total - 1):
            log(f"  held-out exact match (10/skill): {_quick_eval(cfg, llm, predictor, tokenizer)}")
            llm.train()
    llm.eval()
    if predictor is not None:
        predictor.eval()
        if cfg.center_scores:
            fold_mean_score(predictor, tokenizer, random.Random(cfg.seed + 1))
    save_checkpoint(out, cfg, llm, predictor, tokenizer)
    log(f"saved {out}  wall {time.time() - t0:.0f}s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("examples/train_tiny/checkpoint"))
    for f in fields(Config):
        if f.type == "bool":
            ap.add_argument(f"--{f.name}", action="store_true")
        else:
            ap.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type], default=f.default)
    args = vars(ap.parse_args(argv))
    out = args.pop("out")
    train(Config(**args), out)


if __name__ == "__main__":
    main()
