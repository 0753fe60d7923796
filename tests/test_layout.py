"""The package's shape: imports go one way (no cycles), importing changes no global state, and
library code logs rather than prints."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lungrt"


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.with_suffix("").relative_to(PKG.parent).parts).removesuffix(".__init__")
        mods[name] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                for cand in [target, *(f"{target}.{a.name}" for a in node.names)]:
                    if cand in mods and cand != m:
                        graph[m].add(cand)
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods and a.name != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 25
    assert cycles(graph) == []


def test_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_runner_contract_knows_no_backend_by_name():
    assert not import_graph()["lungrt.backends.base"] & {
        "lungrt.backends.tensorrt.runner",
        "lungrt.build.variants",
        "lungrt.build.resolve",
    }


# the stages, lowest first: a module imports only from its own layer or the ones before it. The runner contract
# (`backends.base`) and the artefact seal (`backends.integrity`) are what export writes against, below both.
LAYERS = [
    ["lungrt._version", "lungrt.core"],
    ["lungrt.data"],
    ["lungrt.backends.base", "lungrt.backends.integrity"],
    ["lungrt.models"],
    ["lungrt.export"],  # graph transforms and files: no runner, no evaluation
    ["lungrt.backends"],  # runners and engine compilers
    ["lungrt.evaluation"],  # metrics, gates (verify)
    ["lungrt.training"],
    ["lungrt.inference"],  # the batched stream, infer, DICOM, Ray
    ["lungrt.build"],  # orchestration: export -> compile -> verify -> record; the resolver
    ["lungrt.jobs", "lungrt.benchmark", "lungrt.doctor", "lungrt.demo"],
    ["lungrt.api"],
    ["lungrt.cli", "lungrt"],
]


def layer_of(module: str) -> int:
    """The layer of the longest LAYERS prefix that names `module`."""
    best = max(
        ((len(p), i) for i, names in enumerate(LAYERS) for p in names if module == p or module.startswith(p + ".")),
        default=None,
    )
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))


def test_no_import_runs_upward():
    assert upward_imports(import_graph()) == []


def test_upward_check_finds_an_upward_import():
    assert upward_imports({"lungrt.export.onnx": {"lungrt.evaluation.parity"}}) == [
        "lungrt.export.onnx -> lungrt.evaluation.parity"
    ]


def test_export_imports_neither_evaluation_nor_runners():
    graph = import_graph()
    runners = {m for m in graph if m.startswith("lungrt.backends.") and layer_of(m) == layer_of("lungrt.backends.x")}
    for m, targets in graph.items():
        if m.startswith("lungrt.export"):
            assert not {t for t in targets if t.startswith("lungrt.evaluation")} | (targets & runners), m


def test_the_command_line_is_parsing_and_printing_in_small_modules():
    sizes = {f.name: len(f.read_text().splitlines()) for f in (PKG / "cli").glob("*.py")}
    assert max(sizes.values()) <= 350, sizes


def test_importing_every_module_changes_no_global_state():
    code = """
import importlib, pkgutil, signal, sys
import matplotlib, torch
before = (matplotlib.get_backend() if 'matplotlib.pyplot' in sys.modules else None, torch.get_num_threads(),
          signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
import lungrt
for m in pkgutil.walk_packages(lungrt.__path__, 'lungrt.'):
    if m.name not in ('lungrt.inference.ray',) and not m.name.endswith('__main__'):
        importlib.import_module(m.name)
after = (matplotlib.get_backend() if 'matplotlib.pyplot' in sys.modules else None, torch.get_num_threads(),
         signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'
assert before == after, (before, after)
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_library_code_does_not_print():
    offenders = []
    for f in PKG.rglob("*.py"):
        if "cli" in f.relative_to(PKG).parts[:1]:  # the command line prints; nothing else does
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{f.name}:{node.lineno}")
            if (
                isinstance(node, ast.arg) is False
                and isinstance(node, ast.Name)
                and node.id == "print"
                and isinstance(getattr(node, "ctx", None), ast.Load)
            ):
                offenders.append(f"{f.name}:{node.lineno} (print as a default)")
    assert not offenders, offenders
