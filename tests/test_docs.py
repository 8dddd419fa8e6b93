"""The repository stands alone: docs/algorithms.md, the reference the code cites, has every section
that is cited, and no file links to anything outside the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*ROOT.glob("src/flatmin/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"),
           *ROOT.glob("*.md"), *ROOT.glob("benchmarks/*.md"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("docs/hooks/*.py")]


def test_every_cited_section_of_the_algorithms_reference_exists():
    headings = [line.lstrip("#").strip() for line in (ROOT / "docs" / "algorithms.md").read_text().splitlines()
                if line.startswith("#")]
    cited = {(path.name, section) for path in SOURCES
             for section in re.findall(r'docs/algorithms\.md, "([^"]+)"', path.read_text())}
    assert cited, "the code cites docs/algorithms.md by section"
    missing = [(name, section) for name, section in cited if not any(h.startswith(section) for h in headings)]
    assert not missing, missing


def test_nothing_points_outside_the_repository():
    for path in SOURCES:
        text = path.read_text()
        if path != Path(__file__).resolve():
            assert "SPEC.md" not in text, f"{path} cites a specification that is not in the repository"
        if path.suffix == ".md":
            for target in re.findall(r"\]\(([^)#]+)\)", text):  # links to files
                if not re.match(r"[a-z]+://", target):
                    assert (path.parent / target).resolve().is_relative_to(ROOT), (path, target)
                    assert (path.parent / target).exists(), (path, target)
