"""A wheel (what `pip install .` installs) carries everything the runtime reads from disk: the
Metal kernel sources (metal/ in the repo, kimi_mlx/metal/ once installed), the demo model, the
CLI module and the converter (cli.py and convert/ in the repo, kimi_mlx/cli.py and
kimi_mlx/convert/ once installed), and nothing outside kimi_mlx/ (no top-level `cli` or
`convert` to collide with other packages). The installed copy must find its kernels, run the
demo model and its console script's module must import from there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Build the wheel offline and unpack it into a folder of its own (no dependencies).

    Built from a copy of what the build reads, so a stale build/ folder in the checkout (setuptools
    reuses build/lib) cannot add or hide files; the copy keeps the links (kimi_mlx/cli.py, convert)."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("convert", "kimi_mlx", "metal"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("kimi_mlx-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp / "site")
    return tmp / "site"


def test_wheel_has_kernels_demo_model_cli_and_converter(installed):
    names = lambda d: sorted(p.name for p in d.iterdir() if p.suffix in (".metal", ".h"))  # noqa: E731
    kernels = names(ROOT / "metal")
    assert {"kda_decode.metal", "cuda_compat.h"} <= set(kernels), kernels
    assert names(installed / "kimi_mlx" / "metal") == kernels  # every source, and no stale one
    for name in kernels:
        assert (installed / "kimi_mlx" / "metal" / name).read_bytes() == (ROOT / "metal" / name).read_bytes()
    demo = ROOT / "kimi_mlx" / "demo" / "model"
    assert sorted(p.name for p in (installed / "kimi_mlx" / "demo" / "model").iterdir()) == sorted(
        p.name for p in demo.iterdir())
    assert (installed / "kimi_mlx" / "cli.py").read_bytes() == (ROOT / "cli.py").read_bytes()
    assert sorted(p.name for p in (installed / "kimi_mlx" / "convert").glob("*.py")) == sorted(
        p.name for p in (ROOT / "convert").glob("*.py"))


def test_wheel_installs_nothing_outside_kimi_mlx(installed):
    top = {p.name for p in installed.iterdir()}
    assert top == {"kimi_mlx", "kimi_mlx-0.1.0.dist-info"}, top
    dist_info = installed / "kimi_mlx-0.1.0.dist-info"
    assert (dist_info / "top_level.txt").read_text().split() == ["kimi_mlx"]
    assert "kimi-mlx = kimi_mlx.cli:app" in (dist_info / "entry_points.txt").read_text()
    record = (dist_info / "RECORD").read_text().splitlines()
    assert all(line.startswith(("kimi_mlx/", "kimi_mlx-0.1.0.dist-info/")) for line in record), record


def test_installed_copy_finds_its_kernels_and_runs_the_demo(installed, tmp_path):
    code = (
        "import kimi_mlx, kimi_mlx.kda.metal as m\n"
        "sources, err = m._load_all()\n"
        "assert err is None and set(sources) == {'kda_decode'}, err\n"
        "print(m.METAL_DIR)\n"
        "print(kimi_mlx.__file__)\n"
        "model, tok = kimi_mlx.load('demo')\n"
        "msgs = [{'role': 'user', 'content': 'What is 12 + 30?'}]\n"
        "print(repr(kimi_mlx.generate(model, tok, msgs, max_tokens=8)))\n"
        "import kimi_mlx.cli, kimi_mlx.convert\n"  # the console script's module and the converter
        "print(kimi_mlx.cli.__file__)\n"
        "print(kimi_mlx.convert.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    metal_dir, package, answer, cli, converter = out.stdout.strip().splitlines()[:5]
    assert Path(metal_dir) == installed / "kimi_mlx" / "metal"
    assert Path(package).is_relative_to(installed)
    assert Path(cli) == installed / "kimi_mlx" / "cli.py"
    assert Path(converter) == installed / "kimi_mlx" / "convert" / "__init__.py"
    assert "42" in answer
