"""tests/ mirrors the code, so the test of a module sits under the name of its package.

tests/vim_core/<package>/ holds the tests of vim_core.<package> (tests/vim_core/ those of its top-level
modules), tests/flows/ those of flows/, tests/integration/ the end-to-end and whole-repo checks, and
tests/faults/ the fault-injection suite. Only shared helpers (conftest, servers, reports) stay at the top.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
TOP_FOLDERS = {"vim_core", "flows", "integration", "faults", "assets", "scripts", "__pycache__"}


def test_no_test_module_at_the_top():
    stray = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert not stray, f"move {stray} into tests/vim_core/<package>/, tests/flows/ or tests/integration/"


def test_scripts_run_by_path_live_in_tests_scripts():
    """A script run by path puts its own folder first on sys.path: from tests/, `import vim_core` would find
    the test package tests/vim_core/ instead of the library (it did: ImportError under torchrun)."""
    for path in TESTS.rglob("*.py"):
        if "__main__" in path.read_text() and path.parent != TESTS / "scripts":
            assert not (path.parent / "vim_core").is_dir() and not (path.parent / "flows").is_dir(), (
                f"{path.relative_to(REPO)} runs as a script beside a test package: move it to tests/scripts/"
            )


def test_top_folders_are_the_known_ones():
    folders = {p.name for p in TESTS.iterdir() if p.is_dir()}
    assert folders <= TOP_FOLDERS, f"unexpected folders in tests/: {sorted(folders - TOP_FOLDERS)}"


def test_each_vim_core_test_folder_names_a_package():
    folders = [p for p in (TESTS / "vim_core").iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert folders
    for folder in folders:
        assert (REPO / "vim_core" / folder.name / "__init__.py").is_file(), (
            f"no package vim_core.{folder.name}"
        )
        assert list(folder.glob("test_*.py")), f"{folder} holds no tests"


def test_every_test_folder_is_a_package():
    """Test modules import as tests.<folder>.<module>; without __init__.py pytest would put the folder
    itself on sys.path, where tests/vim_core/data/ could shadow a top-level name."""
    for path in TESTS.rglob("test_*.py"):
        for folder in path.relative_to(TESTS).parents:
            if folder != Path("."):
                assert (TESTS / folder / "__init__.py").is_file(), f"tests/{folder} has no __init__.py"
