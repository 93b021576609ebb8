"""Each CLI command imports what it needs only: `import kimi_mlx`, `--help`, `plan`, `info` and a
convert refused by its early checks never import mlx-lm (whose package imports transformers: 2-4 s), while commands that build the
model do (the check can tell). Timings are in bench/, not here; this checks the imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
args = json.loads(sys.argv[1])
if args is None:
    import kimi_mlx
else:
    from kimi_mlx.cli import app
    try:
        app(args, standalone_mode=False)
    except (SystemExit, Exception):  # typer.Exit for a refused convert
        pass
print(json.dumps({m: m in sys.modules for m in ("mlx_lm", "transformers", "kimi_mlx.model")}))
"""


def imported(args) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [None, ["--help"], ["plan", "--context", "4096"], ["info"],
                                  ["convert", "/no/such/checkpoint", "out"]],
                         ids=["import kimi_mlx", "--help", "plan", "info", "convert refused early"])
def test_light_commands_do_not_import_the_model_or_mlx_lm(args):
    assert imported(args) == {"mlx_lm": False, "transformers": False, "kimi_mlx.model": False}


def test_generate_imports_them():
    assert imported(["generate", "--prompt", "What is 12 + 30?", "--max-tokens", "1"])["mlx_lm"]


def test_info_counts_the_weights_without_loading_them():
    from typer.testing import CliRunner

    from kimi_mlx.cli import app
    from mlx.utils import tree_flatten

    from kimi_mlx import Model, ModelArgs
    from kimi_mlx.loading import demo_model_path
    from kimi_mlx.plan import plan_for_path

    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    held = plan_for_path("demo", 100, memory_bytes=1 << 30).weights  # == load_model's bytes (test_plan)
    assert f"weights      {held / 2**30:.3f} GiB in memory" in result.stdout
    params = sum(p.size for _, p in tree_flatten(Model(ModelArgs.from_file(demo_model_path() / "config.json")).parameters()))
    assert f"parameters   {params / 1e6:.3f}M" in result.stdout and "on disk" in result.stdout
