"""The README's commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:]
    return [b.split("\n```")[0].strip() for b in blocks]


def test_readme_starts_with_the_demo_and_the_test_command():
    demo, tests = _commands()[:2]
    assert "torchrun --standalone --nproc_per_node 2 examples/train_gpt.py" in demo
    assert demo.startswith("python3 -m venv .venv") and "pip install" in demo
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci
