"""MkDocs hook: in the API reference, the docstrings' citations of the methods page (its path, a
comma and the section's title in double quotes) become links to that section of the site.

A citation names a section by the start of its heading (tests/test_docs.py checks that it exists);
one that matches no heading is left as plain text.
"""
from __future__ import annotations

import re
from pathlib import Path

from pymdownx.slugs import slugify

ALGORITHMS = Path(__file__).resolve().parents[1] / "algorithms.md"
CITATION = re.compile(r'docs/algorithms\.md, (?:"|&quot;)([^"&<]+)(?:"|&quot;)')
SLUG = slugify(case="lower")  # as mkdocs.yml's toc makes the headings' ids


def on_page_content(html: str, page, config, files) -> str:
    if not page.file.src_uri.startswith("api/"):
        return html
    headings = [line.lstrip("#").strip() for line in ALGORITHMS.read_text().splitlines() if line.startswith("#")]
    url = files.get_file_from_path("algorithms.md").url_relative_to(page.file)

    def link(match: re.Match) -> str:
        heading = next((h for h in headings if h.startswith(match.group(1))), None)
        if heading is None:
            return match.group(0)
        return f'<a href="{url}#{SLUG(heading, "-")}">{match.group(0)}</a>'

    return CITATION.sub(link, html)
