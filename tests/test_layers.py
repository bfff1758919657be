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
    assert "0 broken" in run.stdout and "2 kept" in run.stdout


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
