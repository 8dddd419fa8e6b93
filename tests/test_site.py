"""The documentation site: it builds in strict mode (no broken link, missing page or unresolved API
reference), fetches nothing from the network, shows MARWP's signature and update rule, documents
every flag of every command, and every Python block of its pages (and the README's) runs."""
import argparse
import html
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flatmin
from flatmin.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for this module with ``mkdocs build --strict``."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def text_of(page: str) -> str:
    """The visible text of an HTML fragment: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def section(page: str, heading_id: str) -> str:
    """The HTML from the heading with ``id=heading_id`` to the next heading of the same level."""
    match = re.search(rf'<h(\d) id="{re.escape(heading_id)}"', page)
    assert match, f"no heading {heading_id!r}"
    end = re.search(rf"<h{match.group(1)}[ >]", page[match.end():])
    return page[match.start():match.end() + end.start() if end else len(page)]


def test_every_page_is_built(site):
    for page in PAGES:
        relative = page.relative_to(ROOT / "docs").with_suffix("")
        target = site / (relative.parent if relative.name == "index" else relative) / "index.html"
        assert target.exists(), f"{page.name} was not built"


def test_nothing_is_fetched_from_the_network(site):
    """No script, stylesheet, font or image of the site comes from another host."""
    remote = re.compile(r"^(https?:)?//", re.I)
    for page in site.rglob("*.html"):
        text = page.read_text()
        for tag, attribute in (("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src")):
            for element in re.findall(rf"<{tag}\b[^>]*>", text, re.I):
                value = re.search(rf'\b{attribute}="([^"]*)"', element)
                if value and remote.match(value.group(1)):
                    rel = re.search(r'\brel="([^"]*)"', element)
                    assert rel and rel.group(1) == "canonical", f"{page}: {element}"
    for sheet in site.rglob("*.css"):
        for url in re.findall(r"@import\s+(?:url\()?['\"]?([^'\")\s;]+)|url\(['\"]?([^'\")]+)", sheet.read_text()):
            assert not any(remote.match(part) for part in url), f"{sheet}: {url}"


def test_the_api_page_of_marwp_shows_its_signature_and_update_rule(site):
    page = section((site / "api" / "optimizers" / "index.html").read_text(), "flatmin.MARWP")
    text = text_of(page)
    for name, parameter in inspect.signature(flatmin.MARWP).parameters.items():
        assert re.search(rf"\b{name}\b", text), f"signature: {name}"
        if parameter.default is not inspect.Parameter.empty:
            assert f"{name}: float = {parameter.default!r}" in text, f"signature: default of {name}"
    rules = re.search(r"\n\n((?: {4}.+\n)+)", inspect.getdoc(flatmin.MARWP) + "\n").group(1)
    assert "∇L(w + ε; B2)" in rules and "sqrt(1 + η · F)" in rules, "the docstring's first code block is the rule"
    for line in rules.splitlines():
        assert line.strip() in text, f"update rule: {line.strip()}"


def parsers(parser: argparse.ArgumentParser):
    """``parser`` and every parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from parsers(sub)


def test_every_argument_of_every_command_has_help():
    for parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                missing = [name for name in action.choices if not (helps.get(name) or "").strip()]
                assert not missing, f"{parser.prog}: commands without help: {missing}"
                continue
            name = action.option_strings or [action.dest]
            # The config flags append "(default: ...)" to their help: that alone is no help text.
            words = re.sub(r"\(default: [^)]*\)\s*$", "", action.help or "").strip()
            assert words and action.help != argparse.SUPPRESS, f"{parser.prog} {name[0]} has no help text"


def test_the_command_reference_lists_every_flag_of_every_command(site):
    page = (site / "cli-reference" / "index.html").read_text()
    commands = list(parsers(build_parser()))
    assert {p.prog for p in commands} >= {"flatmin train", "flatmin compare", "flatmin analyze"}
    for parser in commands:
        text = text_of(section(page, parser.prog.replace(" ", "-").lower()))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                names = list(action.choices)
            else:
                names = action.option_strings or [action.metavar or action.dest]
                expanded = parser._get_formatter()._expand_help(action) if action.help else ""  # %(default)s filled in
                assert " ".join(expanded.split()) in " ".join(text.split()), f"{parser.prog}: help of {names}"
            for name in names:
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{parser.prog}: {name}"


API_MODULES = ["flatmin", "flatmin.analysis", "flatmin.distributed", "flatmin.distributed.fsdp", "flatmin.losses",
               "flatmin.diagnostics", "flatmin.integrations", "flatmin.integrations.lightning",
               "flatmin.integrations.huggingface"]


def public_callables():
    """(qualified name, object, its own docstring, its name in its class) for every public class and
    function of the API reference, with the public methods each class defines (and those of
    flatmin's optimizer base)."""
    import importlib
    from flatmin.optim.base import WrappedOptimizer
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [
            name for name, obj in vars(module).items()
            if not name.startswith("_") and getattr(obj, "__module__", None) == module_name]
        for name in names:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                yield f"{module_name}.{name}", obj, obj.__doc__, name
            elif inspect.isclass(obj):
                yield f"{module_name}.{name}", obj, obj.__doc__, name
                for klass in [obj] + ([WrappedOptimizer] if issubclass(obj, WrappedOptimizer) else []):
                    for attr, member in vars(klass).items():
                        if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__call__"):
                            yield f"{module_name}.{name}.{attr}", member, member.__doc__, f"{klass.__name__}.{attr}"


def python_blocks():
    """Every ```python block of the site: its pages, the README and the docstrings of the API
    reference, as (where, code, the line above it, the module of the docstring or None)."""
    sources = [(str(path.relative_to(ROOT)), path.read_text(), None) for path in [*PAGES, ROOT / "README.md"]]
    sources += [(name, inspect.cleandoc(doc), obj.__module__) for name, obj, doc, _ in public_callables() if doc]
    for where, text, module in sources:
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            before = text[:match.start()].rstrip().splitlines()
            marker = before[-1].strip() if before else ""
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(where, match.group(1), marker, module, id=f"{where}:{line}")


def docstring_context() -> dict:
    """What a docstring's example takes as given, as its prose says: a small ``model`` with BatchNorm,
    batches ``x, y`` (and ``x1, y1``, ``x2, y2``), a ``loader`` of them, ``closure_on(x, y)`` and
    ``closure`` (forward, backward, return the loss), a plain optimizer ``opt`` and a ``correct`` count."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    (x1, y1), (x2, y2) = [(torch.randn(12, 8), torch.randint(0, 3, (12,))) for _ in range(2)]

    def closure_on(x, y):
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return closure

    return {"torch": torch, "F": F, "flatmin": flatmin, "model": model, "x": x1, "y": y1, "x1": x1, "y1": y1,
            "x2": x2, "y2": y2, "loader": [(x1, y1), (x2, y2)], "closure_on": closure_on,
            "closure": closure_on(x1, y1), "opt": torch.optim.SGD(model.parameters(), lr=0.1), "correct": 0}


@pytest.mark.parametrize("where, code, marker, module", list(python_blocks()))
def test_every_python_block_runs(where, code, marker, module, tmp_path, monkeypatch):
    """Each block runs on its own, in a fresh namespace and an empty folder (a docstring's with
    what its prose takes as given, and its module's names), unless it is marked
    ``<!-- not run: REASON -->`` (a GPU, a cluster) or ``<!-- example: NAME -->``, run by the test of
    its integration (which reads it with ``docs_example("NAME")``)."""
    not_run = re.fullmatch(r"<!-- not run: (.*) -->", marker)
    if not_run:
        assert not_run.group(1).strip(), f"{where}: a block not run needs a reason"
        pytest.skip(f"not run: {not_run.group(1)}")
    example = re.fullmatch(r"<!-- example: (\S+) -->", marker)
    if example:
        callers = [test for test in (ROOT / "tests").glob("test_*.py") if f'docs_example("{example.group(1)}")' in test.read_text()]
        assert callers, f"no test runs the example {example.group(1)!r}"
        return
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    if module:
        namespace.update({k: v for k, v in vars(sys.modules[module]).items() if not k.startswith("__")})
        namespace.update(docstring_context())
    exec(compile(code, f"{where} block", "exec"), namespace)


def test_every_public_name_documents_its_arguments_and_what_it_returns():
    problems = []
    for name, obj, doc, _ in public_callables():
        if not (doc or "").strip():
            problems.append(f"{name}: no docstring")
            continue
        function = obj.__init__ if inspect.isclass(obj) else obj
        if not inspect.isfunction(function):  # an exception's message: nothing of flatmin's to describe
            continue
        signature = inspect.signature(function)
        for parameter in signature.parameters.values():
            if parameter.name in ("self", "cls"):
                continue
            stars = {parameter.VAR_POSITIONAL: r"\*", parameter.VAR_KEYWORD: r"\*\*"}.get(parameter.kind, "")
            if not re.search(rf"^\s*(- )?(``)?{stars}{parameter.name}(``)?:", doc, re.M):
                problems.append(f"{name}: argument {parameter.name} is not described")
        returns = signature.return_annotation
        if not inspect.isclass(obj) and returns not in (None, "None", inspect.Signature.empty):
            if not re.search(r"^\s*Returns:", doc, re.M):
                problems.append(f"{name}: no Returns section")
    assert not problems, "\n".join(problems)


def test_the_api_reference_has_every_public_name(site):
    anchors = {anchor for page in (site / "api").rglob("*.html") for anchor in re.findall(r'id="(flatmin\.[^"]+)"', page.read_text())}
    missing = [name for name, _, _, tail in public_callables() if not any(a == tail or a.endswith("." + tail) for a in anchors)]
    assert not missing, missing


def test_the_api_reference_links_its_citations_of_the_methods_page(site):
    ids = set(re.findall(r'id="([^"]+)"', (site / "algorithms" / "index.html").read_text()))
    marwp = section((site / "api" / "optimizers" / "index.html").read_text(), "flatmin.MARWP")
    assert 'href="../../algorithms/#m-rwp-and-m-arwp"' in marwp
    for page in (site / "api").rglob("*.html"):
        for target in re.findall(r'href="\.\./\.\./algorithms/#([^"]+)"', page.read_text()):
            assert target in ids, f"{page}: no section {target}"
