"""The converter (converters/): PyTorch IFPruning checkpoints -> MLX bundles, checked against the
PyTorch reference (converters/reference.py): same logits (dense and pruned), same channels."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import checkpoints as ck  # noqa: E402
import ifprune_mlx  # noqa: E402
from converters.layouts import detect  # noqa: E402
from converters.readers import open_checkpoint  # noqa: E402
from converters.reference import indices_to_mask, select_channels, set_ffn_mask  # noqa: E402
from converters.verify import verify  # noqa: E402
from converters.write import convert  # noqa: E402
from ifprune_mlx import testing  # noqa: E402
from ifprune_mlx.errors import ConversionError  # noqa: E402

PROMPTS = ["Write a Python function that reverses a list.", "What is the sum of 12 and 30?"]
DENSITY = 0.33
ATOL = 1e-4


def parity(bundle, model, pred, density=DENSITY):
    """Max |logit diff| dense and pruned, and whether the selections are identical, over PROMPTS."""
    engine = ifprune_mlx.load(bundle)
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundle)
    dense = pruned = 0.0
    same = True
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = engine.prompt_tokens(prompt)
            set_ffn_mask(model, None)
            engine.apply(None)
            ref = model(torch.tensor([ids])).logits[0].numpy()
            dense = max(dense, float(np.abs(ref - np.array(engine.model(mx.array([ids])))[0]).max()))
            if pred is None:
                continue
            expected = select_channels(pred, tokenizer, prompt, density)
            selection = engine.select(prompt, density)
            same &= all(np.array_equal(a, b) for a, b in zip(expected, selection.indices))
            engine.apply(selection)
            set_ffn_mask(model, indices_to_mask(expected, engine.d_ffn))
            ref = model(torch.tensor([ids])).logits[0].numpy()
            pruned = max(pruned, float(np.abs(ref - np.array(engine.model(mx.array([ids])))[0]).max()))
    return dense, pruned, same


@pytest.fixture(scope="module")
def pred():
    return ck.predictor()


@pytest.fixture(scope="module")
def llama():
    return ck.llm("llama")


# -- the hf layout: every architecture, format and sharding -------------------------------------


@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 3)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_layout_matches_the_reference(tmp_path, pred, arch, fmt, shards):
    model = ck.llm(arch)
    src = ck.hf_folder(model, tmp_path / "llm", fmt, shards)
    pdir = ck.predictor_folder(pred, tmp_path / "predictor", fmt, shards, head_fmt="safetensors" if shards == 1 else "bin")
    source = detect(src, predictor=pdir)
    assert source.layout == "hf"
    convert(source, tmp_path / "out")
    dense, pruned, same = parity(tmp_path / "out", model, pred)
    assert dense <= ATOL and pruned <= ATOL, (dense, pruned)
    assert same


def test_qwen3_plain_model_matches(tmp_path):
    model = ck.llm("qwen3")
    source = detect(ck.hf_folder(model, tmp_path / "llm"))
    assert source.layout == "plain" and source.predictor is None
    convert(source, tmp_path / "out")
    dense, _, _ = parity(tmp_path / "out", model, None)
    assert dense <= ATOL
    engine = ifprune_mlx.load(tmp_path / "out")
    assert not engine.has_predictor
    responses = list(engine.stream_responses("hi", max_tokens=3, density=0.5))
    assert engine.applied.density < 1 and engine.applied.source == "activations"
    assert [r.token for r in responses] == testing.reference_tokens(engine, "hi", len(responses), dense_prefill=True)


def test_llm_and_predictor_subfolders_are_detected(tmp_path, llama, pred):
    ck.hf_folder(llama, tmp_path / "ckpt" / "llm")
    ck.predictor_folder(pred, tmp_path / "ckpt" / "predictor", defaults={"default_density": 0.5, "pad_multiple": 16})
    source = detect(tmp_path / "ckpt")
    assert source.layout == "hf" and source.defaults == {"default_density": 0.5, "pad_multiple": 16}
    summary = convert(source, tmp_path / "out")
    block = json.loads((tmp_path / "out" / "config.json").read_text())["ifpruning"]
    assert (block["default_density"], block["pad_multiple"], block["predictor"]) == (0.5, 16, "predictor")
    assert summary.predictor and summary.default_density == 0.5
    engine = ifprune_mlx.load(tmp_path / "out")
    assert engine.default_density == 0.5 and engine.pad_multiple == 16
    assert detect(tmp_path / "ckpt", layout="plain").predictor is None  # just the LLM


# -- the public code's key layout ----------------------------------------------------------------


@pytest.mark.parametrize("fmt,combined", [("safetensors", True), ("bin", True), ("safetensors", False)])
def test_public_layout_matches_the_reference(tmp_path, llama, pred, fmt, combined):
    paths = ck.public_checkpoint(llama, pred, tmp_path, fmt, combined)
    keys = set(open_checkpoint(paths["src"]))
    if combined:
        assert "sparsity_predictor.feature_extractor.model.embed_tokens.weight" in keys
        assert "sparsity_predictor.prediction_head2.bias" in keys and "llm.lm_head.weight" in keys
    source = detect(paths["src"], predictor=paths["predictor"], config=paths["config"],
                    predictor_config=paths["predictor_config"])
    assert source.layout == "public"
    convert(source, tmp_path / "out")
    dense, pruned, same = parity(tmp_path / "out", llama, pred)
    assert dense <= ATOL and pruned <= ATOL, (dense, pruned)
    assert same


def test_public_layout_needs_its_configs(tmp_path, llama, pred):
    paths = ck.public_checkpoint(llama, pred, tmp_path)
    with pytest.raises(ConversionError, match="--config"):
        detect(paths["src"])
    with pytest.raises(ConversionError, match="--predictor-config"):
        detect(paths["src"], config=paths["config"])


def test_plain_layout_drops_a_combined_predictor(tmp_path, llama, pred):
    paths = ck.public_checkpoint(llama, pred, tmp_path)
    source = detect(paths["src"], config=paths["config"], layout="plain")
    assert source.predictor is None and "model.embed_tokens.weight" in source.llm


# -- bundle contents, dtypes, quantization -------------------------------------------------------


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory, llama, pred):
    root = tmp_path_factory.mktemp("hf")
    return ck.hf_folder(llama, root / "llm"), ck.predictor_folder(pred, root / "predictor")


def test_bundle_holds_rows_and_renamed_head(tmp_path, hf_src):
    src, pdir = hf_src
    convert(detect(src, predictor=pdir), tmp_path / "out")
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    original = open_checkpoint(src)
    down = "model.layers.1.mlp.down_proj.weight"
    assert weights[down].shape == (ck.FFN, ck.HIDDEN)
    assert mx.array_equal(weights[down], original[down].load().T)
    head = mx.load(str(tmp_path / "out" / "predictor" / "head.safetensors"))
    assert sorted(head) == ["head1.bias", "head1.weight", "head2.bias", "head2.weight"]
    assert head["head2.weight"].shape == (ck.LAYERS * ck.FFN, 128)
    backbone = mx.load(str(tmp_path / "out" / "predictor" / "model.safetensors"))
    assert "model.embed_tokens.weight" in backbone and "lm_head.weight" not in backbone  # tied
    assert not (tmp_path / "out" / "predictor" / "tokenizer.json").exists()  # shares the LLM's
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_transformers5_rope_parameters_reach_mlx_lm(tmp_path, pred):
    model = ck.llm("qwen2")
    assert "rope_theta" not in json.loads(model.config.to_json_string())  # nested in rope_parameters
    source = detect(ck.hf_folder(model, tmp_path / "llm"))
    assert source.config["rope_theta"] == 5e4 and "rope_parameters" not in source.config
    assert source.config["tie_word_embeddings"] is False


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype(tmp_path, hf_src, dtype):
    src, pdir = hf_src
    summary = convert(detect(src, predictor=pdir), tmp_path / "out", dtype=dtype)
    assert summary.dtype == dtype
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert {str(v.dtype) for v in weights.values()} == {f"mlx.core.{dtype}"}
    engine = ifprune_mlx.load(tmp_path / "out")
    assert len(engine.select(PROMPTS[0]).indices) == ck.LAYERS


def test_default_dtype_is_the_sources(tmp_path):
    src = ck.hf_folder(ck.llm("llama").to(torch.bfloat16), tmp_path / "llm")
    assert convert(detect(src), tmp_path / "out").dtype == "bfloat16"


@pytest.fixture(scope="module")
def float_and_quantized(tmp_path_factory, hf_src):
    root = tmp_path_factory.mktemp("q")
    src, pdir = hf_src
    source = detect(src, predictor=pdir)
    convert(source, root / "f32")
    for bits in (4, 8):
        convert(source, root / f"q{bits}", bits=bits, group_size=32)
    return root


# Measured on this test's random model (weights ~N(0, 0.1), logits up to ~3.4), dense and at
# density 0.33, group size 32: max |diff| / max |logit| = 0.029 (8-bit), 0.40 (4-bit).
Q_TOLERANCE = {8: 0.05, 4: 0.6}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_logits_stay_close_to_float(float_and_quantized, bits):
    root = float_and_quantized
    ref, q = ifprune_mlx.load(root / "f32"), ifprune_mlx.load(root / f"q{bits}")
    assert q.config["quantization"] == {"group_size": 32, "bits": bits}
    assert q.weight_bytes() < ref.weight_bytes() * (0.35 if bits == 8 else 0.2)
    for prompt in PROMPTS:
        ids = mx.array([ref.prompt_tokens(prompt)])
        for selection in (None, ref.select(prompt, DENSITY)):
            ref.apply(selection)
            q.apply(selection)
            logits = ref.model(ids)
            diff = float(mx.abs(logits - q.model(ids)).max())
            assert diff <= Q_TOLERANCE[bits] * float(mx.abs(logits).max()), diff


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bundle_computes_its_dequantized_weights(tmp_path, float_and_quantized, bits):
    """All the difference to float is quantization noise: rows, scales and biases line up."""
    root = float_and_quantized
    shutil.copytree(root / "f32", tmp_path / "deq")
    packed = mx.load(str(root / f"q{bits}" / "model.safetensors"))
    weights = {}
    for name, value in packed.items():
        base = name.removesuffix(".weight")
        if f"{base}.scales" in packed and name.endswith(".weight"):
            value = mx.dequantize(value, packed[f"{base}.scales"], packed[f"{base}.biases"], group_size=32, bits=bits)
        if not name.endswith((".scales", ".biases")):
            weights[name] = value
    mx.save_safetensors(str(tmp_path / "deq" / "model.safetensors"), weights, metadata={"format": "mlx"})
    deq, q = ifprune_mlx.load(tmp_path / "deq"), ifprune_mlx.load(root / f"q{bits}")
    ids = mx.array([deq.prompt_tokens(PROMPTS[0])])
    selection = deq.select(PROMPTS[0], DENSITY)
    deq.apply(selection)
    q.apply(selection)
    assert float(mx.abs(deq.model(ids) - q.model(ids)).max()) <= ATOL


def test_8bit_greedy_tokens_equal_float(float_and_quantized):
    root = float_and_quantized
    ref, q = ifprune_mlx.load(root / "f32"), ifprune_mlx.load(root / "q8")
    for engine in (ref, q):
        engine.apply(None)
    a = [r.token for r in ref.stream_responses(PROMPTS[0], max_tokens=8)]
    b = [r.token for r in q.stream_responses(PROMPTS[0], max_tokens=8)]
    assert a == b


def test_quantize_rejects_a_group_size_that_does_not_divide_rows(tmp_path, hf_src):
    src, pdir = hf_src
    with pytest.raises(ConversionError, match="group-size 128"):
        convert(detect(src, predictor=pdir), tmp_path / "out", bits=4, group_size=128)
    assert not (tmp_path / "out").exists()


# -- verify ---------------------------------------------------------------------------------------


def test_verify_reports_parity(tmp_path, hf_src):
    src, pdir = hf_src
    source = detect(src, predictor=pdir)
    convert(source, tmp_path / "out")
    report = verify(tmp_path / "out", source)
    assert report.passed, report.lines()
    assert report.dense_max_diff <= ATOL and report.pruned_max_diff <= ATOL
    assert report.selections_identical == report.prompts and report.mean_overlap == 1.0


def test_verify_catches_a_config_the_runtime_reads_differently(tmp_path, hf_src):
    src, pdir = hf_src
    source = detect(src, predictor=pdir)
    convert(source, tmp_path / "out")
    path = tmp_path / "out" / "config.json"
    config = json.loads(path.read_text())
    config["rope_theta"] = 10000.0  # what mlx-lm would use if rope_parameters were not unpacked
    path.write_text(json.dumps(config))
    report = verify(tmp_path / "out", source)
    assert report.worst_weight_ratio == 0.0  # the weights are right ...
    assert not report.passed and report.dense_max_diff > 0.01  # ... the model is not


@pytest.mark.parametrize("dtype,bits", [("bfloat16", None), ("float16", None), ("float32", 8), ("float32", 4)])
def test_verify_checks_rounded_and_quantized_bundles_tightly(tmp_path, hf_src, dtype, bits):
    src, pdir = hf_src
    source = detect(src, predictor=pdir)
    convert(source, tmp_path / "out", dtype=dtype, bits=bits, group_size=32)
    report = verify(tmp_path / "out", source)
    assert report.passed, report.lines()
    assert 0 < report.worst_weight_ratio <= 1
    if bits:  # against the reference holding the same (dequantized) weights: float32 rounding only
        assert report.dense_max_diff <= ATOL and report.pruned_max_diff <= ATOL
        assert report.source_max_diff > 10 * ATOL  # the quantization noise, reported apart


def test_verify_fails_on_a_wrong_conversion(tmp_path, hf_src):
    src, pdir = hf_src
    source = detect(src, predictor=pdir)
    convert(source, tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    weights = dict(mx.load(str(path)))
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = weights[name][::-1]  # channels mislabeled: dense is unchanged only if rows move together
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"] * 1.01
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    report = verify(tmp_path / "out", source)
    assert not report.passed and "FAILED" in report.lines()[0]


# -- bad inputs (API level; the CLI's are in test_convert_cli.py) ---------------------------------


def test_wrong_shapes_name_the_tensor(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"mlp.*has shape .* config implies"):
        detect(src)


def test_head_for_another_llm_is_refused(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm")
    pdir = ck.predictor_folder(ck.predictor(d_ffn=128), tmp_path / "predictor")
    with pytest.raises(ConversionError, match="prediction_head2.weight has shape"):
        detect(src, predictor=pdir)


def test_ctrl_c_mid_conversion_leaves_nothing(tmp_path, hf_src):
    src, pdir = hf_src
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(detect(src, predictor=pdir), tmp_path / "out", on_progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_reads_what_its_index_lists(tmp_path, llama):
    src = ck.hf_folder(llama, tmp_path / "llm", "safetensors", shards=2)
    (src / "consolidated.safetensors").write_bytes(b"not read")  # as Mistral's repos ship it
    torch.save({"step": 3}, src / "optimizer.pt")
    assert len(detect(src).llm) == 21
    (src / "model.safetensors.index.json").unlink()  # no index: every .safetensors is weights
    with pytest.raises(ConversionError, match="consolidated.safetensors"):
        detect(src)


def test_a_failed_check_keeps_the_previous_out(tmp_path, hf_src):
    src, pdir = hf_src
    source = detect(src, predictor=pdir)
    convert(source, tmp_path / "out", dtype="float16")

    def reject(folder):
        assert (folder / "model.safetensors").is_file() and folder.name.startswith(".out.partial-")
        raise ConversionError("verification failed")

    with pytest.raises(ConversionError, match="verification failed"):
        convert(source, tmp_path / "out", force=True, check=reject)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["ifpruning"]
    assert mx.load(str(tmp_path / "out" / "model.safetensors"))["model.norm.weight"].dtype == mx.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
