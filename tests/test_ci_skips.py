"""tests/ci_skips.py: a skip fails the run in CI and only there."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci, failed", [("true", True), ("", False)])
def test_a_skip_fails_the_run_in_ci_only(tmp_path, ci, failed):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "missing = pytest.importorskip('a_module_that_is_not_installed')\n"
        "def test_never():\n    pass\n")
    (tmp_path / "test_y.py").write_text("def test_passes():\n    pass\n")
    env = dict(os.environ, CI=ci, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ci_skips", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode != 0) == failed, result.stdout + result.stderr
    assert ("skipped in CI" in result.stdout) == failed
    if failed:
        assert "a_module_that_is_not_installed" in result.stdout
