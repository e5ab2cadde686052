"""The repository stands on its own, and its docs say what the code does.

Every path a tracked file names stays inside the repository, every relative
link of the docs reaches a file, every Redis key is spelled in
`sdapi/contract/names.py`, and the import table of docs/ARCHITECTURE.md is
the import graph grimp computes.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdapi", "web", "jobs", "gpu_node")
# Subpackages that are packages of their own in the architecture's table;
# every other module belongs to its top-level package, except the top-level
# modules of `sdapi` (the command line), which stand alone.
SUBPACKAGES = ("sdapi.contract", "sdapi.infra", "sdapi.db", "sdapi.devtools")
NAMES_MODULE = "sdapi/contract/names.py"
# Files of the workspace this repository was once developed in: a reader of
# the repository alone does not have them.
OUTSIDE_FILES = ("shared/API.md", "shared/DESIGN.md", "STYLE.md", "ENVIRONMENT.md")
RELATIVE_PATH = re.compile(r"(?<![\w.])((?:\.\./)+[\w.\-/]*)")
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A Redis key or channel literal: "sdapi:" and a name (not "sdapi: <message>").
KEY_LITERAL = re.compile(r"""["']sdapi:[\w{-]""")
TABLE_ROW = re.compile(r"^\|\s*`([\w.]+)`\s*\|[^|]*\|([^|]*)\|\s*$")


def tracked_text_files() -> dict[str, str]:
    """Every tracked file that is UTF-8 text, by its path in the repository."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    texts = {}
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def escapes_repository(source: str, target: str) -> bool:
    """Whether `target`, relative to the file `source`, leaves the repository."""
    depth = len(PurePosixPath(source).parent.parts)
    for part in PurePosixPath(target).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part != ".":
            depth += 1
    return False


def test_no_tracked_file_refers_outside_the_repository() -> None:
    files = tracked_text_files()
    assert "README.md" in files
    outside = []
    for name, text in files.items():
        if name == "tests/test_docs.py":
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in RELATIVE_PATH.finditer(line):
                if escapes_repository(name, match.group(1)):
                    outside.append(f"{name}:{number}: {match.group(1)}")
            outside.extend(
                f"{name}:{number}: {other}" for other in OUTSIDE_FILES if other in line
            )
    assert outside == []


def test_escapes_repository_tells_inside_from_outside() -> None:
    assert escapes_repository("README.md", "../shared/API.md")
    assert escapes_repository("docs/ARCHITECTURE.md", "../../x")
    assert not escapes_repository("docs/ARCHITECTURE.md", "../README.md")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_markdown_link_reaches_a_file() -> None:
    broken = []
    for doc in doc_files():
        for target in MARKDOWN_LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:|^#", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_every_file_the_architecture_names_exists() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:sdapi|web|jobs|gpu_node|tests|docs)/[\w./]*)`", text))
    assert named
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert missing == []


def test_redis_keys_are_named_in_names_module_only() -> None:
    outside = []
    for name, text in tracked_text_files().items():
        if not name.endswith(".py") or name == NAMES_MODULE:
            continue
        if name.startswith("tests/"):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if KEY_LITERAL.search(line):
                outside.append(f"{name}:{number}: {line.strip()}")
    assert outside == []


def test_key_literal_pattern_finds_keys_not_messages() -> None:
    assert KEY_LITERAL.search('KEY_PREFIX = "sdapi:signin-failures"')
    assert KEY_LITERAL.search('return f"sdapi:dispatch:{model}"')
    assert not KEY_LITERAL.search('print(f"sdapi: {exc}", file=sys.stderr)')


def package_of(module: str) -> str:
    for package in SUBPACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    if module.startswith("sdapi."):
        return ".".join(module.split(".")[:2])
    return module.split(".")[0]


def import_graph() -> dict[str, set[str]]:
    """For each package of the table, the sdapi packages it imports."""
    graph = grimp.build_graph(*PACKAGES)
    imports: dict[str, set[str]] = {}
    for module in graph.modules:
        if module == "sdapi":
            # The package's own __init__: a docstring, no imports.
            assert not graph.find_modules_directly_imported_by(module)
            continue
        source = package_of(module)
        targets = imports.setdefault(source, set())
        for imported in graph.find_modules_directly_imported_by(module):
            if package_of(imported) != source:
                targets.add(package_of(imported))
    return imports


def documented_imports() -> dict[str, set[str]]:
    """The table of docs/ARCHITECTURE.md: package | layer | what it imports."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table: dict[str, set[str]] = {}
    for line in text.splitlines():
        row = TABLE_ROW.match(line)
        if row is None:
            continue
        package, imported = row.groups()
        table[package] = set(re.findall(r"`([\w.]+)`", imported))
    return table


def test_architecture_import_table_is_the_import_graph() -> None:
    table = documented_imports()
    assert "web" in table
    assert table == import_graph()
