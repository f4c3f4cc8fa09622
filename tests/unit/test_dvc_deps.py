"""dvc.yaml's code dependencies are the code each stage runs: a change in a module that a
stage's command imports reruns that stage.

What a command runs is read from the source with `ast`, never by importing it: cli.py and
everything imported at module level, transitively (what `import` executes), plus the lazy
imports (inside functions) of every function the command reaches by calling module-level
functions by name: `stages.train(...)`, then `_log_training(...)`, `tracking.track_training(...)`
and so on. Methods of objects are not followed; their modules are imported at module level by
the code that builds the objects, so they are found anyway."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

# Standalone: `python tests/unit/test_dvc_deps.py` runs it as a script (write_deps).
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = "fersynth"


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@dataclass
class Module:
    name: str
    tree: ast.Module
    top: set[str] = field(default_factory=set)  # fersynth modules imported at module level
    names: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local -> (module, attr)
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)


def _imported(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool
) -> list[tuple[str, str, str | None]]:
    """(local name, module, attribute or None) for each fersynth name an import binds."""
    bound = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                bound.append((alias.asname or alias.name.split(".")[0], alias.name, None))
        return bound
    if node.level:
        parts = module.split(".")
        parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
        base = ".".join([*parts, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    if base.split(".")[0] != PACKAGE:
        return bound
    for alias in node.names:
        local = alias.asname or alias.name
        sub = f"{base}.{alias.name}"
        bound.append((local, sub, None) if module_file(sub) else (local, base, alias.name))
    return bound


@cache
def load(name: str) -> Module | None:
    path = module_file(name)
    if path is None:
        return None
    tree = ast.parse(path.read_text())
    module = Module(name, tree)
    for node in tree.body:
        statements = [node]
        if isinstance(node, ast.If | ast.Try):  # guarded imports at module level run too
            statements = [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
        for statement in statements:
            if isinstance(statement, ast.Import | ast.ImportFrom):
                for local, target, attr in _imported(statement, name, path.name == "__init__.py"):
                    module.top.add(target)
                    module.names[local] = (target, attr)
        if isinstance(node, ast.FunctionDef):
            module.functions[node.name] = node
    return module


@cache
def imported_by(name: str) -> frozenset[str]:
    """`name` and what importing it runs: its parent packages, its module-level imports, theirs."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen or module_file(current) is None:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(load(current).top)
    return frozenset(seen)


def runs(module: str, function: str) -> set[str]:
    """The fersynth modules that calling `module.function` imports: the module's own imports,
    and the lazy imports of every function reached by calling module-level functions by name."""
    modules = set(imported_by(module))
    seen: set[tuple[str, str]] = set()
    todo = [(module, function)]
    while todo:
        where, name = todo.pop()
        if (where, name) in seen:
            continue
        seen.add((where, name))
        source = load(where)
        if source is None or name not in source.functions:
            continue
        body = source.functions[name]
        local = dict(source.names)
        for node in ast.walk(body):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias, target, attr in _imported(node, where, module_file(where).name == "__init__.py"):
                    modules |= imported_by(target)
                    local[alias] = (target, attr)
        for node in ast.walk(body):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name):
                if node.func.id in source.functions:
                    todo.append((where, node.func.id))
                elif node.func.id in local and local[node.func.id][1]:
                    todo.append(local[node.func.id])  # `from fersynth.x import f`; f(...)
            elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                target = local.get(node.func.value.id)
                if target and target[1] is None:  # `tracking.track_training(...)`
                    todo.append((target[0], node.func.attr))
    return modules


def _command_functions() -> dict[str, str]:
    """`fersynth <name>` -> the name of its click function in cli.py."""
    commands = {}
    for node in load(f"{PACKAGE}.cli").tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "command":
                    commands[decorator.args[0].value] = node.name
    return commands


def command_files(command: str) -> set[Path]:
    """The source files `fersynth <command>` runs (the group's own callback included)."""
    cli = f"{PACKAGE}.cli"
    modules = runs(cli, _command_functions()[command]) | runs(cli, "cli") | runs(cli, "main")
    return {module_file(m) for m in modules}


def _commands(cmd: str) -> list[str]:
    """The fersynth subcommands of a stage's cmd (`fersynth generate --quiet && fersynth merge`)."""
    names = []
    for part in cmd.split("&&"):
        words = part.split()
        if words and words[0] == "fersynth":
            names.append(next(w for w in words[1:] if not w.startswith("-")))
    return names


def missing_deps() -> dict[str, list[str]]:
    """Stage -> the source files it runs that none of its deps covers (the file, or a folder
    above it)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        deps = [Path(d) for d in body.get("deps", []) if isinstance(d, str) and d.startswith("src/")]
        needed = set()
        for command in _commands(body["cmd"]):
            needed |= command_files(command)
        uncovered = sorted(
            p.relative_to(ROOT).as_posix()
            for p in needed
            if not any(p.relative_to(ROOT).is_relative_to(d) for d in deps)
        )
        if uncovered:
            missing[name] = uncovered
    return missing


def test_every_module_a_stage_runs_is_one_of_its_dvc_deps():
    missing = missing_deps()
    assert not missing, "dvc.yaml: add to each stage's deps the modules its command runs:\n" + "\n".join(
        f"  {stage}: {', '.join(files)}" for stage, files in missing.items()
    )


def test_the_reader_follows_module_imports_lazy_imports_and_calls():
    files = {p.relative_to(SRC / PACKAGE).as_posix() for p in command_files("train")}
    # cli -> stages.train (a lazy import in the command) -> run_train (a lazy import in stages)
    # -> the loop's module-level imports; tracking.track_training -> its lazy model import.
    assert {
        "cli.py",
        "stages.py",
        "train/loop.py",
        "train/inference.py",
        "train/models.py",
        "tracking.py",
    } <= files
    assert {"__init__.py", "train/__init__.py", "settings.py", "memory.py", "train/resume.py"} <= files
    assert not {"report.py", "generate/__init__.py", "verify/voting.py"} & files  # never called by train
    report = {p.relative_to(SRC / PACKAGE).as_posix() for p in command_files("report")}
    assert "report.py" in report and "train/loop.py" not in report


def write_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each stage's `src/` deps from the imports (a package folder when every module of
    it runs), keeping its other deps, the templates and the file's comments (ruamel, which DVC
    itself reads dvc.yaml with). `python tests/unit/test_dvc_deps.py` runs it."""
    import io

    from ruamel.yaml import YAML

    round_trip = YAML()
    round_trip.width, round_trip.preserve_quotes = 4096, True
    round_trip.indent(mapping=2, sequence=4, offset=2)
    document = round_trip.load(path.read_text())
    package = SRC / PACKAGE
    for stage in document["stages"].values():
        body = stage.get("do", stage)
        needed: set[Path] = set()
        for command in _commands(body["cmd"]):
            needed |= command_files(command)
        files = {p.relative_to(ROOT).as_posix() for p in needed}
        folders = []
        for folder in sorted({p.parent for p in needed if p.parent != package}):
            inside = {f.relative_to(ROOT).as_posix() for f in folder.glob("*.py")}
            if inside <= files:
                folders.append(folder.relative_to(ROOT).as_posix())
                files -= inside
        deps = body["deps"]
        templates = [d for d in deps if isinstance(d, str) and d.startswith("src/") and not d.endswith(".py")]
        templates = [d for d in templates if not (ROOT / d / "__init__.py").is_file()]
        for index in reversed(range(len(deps))):
            if isinstance(deps[index], str) and deps[index].startswith("src/"):
                del deps[index]
        deps.extend([*folders, *sorted(files), *templates])
    text = io.StringIO()
    round_trip.dump(document, text)
    path.write_text(text.getvalue())


if __name__ == "__main__":
    write_deps()
