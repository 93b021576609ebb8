"""The mlx / mlx-lm API this project calls, against a recorded snapshot of the oldest versions
pyproject.toml allows (tests/data/mlx_api_floor.json).

CI installs the newest mlx, so it cannot import the floor version; what it can check is the code
against a record of the floor's API made by running this file under that version:

    pip install --target /tmp/floor "mlx==<floor>" ("mlx-cpu==<floor>" on Linux) --no-deps
    PYTHONPATH=/tmp/floor python tests/mlx_api.py > tests/data/mlx_api_floor.json

The record holds every public name of the modules we import from (mlx.core and its fast, metal,
random, linalg namespaces, mlx.nn, mlx.utils, mlx.optimizers, the mlx_lm modules we use) and, for
callables, their parameter names. `used_api` scans our sources (AST) for each `mx.X`, `nn.X`,
`from mlx... import X` and the keyword arguments passed to them.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "cli.py", ROOT / "convert", ROOT / "kimi_mlx"]  # what the package installs
MLX_MODULES = ["mlx.core", "mlx.core.fast", "mlx.core.metal", "mlx.core.random", "mlx.core.linalg",
               "mlx.nn", "mlx.utils", "mlx.optimizers"]


# ---------------------------------------------------------------- the record (run under the floor)

def _params(obj, name: str) -> dict | None:
    """{"params": [...], "varkw": bool} of a callable, from inspect or nanobind's docstring lines."""
    try:
        sig = inspect.signature(obj)
        return {"params": [p.name for p in sig.parameters.values() if p.name != "self"],
                "varkw": any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())}
    except (TypeError, ValueError):
        pass
    names, varkw, found = set(), False, False
    for line in (getattr(obj, "__doc__", None) or "").splitlines():
        m = re.match(rf"^\s*(?:\d+\.\s*)?`*{re.escape(name)}\((.*)\)", line)
        if not m:
            continue
        found = True
        depth, part, parts = 0, "", []
        for ch in m.group(1):  # split at top-level commas
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch == "," and depth == 0:
                parts.append(part)
                part = ""
            else:
                part += ch
        parts.append(part)
        for p in parts:
            p = p.strip()
            if p.startswith("**"):
                varkw = True
            elif p and p not in ("/", "*") and not p.startswith("*"):
                names.add(re.split(r"[:=]", p)[0].strip())
    return {"params": sorted(names), "varkw": varkw} if found else None


def _record_module(modname: str) -> dict:
    mod = importlib.import_module(modname)
    out = {}
    for name in dir(mod):
        if name.startswith("_") and name != "__version__":
            continue
        obj = getattr(mod, name)
        out[name] = _params(obj, name) if callable(obj) else None
    return out


def snapshot() -> dict:
    import mlx.core as mx

    modules = sorted(set(MLX_MODULES) | {m for m in used_api().modules if _is_module(m)})
    import mlx_lm

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "modules": {m: _record_module(m) for m in modules}}


# ---------------------------------------------------------------- what our code uses

@dataclass
class Use:
    module: str
    name: str
    where: str  # file:line
    keywords: set = field(default_factory=set)


@dataclass
class Uses:
    uses: list
    modules: set


def used_api(paths=None, texts: dict | None = None) -> Uses:
    """Every mlx / mlx_lm name our sources use (module, name, keywords), by AST. `texts`: {label:
    source} to scan instead of files (tests)."""
    if texts is None:
        files = [f for p in (paths or SOURCES) for f in ([p] if p.is_file() else sorted(p.rglob("*.py")))]
        texts = {str(f.relative_to(ROOT)): f.read_text() for f in files}
    uses, modules = [], set()
    for label, text in texts.items():
        tree = ast.parse(text)
        aliases = {}  # local name -> dotted module or module.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in ("mlx", "mlx_lm"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                        modules.add(a.name)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in ("mlx", "mlx_lm"):
                modules.add(node.module)
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if _is_module(sub):
                        aliases[a.asname or a.name] = sub
                        modules.add(sub)
                    else:
                        aliases[a.asname or a.name] = sub
                        uses.append(Use(node.module, a.name, f"{label}:{node.lineno}"))
        calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in aliases:
                continue
            dotted = aliases[base.id] + "." + ".".join(chain)
            module, name = _split(dotted)
            if module is None:
                continue
            modules.add(module)
            call = calls.get(id(node))
            keywords = {k.arg for k in call.keywords if k.arg} if call is not None and dotted == f"{module}.{name}" else set()
            uses.append(Use(module, name, f"{label}:{node.lineno}", keywords))
        for node in ast.walk(tree):  # calls of names imported directly: tree_flatten(x, prefix=...)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in aliases:
                module, name = _split(aliases[node.func.id])
                if module is not None:
                    uses.append(Use(module, name, f"{label}:{node.lineno}", {k.arg for k in node.keywords if k.arg}))
    return Uses(uses, modules)


def _is_module(dotted: str) -> bool:
    """Whether a dotted name is a module, found without importing it (mlx_lm's package imports
    transformers, seconds)."""
    if dotted in MLX_MODULES:
        return True
    top, *rest = dotted.split(".")
    spec = importlib.util.find_spec(top) if top in ("mlx", "mlx_lm") else None
    if spec is None or not spec.submodule_search_locations or not rest:
        return bool(spec) and not rest
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _split(dotted: str) -> tuple[str | None, str | None]:
    """'mlx.core.fast.metal_kernel' -> ('mlx.core.fast', 'metal_kernel'): the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if _is_module(".".join(parts[:i])):
            return ".".join(parts[:i]), parts[i]
    return None, None


def missing(record: dict, uses: Uses) -> list[str]:
    """What `uses` needs that `record` (a snapshot) lacks: names, then keyword arguments."""
    problems = []
    for u in uses.uses:
        names = record["modules"].get(u.module)
        if names is None:
            problems.append(f"{u.where}: module {u.module} is not in the record")
        elif u.name not in names:
            problems.append(f"{u.where}: {u.module}.{u.name} is not in mlx {record['mlx']} / mlx-lm {record['mlx_lm']}")
        elif u.keywords and names[u.name] is not None and not names[u.name]["varkw"]:
            for k in sorted(u.keywords - set(names[u.name]["params"])):
                problems.append(f"{u.where}: {u.module}.{u.name} takes no keyword {k!r} in mlx {record['mlx']}")
    return problems


if __name__ == "__main__":
    json.dump(snapshot(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
