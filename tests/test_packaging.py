"""A wheel (what `pip install .` installs) carries everything the runtime reads from disk: the
Metal kernel sources (metal/ in the repo, kimi_mlx/metal/ once installed), the demo model, the
CLI module and the converter. The installed copy must find its kernels and run the demo model."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Build the wheel offline and unpack it into a folder of its own (no dependencies)."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("kimi_mlx-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp / "site")
    return tmp / "site"


def test_wheel_has_kernels_demo_model_cli_and_converter(installed):
    for name in ("kda_decode.metal", "kda_chunk.metal"):
        assert (installed / "kimi_mlx" / "metal" / name).read_bytes() == (ROOT / "metal" / name).read_bytes()
    demo = ROOT / "kimi_mlx" / "demo" / "model"
    assert sorted(p.name for p in (installed / "kimi_mlx" / "demo" / "model").iterdir()) == sorted(
        p.name for p in demo.iterdir())
    assert (installed / "cli.py").is_file() and (installed / "convert" / "pipeline.py").is_file()


def test_installed_copy_finds_its_kernels_and_runs_the_demo(installed, tmp_path):
    code = (
        "import kimi_mlx, kimi_mlx.kda.metal as m\n"
        "sources, err = m._load_all()\n"
        "assert err is None and {'kda_decode', 'kda_chunk_ut', 'kda_chunk_state'} <= set(sources), err\n"
        "print(m.METAL_DIR)\n"
        "print(kimi_mlx.__file__)\n"
        "model, tok = kimi_mlx.load('demo')\n"
        "msgs = [{'role': 'user', 'content': 'What is 12 + 30?'}]\n"
        "print(repr(kimi_mlx.generate(model, tok, msgs, max_tokens=8)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    metal_dir, package, answer = out.stdout.strip().splitlines()[:3]
    assert Path(metal_dir) == installed / "kimi_mlx" / "metal"
    assert Path(package).is_relative_to(installed)
    assert "42" in answer
