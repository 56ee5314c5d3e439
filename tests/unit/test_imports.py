"""The package's import graph, read from the code: no circle, stages below tools below the CLI, an import inside a
function only where it defers a heavy dependency, and every module importable alone."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import spin_ray

ROOT = Path(spin_ray.__file__).parent
# Third-party packages that take seconds to import: an import inside a function may defer one of these, nothing else.
HEAVY = {"torch", "ray", "vllm", "transformers", "pyarrow", "datasets", "lm_eval", "fastapi", "starlette", "pydantic",
         "numpy", "safetensors", "gguf", "matplotlib", "mlflow", "wandb", "tensorboard", "peft"}
# Who may import whom: a module imports only modules of its own or a lower rank, by folder (or by module where a
# folder's modules differ: the named models are built by training on the bundled data, above both).
RANK = {"config": 0, "failures": 0, "assets": 0, "models": 1, "logs": 1, "data": 2, "training": 3,
        "models.builders": 3.5, "stages": 4, "tools": 5, "cli": 6}


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py") if "lm_eval_tasks" not in p.parts}


def _module(dotted: str) -> str | None:
    """The package module a dotted import name lands in (`spin_ray.data.records.join` → spin_ray.data.records)."""
    parts = dotted.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in MODULES), None)


@functools.cache
def _imports(module: str) -> tuple[frozenset[str], tuple[tuple[int, str], ...], frozenset[str]]:
    """(package modules imported at the top, (line, module) imported inside functions, heavy packages at the top);
    imports under `if TYPE_CHECKING:` run never and count as neither."""
    top, inner, heavy = set(), [], set()

    def visit(body: list[ast.stmt], in_function: bool) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [f"{node.module}.{a.name}" for a in node.names] if node.module else []
                for dotted in names:
                    target = _module(dotted) if dotted.startswith("spin_ray.") else None
                    if target and target != module:
                        (inner.append((node.lineno, target)) if in_function else top.add(target))
                    elif dotted.split(".")[0] in HEAVY and not in_function:
                        heavy.add(dotted.split(".")[0])
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, True)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    if isinstance(getattr(node, field, None), list):
                        visit(getattr(node, field), in_function)

    visit(ast.parse(MODULES[module].read_text()).body, False)
    return frozenset(top), tuple(inner), frozenset(heavy)


@functools.cache
def _heavy(module: str) -> frozenset[str]:
    """Heavy packages that importing `module` loads (the graph has no circle: test_no_circle)."""
    top, _, heavy = _imports(module)
    return heavy.union(*(_heavy(m) for m in top))


def _rank(module: str) -> float:
    parts = module.split(".")[1:] or ["config"]
    return RANK.get(".".join(parts[:2]), RANK[parts[0]])


def test_no_circle() -> None:
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(_imports(module)[0]):
            assert state.get(target) != "open", "import circle: " + " → ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def test_a_module_imports_only_its_own_rank_or_lower() -> None:
    upward = [f"{m} → {t}" for m in MODULES for t in {*_imports(m)[0], *(t for _, t in _imports(m)[1])}
              if _rank(t) > _rank(m)]
    assert upward == []


def test_an_import_inside_a_function_defers_a_heavy_dependency() -> None:
    """Such an import is allowed only where the module it names would load a heavy package its importer does not:
    hiding an import circle or a light module is not a reason."""
    hiding = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {t}" for m in MODULES
              for line, t in _imports(m)[1] if _heavy(t) <= _heavy(m)]
    assert hiding == []


def test_every_module_imports_alone() -> None:
    """Each module first into a fresh set of spin_ray modules (third-party ones stay loaded, for speed)."""
    code = ("import importlib, sys\n"
            f"for name in {sorted(MODULES)!r}:\n"
            "    for loaded in [m for m in sys.modules if m == 'spin_ray' or m.startswith('spin_ray.')]:\n"
            "        del sys.modules[loaded]\n"
            "    importlib.import_module(name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_api_names_stay_the_functions_after_their_modules_load() -> None:
    """No submodule bears an API name, so loading a stage's module leaves `spin_ray.train` the function."""
    code = ("import importlib, inspect, spin_ray\n"
            "for name, home in spin_ray._HOMES.items():\n"
            "    module = importlib.import_module(f'spin_ray.{home}')\n"
            "    assert getattr(spin_ray, name) is getattr(module, name), name\n"
            "import spin_ray.stages.train, spin_ray.stages.evaluate\n"
            "assert inspect.isfunction(spin_ray.train) and inspect.isfunction(spin_ray.evaluate)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
