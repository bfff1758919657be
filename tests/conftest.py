"""Tiny models built here, never downloaded."""

import pytest

from ifprune_mlx import bundle, load, testing

pytest_plugins = ["ci_skips"]  # in CI (CI=true) a skipped test fails the run


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Conversions, calibrations and notes go to a folder of this run, not the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("IFPRUNE_CACHE", str(tmp_path_factory.mktemp("ifprune-cache")))
    mp.delenv("IFPRUNE_MODEL", raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def plain_dir(models_dir):
    """A plain mlx-lm llama folder (standard FFN layout), float32, random weights."""
    return testing.make_model_folder(models_dir / "plain")


@pytest.fixture(scope="session")
def bundle_dir(models_dir):
    """A float32 bundle with a random predictor."""
    return testing.make_bundle(models_dir / "bundle")


@pytest.fixture(scope="session")
def q4_bundle_dir(models_dir):
    """A 4-bit bundle with a random predictor."""
    return testing.make_bundle(models_dir / "bundle-q4", quantize_bits=4)


@pytest.fixture(scope="session")
def endless_bundle(models_dir):
    """A bundle whose greedy answers never end early: the end token's lm_head row is zero,
    so its logit (0) is below the largest of 319 random logits."""
    folder = testing.make_bundle(models_dir / "endless-bundle")
    files = bundle.weight_files(folder)
    weights = bundle.read_safetensors(files)
    eos = load(folder).tokenizer.eos_token_id
    weights["lm_head.weight"][eos] = 0.0
    bundle.save_safetensors(files[0], weights)
    return folder
