"""The shape of the code (../shared/ARCHITECTURE.md): imports point down the layers, no import
cycles (function-level imports included), no module over ~400 lines, and every file a job writes
is named only in ``cryocv/jobs/jobdir.py``."""
import ast
import os

import pytest

from cryocv.jobs import jobdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(ROOT, "cryocv")

# a module may import modules of its own layer or of layers before it
LAYERS = [
    {"errors", "backend", "bibtex"},
    {"fourier", "geometry", "symmetry", "ctf", "masks", "kernels", "top_k_kernel", "ctf_kernel", "projector", "fsc", "models"},
    {"io.mrc", "particles", "io.star", "io.cs", "io.particle_files"},
    {"source", "subtraction", "noise", "search", "local_search", "accumulate", "em_pass", "nonuniform", "regularize",
     "reconstruct", "simulate", "plotting", "plot_worker", "register", "sgd", "relax"},
    {"jobs.jobdir", "jobs.checkpoints", "jobs.common", "jobs.loop", "jobs.simulate", "jobs.reconstruct", "jobs.refine", "jobs.subtract",
     "jobs.local_refine", "jobs.fsc", "jobs.convert", "jobs.demo", "jobs.abinitio", "jobs.relaxation",
     "jobs.registration"},
    {"cli", "__main__", "scipion_plugin", "scipion_env"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def core_modules() -> dict:
    """{dotted name below cryocv: path} of every module but the package ``__init__`` files."""
    found = {}
    for folder, _, files in os.walk(CORE):
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                rel = os.path.relpath(os.path.join(folder, name), CORE)[:-3]
                found[rel.replace(os.sep, ".")] = os.path.join(folder, name)
    return found


def imported_core_modules(module: str, path: str, known: set) -> set:
    """cryocv modules that ``module`` imports anywhere in its file (function bodies included)."""
    package = module.rsplit(".", 1)[0] if "." in module else ""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("cryocv"):
                target = node.module[len("cryocv."):] if node.module != "cryocv" else ""
            else:
                continue
            for alias in node.names:  # `from . import kernels` names a module
                candidate = f"{target}.{alias.name}" if target else alias.name
                out.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cryocv."):
                    out.add(alias.name[len("cryocv."):])
    return {m for m in out if m in known}


def test_every_module_has_a_layer():
    assert set(core_modules()) == set(LAYER), "classify new modules in LAYERS (and ARCHITECTURE.md)"


def test_imports_point_down_the_layers_without_cycles():
    modules = core_modules()
    graph = {m: imported_core_modules(m, p, set(modules)) for m, p in modules.items()}
    upward = [(m, t) for m, targets in graph.items() for t in targets if LAYER[t] > LAYER[m]]
    assert not upward, f"imports pointing up the layers: {upward}"
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                pytest.fail(f"import cycle: {' -> '.join(trail + [node, nxt])}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_package_inits_only_document():
    for folder in ("io", "jobs"):
        tree = ast.parse(open(os.path.join(CORE, folder, "__init__.py")).read())
        assert all(isinstance(node, ast.Expr) for node in tree.body), f"cryocv/{folder}/__init__.py re-exports"


def test_no_module_is_a_monolith():
    long = {m: n for m, p in core_modules().items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_job_file_names_are_defined_once():
    """No string literal equal to a job-directory file name outside jobs/jobdir.py (core,
    protocols, viewers): everything else asks jobdir for it."""
    names = {value for key, value in vars(jobdir).items() if key.isupper() and isinstance(value, str)}
    names |= {value for key, value in vars(jobdir).items() if key.isupper() and isinstance(value, tuple)
              for value in value}
    names = {name for name in names if "." in name}  # file names (folder names like "refine" are also words)
    assert {"map.mrc", "fsc.json", "checkpoint.json", "half_map_1.mrc"} <= names
    offenders = []
    for top in ("cryocv", "protocols", "viewers"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                path = os.path.join(folder, name)
                if not name.endswith(".py") or path == jobdir.__file__.replace(".pyc", ".py"):
                    continue
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Constant) and node.value in names:
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
