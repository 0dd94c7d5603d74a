"""docs/architecture.md names every module of the packages, so it is updated when the layout changes."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_is_named_in_the_architecture_page():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(ROOT))
        for package in ("cluster", "musetalk", "shards")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "__init__.py" and f"`{path.relative_to(ROOT).as_posix()}`" not in text
    ]
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"
