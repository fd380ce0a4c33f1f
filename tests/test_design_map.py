"""docs/design.md's map names every module of batchd/ (a new module goes on the map)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_design_maps_every_module() -> None:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    start = text.index("## The map")
    section = text[start : text.index("\n## ", start)]
    modules = [
        path.relative_to(ROOT).as_posix()
        for path in sorted((ROOT / "batchd").rglob("*.py"))
        if path.name not in {"__init__.py", "__main__.py"}
    ]
    assert len(modules) > 50
    assert [m for m in modules if not re.search(rf"\b{Path(m).stem}\b", section)] == []
