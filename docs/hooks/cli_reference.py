"""MkDocs hook: the command reference, generated from flatmin's argparse parser when the site is built.

The line ``<!-- cli-reference -->`` of a page is replaced by one section per parser: ``flatmin``
itself and every subcommand it has (theirs too), each with its description and a table of every
argument and flag with its help, as ``--help`` prints them. A command added to the parser gets its
section without any change here, and the reference cannot drift from the parser.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, List

# The reference documents this checkout's parser, whether or not (and wherever) flatmin is installed.
SRC = str(Path(__file__).resolve().parents[2] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from flatmin.cli import build_parser  # noqa: E402

MARKER = "<!-- cli-reference -->"


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every parser below it, depth first, each once (aliases share a parser)."""
    yield parser
    seen: List[int] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if id(sub) not in seen:
                    seen.append(id(sub))
                    yield from parsers(sub)


def cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell: no line breaks, ``|`` and markup characters escaped."""
    text = " ".join(text.split()).replace("\\", "\\\\")
    for char in "|*_[]<>`":
        text = text.replace(char, "\\" + char)
    return text


def section(parser: argparse.ArgumentParser) -> str:
    formatter = parser._get_formatter()
    positionals = [a for a in parser._actions if not a.option_strings]
    usage = " ".join([parser.prog, "[OPTIONS]", *(formatter._format_args(a, a.dest) for a in positionals)])
    lines = [f"## {parser.prog}", "", f"`{usage}`", ""]
    if parser.description:
        lines += [parser.description, ""]
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                anchor = f"{parser.prog} {choice.dest}".replace(" ", "-").lower()  # the section of that command
                rows.append((f"[`{choice.dest}`](#{anchor})", cell(choice.help or "")))
            continue
        text = formatter._expand_help(action) if action.help else ""  # a flag without help: tests/test_site.py says so
        rows.append((f"`{formatter._format_action_invocation(action)}`", cell(text)))
    lines += ["| argument | what it does |", "|---|---|", *(f"| {name} | {text} |" for name, text in rows), ""]
    return "\n".join(lines)


def reference(parser: argparse.ArgumentParser) -> str:
    return "\n".join(section(p) for p in parsers(parser))


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference(build_parser()))
