"""The house's layering, read from the source (nothing is imported): the framework (``easynlp_ldm/``) imports no app,
no model and no data set, and no project module reaches itself again through imports.

Every import counts, wherever it stands (module level or inside a function), and so does
``importlib.import_module("a.b")`` with a literal name. ``from package import name`` is an arrow to
``package.name`` when that is a module of the project, else to ``package``. A package's ``__init__`` is not drawn as
imported by the modules inside it (Python runs it first, but that is no choice of the importing module's)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("easynlp_ldm", "appzoo", "modelzoo", "shapes_data")
FRAMEWORK = "easynlp_ldm"
ABOVE_THE_FRAMEWORK = ("appzoo", "modelzoo", "shapes_data")


def module_files() -> dict[str, str]:
    """module name → its file, for every .py of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts.pop()
                    modules[".".join(parts)] = path
    return modules


def _is_import_module(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__") and bool(call.args) and isinstance(call.args[0], ast.Constant) \
        and isinstance(call.args[0].value, str)


def imported_names(module: str, path: str, modules: dict[str, str]) -> list[tuple[str, int]]:
    """(dotted name, line) of everything ``module`` imports, at any depth of its code."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names += [(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node.lineno)
                      for alias in node.names]
        elif isinstance(node, ast.Call) and _is_import_module(node):
            names.append((node.args[0].value, node.lineno))
    return names


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """module → the project modules it imports."""
    graph = {}
    for module, path in modules.items():
        graph[module] = {name for name, _line in imported_names(module, path, modules) if name in modules} - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(start: str) -> None:
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def test_the_framework_imports_no_app_model_or_data_set():
    modules = module_files()
    wrong = [f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
             for module, path in modules.items() if module.split(".")[0] == FRAMEWORK
             for name, line in imported_names(module, path, modules) if name.split(".")[0] in ABOVE_THE_FRAMEWORK]
    assert not wrong, "the framework imports what stands above it:\n" + "\n".join(sorted(set(wrong)))


def test_no_import_cycle():
    found = cycles(import_graph(module_files()))
    assert not found, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_follows_function_level_relative_and_import_module_imports(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from b import g\n")
    (tmp_path / "b.py").write_text("import importlib\n\ndef g():\n    importlib.import_module('c')\n")
    (tmp_path / "c.py").write_text("import a\nfrom p import d\n")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "__init__.py").write_text("")
    (tmp_path / "p" / "d.py").write_text("from . import e\n")
    (tmp_path / "p" / "e.py").write_text("from .d import x\nfrom p import y\n")  # y: a name of p, not a module
    modules = {name: str(tmp_path / f"{name}.py") for name in "abc"}
    modules.update({"p": str(tmp_path / "p" / "__init__.py"), "p.d": str(tmp_path / "p" / "d.py"),
                    "p.e": str(tmp_path / "p" / "e.py")})
    graph = import_graph(modules)
    assert graph["c"] == {"a", "p.d"} and graph["p.d"] == {"p.e"} and graph["p.e"] == {"p.d", "p"}
    assert cycles(graph) == [["a", "b", "c"], ["p.d", "p.e"]]
