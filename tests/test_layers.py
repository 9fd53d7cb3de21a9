"""The house rules, read from the code: imports go one way, from commands down to config and
errors, and argparse, deepspeed and torch.distributed stay where they belong.

Every import is counted, at module level and inside functions (lazy imports of heavy optional
packages are fine, but they are still edges of the dependency graph).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megadalle"

# Lower numbers are further down; a module may import its own layer or lower ones.
LAYER = {
    "errors": 0, "config": 0, "safe_load": 0, "run_layout": 0,
    "__init__": 5,  # the package root: re-exports the public API (megadalle.Pipeline) lazily
    "ops": 1,
    "distributed": 2, "data": 2, "dvae": 2, "transformer": 2, "clip": 2, "eval": 2,
    "training": 3, "generate": 3, "tools": 3,
    "commands": 4,
    "cli": 5, "__main__": 5,
}
MODEL_FOLDERS = {"dvae", "transformer", "clip"}
# Where these third-party modules may be imported (by the part of megadalle named).
CONFINED = {
    "argparse": {"commands", "cli"},
    "deepspeed": {"distributed", "safe_load", "tools"},  # safe_load: the allow-list; tools: zero_to_fp32
    "torch.distributed": {"distributed"},
}


def _part(module: str) -> str:
    """`megadalle.training.trainer` -> `training`; `megadalle.cli` -> `cli`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, node.lineno))
            # `from megadalle import x` imports the submodule x when there is one.
            if base == "megadalle":
                found += [(f"megadalle.{a.name}", node.lineno) for a in node.names]
    return found


def _edges():
    mods = _modules()
    for module, path in sorted(mods.items()):
        for target, line in _imports(path, module):
            if target.startswith("megadalle.") and _part(target) not in LAYER and target not in mods:
                continue  # `from megadalle import __version__`: a name, not a module
            yield module, f"{path.relative_to(PACKAGE.parent)}:{line}", target


def test_imports_go_one_way():
    bad = []
    for module, where, target in _edges():
        if not target.startswith("megadalle.") or target == "megadalle":
            continue
        src, dst = _part(module), _part(target)
        if src == dst:
            continue
        if LAYER[dst] > LAYER[src]:
            bad.append(f"{where}: {src}/ imports {target} (a higher layer)")
        if src in MODEL_FOLDERS and dst in ("distributed", "training", "commands", "cli", "generate"):
            bad.append(f"{where}: model folder {src}/ imports {target}")
    assert not bad, "\n".join(bad)


def test_confined_imports():
    bad = []
    for module, where, target in _edges():
        for name, allowed in CONFINED.items():
            if (target == name or target.startswith(name + ".")) and _part(module) not in allowed:
                bad.append(f"{where}: {target} imported outside {sorted(allowed)}")
    assert not bad, "\n".join(bad)


def test_every_command_is_a_thin_module_in_commands():
    from megadalle.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert module.startswith("megadalle.commands."), (name, module)
        path = PACKAGE / "commands" / f"{module.rsplit('.', 1)[1]}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= functions, (name, functions)


def test_the_run_folder_layout_is_spelled_out_once():
    """Paths inside a run folder come from megadalle/run_layout.py, nowhere else."""
    import re

    spelled = re.compile(r'/ "(tokens|dvae|clip|transformer|samples|eval)"\b|"tokenizer\.json"|"data" / "shapes"')
    bad = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in PACKAGE.rglob("*.py") if p.name != "run_layout.py"
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
           if spelled.search(line) and not line.lstrip().startswith("#")]
    assert not bad, bad
