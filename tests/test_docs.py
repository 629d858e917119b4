"""docs/ARCHITECTURE.md and the README's layout stay true: every module of the package is named in both."""
from __future__ import annotations

from tests.conftest import REPO

PACKAGE = REPO / "distgan"


def modules() -> list[str]:
    """Every module as ARCHITECTURE.md names it (``trainer.py``, ``nn/syncbn.py``), package markers left out."""
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py" or p.parent == PACKAGE)


def test_every_module_is_named_in_the_architecture_doc_and_the_readme_layout():
    architecture = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    layout = (REPO / "README.md").read_text().split("\n## Layout\n", 1)[1]
    unnamed = [m for m in modules() if f"`{m}`" not in architecture and f"`{m.split('/')[-1]}`" not in architecture
               and f", {m.split('/')[-1]}" not in architecture]
    assert not unnamed, f"docs/ARCHITECTURE.md does not name {unnamed}: add each to 'Who owns what'"
    stems = [m.split("/")[-1].removesuffix(".py") for m in modules()]
    missing = [m for m, stem in zip(modules(), stems) if stem not in layout]
    assert not missing, f"the README's Layout does not name {missing}"
    assert len(modules()) > 40  # the walk sees the package
