"""The package's layering (README, "Layering"): every import of every covrl module,
those inside functions included, goes to its own top-level package or to a lower layer.

Layers are lists of top-level names under ``covrl/`` (a package or a root module), so a
module moving inside its package, or a root module becoming a package of the same name,
keeps its layer. Packages in one layer are independent of each other.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "covrl"

# Lowest first. Keep the README's "Layering" paragraph in step with this table.
LAYERS: list[tuple[str, ...]] = [
    ("utils",),  # file writes, checksums, error messages: no covrl imports
    ("parallel",),  # process groups, megatron parallel state, liveness
    ("ops",),  # tensor-parallel log-prob / entropy, covariance statistics
    ("algorithms",),  # advantages, token selection, policy losses
    ("models",),  # megatron-core policy model, HF weights
    ("rollout", "checkpointing", "data", "rewards", "analysis"),
    ("engine",),  # PolicyEngine: passes, optimizer steps, its checkpoints and exports
    ("config", "tasks"),  # the run config; the built-in tasks
    ("training", "scaling"),  # the trainer; the Slurm plan and memory estimate
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top_level_names() -> set[str]:
    """Every top-level module and package of covrl (``covrl/x.py``, ``covrl/x/``)."""
    names = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    names |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.rglob("*.py"))}
    return names


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every covrl module ``path`` imports, at any depth in the
    file; ``from covrl.x import y`` counts as ``covrl.x.y`` when ``y`` is a module."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                is_module |= (PACKAGE.parent / sub.replace(".", "/")).is_dir()
                found.append((node.lineno, sub if is_module else base))
    return [(line, name) for line, name in found if name == "covrl" or name.startswith("covrl.")]


def _top(module: str) -> str | None:
    """The top-level name of ``covrl.x.y`` (``x``), None for the root package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _rule(name: str) -> str:
    lower = [n for names in LAYERS[: LAYER[name]] for n in names]
    return (
        f"{name} (layer {LAYER[name]}) may import only itself and lower layers: "
        f"{', '.join(lower) or 'none'}"
    )


def layering_violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        importer = _top(module)
        for line, imported in _imported_modules(path):
            target = _top(imported)
            if importer is None:
                if target is not None:  # everything imports the root: it imports nothing
                    problems.append(
                        f"{module}:{line} imports {imported}: the root package covrl/__init__.py "
                        "imports no covrl module"
                    )
                continue
            if target is None or target == importer:
                continue
            if target not in LAYER:
                continue  # reported once below as an unknown top-level module
            if LAYER[target] >= LAYER[importer]:
                problems.append(f"{module}:{line} imports {imported}: {_rule(importer)}")
    for name in sorted(_top_level_names() - set(LAYER)):
        problems.append(
            f"covrl.{name} is in no layer: add it to a layer in tests/test_layering.py "
            "(and the README's Layering paragraph)"
        )
    return problems


def test_no_module_imports_a_higher_or_peer_layer():
    problems = layering_violations()
    assert not problems, "\n".join(problems)


def test_the_check_can_fail(tmp_path, monkeypatch):
    """A lower layer importing a higher one, inside a function, is named with the rule;
    an unknown top-level module is named too."""
    fake = tmp_path / "covrl"
    for name, text in {
        "__init__.py": "",
        "parallel/__init__.py": "",
        "parallel/state.py": "def f():\n    from covrl.training import loop\n",
        "training/__init__.py": "",
        "training/loop.py": "from covrl.parallel import state\nfrom . import helpers\n",
        "training/helpers.py": "",
        "rollout/__init__.py": "from covrl import data\n",
        "data/__init__.py": "",
        "newthing.py": "",
    }.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    problems = layering_violations()
    assert problems == [
        "covrl.parallel.state:2 imports covrl.training.loop: parallel (layer 1) may import "
        "only itself and lower layers: utils",
        "covrl.rollout:1 imports covrl.data: rollout (layer 5) may import only itself and "
        "lower layers: utils, parallel, ops, algorithms, models",
        "covrl.newthing is in no layer: add it to a layer in tests/test_layering.py "
        "(and the README's Layering paragraph)",
    ]
