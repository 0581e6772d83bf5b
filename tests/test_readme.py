"""The README and docs/ stay true: the example runs, commands exist, links resolve."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from llamalab.cli import build_parser

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]


def python_blocks(section: str) -> list[str]:
    readme = README.read_text(encoding="utf-8")
    start = readme.index(f"## {section}")
    end = readme.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", readme[start : end if end > 0 else None], re.DOTALL)


def test_python_api_example_runs_as_written(smollm2_path, tmp_path):
    (code,) = python_blocks("Python API")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not next to any model file: the example must find the default itself
        env={**os.environ},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) > 5, result.stdout  # it printed generated text


# ------------------------------------------------------------------ commands
def split_fences(text: str) -> tuple[list[tuple[str, str]], str]:
    """The fenced code blocks of a markdown text as (language, body), and the prose left."""
    blocks: list[tuple[str, str]] = []
    prose: list[str] = []
    fence: tuple[str, list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if fence is None:
                fence = (line[3:].strip(), [])
            else:
                blocks.append((fence[0], "\n".join(fence[1])))
                fence = None
        elif fence is not None:
            fence[1].append(line)
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


def command_lines(text: str) -> list[str]:
    """Every `llamalab ...` command shown: in shell code blocks and in inline code."""
    blocks, prose = split_fences(text)
    lines = [
        line for lang, body in blocks if lang in ("", "bash", "sh") for line in body.splitlines()
    ]
    # Inline code may wrap across a line break.
    lines += [m.replace("\n", " ") for m in re.findall(r"`([^`]+)`", prose)]
    found = []
    for line in lines:
        line = line.split(" #", 1)[0]  # a shell comment
        if "python -m llamalab." in line:  # another module's command line
            continue
        m = re.search(r"(?:^|[\s|;(])llamalab ([a-z].*)", line)
        if m:
            found.append("llamalab " + m.group(1).strip())
    return found


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public way to walk subcommands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def documented_commands() -> list[tuple[str, str]]:
    return [
        (page.relative_to(REPO).as_posix(), line)
        for page in PAGES
        for line in command_lines(page.read_text(encoding="utf-8"))
    ]


def test_the_readme_shows_each_task_s_commands():
    shown = {line.split()[1] for line in command_lines(README.read_text(encoding="utf-8"))}
    for name in ("generate", "chat", "serve", "info", "convert", "verify"):
        assert name in shown, f"README shows no `llamalab {name}`"
    for name in ("tokenizer", "data", "train", "eval"):
        assert name in shown, f"README shows no `llamalab {name}`"


@pytest.mark.parametrize("page,line", documented_commands())
def test_documented_command_exists_with_its_options(page, line):
    parser = build_parser()
    commands = subparsers(parser)
    words = line.split()
    name = words[1]
    assert name in commands, f"{page}: `{line}`: llamalab has no subcommand {name!r}"
    sub = commands[name]
    nested = subparsers(sub)
    if nested:  # `llamalab tokenizer train`, `llamalab data prepare`
        assert len(words) > 2 and words[2] in nested, f"{page}: `{line}`: no such subcommand"
        sub = nested[words[2]]
    known = option_strings(sub)
    for option in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", line):
        option = option.split("=", 1)[0]
        assert option in known, f"{page}: `{line}`: llamalab {name} has no option {option}"


def test_command_parsing_catches_a_wrong_subcommand_and_option():
    """The checks above are not vacuous."""
    commands = subparsers(build_parser())
    assert "generat" not in commands
    assert "--max-token" not in option_strings(commands["generate"])
    assert command_lines("```bash\nllamalab info x --json  # --nothing\n```\n") == [
        "llamalab info x --json"
    ]
    text = "```python\nllamalab.x()\n```\nsee `llamalab chat`\n```bash\ntorchrun -m llamalab train c\n```"
    assert command_lines(text) == ["llamalab train c", "llamalab chat"]


def test_every_make_target_shown_exists():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"(?m)^([\w-]+):", makefile))
    for page in PAGES:
        blocks, prose = split_fences(page.read_text(encoding="utf-8"))
        shown = [line for _, body in blocks for line in body.splitlines()]
        shown += re.findall(r"`([^`]+)`", prose)
        for target in (m.group(1) for s in shown if (m := re.match(r"\s*make ([\w-]+)", s))):
            assert target in targets, f"{page.name}: `make {target}` is not a Makefile target"


# ------------------------------------------------------------------ links
def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[`*_]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, text = split_fences(page.read_text(encoding="utf-8"))
    return {github_anchor(h) for h in re.findall(r"(?m)^#{1,6} (.+)$", text)}


def links(page: Path) -> list[str]:
    _, text = split_fences(page.read_text(encoding="utf-8"))
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_stay_inside_the_repository_and_resolve(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text, f"{page.name} points outside the repository"
    assert not re.search(r"(?<![\w.])/(?:work|home)/", text), f"{page.name}: a machine path"
    root = REPO.resolve()
    for link in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ...
            assert link.startswith("https://"), f"{page.name}: {link}"
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page.resolve()
        assert target.is_relative_to(root), f"{page.name}: {link} leaves the repository"
        assert target.exists(), f"{page.name}: {link} does not exist"
        if fragment and target.suffix == ".md":
            assert fragment in anchors(target), f"{page.name}: {link}: no such heading"


def test_the_readme_stays_the_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 150
    for section in ("## Quick start", "## Python API"):
        assert section in text
    assert "make run" in text and "make test" in text
    for page in DOCS:  # every page of docs/ is reachable from the README
        assert f"docs/{page.name}" in text, f"README does not link docs/{page.name}"


def test_link_checks_are_not_vacuous(tmp_path):
    assert github_anchor("A 0.9B model, bandwidth bound") == "a-09b-model-bandwidth-bound"
    assert github_anchor("Options every model command takes") == (
        "options-every-model-command-takes"
    )
    page = tmp_path / "x.md"
    page.write_text("[a](../shared/DATA.md) [b](y.md#z)\n```\n[c](no.md)\n```\n")
    assert links(page) == ["../shared/DATA.md", "y.md#z"]
