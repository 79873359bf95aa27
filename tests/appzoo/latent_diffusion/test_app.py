"""app.py and the app's shape, read from the source (ast): a dispatch table, modes that import no other mode, no import
cycle inside appzoo/, and nothing that builds a whole flag set just to load a model."""

import ast
import os

import pytest

from appzoo.latent_diffusion.app import MODES, LatentDiffusionApp
from easynlp_ldm.args import parse_flags
from easynlp_ldm.errors import UserError
from tests.helpers import ROOT

APPZOO = os.path.join(ROOT, "appzoo")


def module_name(path: str) -> str:
    relative = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
    return relative[:-len(".__init__")] if relative.endswith(".__init__") else relative


def imported_modules(path: str) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (``from a import b`` counts ``a`` and ``a.b``)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def appzoo_graph() -> dict[str, set[str]]:
    modules = {}
    for folder, _, files in os.walk(APPZOO):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[module_name(path)] = path
    return {name: {m for m in imported_modules(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycle_inside_appzoo():
    graph = appzoo_graph()
    assert "appzoo.latent_diffusion.generation" in graph and graph["appzoo.latent_diffusion.app"] == set()
    state: dict[str, str] = {}

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_mode_module_imports_another_mode():
    graph = appzoo_graph()
    modes = set(MODES.values())
    assert len(modes) == 5 and modes <= set(graph)
    for mode in sorted(modes):
        assert not graph[mode] & (modes - {mode}), f"{mode} imports {sorted(graph[mode] & modes)}"


def test_nothing_builds_empty_flags_to_load_a_model():
    """load_model takes plain arguments: no caller needs ``parse_flags([])`` to reach it."""
    for folder in ("appzoo", "bench", "tests", "scripts", "modelzoo"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                tree = ast.parse(open(os.path.join(base, name), encoding="utf-8").read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("load_model",):
                        for arg in list(node.args) + [k.value for k in node.keywords]:
                            assert not (isinstance(arg, ast.Call) and getattr(arg.func, "id", "") == "parse_flags"), \
                                f"{base}/{name}:{node.lineno} builds flags to load a model"


def test_dispatch_runs_the_mode_module_and_refuses_unknown_modes(monkeypatch):
    import appzoo.latent_diffusion.export as export

    seen = {}
    monkeypatch.setattr(export, "run", lambda flags, params: seen.setdefault("args", (flags, params)) and 0)
    flags = parse_flags(["--mode=export"])
    assert LatentDiffusionApp(flags, {"x": 1}).run("export") == 0
    assert seen["args"] == (flags, {"x": 1})
    with pytest.raises(UserError, match="--mode=fly is not available"):
        LatentDiffusionApp(flags, {}).run("fly")
