"""Tensor-parallel pruned FFN over mlx.distributed (ifprune_mlx/distributed.py).

The multi-process tests start 2 ranks on 127.0.0.1 (ring backend), each bounded in time:
through `mlx.launch --backend ring -n 2`, as users do, and directly (MLX_RANK, MLX_HOSTFILE:
what mlx.launch sets) where a test needs one rank to fail without the launcher stepping in.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import ifprune_mlx
from ifprune_mlx import testing
from ifprune_mlx.bundle import read_rows, read_safetensors, safetensors_header
from ifprune_mlx.distributed import Sharding, balanced_top_k, is_ffn_rows
from ifprune_mlx.errors import DistributedError
from ifprune_mlx.models import to_row_layout
from ifprune_mlx.selectors import top_k

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
LAUNCH = Path(sys.executable).with_name("mlx.launch")
TIMEOUT = 180  # seconds for a whole 2-rank run; a hang fails the test instead of the suite


class FakeGroup:
    """What Sharding reads of an mlx.distributed group, for rules that need no transport."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def free_port_pair() -> int:
    """A port p such that p and p + 1 were free on 127.0.0.1 a moment ago."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                    return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def launch(bundle: Path, out: Path, *args: str) -> list[dict]:
    """Run the worker under `mlx.launch --backend ring -n 2`; each rank's result."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(free_port_pair()),
           "--python", sys.executable, str(WORKER), str(bundle), str(out), *args]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
                         stdin=subprocess.DEVNULL)
    return _results(out, run.stdout + run.stderr)


def run_ranks(bundle: Path, out: Path, *args: str) -> tuple[list[dict], list[int]]:
    """Run the worker as 2 ranks started directly (no launcher); results and exit codes."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port_pair()
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(bundle), str(out), *args],
                              env=dict(_env(), MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return _results(out, "\n".join(logs), missing_ok=True), [p.returncode for p in procs]


def _results(out: Path, log: str, missing_ok: bool = False) -> list[dict]:
    results = []
    for rank in range(2):
        path = out / f"rank{rank}.json"
        if not path.is_file():
            if missing_ok:
                results.append({})
                continue
            raise AssertionError(f"rank {rank} wrote no result; output:\n{log[-3000:]}")
        results.append(json.loads(path.read_text()))
    return results


@pytest.fixture(scope="module")
def ffn_bundle(tmp_path_factory):
    """A float32 bundle whose FFN is most of its bytes (the memory test needs that)."""
    config = testing.model_config(hidden_size=128, intermediate_size=2048, num_hidden_layers=4)
    return testing.make_bundle(tmp_path_factory.mktemp("dist") / "bundle", config)


# -- rules, in one process ---------------------------------------------------------------


def test_shards_cover_the_channels_and_map_global_ids_to_rows():
    shards = [Sharding(FakeGroup(r, 3), 100, pad_multiple=8) for r in range(3)]
    assert [(s.start, s.stop) for s in shards] == [(0, 33), (33, 66), (66, 100)]
    ids = [np.array([0, 32, 33, 65, 99]), np.array([50])]
    assert [x.tolist() for x in shards[1].local(ids)] == [[0, 32], [17]]
    assert [x.tolist() for x in shards[2].local(ids)] == [[33], []]
    assert shards[0].kept_per_rank(ids).tolist() == [[2, 2, 1], [0, 1, 0]]


def test_too_small_to_shard_is_refused_in_one_line():
    with pytest.raises(DistributedError) as e:
        Sharding(FakeGroup(0, 16), 256, pad_multiple=32)
    assert "\n" not in str(e.value) and "16 ranks" in str(e.value) and "at most 8 ranks" in str(e.value)
    with pytest.raises(DistributedError):
        Sharding(FakeGroup(0, 2), 256, split="uneven")


def test_balanced_top_k_keeps_the_best_k_over_n_in_each_shard():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 96)).astype(np.float32)
    scores[:, :48] += 5  # the global top-k would take every channel from the first shard
    bounds = np.array([0, 48, 96])
    assert all(ids.max() < 48 for ids in top_k(scores, 32))
    for layer, ids in enumerate(balanced_top_k(scores, 32, bounds)):
        assert len(ids) == 32 and (np.diff(ids) > 0).all()
        assert (ids < 48).sum() == 16
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            mine = ids[(ids >= lo) & (ids < hi)]
            assert set(mine) == set(lo + np.argsort(-scores[layer, lo:hi], kind="stable")[:16])
    odd = balanced_top_k(scores, 33, np.array([0, 31, 96]))  # counts follow the widths, sum to k
    assert [((ids < 31).sum(), len(ids)) for ids in odd] == [(11, 33)] * 3


@pytest.mark.parametrize("dtype,bits", [("float32", None), ("bfloat16", None), ("float32", 4)])
def test_read_rows_reads_a_row_range_of_the_file(tmp_path, dtype, bits):
    folder = testing.make_bundle(tmp_path / "b", predictor=False, dtype=dtype, quantize_bits=bits)
    path = folder / "model.safetensors"
    header, whole = safetensors_header(path), mx.load(str(path))
    names = [n for n in header if n != "__metadata__" and is_ffn_rows(n)]
    assert any(n.endswith("down_proj.weight") for n in names)
    assert any(n.endswith(".scales") for n in names) == bool(bits)
    for name in names:
        rows = read_rows(path, header, name, 100, 200)
        assert rows.dtype == whole[name].dtype
        assert mx.array_equal(rows, whole[name][100:200]).item(), name


@pytest.fixture(scope="module")
def biased_models(tmp_path_factory):
    """A plain folder and a bundle of a model whose FFN has biases."""
    config = testing.model_config(mlp_bias=True)
    folder = tmp_path_factory.mktemp("biased")
    return config, testing.make_model_folder(folder / "plain", config), testing.make_bundle(
        folder / "bundle", config, predictor=False)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_gets_its_rows_from_a_bundle_or_a_plain_folder(biased_models, rank):
    config, plain, bundle_dir = biased_models
    sharding = Sharding(FakeGroup(rank, 2), config["intermediate_size"])
    files = [bundle_dir / "model.safetensors"]
    for whole, mine in [(read_safetensors(files), sharding.local_weights(read_safetensors(files), files)),
                        (to_row_layout(read_safetensors([plain / "model.safetensors"])),
                         sharding.local_weights(to_row_layout(read_safetensors([plain / "model.safetensors"]))))]:
        assert set(mine) == set(whole)
        for name, value in mine.items():
            if is_ffn_rows(name):
                expected = whole[name][sharding.start:sharding.stop]
            elif name.endswith("down_proj.bias"):  # added once, by rank 0, after the all_sum
                expected = whole[name] if rank == 0 else mx.zeros_like(whole[name])
            else:
                expected = whole[name]
            assert mx.array_equal(value, expected).item(), name


# -- 2 ranks ---------------------------------------------------------------------------------


def test_two_ranks_generate_what_one_process_does(ffn_bundle, tmp_path):
    ranks = launch(ffn_bundle, tmp_path / "out")
    assert [r.get("error") for r in ranks] == [None, None]
    one = ifprune_mlx.load(ffn_bundle)
    for key in ("dense", "pruned", "applied", "griffin", "griffin_applied"):
        assert ranks[0][key] == ranks[1][key], key
    rank = ranks[0]
    prompt = "Write a Python function that reverses a list."
    n = len(rank["dense"])
    one.apply(None)
    assert rank["dense"] == testing.reference_tokens(one, prompt, n)
    # the predictor's scores are rank 0's, the global top-k the single process's
    assert rank["applied"] == [ids.tolist() for ids in one.select(prompt, selector="predictor").indices]
    one.apply(rank["applied"])
    assert rank["pruned"] == testing.reference_tokens(one, prompt, n)
    one.apply(rank["griffin_applied"])  # the training-free selection, made from both ranks' channels
    assert rank["griffin"] == testing.reference_tokens(one, prompt, n, dense_prefill=True)
    kept = [len(ids) for ids in rank["griffin_applied"]]  # the last selection applied
    assert [a + b for a, b in zip(ranks[0]["kept"], ranks[1]["kept"])] == kept
    # each rank holds half the FFN, and never held more while loading
    params = dict(nn.utils.tree_flatten(one.model.parameters()))
    ffn = sum(v.nbytes for name, v in params.items() if is_ffn_rows(name))
    assert [r["ffn_bytes"] for r in ranks] == [ffn // 2] * 2
    other = one.weight_bytes() - ffn
    assert ffn > 4 * other  # so that the bound below says something
    for r in ranks:
        assert r["load_peak"] < other + 0.5 * ffn * 1.3, (r["load_peak"], ffn)


def test_a_rank_that_cannot_load_stops_the_others_with_a_clear_error(ffn_bundle, tmp_path):
    ranks, codes = run_ranks(ffn_bundle, tmp_path / "out", "--bad-rank", "1")
    assert codes == [2, 2]
    assert ranks[1]["error"].startswith("BundleError") and "no such model folder" in ranks[1]["error"]
    assert ranks[0]["error"].startswith("DistributedError: rank 1 could not load the model")


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(ffn_bundle, tmp_path):
    ranks, codes = run_ranks(ffn_bundle, tmp_path / "out", "--die-rank", "1")
    assert codes == [2, 3] and ranks[1] == {}
    assert ranks[0]["error"].startswith("DistributedError: lost the connection to another rank")


@pytest.mark.slow
def test_balanced_split_keeps_equal_counts_and_matches_one_process(ffn_bundle, tmp_path):
    ranks = launch(ffn_bundle, tmp_path / "out", "--split", "balanced")
    assert ranks[0]["applied"] == ranks[1]["applied"]
    assert ranks[0]["kept"] == ranks[1]["kept"]  # the same work on both ranks
    one = ifprune_mlx.load(ffn_bundle)
    one.apply(ranks[0]["applied"])
    prompt = "Write a Python function that reverses a list."
    assert ranks[0]["pruned"] == testing.reference_tokens(one, prompt, len(ranks[0]["pruned"]))


@pytest.mark.slow
def test_generate_under_mlx_launch_prints_once_what_one_process_prints(ffn_bundle, tmp_path):
    args = ["generate", str(ffn_bundle), "-p", "Sort these numbers: 5 3 9 1", "-m", "6", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "ifprune_mlx.cli", *args], env=_env(), capture_output=True,
                         text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert one.returncode == 0, one.stderr
    cmd = [str(LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(free_port_pair()), "--",
           sys.executable, "-m", "ifprune_mlx.cli", *args]
    two = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
                         stdin=subprocess.DEVNULL)
    assert two.stdout.strip() and two.stdout.strip() == one.stdout.strip(), two.stderr


@pytest.mark.slow
def test_a_quantized_bundle_shards_too(tmp_path):
    config = testing.model_config(hidden_size=128, intermediate_size=1024, num_hidden_layers=2)
    bundle_dir = testing.make_bundle(tmp_path / "q4", config, quantize_bits=4)
    ranks = launch(bundle_dir, tmp_path / "out", "--tokens", "8")
    assert ranks[0]["applied"] == ranks[1]["applied"]
    one = ifprune_mlx.load(bundle_dir)
    prompt = "Write a Python function that reverses a list."
    one.apply(None)
    assert ranks[0]["dense"] == testing.reference_tokens(one, prompt, 8)
    one.apply(ranks[0]["applied"])
    assert ranks[0]["pruned"] == testing.reference_tokens(one, prompt, 8)
