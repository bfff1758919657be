"""The demo trainer (examples/train_tiny): a few steps at tiny sizes write a checkpoint in the
layout the converter reads, and it loads back in transformers and in the reference."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from converters.reference import SparsityPredictor, predict_scores, select_channels  # noqa: E402
from examples.train_tiny import data  # noqa: E402
from examples.train_tiny.train import Config, encode_sft, load_checkpoint, train  # noqa: E402
from ifprune_mlx.selectors import kept_count  # noqa: E402

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_ffn=96, d_pred=16, pred_layers=1, pred_heads=2,
            pred_ffn=32, vocab_size=300, steps1=2, steps2=3, batch1=4, batch2=4, chunk=8, n_chunks=3,
            warmup=2, eval_every=0)
MLX_SKILLS = ("reverse", "sort", "upper", "copy", "count", "last", "max")  # exact on these prompts
SHIPPED = Path(__file__).parents[1] / "examples" / "train_tiny" / "checkpoint"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "checkpoint"
    train(Config(**TINY), out, log=lambda *a: None)
    return out


def test_skills_are_many_and_phrased_several_ways():
    assert len(data.SKILLS) >= 8
    assert all(len(s.phrasings) >= 3 for s in data.SKILLS)
    rng = random.Random(0)
    for skill in data.SKILLS:
        for split in ("train", "test"):
            ex = data.sample(rng, split, skill)
            assert ex.prompt.startswith(ex.instruction) and ex.answer


def test_held_out_prompts_never_appear_in_training():
    rng = random.Random(0)
    train_prompts = {(ex.skill, ex.input) for ex in (data.sample(rng) for _ in range(5000))}
    assert not train_prompts & {(ex.skill, ex.input) for ex in data.test_set(30)}
    heldout = data.test_set(5, heldout_phrasing=True)
    assert all(ex.instruction == data.SKILLS[data.SKILL_NAMES.index(ex.skill)].phrasings[-1] for ex in heldout)


def test_knowledge_skills_share_their_keys_and_keep_held_out_inputs_apart():
    """The fact-table skill set (train.py --skills knowledge): every table asks the same names, so
    only the instruction says which fact; held-out inputs never appear in training."""
    data.use("knowledge")
    try:
        assert len(data.SKILLS) == 6 and data.SKILL_NAMES[0] == "capital"
        rng = random.Random(0)
        train_prompts = {(ex.skill, ex.input) for ex in (data.sample(rng) for _ in range(5000))}
        test = data.test_set(30)
        assert not train_prompts & {(ex.skill, ex.input) for ex in test}
        names = [{ex.input for ex in test if ex.skill == s and " " not in ex.input} for s in data.SKILL_NAMES]
        assert set.union(*names) <= {w for _, x in train_prompts for w in x.split()}
    finally:
        data.use("default")
    assert data.SKILL_NAMES[0] == "reverse"


def test_checkpoint_layout(ckpt):
    llm_dir, pred_dir = ckpt / "llm", ckpt / "predictor"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (llm_dir / name).exists(), name
    config = json.loads((llm_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    tc = json.loads((llm_dir / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in tc["chat_template"] and tc["eos_token"] == "<|end|>"
    assert json.loads((llm_dir / "generation_config.json").read_text())["eos_token_id"] is not None

    assert (pred_dir / "config.json").exists() and (pred_dir / "model.safetensors").exists()
    backbone = safetensors_torch.load_file(pred_dir / "model.safetensors")
    assert all(k.startswith("model.") or k == "lm_head.weight" for k in backbone)
    head = safetensors_torch.load_file(pred_dir / "head.safetensors")
    L, F, d_pred = TINY["n_layers"], TINY["d_ffn"], TINY["d_pred"]
    assert {k: tuple(v.shape) for k, v in head.items()} == {
        "prediction_head1.weight": (128, d_pred), "prediction_head1.bias": (128,),
        "prediction_head2.weight": (L * F, 128), "prediction_head2.bias": (L * F,)}
    meta = json.loads((pred_dir / "ifpruning.json").read_text())
    assert meta["pad_multiple"] == 32 and meta["pooling"] == "last"
    assert abs(meta["default_density"] - 1 / 3) < 0.01


def test_checkpoint_loads_in_transformers_with_a_working_chat_template(ckpt):
    tok = transformers.AutoTokenizer.from_pretrained(ckpt / "llm")
    llm = transformers.AutoModelForCausalLM.from_pretrained(ckpt / "llm")
    text = tok.apply_chat_template([{"role": "user", "content": "Sort the letters: b a"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>\nSort the letters: b a<|end|>\n<|assistant|>\n"
    ids = tok(text, return_tensors="pt")
    out = llm.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= ids["input_ids"].shape[1] + 1
    transformers.AutoModelForCausalLM.from_pretrained(ckpt / "predictor")


def test_sft_tokens_equal_tokenizing_the_chat_text(ckpt):
    _, _, tok, _ = load_checkpoint(ckpt)
    ex = data.sample(random.Random(3))
    prompt, answer = encode_sft(tok, ex)
    chat = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                                   tokenize=False)
    assert prompt + answer == tok(chat + ex.answer + tok.eos_token)["input_ids"]
    assert answer[-1] == tok.eos_token_id


def test_checkpoint_loads_in_the_reference_and_selects(ckpt):
    llm, predictor, tok, meta = load_checkpoint(ckpt)
    assert isinstance(predictor, SparsityPredictor)
    # the saved head is the one loaded: keys in the public layout, scores finite
    assert {"prediction_head1.weight", "feature_extractor.model.embed_tokens.weight"} <= set(predictor.state_dict())
    scores = predict_scores(predictor, tok, ["Reverse the letters: a b c"])
    assert scores.shape == (1, TINY["n_layers"], TINY["d_ffn"]) and np.isfinite(scores).all()
    ids = select_channels(predictor, tok, "Reverse the letters: a b c", meta["default_density"], meta["pad_multiple"])
    k = kept_count(meta["default_density"], TINY["d_ffn"], meta["pad_multiple"])
    assert [len(row) for row in ids] == [k] * TINY["n_layers"]


def test_mean_training_score_is_folded_into_the_head_bias(ckpt):
    """Training centers scores on the batch mean; the saved head has the mean subtracted, so
    plain inference (one prompt, no batch) ranks channels as training did."""
    _, predictor, tok, _ = load_checkpoint(ckpt)
    rng = random.Random(Config().seed + 1)  # the prompts train.fold_mean_score averaged over
    prompts = [data.sample(rng).prompt for _ in range(2048)]
    mean = np.mean([predict_scores(predictor, tok, prompts[i: i + 512]).sum(0) for i in range(0, 2048, 512)], 0) * 4 / 2048
    assert np.abs(mean).max() < 1e-4


def test_training_is_reproducible(ckpt, tmp_path):
    train(Config(**TINY), tmp_path / "again", log=lambda *a: None)
    for part in ("llm/model.safetensors", "predictor/model.safetensors", "predictor/head.safetensors"):
        a = safetensors_torch.load_file(ckpt / part)
        b = safetensors_torch.load_file(tmp_path / "again" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.skipif(not (SHIPPED / "llm").exists(), reason="shipped checkpoint not trained yet")
def test_shipped_checkpoint_answers_held_out_prompts_when_pruned():
    from examples.train_tiny.evaluate import accuracy, distinct, hits, masks_for

    llm, predictor, tok, meta = load_checkpoint(SHIPPED)
    test = distinct(data.test_set(3, seed=11))
    scores = predict_scores(predictor, tok, [ex.prompt for ex in test])
    d_ffn, n_layers = llm.config.intermediate_size, llm.config.num_hidden_layers
    k = kept_count(meta["default_density"], d_ffn, meta["pad_multiple"])
    pruned = accuracy(hits(llm, tok, test, masks_for(scores, k, d_ffn)), test)["mean"]
    no_ffn = accuracy(hits(llm, tok, test, torch.zeros(n_layers, d_ffn)), test)["mean"]  # the prompt alone
    assert pruned >= no_ffn + 0.15, (pruned, no_ffn)


@pytest.mark.skipif(not (SHIPPED / "llm").exists(), reason="shipped checkpoint not trained yet")
def test_shipped_checkpoint_converts_and_answers_the_same_in_mlx(tmp_path):
    """The shipped model through `ifprune convert` and ifprune_mlx.load: same channels as the
    reference, and exact answers to held-out prompts of several skills at its default density."""
    pytest.importorskip("mlx.core")
    import ifprune_mlx as ifp
    from typer.testing import CliRunner

    from ifprune_mlx.cli import app

    result = CliRunner().invoke(app, ["convert", str(SHIPPED), str(tmp_path / "bundle"), "--no-calibrate"])
    assert result.exit_code == 0, result.output
    engine = ifp.load(tmp_path / "bundle")
    _, predictor, tok, meta = load_checkpoint(SHIPPED)
    examples = [ex for ex in data.test_set(2, seed=11) if ex.skill in MLX_SKILLS]
    for ex in examples:
        ref = select_channels(predictor, tok, ex.prompt, meta["default_density"], meta["pad_multiple"])
        sel = engine.select(ex.prompt)
        assert all(np.array_equal(a, b) for a, b in zip(ref, sel.indices)), ex.prompt
        assert engine.generate(ex.prompt, max_tokens=16).strip() == ex.answer, ex.prompt
