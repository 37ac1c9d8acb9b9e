"""docs/architecture.md's module map holds: every module has a floor, imports run only to its floor or below, and
Horovod and mpi4py are imported only by their one backend module."""
import ast
import re

from conftest import REPO

PACKAGE = REPO / "hvdtrain"


def floors() -> dict:
    """`name` -> floor, from the table's rows (`backend/environment.py` counts apart from the rest of `backend/`)."""
    table = {}
    for line in (REPO / "docs/architecture.md").read_text().splitlines():
        row = re.match(r"\| (\d) \| (.*?) \|", line)
        for name in re.findall(r"`([\w/]+?)(?:\.py|/)?`", row.group(2)) if row else ():
            table.setdefault(name, int(row.group(1)))
    return table


def unit(module: str, table: dict) -> str:
    """hvdtrain.a.b -> the table's name for it: 'a/b' where the table names it, else 'a'."""
    parts = module.split(".")[1:]
    return f"{parts[0]}/{parts[1]}" if len(parts) > 1 and f"{parts[0]}/{parts[1]}" in table else parts[0]


def imports(path) -> list[str]:
    """Every module this file imports, at the top or inside functions (`from hvdtrain import x` is hvdtrain.x)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [f"{node.module}.{a.name}" for a in node.names] if node.module == "hvdtrain" else [node.module]
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("hvdtrain", *path.relative_to(PACKAGE).with_suffix("").parts))
        if name != "hvdtrain.__init__":
            yield path, name


def test_every_module_has_a_floor_and_imports_only_downwards():
    table = floors()
    assert table["errors"] == 0 and table["cli"] == max(table.values())   # the table was read
    missing = sorted({unit(name, table) for _, name in modules()} - set(table))
    assert not missing, f"docs/architecture.md's module map lacks {missing}"
    upward = [f"{name} (floor {table[unit(name, table)]}) imports {other} (floor {table[unit(other, table)]})"
              for path, name in modules() for other in imports(path)
              if other.startswith("hvdtrain.") and table[unit(other, table)] > table[unit(name, table)]]
    assert not upward, upward


def test_horovod_and_mpi4py_are_imported_in_one_module_each():
    def importers(package: str) -> set:
        return {name for path, name in modules()
                if any(m == package or m.startswith(package + ".") for m in imports(path))}
    assert importers("horovod") == {"hvdtrain.backend._horovod"}
    assert importers("mpi4py") == {"hvdtrain.backend._mpi"}
    # Outside the backend, only the plain-Horovod peer benchmark reaches Horovod itself: it is the peer.
    outside = {name for private in ("hvdtrain.backend._horovod", "hvdtrain.backend._mpi")
               for name in importers(private) if not name.startswith("hvdtrain.backend.")}
    assert outside == {"hvdtrain.bench.horovod_worker"}


def test_the_command_line_and_config_checks_load_without_the_heavy_packages():
    """The rule for imports inside functions: what runs before a config is known valid (the CLI's parser, config,
    data sources, sweep spaces, Slurm jobs, the serving driver) imports TensorFlow, Keras, Horovod, MPI and the extras only when used,
    so `hvdtrain --help` and a typo's error take a fraction of a second, and the extras stay optional."""
    import subprocess
    import sys

    from conftest import env
    code = ("import sys, hvdtrain.cli as cli; cli._parser()\n"
            "import hvdtrain.config, hvdtrain.data, hvdtrain.sweep.space, hvdtrain.sweep.driver, hvdtrain.slurm_jobs\n"
            "import hvdtrain.serve, hvdtrain.serve.server\n"
            "heavy = ('tensorflow', 'keras', 'horovod', 'mpi4py', 'optuna', 'matplotlib', 'sklearn', 'ray')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def code_index() -> tuple[dict, dict]:
    """(module -> the names it defines or imports at its top, class -> its members), from the source: `a.b` for
    hvdtrain/a/b.py, `a` for hvdtrain/a/__init__.py."""
    names, members = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text())
        found = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found |= {t.id for t in targets if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= {(a.asname or a.name).split(".")[0] for a in node.names}
            if isinstance(node, ast.ClassDef):
                inside = members.setdefault(node.name, set())
                for item in ast.walk(node):
                    if isinstance(item, ast.FunctionDef):
                        inside.add(item.name)
                    elif isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name) and item.value.id == "self":
                        inside.add(item.attr)
                    elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                        targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                        inside |= {t.id for t in targets if isinstance(t, ast.Name)}
        names[module] = found
    return names, members


def test_every_module_class_and_function_the_page_names_exists():
    """The page's backticked references (`loop.controller.LoopController`, `strategies.create`, `World.data_view`)
    resolve in the code, so the map cannot drift from it. Config keys and names of other libraries are not
    references."""
    from hvdtrain.config import describe_fields
    names, members = code_index()
    keys = {key for key, _, _ in describe_fields()}
    aliases = {"hk": "keras"}
    missing = []
    for token in sorted(set(re.findall(r"`([A-Za-z_][\w.]*?)(?:\(\))?`", (REPO / "docs/architecture.md").read_text()))):
        if token in keys or token.endswith((".py", ".yaml", ".json", ".keras", ".csv")):
            continue
        parts = token.split(".")
        parts[0] = aliases.get(parts[0], parts[0])
        module = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in names), None)
        if module is not None:
            rest = parts[len(module.split(".")):]
        elif parts[0] in members or parts[0][0].isupper():   # a class: hvdtrain's, by the page's convention
            module, rest = None, parts
        else:
            continue   # not hvdtrain's (fit, tf.numpy_function, hvd.init)
        if module is None and rest[0] not in members:
            missing.append(token)
            continue
        if rest and module is not None and rest[0] not in names[module]:
            missing.append(token)
        elif len(rest) > 1 and rest[1] not in members.get(rest[0], set()):
            missing.append(token)
    assert not missing, f"docs/architecture.md names what the code does not have: {missing}"
