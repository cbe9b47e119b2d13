"""The map in docs/architecture.md, checked: which package may import which, no import cycles,
one home for the concepts that used to be spread out, and a training loop a newcomer can
read. Parsed from the source with `ast` (nothing is imported), so it sees lazy imports too."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "bastion"

# Packages by layer: a module may import its own package and packages of lower layers only.
LAYERS = [
    {"errors"},
    {"bastion", "safeio", "safepath"},
    {"safetensors_layout"},  # the safetensors layout check, on safeio's bounded JSON
    {"config", "tokenizer"},
    {"checkpoint", "data", "model"},
    {"adapters"},
    {"infer"},
    {"rewards"},
    {"interop", "train"},
    {"eval", "serve"},
    {"cli", "demo", "demo_rl"},
]
LAYER = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bastion"


def is_cli(module: str) -> bool:
    """The command-line layer: the root cli/demo and every stage's own cli.py (they assemble
    commands, so they may import any package; nothing may import them but the root cli)."""
    return package_of(module) in ("cli", "demo", "demo_rl") or module.endswith(".cli") or module.endswith("_cli")


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str, *, top_level_only: bool = False) -> set[str]:
    """The bastion modules `module` imports (a `from pkg import sub` counts as pkg.sub when
    that is a module). With top_level_only: what runs on import (not inside functions, not
    under `if TYPE_CHECKING`)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or _type_checking(child)):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "bastion")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "bastion":
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.add(sub if sub in MODULES else child.module)
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != module}


def test_every_package_is_placed_in_a_layer():
    assert {package_of(m) for m in MODULES} <= set(LAYER)


def test_dependencies_point_down():
    wrong = []
    for module in MODULES:
        if is_cli(module):
            continue
        mine = package_of(module)
        for target in imports(module):
            theirs = package_of(target)
            if is_cli(target) or (theirs != mine and LAYER[theirs] >= LAYER[mine]):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that climb or go sideways:\n  " + "\n  ".join(wrong)


# (train -> infer is allowed since online RL: GRPO samples its rollouts with infer's engine;
# the engine, like rewards, knows nothing of training.)
@pytest.mark.parametrize("low,high", [("model", "checkpoint"), ("model", "train"), ("infer", "train"),
                                      ("rewards", "train"), ("config", "model"), ("checkpoint", "model"),
                                      ("data", "train")])
def test_named_boundaries(low, high):
    crossing = [f"{m} -> {t}" for m in MODULES if package_of(m) == low and not is_cli(m)
                for t in imports(m) if package_of(t) == high]
    assert not crossing


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_no_import_cycles():
    modules = {m: imports(m, top_level_only=True) for m in MODULES}
    assert _cycle(modules) is None, " -> ".join(_cycle(modules) or [])
    packages: dict[str, set[str]] = {}
    for module, targets in ((m, imports(m)) for m in MODULES):
        packages.setdefault(package_of(module), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(module) and not is_cli(module))
    assert _cycle(packages) is None, " -> ".join(_cycle(packages) or [])


def _source_files():
    return [(m, p.read_text(encoding="utf-8")) for m, p in MODULES.items()]


def test_one_sha256_pattern_and_one_manifest_parser():
    patterns = [m for m, text in _source_files() if re.search(r"\[0-9a-f\]\{64\}", text)]
    assert patterns == ["bastion.safeio"]
    # MANIFEST.json is parsed in one place; everything else calls read_manifest / parse_manifest.
    parsers = [m for m, text in _source_files() if re.search(r"def \w*manifest\w*\(", text)
               and re.search(r"json\.loads|parse_json\(", text.split("def ", 1)[-1]) and m.startswith("bastion.checkpoint")]
    assert "bastion.checkpoint.manifest" in parsers
    for module, text in _source_files():
        if module != "bastion.checkpoint.manifest":
            assert not re.search(r"def _?(read|parse)_manifest\b", text), module


def test_checkpoint_contents_are_read_in_one_place():
    """config.yaml, trainer_state.json and the tokenizer of a checkpoint are read through
    bastion/checkpoint/contents.py: no other module parses them itself."""
    readers = {"bastion.checkpoint.contents", "bastion.checkpoint.checkpoint"}
    for module, text in _source_files():
        if module in readers:
            continue
        assert not re.search(r"yaml\.safe_load\([^)]*config_yaml", text), module
        assert not re.search(r"json\.loads\([^)]*trainer_state", text), module
        assert "from_json_str(ckpt.tokenizer_json" not in text, module


def _function_lengths(module: str) -> dict[str, int]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return {f"{module}.{node.name}": node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_training_functions_stay_short():
    lengths = {name: n for m in MODULES if package_of(m) == "train" for name, n in _function_lengths(m).items()}
    long = {name: n for name, n in lengths.items() if n > 120}
    assert not long, long
    assert lengths["bastion.train.loop._train"] <= 120


def test_each_stage_defines_its_commands_in_its_own_cli():
    """The root cli.py only assembles: it defines no command but `demo`, which spans stages."""
    tree = ast.parse(MODULES["bastion.cli"].read_text(encoding="utf-8"))
    commands = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                and any("command" in ast.unparse(d) for d in node.decorator_list)]
    assert commands == ["demo_cmd"]
    for stage in ("config", "data", "train", "infer", "eval", "checkpoint", "interop", "serve", "adapters"):
        assert f"bastion.{stage}.cli" in MODULES, stage
