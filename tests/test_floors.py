"""Layout of the sparsification package: torch-free configs, no Lightning in the model wing."""
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


def test_importing_the_model_does_not_load_lightning():
    code = ("import sys, omnibal_pl.model; loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'); "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
