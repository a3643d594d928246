"""The package's layers import one way only: core → babyai → train → analysis → cli/bench.

Each layer is imported in a fresh interpreter with every layer above it blocked (an import of a
blocked package raises), so an edge that runs the wrong way, even a lazy one at module level,
fails here. The core must not pull in gymnasium or minigrid: a TorchRL user who only wants the
module gets no env stack.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import mop_torchrl

PACKAGE = pathlib.Path(mop_torchrl.__file__).parent

LAYERS = ["io", "core", "babyai", "train", "analysis", "cli"]
"""Bottom to top; ``io`` is the base utility ``io.py``, ``cli`` stands for the tools on top
(``cli.py``, ``bench.py``)."""


def _layer(module: str) -> str | None:
    """The layer of a ``mop_torchrl.*`` module name, or None for the package root."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return "cli" if parts[1] in ("cli", "bench") else parts[1]


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """Every ``mop_torchrl`` module a file imports (lazy imports included), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(n, node.lineno) for n in names if n.startswith("mop_torchrl")]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("mop_torchrl")]
    return found


def test_every_import_points_down_the_layers():
    """Statically, lazy imports included: no module imports a layer above its own."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("mop_torchrl", *path.relative_to(PACKAGE).with_suffix("").parts))
        own = _layer(module.removesuffix(".__init__"))
        if own is None:
            continue
        for target, line in _imports(path):
            layer = _layer(target)
            if layer is not None and layer in LAYERS and LAYERS.index(layer) > LAYERS.index(own):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


_BLOCKER = """
import sys
blocked = {blocked!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name in blocked or any(name.startswith(b + ".") for b in blocked):
            raise ImportError(f"layer test: {{name}} is blocked")
        return None

sys.meta_path.insert(0, Blocker())
import importlib, pkgutil
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(sorted(m for m in ("gymnasium", "minigrid") if m in sys.modules))
"""


@pytest.mark.parametrize("layer", ["core", "babyai", "train", "analysis"])
@pytest.mark.subprocess
def test_layer_imports_with_the_layers_above_blocked(layer):
    """Each layer (every submodule) imports in a fresh process with the layers above blocked."""
    above = LAYERS[LAYERS.index(layer) + 1 :]
    blocked = [f"mop_torchrl.{name}" for name in above if name != "cli"]
    blocked += ["mop_torchrl.cli", "mop_torchrl.bench"]
    code = _BLOCKER.format(blocked=blocked, package=f"mop_torchrl.{layer}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    if layer == "core":
        assert result.stdout.strip() == "[]", f"core imported {result.stdout.strip()}"


def test_top_level_api_keeps_working():
    from mop_torchrl import MoPConfig, MoPModule
    from mop_torchrl.core import MoPModule as CoreModule

    assert MoPModule is CoreModule
    assert MoPConfig.from_preset("paper").num_blocks == 3
