"""The docs name only code that exists: every `align/...py`, `reward/...py`, `scripts/...` path and every
`align.x.y` / `reward.x.y` module (and the name it points at) in README.md and docs/ is in the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Not inside a longer path (runs/my_reward/reward_model, ~/.cache/align/models/...).
_START = r"(?<![\w/.~-])"
PATH = re.compile(_START + r"((?:align|reward)/(?:[\w-]+/)*(?:\w+\.py\b)?|scripts/[\w/.-]*[\w/])")
MODULE = re.compile(_START + r"((?:align|reward)(?:\.[A-Za-z_]\w*)+)")


def mentioned(text: str) -> tuple[set[str], set[str]]:
    """The file paths and the dotted module names a Markdown text mentions."""
    paths = {p.rstrip(".") for p in PATH.findall(text)}
    # `reward.py`, reward.md: a file's name, not a module
    return paths, {m for m in MODULE.findall(text) if not re.search(r"\.(py|md|ya?ml|sh|jsonl?|toml|txt)$", m)}


def defines(source: str, name: str) -> bool:
    """Whether a module's source defines or imports `name` at any level."""
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]|^\s*(?:from|import)\s.*\b{name}\b"
                     rf"|^\s+{name},", source, re.M) is not None


def module_missing(dotted: str, root: Path = ROOT) -> str | None:
    """Why `align.x.y[.attr]` names nothing in the tree, or None when it does."""
    parts = dotted.split(".")
    here = root / parts[0]
    for i, part in enumerate(parts[1:], 1):
        if (here / part).is_dir():
            here = here / part
            continue
        if (here / f"{part}.py").is_file():
            attrs = parts[i + 1:]
            if attrs and not defines((here / f"{part}.py").read_text(encoding="utf-8"), attrs[0]):
                return f"{dotted}: {here.relative_to(root)}/{part}.py defines no {attrs[0]}"
            return None
        source = (here / "__init__.py").read_text(encoding="utf-8") if (here / "__init__.py").is_file() else ""
        if i > 1 and defines(source, part):  # a name the package itself exports
            return None
        return f"{dotted}: no {here.relative_to(root)}/{part}.py or package"
    return None


def missing(text: str, root: Path = ROOT) -> list[str]:
    paths, modules = mentioned(text)
    gone = [p for p in sorted(paths) if not (root / p).exists()]
    return gone + [why for m in sorted(modules) if (why := module_missing(m, root))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_and_module_the_docs_name_exists(doc):
    gone = missing(doc.read_text(encoding="utf-8"))
    assert not gone, f"{doc.relative_to(ROOT)} names what is not in the tree: {gone}"


# Comments and help texts in the code, and the configs, are docs too: a moved file must not leave them behind.
CODE = sorted(p for folder in ("align", "reward", "scripts", "configs") for p in (ROOT / folder).rglob("*")
              if p.suffix in (".py", ".yaml", ".sh"))


@pytest.mark.parametrize("source", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_the_code_names_exists(source):
    gone = [g for g in missing(source.read_text(encoding="utf-8")) if ":" not in g]  # paths; dotted names are imports
    assert not gone, f"{source.relative_to(ROOT)} names files that are not in the tree: {gone}"


def test_the_check_catches_a_planted_bad_path():
    text = ("See `align/checkpoint.py`, `align/train/trackers.py`, scripts/train_nothing.py, reward/model.py,\n"
            "`align.train.trackers.open_trackers`, `align.checkpoint`, `align.train.trackers.no_such_name`,\n"
            "runs/my_reward/reward_model, ~/.cache/align/models/x.py and `reward.py` (not code paths).")
    assert mentioned(text)[0] == {"align/checkpoint.py", "align/train/trackers.py", "scripts/train_nothing.py",
                                  "reward/model.py"}
    assert missing(text) == ["align/checkpoint.py", "scripts/train_nothing.py",
                             "align.checkpoint: no align/checkpoint.py or package",
                             "align.train.trackers.no_such_name: align/train/trackers.py defines no no_such_name"]


def layout_bullets(readme: str) -> dict[str, set[str]]:
    """README's "Layout": each wing folder's bullet -> the file names it lists."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    bullets = re.split(r"^- ", section, flags=re.M)[1:]
    return {m.group(1): set(re.findall(r"`([\w]+\.py)`", b)) for b in bullets
            if (m := re.match(r"`((?:align|reward)[\w/]*/)`", b))}


def test_readme_layout_lists_every_wing_and_its_files():
    listed = layout_bullets((ROOT / "README.md").read_text(encoding="utf-8"))
    wings = {"align/core/", "align/tasks/", "align/data/", "align/engines/", "align/serve/", "align/train/",
             "reward/", "align/recipes/", "align/study/", "align/export/"}
    assert set(listed) == wings
    for wing, names in listed.items():
        files = {p.name for p in (ROOT / wing).rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
        assert names == files, f"README Layout, {wing}: not listed {sorted(files - names)}, " \
                               f"not there {sorted(names - files)}"


def test_docs_index_links_every_doc():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for doc in DOCS[1:]:
        assert doc.name == "index.md" or f"]({doc.name})" in index, f"docs/index.md does not link {doc.name}"
