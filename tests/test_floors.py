"""The floors of the package: torch-free configs, no Lightning or C++ core under the model, each shared
constant defined once, and tests that import helpers, never other test modules."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "numpy", "lightning", "pytorch_lightning")
ALLOWED_OWN = ("omnibal_pl.errors", "omnibal_pl.model.sparsify.config")
TORCH_FREE = ("omnibal_pl/model/sparsify/config.py", "omnibal_pl/model/config.py")


def imported_modules(path: Path) -> list[str]:
    """Every module an ``import`` or ``from ... import`` statement anywhere in ``path`` names
    (relative imports as ``.``-prefixed names)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("relpath", TORCH_FREE)
def test_configs_import_only_stdlib_and_errors(relpath):
    for name in imported_modules(ROOT / relpath):
        top = name.split(".")[0]
        stdlib = top in sys.stdlib_module_names and top not in FORBIDDEN
        assert stdlib or name in ALLOWED_OWN, f"{relpath} imports {name!r}: only stdlib and {ALLOWED_OWN} are allowed"


def test_no_model_module_imports_lightning():
    for path in sorted((ROOT / "omnibal_pl" / "model").rglob("*.py")):
        bad = [n for n in imported_modules(path) if n.split(".")[0] in ("lightning", "pytorch_lightning")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_importing_the_model_loads_neither_lightning_nor_the_balance_core():
    code = ("import sys, omnibal_pl.model; loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' "
            "or m.startswith(('omnibal_pl.balance', 'omnibal_pl.data'))); assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def module_assignments(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}


@pytest.mark.parametrize("name", ["SCHEDULES", "RECOMPUTE_MODES", "IGNORE_INDEX"])
def test_shared_constants_are_defined_once(name):
    owners = [p.relative_to(ROOT) for p in sorted((ROOT / "omnibal_pl").rglob("*.py")) if name in module_assignments(p)]
    assert len(owners) == 1, f"{name} is defined in {owners}"


def test_tests_import_helpers_not_other_test_modules():
    for path in sorted((ROOT / "tests").rglob("*.py")):
        bad = [n for n in imported_modules(path) if n.split(".")[-1].startswith("test_")]
        assert not bad, f"{path.relative_to(ROOT)} imports test modules {bad}; move what they share to tests/helpers.py"
