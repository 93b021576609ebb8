"""The oldest mlx / mlx-lm pyproject.toml allows have every API the code calls.

CI installs the newest mlx, so the floor version itself cannot run here. What is checked instead:
tests/data/mlx_api_floor.json is a record of the floor versions' API (every public name of the
modules we import from, and the parameter names of the callables), made by running
tests/mlx_api.py under exactly those versions; the record must name the versions pyproject.toml
states, and every `mx.X`, `nn.X`, `from mlx... import X` in the installed sources, with the keyword
arguments passed, must be in it. Raising the floor means regenerating the record (see mlx_api.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx_api

ROOT = Path(__file__).resolve().parents[1]
RECORD = json.loads((ROOT / "tests" / "data" / "mlx_api_floor.json").read_text())


def floors() -> tuple[str, str]:
    """(mlx floor, mlx-lm pin) from pyproject.toml: the oldest mlx any requirement line allows
    (mlx, mlx[cpu], mlx[<extra>], in dependencies or extras), and the one mlx-lm pin."""
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; we allow 3.10)
    mlx = re.findall(r'"mlx(?:\[[\w,-]+\])?>=([\d.]+)[;",]', text)
    lm = re.findall(r'"mlx-lm==([\d.]+)"', text)
    assert mlx and not re.search(r'"mlx(?:\[[\w,-]+\])?(?:;|")', text), "every mlx requirement states a floor"
    assert len(set(lm)) == 1, lm
    return min(mlx, key=version), lm[0]


def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:3])


def test_record_is_of_the_versions_pyproject_allows():
    mlx_floor, mlx_lm_pin = floors()
    assert (RECORD["mlx"], RECORD["mlx_lm"]) == (mlx_floor, mlx_lm_pin)
    assert version(mx.__version__) >= version(mlx_floor)


def test_the_code_calls_only_the_floors_api():
    uses = mlx_api.used_api()
    assert any(u.module == "mlx.core.fast" and u.name == "gated_delta_update" for u in uses.uses)
    assert mlx_api.missing(RECORD, uses) == []


def test_a_use_past_the_floor_is_found():
    """The check can fail: the record of mlx 0.32.2 lacked mx.fast.gated_delta_update (the fault
    this floor fixes), and made-up names and keywords are named with their file and line."""
    older = json.loads(json.dumps(RECORD))
    older["mlx"] = "0.32.2"
    del older["modules"]["mlx.core.fast"]["gated_delta_update"]
    problems = mlx_api.missing(older, mlx_api.used_api())
    assert problems and all("gated_delta_update is not in mlx 0.32.2" in p for p in problems)
    assert any(p.startswith("kimi_mlx/kda/mx_fast.py:") for p in problems)
    source = ("import mlx.core as mx\nimport mlx.nn as nn\nfrom mlx.utils import tree_flatten\n"
              "mx.quantize(w, group_size=64, nonsense=1)\nmx.fast.not_an_api(x)\nnn.Linear(2, 3, colour=1)\n"
              "tree_flatten(p, prefixx='')\n")
    assert mlx_api.missing(RECORD, mlx_api.used_api(texts={"x.py": source})) == [
        f"x.py:4: mlx.core.quantize takes no keyword 'nonsense' in mlx {RECORD['mlx']}",
        f"x.py:5: mlx.core.fast.not_an_api is not in mlx {RECORD['mlx']} / mlx-lm {RECORD['mlx_lm']}",
        f"x.py:6: mlx.nn.Linear takes no keyword 'colour' in mlx {RECORD['mlx']}",
        f"x.py:7: mlx.utils.tree_flatten takes no keyword 'prefixx' in mlx {RECORD['mlx']}",
    ]
