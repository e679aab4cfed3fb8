"""The documentation cannot go stale unnoticed: every relative link in README.md and docs/ leads
to a file (and heading) of this repository and nothing points outside it; the configuration
tables list every field of the config classes with its type and default, and every variable the
package reads; the API reference lists every public name with its current signature; the
troubleshooting page quotes only messages the package can raise; and every benchmark command the
docs cite exists. Nothing here starts Ray.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import trims_ray
from trims_ray._config import CacheConfig, GpuTierConfig, ReadOptions

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PACKAGE = ROOT / "trims_ray"


def text_outside_code(markdown: str) -> str:
    """The page without its fenced code blocks (their brackets are code, not links)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text_outside_code(page.read_text()), re.MULTILINE):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text_outside_code(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not a file of ours
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_points_at_files_users_do_not_have(page):
    text = page.read_text()
    assert "../shared" not in text and "DESIGN.md" not in text


def test_the_readme_is_short_and_keeps_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 210, "the README should stay near 200 lines: move details to docs/"
    assert "./run demo" in text and "./run test" in text
    assert "CI runs `.ci/run`, which is `./run test`." in text
    for needed in ("## Quickstart", "## With Ray Serve", "serve.multiplexed"):
        assert needed in text


def test_the_docs_index_lists_every_page():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"README's documentation table does not link docs/{page.name}"


# -- configuration ------------------------------------------------------------------------------


def table_rows(page: Path, section: str) -> dict[str, list[str]]:
    """The rows of the first table under heading ``section``: first cell (unquoted) -> cells."""
    text = page.read_text()
    match = re.search(rf"^#+ {re.escape(section)}\n(.*?)(?=^#+ |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{page.name} has no section {section!r}"
    rows = {}
    for line in match.group(1).splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows[cells[0].strip("`")] = [c.strip("`") for c in cells]
    return rows


@pytest.mark.parametrize("cls", [CacheConfig, GpuTierConfig, ReadOptions], ids=lambda c: c.__name__)
def test_the_config_table_lists_every_field_with_its_type_and_default(cls):
    rows = table_rows(DOCS / "config.md", cls.__name__)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(rows) == set(fields), f"documented {sorted(rows)} vs fields {sorted(fields)}"
    for name, field in fields.items():
        _, type_text, default_text, meaning = rows[name]
        assert type_text == field.type, f"{cls.__name__}.{name}: documented type {type_text}, is {field.type}"
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        documented = eval(default_text, {"__builtins__": {}})  # literals and arithmetic only
        assert documented == default and type(documented) is type(default), f"{cls.__name__}.{name}: {default_text} != {default!r}"
        assert len(meaning) > 20, f"{cls.__name__}.{name} has no real description"


def test_every_environment_variable_the_package_reads_is_documented():
    source = (PACKAGE / "_config.py").read_text()
    read = set(re.findall(r'"(TRIMS_RAY_[A-Z0-9_]+)"', source))
    assert {"TRIMS_RAY_STORE", "TRIMS_RAY_TENANT", "TRIMS_RAY_PROTECT"} <= read
    documented = set(re.findall(r"`(TRIMS_RAY_[A-Z0-9_]+)`", (DOCS / "config.md").read_text()))
    assert not read - documented, f"undocumented: {sorted(read - documented)}"


# -- API reference ------------------------------------------------------------------------------


def bare_signature(obj) -> str:
    """``(a, b=1, *, c=None)``: the signature without annotations, as api.md writes it."""
    signature = inspect.signature(obj)
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def test_the_api_reference_covers_every_public_name_with_its_signature():
    text = (DOCS / "api.md").read_text()
    headings = set(re.findall(r"^### trims_ray\.(\w+)$", text, re.MULTILINE))
    public = set(trims_ray.__all__)
    assert headings == public, f"missing {sorted(public - headings)}, not public {sorted(headings - public)}"
    for name in public:
        obj = getattr(trims_ray, name)
        if inspect.isfunction(obj) or name == "ModelStore":
            assert f"trims_ray.{name}{bare_signature(obj)}" in text, f"api.md's signature of {name} is stale"
        elif dataclasses.is_dataclass(obj):
            section = text.split(f"### trims_ray.{name}\n", 1)[1].split("\n### ", 1)[0]
            missing = [f.name for f in dataclasses.fields(obj) if f"`{f.name}`" not in section and name != "CacheConfig"]
            assert not missing, f"api.md does not describe {name}'s fields {missing}"


# -- troubleshooting ----------------------------------------------------------------------------


def message_templates() -> list[str]:
    """Every string the package writes, f-strings with ``...`` where a value goes."""

    def template(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else "..." for v in node.values)
        return None

    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            text = template(node)
            if text:
                found.append(text)
    return found


def matches(quoted: str, templates: list[str]) -> bool:
    """Whether a quoted message, ``...`` for the parts that vary, is the text of a template:
    its literal pieces appear in one template, in order."""
    pieces = [p for p in quoted.split("...") if p]
    for text in templates:
        at = 0
        for piece in pieces:
            at = text.find(piece, at)
            if at < 0:
                break
            at += len(piece)
        else:
            return True
    return False


def test_troubleshooting_quotes_only_messages_the_package_raises():
    text = (DOCS / "troubleshooting.md").read_text()
    quoted = [
        line.strip()
        for block in re.findall(r"```text\n(.*?)```", text, re.DOTALL)
        for line in block.splitlines()
        if line.strip()
    ]
    assert len(quoted) >= 30
    templates = message_templates()
    unknown = [line for line in quoted if not matches(line, templates)]
    assert not unknown, f"messages the package does not raise: {unknown}"


def test_the_message_check_can_fail():
    templates = ["no model named ... for tenant ... in ...: register it first"]
    assert matches("no model named ... for tenant ...", templates)
    assert not matches("no model called ... for tenant ...", templates)
    assert not matches("for tenant ... no model named ...", templates)  # order matters


# -- benchmark commands -------------------------------------------------------------------------


def test_every_benchmark_command_the_docs_cite_exists():
    cited = set()
    for page in PAGES:
        cited |= set(re.findall(r"python -m (workloads\.\w+)(?: ([a-z]+))?", page.read_text()))
    assert len(cited) >= 10
    missing = []
    for module, sub in cited:
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            missing.append(module)
        elif sub and f'"{sub}"' not in path.read_text() and sub not in ("and",):
            missing.append(f"{module} {sub}")
    assert not missing, f"the docs cite commands that do not exist: {missing}"
