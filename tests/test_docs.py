"""The documentation stays true: the generated configuration reference is current, and every
relative link in README.md and docs/ points at a file that exists."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "examples" / "deploy" / "README.md",
]

# [text](target) and [text]: target; images too. Code spans are removed first.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
CODE_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)


@functools.cache
def _script() -> ModuleType:
    """scripts/config_reference.py, imported by path (scripts/ is not a package)."""
    path = ROOT / "scripts" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current() -> None:
    script = _script()
    page = ROOT / "docs" / "configuration.md"
    fix = "run python scripts/config_reference.py --write"
    assert page.exists(), f"docs/configuration.md is missing: {fix}"
    assert page.read_text(encoding="utf-8") == script.render(), (
        f"docs/configuration.md is stale: {fix}"
    )


def test_reference_lists_every_config_key() -> None:
    """Each section's every field is a row of the page (nested tables included)."""
    import dataclasses

    from fedtrain.config import Config, SiloProfile

    page = _script().render()
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        assert f"## `[{section.name}]`" in page
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            assert f"| `{f.name}` |" in page, f"{section.name}.{f.name} missing from the reference"
    assert "### `[[simulation.profiles]]`" in page
    for f in dataclasses.fields(SiloProfile):
        assert f"| `{f.name}` |" in page


def test_field_docstrings_are_read_from_source() -> None:
    """A docstring is the string right under the field; a field without one is an error."""
    from dataclasses import dataclass

    script = _script()

    @dataclass(kw_only=True)
    class Example:
        a: int = 3
        """The a."""
        b: list[str] | None = None
        """The b,
        on two lines."""

    docs = script.field_docs(Example)
    assert [(d.name, d.annotation, d.default, d.doc) for d in docs] == [
        ("a", "int", "3", "The a."),
        ("b", "list[str] | None", "None", "The b, on two lines."),
    ]

    @dataclass
    class Undocumented:
        c: bool = True

    try:
        script.field_docs(Undocumented)
    except ValueError as err:
        assert "Undocumented.c has no docstring" in str(err)
    else:
        raise AssertionError("a field without a docstring was accepted")


def _links(page: Path) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    stripped = CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    found = []
    for match in LINK.finditer(stripped):
        target = match.group(1) or match.group(2)
        line = stripped.count("\n", 0, match.start()) + 1
        found.append((line, target))
    return found


def _anchors(page: Path) -> set[str]:
    """The fragment ids a page offers: GitHub's heading slugs and explicit ``<a id="...">``."""
    text = CODE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    anchors = set(re.findall(r'<a id="([^"]+)">', text))
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_relative_links_resolve() -> None:
    broken = []
    checked = 0
    for page in PAGES:
        for line, target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # an absolute URL (https:, mailto:)
            path, _, fragment = target.partition("#")
            dest = page.parent / path if path else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}:{line}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}:{line}: {target} (no such heading)")
    assert checked > 0, "no relative links found: the link pattern is wrong"
    assert not broken, "relative links to files or headings that do not exist:\n" + "\n".join(
        broken
    )
