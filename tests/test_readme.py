"""The README's first two lines are the set-up commands; CI must run exactly the test one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()[:2]]
    assert lines[0].startswith("pip install -e . && kimi-mlx ")
    assert lines[1] in (ROOT / ".ci" / "run").read_text().splitlines()
