"""Docs tables derived from the registry, so a defense's facts are written once, in its `DefenseSpec`.

Each generated table sits in a page between `<!-- <name>:start -->` and `<!-- <name>:end -->` markers. Regenerate
every table after changing a spec (or adding a defense):

    python -m trl_safety.docs_tables            # rewrite the blocks in docs/
    python -m trl_safety.docs_tables --check    # exit 1 if a block is out of date (what the test checks)
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

from .registry import STAGES, DefenseSpec, list_defenses


COMMAND = "python -m trl_safety.docs_tables"
DEFAULT_DOCS_DIR = pathlib.Path(__file__).resolve().parents[1] / "docs"
_BUILTIN_PREFIX = "trl_safety.defenses."


def builtin_defenses() -> list[DefenseSpec]:
    """The defenses of this package (not those of installed plugins), by stage, then by name."""
    specs = [s for s in list_defenses() if s.config_class.__module__.startswith(_BUILTIN_PREFIX)]
    return sorted(specs, key=lambda s: (STAGES.index(s.stage), s.name))


def _folder(spec: DefenseSpec) -> str:
    return spec.config_class.__module__[len(_BUILTIN_PREFIX) :].split(".")[0]


def _api_names(spec: DefenseSpec) -> list[str]:
    """Config and trainer first, then the other public names of the defense package (constants left out)."""
    names = [spec.config_class.__name__]
    if spec.trainer_class is not None:
        names.append(spec.trainer_class.__name__)
    package = importlib.import_module(_BUILTIN_PREFIX + _folder(spec))
    return names + [n for n in getattr(package, "__all__", ()) if n not in names and not n.isupper()]


def _paper_cell(spec: DefenseSpec) -> str:
    paper = spec.paper
    if not paper:
        return "—"
    link = f" ([{paper['id']}](https://huggingface.co/papers/{paper['id']}))" if paper.get("id") else ""
    return f"{paper.get('title', spec.title)}{link}"


def defenses_table() -> str:
    """The paper index of `docs/index.md`: one row per built-in defense."""
    rows = [
        "| defense | stage | paper | API | refused backends | page |",
        "|---|---|---|---|---|---|",
    ]
    for spec in builtin_defenses():
        api = ", ".join(f"`{name}`" for name in _api_names(spec))
        refused = ", ".join(spec.unsupported_backends) or "—"
        page = f"{_folder(spec)}.md"
        rows.append(
            f"| {spec.title} (`{spec.name}`) | {spec.stage} | {_paper_cell(spec)} | {api} | {refused} | [{page}]({page}) |"
        )
    return "\n".join(rows)


# (page under docs/, marker name, generator)
TABLES = (("index.md", "defenses-table", defenses_table),)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def generated_block(name: str, table: str) -> str:
    start, end = _markers(name)
    return f"{start}\n<!-- generated from the registry by `{COMMAND}`; edit the DefenseSpec, not this table -->\n{table}\n{end}"


def current_block(text: str, name: str) -> str:
    """The block between the markers in `text`, markers included; `ValueError` if they are missing."""
    start, end = _markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"the markers {start} / {end} are missing")
    return text[i : j + len(end)]


def stale_tables(docs_dir: pathlib.Path = DEFAULT_DOCS_DIR) -> list[str]:
    """The `page (marker)` of every docs block that differs from what the registry generates."""
    stale = []
    for page, name, generate in TABLES:
        text = (docs_dir / page).read_text()
        if current_block(text, name) != generated_block(name, generate()):
            stale.append(f"{page} ({name})")
    return stale


def write_tables(docs_dir: pathlib.Path = DEFAULT_DOCS_DIR) -> list[str]:
    """Rewrite every stale block in place; returns the pages changed."""
    changed = []
    for page, name, generate in TABLES:
        path = docs_dir / page
        text = path.read_text()
        block = current_block(text, name)
        new = generated_block(name, generate())
        if block != new:
            path.write_text(text.replace(block, new, 1))
            changed.append(page)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Regenerate the docs tables derived from the registry.")
    parser.add_argument("--check", action="store_true", help="only report stale tables (exit code 1 if any)")
    parser.add_argument("--docs-dir", type=pathlib.Path, default=DEFAULT_DOCS_DIR, help="the docs folder")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_tables(args.docs_dir)
        for entry in stale:
            print(f"out of date: {entry}; run `{COMMAND}`", file=sys.stderr)
        return 1 if stale else 0
    for page in write_tables(args.docs_dir):
        print(f"rewrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
