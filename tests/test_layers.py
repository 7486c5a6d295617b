"""The package's layers: no module imports from a layer above its own.

Every module under ``sslseg/`` is parsed with ``ast`` and every import it makes is checked:
module-level and inside functions, ``import x`` and ``from x import y``, absolute and relative,
and ``importlib.import_module("...")`` with a literal name. The allowed directions are written once,
in :data:`LAYERS`: a module may import its own layer or a lower one, never a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sslseg

ROOT = Path(sslseg.__file__).resolve().parent

#: Rank of each top-level part of the package; a module may import only ranks <= its own.
#: ``_C`` and ``_C_cuda`` are the compiled extension modules; the package root files (``__init__``, ``__main__``) sit with the app.
LAYERS: dict[str, int] = {
    **dict.fromkeys(("ops", "models", "data", "losses", "metrics", "utils", "_version", "_C", "_C_cuda"), 0),
    "inference": 1,
    "methods": 2,
    "engine": 3,
    **dict.fromkeys(("app", "__init__", "__main__"), 4),
}
_NAMES = {0: "ops/models/data/losses/metrics/utils", 1: "inference", 2: "methods", 3: "engine", 4: "app/package root"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _part(module: str) -> str:
    """The top-level part of ``sslseg.<part>...`` (``__init__`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _targets(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, imported sslseg module)`` for every import of an sslseg module in ``tree``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "sslseg":
                # ``from sslseg import data`` imports the subpackage; ``from sslseg import fit`` the root.
                found += [(node.lineno, f"sslseg.{a.name}" if a.name in LAYERS else "sslseg") for a in node.names]
            else:
                found.append((node.lineno, source))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name == "sslseg" or name.startswith("sslseg.")]


def backward_imports(source: str, path: str, module: str, is_package: bool = False) -> list[str]:
    """One message per import in ``source`` (the module ``module``) that points to a higher layer."""
    own = _part(module)
    if own not in LAYERS:
        return [f"{path}: sslseg.{own} is in no layer; add it to LAYERS in tests/test_layers.py"]
    errors = []
    for line, target in _targets(ast.parse(source, path), module, is_package):
        part = _part(target)
        if part not in LAYERS:
            errors.append(f"{path}:{line}: imports {target}, which is in no layer")
        elif LAYERS[part] > LAYERS[own]:
            errors.append(f"{path}:{line}: {module} (layer {LAYERS[own]}, {_NAMES[LAYERS[own]]}) imports {target} "
                          f"(layer {LAYERS[part]}, {_NAMES[LAYERS[part]]}): a backwards arrow")
    return errors


def test_no_module_imports_a_higher_layer():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 50, f"expected the whole package under {ROOT}, found {len(files)} files"
    errors: list[str] = []
    for path in files:
        errors += backward_imports(path.read_text(), str(path.relative_to(ROOT.parent)), _module_name(path),
                                   path.name == "__init__.py")
    assert not errors, "backwards imports:\n" + "\n".join(errors)


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.is_dir() and (p / "__init__.py").is_file()) or p.suffix == ".py"}
    assert parts <= set(LAYERS), f"parts without a layer: {sorted(parts - set(LAYERS))}"


@pytest.mark.parametrize(("source", "module", "is_package", "target"), [
    ("from sslseg.engine.distributed import get_rank", "sslseg.losses.segmentation", False, "sslseg.engine.distributed"),
    ("def f():\n    import sslseg.methods\n", "sslseg.inference.sliding", False, "sslseg.methods"),
    ("from ..engine import fit", "sslseg.methods.uamt", False, "sslseg.engine"),
    ("from .. import app", "sslseg.engine", True, "sslseg.app"),
    ("import sslseg", "sslseg.engine.run", False, "sslseg"),
    ("from sslseg import __version__", "sslseg.engine.loop", False, "sslseg"),
    ("import importlib\nimportlib.import_module('sslseg.app.cli')", "sslseg.data.cli", False, "sslseg.app.cli"),
])
def test_the_walk_finds_backward_arrows(source, module, is_package, target):
    errors = backward_imports(source, "x.py", module, is_package)
    assert len(errors) == 1 and f"imports {target} " in errors[0] and "backwards arrow" in errors[0], errors


@pytest.mark.parametrize(("source", "module", "is_package"), [
    ("from sslseg.utils.distributed import global_batch_sum", "sslseg.losses.segmentation", False),
    ("from . import sliding", "sslseg.inference", True),
    ("from .base import SSLMethod", "sslseg.methods.uamt", False),
    ("from sslseg import data", "sslseg.methods.base", False),
    ("from sslseg._version import __version__", "sslseg.engine.run", False),
    ("import torch\nfrom sslseg.engine import fit", "sslseg.app.cli", False),
])
def test_the_walk_allows_downward_and_sideways_imports(source, module, is_package):
    assert backward_imports(source, "x.py", module, is_package) == []
