"""Every document the repo cites is in the repo: someone who clones the project can follow each reference."""

import pathlib
import re
import subprocess

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt"}
_MD = r"((?:\.{1,2}/|[\w-]+/)*[\w-]+\.md)"
# A citation: a Markdown link to a page, a page followed by a section sign (`docs/design/algorithms.md` §2.1), or
# any mention of the team's background documents by name. File names a command writes (`--markdown overhead.md`)
# are not citations.
CITED = re.compile(
    rf"\]\({_MD}(?:#[\w-]*)?\)|(?<![\w/.-]){_MD}`? ?§|(?<![\w/.-])((?:[\w-]+/)*(?:algorithms|integration|design|landscape|new_defenses)\.md)\b"
)
# Phrases that cite the team's background notes, which are not part of the repo
UNTRACEABLE = re.compile(r"integration notes|design brief", re.IGNORECASE)


def repo_files():
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): walk the tree
        listed = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    return [ROOT / name for name in listed if pathlib.Path(name).suffix in SUFFIXES and (ROOT / name).is_file()]


def unresolved_references(path: pathlib.Path, text: str) -> list[str]:
    missing = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in CITED.finditer(line):
            name = next(group for group in match.groups() if group)
            if not ((path.parent / name).exists() or (ROOT / name).exists()):
                missing.append(f"{path.relative_to(ROOT)}:{number}: {name}")
        if UNTRACEABLE.search(line):
            missing.append(f"{path.relative_to(ROOT)}:{number}: {UNTRACEABLE.search(line).group(0)!r}")
    return missing


@pytest.mark.parametrize(
    "line, ok",
    [
        ("see algorithms.md §2.1", False),
        ("see `docs/design/algorithms.md` §2.1", True),
        ("[Lisa](lisa.md)", False),  # relative to tests/, where there is no lisa.md
        ("the integration notes §4.4", False),
        ("[Lisa](../docs/lisa.md#resume)", True),
        ("writes --markdown overhead.md", True),
        ("see landscape.md", False),
    ],
)
def test_checker_resolves_paths_from_the_root_or_the_citing_file(line, ok):
    assert (unresolved_references(ROOT / "tests" / "x.py", line) == []) is ok


def test_every_cited_document_is_in_the_repo():
    files = repo_files()
    assert any(path.name == "index.md" for path in files)  # the scan reads the docs
    missing = [
        ref
        for path in files
        if path != pathlib.Path(__file__)
        for ref in unresolved_references(path, path.read_text())
    ]
    assert missing == [], "documents cited but not in the repo:\n" + "\n".join(missing)


# Package-registry hosts are never written into the repo (links to an unpublished package's page included); the names
# are assembled here so this file does not contain them either.
REGISTRY_HOSTS = re.compile(
    "|".join(
        re.escape(".".join(parts))
        for parts in [("pypi", "org"), ("pythonhosted", "org"), ("debian", "org"), ("npmjs", "org"), ("npmjs", "com")]
    )
)


def test_no_package_registry_address_in_the_repo():
    assert REGISTRY_HOSTS.search("see " + ".".join(("pypi", "org")) + "/project/x")  # the pattern matches
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in repo_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if REGISTRY_HOSTS.search(line)
    ]
    assert found == []
