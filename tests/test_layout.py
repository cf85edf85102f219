"""The package's folders are its layers (DESIGN.md §3): each imports only from the layers below it.

Read from the source with `ast` (no import runs), so a new upward import fails here, naming the file. With
every import pointing down the list, the graph between folders has no cycle.

The tests mirror those folders; what several test modules share lives in support modules at tests/ top level
(reference.py, tiny_models.py, ...), never in a test module another one imports. Test modules are imported by
their bare name (pytest puts each one's folder on sys.path), so their names are unique across folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import chunkwise

PACKAGE = Path(chunkwise.__file__).parent
TESTS = Path(__file__).parent
# Bottom to top. A module may import from its own folder and from the folders before it in this list.
LAYERS = ["utils", "attention", "core", "data", "models", "plan", "recipes", "integrations", "tools", "cli"]
# The package root holds the public face (`chunkwise`, `chunkwise.hf`, `chunkwise.trl_trainers`,
# `chunkwise.objectives`): re-exports only, above every layer. Layers may read its version string.
ROOT_NAMES_ALLOWED = {"__version__"}


def chunkwise_imports(path: Path) -> list[tuple[str, int]]:
    """`(imported chunkwise module, line)` for every import in `path`, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append((f"<relative import, level {node.level}>", node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module == "chunkwise":
            found += [(f"chunkwise.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chunkwise."):
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("chunkwise.")]
    return found


def layer_modules() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if len(path.relative_to(PACKAGE).parts) > 1]


def test_every_layer_folder_exists_and_holds_every_module():
    folders = {path.relative_to(PACKAGE).parts[0] for path in layer_modules()}
    assert folders == set(LAYERS), f"folders {sorted(folders)} vs layers {LAYERS}"
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    # The public face, and `python -m chunkwise` (the command line's entry point, as `chunkwise.cli.__main__`).
    assert top == ["__init__.py", "__main__.py", "hf.py", "objectives.py", "trl_trainers.py"], f"only the public face sits at the top: {top}"


def test_no_module_imports_from_a_higher_layer():
    problems = []
    for path in layer_modules():
        layer = path.relative_to(PACKAGE).parts[0]
        for module, line in chunkwise_imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
            if module.startswith("<relative"):
                problems.append(f"{where} (use absolute imports)")
                continue
            target = module.split(".")[1]
            if target in ROOT_NAMES_ALLOWED:
                continue
            if target not in LAYERS:
                problems.append(f"{where} (the package root is the public face, not a layer to import from)")
            elif LAYERS.index(target) > LAYERS.index(layer):
                problems.append(f"{where} ({layer} is below {target})")
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_algorithm_knows_nothing_of_its_users():
    users = ("recipes", "integrations", "tools", "cli")
    for path in layer_modules():
        if path.relative_to(PACKAGE).parts[0] in ("core", "attention"):
            for module, line in chunkwise_imports(path):
                assert module.split(".")[1] not in users, f"{path.name}:{line} imports {module}"


def test_public_paths_keep_working():
    from chunkwise import ChunkwiseConfig, SeCO, SpaCO  # noqa: F401
    from chunkwise.hf import ChunkwiseConfig as HfConfig  # noqa: F401
    from chunkwise.hf import ChunkwiseTrainer
    from chunkwise.objectives import DPO, GRPO  # noqa: F401
    from chunkwise.trl_trainers import ChunkwiseDPOMixin  # noqa: F401

    assert HfConfig is ChunkwiseConfig


def imported_names(path: Path) -> list[tuple[str, int]]:
    """`(top-level module name, line)` for every import in `path`, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
    return found


def test_no_test_module_imports_another():
    test_modules = {path.stem for path in TESTS.rglob("test_*.py")}
    scripts = sorted(TESTS.rglob("*.py")) + sorted((TESTS.parent / "docs").glob("*.py"))
    problems = [
        f"{path.relative_to(TESTS.parent)}:{line} imports {name} (move what it shares to a support module at tests/ top level)"
        for path in scripts
        for name, line in imported_names(path)
        if name in test_modules
    ]
    assert not problems, "\n".join(problems)


def test_test_module_names_are_unique():
    paths = sorted(TESTS.rglob("*.py"))
    names = [path.name for path in paths if path.name != "__init__.py"]
    repeated = sorted({name for name in names if names.count(name) > 1})
    assert not repeated, f"imported by bare name, so these must not repeat: {repeated}"
