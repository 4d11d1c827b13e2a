"""docs/design.md's module map against the tree: every module named, every name a real file."""
from __future__ import annotations

import re
from pathlib import Path

import anomalyvfm

ROOT = Path(anomalyvfm.__file__).parent
DOC = Path(__file__).parents[1] / "docs" / "design.md"


def module_map(text: str) -> str:
    """The table under the header `| folder / module | role |`, up to the first line that is not a row."""
    lines = text[text.index("| folder / module | role |"):].splitlines()
    return "\n".join(lines[: next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))])


def mapped_paths(table: str) -> set[str]:
    """Paths the map's first column names; a bare file name belongs to the folder named before it in its cell."""
    found: set[str] = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if "/" in name:
                folder, _, file = name.rpartition("/")
                found.add(name.rstrip("/") if not file else name)
            else:
                found.add(f"{folder}/{name}" if folder else name)
    return found


def test_every_module_is_in_the_map_and_every_name_exists():
    named = mapped_paths(module_map(DOC.read_text()))
    modules = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if p.name != "__init__.py"}
    assert not modules - named, f"modules missing from the map in docs/design.md: {sorted(modules - named)}"
    assert not {n for n in named if not (ROOT / n).exists()}, "the map names files that do not exist"


def test_the_check_sees_a_missing_and_a_stale_name():
    assert mapped_paths("| `data/images.py`, `transforms.py` | x |") == {"data/images.py", "data/transforms.py"}
    assert not (ROOT / "scoring/fusion.py").exists()
