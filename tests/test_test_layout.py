"""The test tree never shadows an installed package.

pytest (prepend import mode) puts `tests/` and every test folder without an `__init__.py` on sys.path,
so a test module or folder there named like an installed distribution's top-level module wins over the
real one: transformers 5.25 imports Hugging Face's `kernels`, and once found our old `tests/kernels`
package instead, failing every Hugging Face test. The repository root is on the path too (pyproject's
`pythonpath`, for the `benchmarks` package). This check names any such collision.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
OWN = {"switchhead"}  # the package installed from this checkout


def path_entries(root: Path = TESTS) -> list[Path]:
    """Folders of the test tree that end up on sys.path: the root (rootdir conftest) and each folder
    holding Python files that is not itself a package (its parent package's root goes in instead)."""
    entries = {root}
    for py in root.rglob("*.py"):
        folder = py.parent
        while (folder / "__init__.py").exists() and folder != root:
            folder = folder.parent
        entries.add(folder)
    return sorted(e for e in entries if "__pycache__" not in e.parts)


def importable_names(entry: Path) -> set[str]:
    """Top-level names importable from one sys.path folder: modules and (namespace) packages."""
    names = {p.stem for p in entry.glob("*.py")}
    names |= {p.name for p in entry.iterdir() if p.is_dir() and p.name.isidentifier()}
    return names - {"__pycache__", "conftest"}


def installed_names() -> dict[str, str]:
    """Top-level module name -> who provides it (installed distributions and the standard library)."""
    names = {name: ", ".join(dists) for name, dists in importlib.metadata.packages_distributions().items()}
    for name in (*sys.stdlib_module_names, *sys.builtin_module_names):
        names.setdefault(name, "the standard library")
    return names


def root_names(repo: Path = ROOT) -> set[str]:
    """What the repository root adds: its modules and regular packages (a folder without __init__.py is
    a namespace portion, which never hides an installed package)."""
    return ({p.stem for p in repo.glob("*.py")} | {p.name for p in repo.iterdir() if (p / "__init__.py").exists()}) - OWN


def collisions(root: Path = TESTS, repo: Path | None = ROOT) -> list[str]:
    installed = installed_names()
    found = [(entry.relative_to(root.parent) / name, name)
             for entry in path_entries(root) for name in sorted(importable_names(entry))]
    if repo is not None:
        found += [(Path(name), name) for name in sorted(root_names(repo))]
    return [f"{path} shadows '{name}' from {installed[name]}" for path, name in found if name in installed]


def test_no_test_module_or_folder_shadows_an_installed_package() -> None:
    found = collisions()
    assert not found, "rename these test modules/folders: " + "; ".join(found)


def test_the_check_sees_a_shadowing_folder(tmp_path: Path) -> None:
    """The check must fire: a test folder named like an installed package is reported."""
    (tmp_path / "conftest.py").write_text("")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "test_x.py").write_text("")
    (tmp_path / "json.py").write_text("")
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("")
    found = collisions(tmp_path, repo=tmp_path)
    assert any("numpy" in line for line in found), found
    assert any("'torch'" in line for line in found) and any("'json'" in line for line in found), found
    assert not any("'plain'" in line or "'test_x'" in line for line in found), found
