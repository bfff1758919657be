"""The import layers of pyproject.toml ([tool.importlinter]) hold, and `import ifprune_mlx` stays light."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    if not Path(LINT_IMPORTS).is_file():
        pytest.fail("lint-imports is missing: pip install -e '.[dev]' (import-linter)")
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_import_contracts_are_kept():
    run = _lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout and "3 kept" in run.stdout


LAYERS = "apps above converters above the runtime core"
FRAMEWORKS = "the runtime core and the converters use no command-line or web framework"


@pytest.mark.parametrize("module, line, broken", [
    ("converters/write.py", "from ifprune_mlx.resolve import resolve", LAYERS),  # the converters use an app
    ("ifprune_mlx/engine.py", "from converters.layouts import detect", LAYERS),  # the runtime uses the converters
    ("ifprune_mlx/selectors.py", "from .engine import load", LAYERS),            # a core layer imports upwards
    ("ifprune_mlx/bundle.py", "import typer", FRAMEWORKS),                       # a framework below the apps
])
def test_an_import_against_the_layers_breaks_a_contract(tmp_path, module, line, broken):
    for package in ("ifprune_mlx", "converters"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("pretrained", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}\n")
    run = _lint_imports(tmp_path)
    assert run.returncode == 1 and f"{broken} BROKEN" in run.stdout, run.stdout + run.stderr


def test_importing_the_package_loads_neither_generation_code_nor_the_converters():
    code = ("import sys, ifprune_mlx; heavy = [m for m in ('mlx_lm', 'mlx_lm.generate', 'converters', "
            "'ifprune_mlx.engine', 'ifprune_mlx.opener') if m in sys.modules]; print(heavy)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_lazy_names_are_the_modules_own():
    import ifprune_mlx
    from ifprune_mlx import chat, engine, opener, selectors

    assert ifprune_mlx.load is engine.load and ifprune_mlx.Engine is engine.Engine
    assert ifprune_mlx.open_model is opener.open_model and ifprune_mlx.ChatSession is chat.ChatSession
    assert ifprune_mlx.kept_count is selectors.kept_count
    assert set(ifprune_mlx.__all__) <= set(dir(ifprune_mlx))
    with pytest.raises(AttributeError, match="no_such_name"):
        ifprune_mlx.no_such_name


# -- the diagram in docs/ARCHITECTURE.md is drawn from the contract --------------------------

ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
BEGIN = "<!-- layers: drawn from pyproject.toml by `python tests/test_layers.py --write`; do not edit -->"
END = "<!-- /layers -->"


def _contract_layers() -> list[list[str]]:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [[m.strip() for m in layer.split("|")] for layer in layers]


def _file(module: str) -> str:
    """ifprune_mlx.chat -> chat.py, ifprune_mlx.bench -> bench/, converters -> converters/."""
    path = ROOT / module.replace(".", "/")
    shown = module.removeprefix("ifprune_mlx.")
    return f"{shown}/" if path.is_dir() else f"{shown}.py"


def layers_diagram() -> str:
    """The contract's layers, top to bottom: a module imports only from lines below its own;
    modules on one line do not import each other."""
    lines = [" " + " | ".join(_file(m) for m in layer) for layer in _contract_layers()]
    return "\n".join([BEGIN, "```", "top: the apps", *lines, "bottom: the format and its errors", "```", END])


def test_the_architecture_page_draws_the_contract():
    text = ARCHITECTURE.read_text()
    assert BEGIN in text and END in text
    drawn = text[text.index(BEGIN):text.index(END) + len(END)]
    assert drawn == layers_diagram(), "run `python tests/test_layers.py --write`"


def test_every_module_is_in_a_layer_and_in_the_module_table():
    """A new module must take a place in the contract (else nothing checks its imports) and
    a row in ARCHITECTURE.md's module table."""
    placed = {m for layer in _contract_layers() for m in layer}
    modules = {f"ifprune_mlx.{p.stem}" for p in (ROOT / "ifprune_mlx").glob("*.py") if p.stem != "__init__"}
    modules |= {f"ifprune_mlx.{p.name}" for p in (ROOT / "ifprune_mlx").iterdir() if (p / "__init__.py").is_file()}
    assert modules | {"converters"} == placed
    table = ARCHITECTURE.read_text().split("## Modules", 1)[1].split("\n## ", 1)[0]
    for module in placed - {"converters"}:
        assert f"`{_file(module)}`" in table, module


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_layers.py --write   (redraws the layers in docs/ARCHITECTURE.md)")
    text = ARCHITECTURE.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    ARCHITECTURE.write_text(text[:start] + layers_diagram() + text[end:])
    print(f"wrote the layers of {ARCHITECTURE}")
