"""The package's shape, as docs/architecture.md states it: read off the source, not trusted.

Imports are read with ``ast`` (module level and inside functions), relative imports resolved, and the
graph between this repository's modules checked: no cycle; the reference imports neither torch nor
``stm_fast``; each layer imports only its own and the layers below it (``LAYERS``, lowest first:
reference, runtime, kernels, model, reduction, measures, eval, tools). Also: no private name is imported
across modules, no function in ``stm_fast/`` or ``stm_ref/`` is longer than 60 lines, no file cites a
document outside the repository, and no test module imports another.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("stm_fast", "stm_ref")

# layer of each module (first matching prefix wins); forbidden[layer] = layers it must not import
LAYERS = [
    ("stm_ref", "reference"),
    ("stm_fast.runtime", "runtime"),
    ("stm_fast.ops", "kernels"), ("stm_fast.ssm", "kernels"),
    ("stm_fast.vim", "model"), ("stm_fast.layer_stats", "model"), ("stm_fast.registry", "model"),
    ("stm_fast.models", "model"), ("stm_fast.checkpoint", "model"),
    ("stm_fast.reduction", "reduction"),
    *[(f"stm_fast.{m}", "measures") for m in ("flops", "analysis", "selfcheck", "digits", "fashion_mnist", "floor")],
    ("stm_fast.eval", "eval"),
    ("stm_fast", "tools"),  # bench, train_tiny and the package itself
]
FORBIDDEN = {
    "reference": {"runtime", "kernels", "model", "reduction", "measures", "eval", "tools"},
    "runtime": {"kernels", "model", "reduction", "measures", "eval", "tools", "reference"},
    "kernels": {"model", "reduction", "measures", "eval", "tools"},
    "model": {"reduction", "measures", "eval", "tools"},
    "reduction": {"measures", "eval", "tools"},
    "measures": {"eval", "tools"},
    "eval": {"tools"},
}


def layer_of(module):
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"module {module} has no layer in tests/test_architecture.py: add it (and to docs/architecture.md)")


def modules():
    """{dotted name: path} of every module of the two packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name, path):
    """[(imported module or None for third-party, names imported, line)] of one module."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.append((mod, [a.name for a in node.names], node.lineno))
    return found


def graph():
    mods = modules()
    edges = {}
    for name, path in mods.items():
        targets = set()
        for mod, names, _ in imports_of(name, path):
            for cand in [f"{mod}.{n}" for n in names] + [mod]:  # "from . import x" imports the module x
                if cand in mods and cand != name:
                    targets.add(cand)
                    break
        edges[name] = targets
    return mods, edges


def test_no_import_cycle():
    _, edges = graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_no_forbidden_import_direction():
    mods, edges = graph()
    bad = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})" for m in sorted(edges) for t in sorted(edges[m])
           if layer_of(t) in FORBIDDEN.get(layer_of(m), ())]
    for name, path in mods.items():  # the reference stays free of torch, including third-party torch packages
        if layer_of(name) == "reference":
            bad += [f"{name} imports {mod} (line {line})" for mod, _, line in imports_of(name, path)
                    if mod and (mod.split(".")[0] in ("torch", "triton", "stm_fast"))]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_no_private_name_is_imported_across_modules():
    mods = modules()
    bad = [f"{name}: from {mod} import {n}" for name, path in mods.items() for mod, names, _ in imports_of(name, path)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_functions_are_at_most_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)


def test_nothing_cites_documents_outside_the_repository():
    """Users who clone the repository cannot read the team's notes: cite docs/ and the paper's equations."""
    pattern = re.compile(r"SPEC(\.md| §)|NOTES\.md|shared/(paper|SPEC|NOTES)")
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".sh", ".toml", ".cpp") and ".git" not in p.parts
             and p.resolve() != pathlib.Path(__file__).resolve()]
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
           if pattern.search(line)]
    assert not bad, "citations of files outside the repository: " + ", ".join(bad[:20])


def test_only_the_backend_table_names_a_backend_module():
    """The model, the reductions, the eval and the dispatcher (stm_fast.ssm) import no backend module
    (``stm_fast.ops.scan_*``, ``ops.conv``): they reach kernels through ``stm_fast.ops.backends``' records, so
    deleting a backend's module and its record leaves them untouched. (Tools such as the CPU floor may
    import a kernel they measure; backend modules may import their own helpers.)"""
    mods, edges = graph()
    kernel = re.compile(r"^stm_fast\.ops\.(scan_\w+|conv)$")
    bad = [f"{m} imports {t}" for m in sorted(edges) for t in sorted(edges[m])
           if kernel.match(t) and (layer_of(m) in ("model", "reduction", "eval") or m == "stm_fast.ssm")]
    assert not bad, "\n".join(bad)
    table = (ROOT / "stm_fast" / "ops" / "backends.py").read_text()
    backend_modules = [n for n in mods if re.match(r"^stm_fast\.ops\.scan_(?!autograd)\w+$", n)]
    assert backend_modules and all(f'"{n}"' in table for n in backend_modules), "every backend module has a record"


def test_no_test_module_imports_another():
    """Test modules share code through builders (tests/builders.py, verify/strategies.py, verify/mutations.py,
    verify/fast_path.py), never by importing each other."""
    bad = []
    for tree in ("tests", "verify", "benchmarks"):
        for path in sorted((ROOT / tree).glob("*.py")):
            for mod, names, line in imports_of(f"{tree}.{path.stem}", path):
                targets = [mod or ""] + [f"{mod}.{n}" for n in names]
                if any(t.split(".")[0] in ("tests", "verify", "benchmarks") and t.split(".")[-1].startswith(("test_", "bench_"))
                       for t in targets):
                    bad.append(f"{tree}/{path.name}:{line} imports {mod} {names}")
    assert not bad, "\n".join(bad)
