"""The README's commands are the ones CI and users run, and the README and docs/ point only at
things that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 350  # the deep dives live in docs/ (issue 22)


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


def test_readme_stays_short_and_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    for page in DOCS[1:]:
        assert f"](docs/{page.name}" in text, f"README does not link docs/{page.name}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_anchor(m[1]) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_and_anchor_exists():
    broken = []
    for page in DOCS:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_no_page_mentions_the_removed_bench_subcommand():
    # the benchmark left the installed package: ``python -m benchmarks`` from a checkout
    for page in DOCS:
        text = page.read_text()
        assert not re.search(r"sharded-adamw bench|cli bench|sharded_adamw[./]bench", text), page
