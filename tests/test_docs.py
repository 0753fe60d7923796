"""The README and the documentation site stay true: the README is short, the site builds strictly (no broken link,
no missing page), every results page is what its JSON renders to, every `lungrt ...` command line in them parses
against the real CLI, and every Python block runs (the README's own is run in test_api.py)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

try:  # Typer vendors its own Click
    from typer._click import exceptions as cli_errors
except ImportError:  # an older Typer over Click itself
    from click import exceptions as cli_errors

from lungrt.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!--[^>]*-->\s*)?```(bash|python)\n(.*?)```", re.S)


def command_lines(text: str) -> list[str]:
    """Every `lungrt ...` line of the bash blocks in `text` (continuations joined, comments dropped)."""
    found = []
    for _, lang, body in BLOCK.findall(text):
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for prefix in (".venv/bin/lungrt ", "lungrt "):
                if line.startswith(prefix):
                    found.append(line[len(prefix) :])
    return found


def parse(args: list[str]) -> None:
    """Click parses `args` as `lungrt ARGS` would: an unknown command or option, or a bad value, raises."""
    group = typer.main.get_command(app)
    ctx = group.make_context("lungrt", list(args))
    cmd, rest = group, _left(ctx)
    while hasattr(cmd, "resolve_command") and rest:
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
        rest = _left(ctx) if hasattr(cmd, "resolve_command") else []


def _left(ctx) -> list[str]:
    """A group's arguments left for its subcommand (Click 8.2 keeps them in `_protected_args`)."""
    return list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])) + list(ctx.args)


def test_readme_is_read_in_five_minutes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    assert "bash scripts/setup.sh && .venv/bin/lungrt demo" in lines and "bash scripts/test.sh" in lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_parses(page):
    lines = command_lines(page.read_text())
    for line in lines:
        try:
            parse(shlex.split(line))
        except cli_errors.Exit:
            pass  # --help, --version: parsed, then they exit
        except cli_errors.UsageError as e:
            pytest.fail(f"{page.name}: `lungrt {line}`: {e.format_message()}")


def test_the_command_line_check_catches_a_wrong_option():
    with pytest.raises(cli_errors.UsageError):
        parse(["infer", "a/", "--out", "o/", "--no-such-option"])
    with pytest.raises(cli_errors.UsageError):
        parse(["no-such-command"])


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.name != "README.md" and "```python" in p.read_text()], ids=lambda p: p.name
)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for marker, lang, body in BLOCK.findall(page.read_text()):
        if lang == "python" and "not-run" not in marker:
            exec(compile(body, str(page), "exec"), {})  # noqa: S102 - the page's own example


def test_results_pages_are_what_their_json_renders_to():
    res = subprocess.run(
        [sys.executable, "scripts/render_results.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_site_builds_strictly(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists() and (
        tmp_path / "site" / "results" / "accuracy" / "index.html"
    ).exists()
