"""The layering the README's architecture map states, checked on the source: the library never
imports `analyses`, a layer imports only the layers below it, no module imports another module's
private name, and every public name of `dynamics` resolves."""
import ast
import importlib
from pathlib import Path

import pytest

import dynamics

ROOT = Path(__file__).resolve().parents[1]
# a module of layer i may import layers j <= i (errors: everyone)
LAYERS = {"dynamics.errors": 0, "dynamics.core": 1, "dynamics.inputs": 2, "dynamics.runs": 3, "dynamics.tools": 4,
          "analyses": 5}


def _layer(module: str) -> int | None:
    return next((v for k, v in sorted(LAYERS.items(), key=lambda kv: -len(kv[0]))
                 if module == k or module.startswith(k + ".")), None)


def _imports(path: Path):
    """(imported module, imported names) of every import statement in ``path``, nested ones too."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _modules():
    for pkg in ("dynamics", "analyses"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path


def test_layers_import_downwards_only():
    bad = []
    for name, path in _modules():
        mine = _layer(name)
        if mine is None:
            continue
        for module, _ in _imports(path):
            other = _layer(module)
            if other is not None and other > mine and not (name == "dynamics" and module == "importlib"):
                bad.append(f"{name} imports {module}")
    assert not bad, bad


def test_no_private_name_crosses_modules():
    bad = [f"{name} imports {module}.{n}" for name, path in _modules() for module, names in _imports(path)
           if module.startswith(("dynamics", "analyses")) and module != name
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


@pytest.mark.parametrize("name", dynamics.__all__)
def test_public_names_resolve(name):
    value = getattr(dynamics, name)
    assert value is getattr(importlib.import_module(dynamics._PUBLIC[name]), name)


def test_unknown_public_name():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dynamics.nope
