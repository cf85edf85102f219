"""The package's folders are its layers (DESIGN.md §3): each imports only from the layers below it.

Read from the source with `ast` (no import runs), so a new upward import fails here, naming the file. With
every import pointing down the list, the graph between folders has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import chunkwise

PACKAGE = Path(chunkwise.__file__).parent
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
    assert top == ["__init__.py", "hf.py", "objectives.py", "trl_trainers.py"], f"only the public face sits at the top: {top}"


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
