"""MkDocs hook: the benchmark results of the repository (plots, logs), published with the site.

The pages link them as the repository holds them, ``../benchmarks/results/NAME`` from ``docs/``, so
the same links work when the Markdown is read in the repository and on the built site, where the
files are copied to ``benchmarks/results/``. Markdown results are not pages of their own: a page
that shows one includes it (``--8<--``).
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ["benchmarks/results"]  # with their subfolders (a sweep's plots)


def on_files(files: Files, config) -> Files:
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix != ".md":
                relative = path.relative_to(ROOT).as_posix()
                file = File.generated(config, "../" + relative, abs_src_path=str(path),
                                      inclusion=InclusionLevel.INCLUDED)
                file.dest_uri = relative  # under the site's root, not above it
                files.append(file)
    return files
