"""The README is a front door: short, and every link, make target and module it names exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
MAKE = re.compile(r"(?<![\w-])make ([a-z][\w-]*)")
MODULE = re.compile(r"python -m ([A-Za-z_][\w.]*)")
TARGET = re.compile(r"^([a-z][\w-]*)\s*:(?!=)", re.M)


def _module_file(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_relative_links_point_to_files():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_make_targets_exist():
    targets = set(TARGET.findall((REPO / "Makefile").read_text()))
    missing = [
        f"{page.relative_to(REPO)}: make {t}"
        for page in PAGES
        for t in MAKE.findall(page.read_text())
        if t not in targets
    ]
    assert not missing, missing


def test_python_modules_exist():
    """Our own modules by file path (no import); a third-party one (pip, torch.distributed...) is skipped."""
    ours = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    missing = [
        f"{page.relative_to(REPO)}: python -m {m}"
        for page in PAGES
        for m in MODULE.findall(page.read_text())
        if m.split(".")[0] in ours and not _module_file(m.rstrip("."))
    ]
    assert not missing, missing
