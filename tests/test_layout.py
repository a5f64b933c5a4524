"""The package layout: target profiles shipped as the package `edgeconv.targets`, one file name per module, and a
docstring in every package's __init__.py."""

import ast
import tomllib
from collections import Counter
from importlib import resources
from pathlib import Path

from edgeconv.device import profiles

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgeconv"


def package_dirs() -> list[Path]:
    """Every folder of edgeconv/ that holds Python modules, and targets/ (the package edgeconv.targets)."""
    dirs = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    return sorted(dirs) + [ROOT / "targets"]


def test_target_profiles_load_through_importlib_resources():
    tomls = sorted((p for p in resources.files("edgeconv.targets").iterdir() if p.name.endswith(".toml")),
                   key=lambda p: p.name)
    assert len(tomls) >= 6 and any(p.name == "README.md" for p in resources.files("edgeconv.targets").iterdir())
    for path in tomls:
        name = path.name.removesuffix(".toml")
        assert tomllib.loads(path.read_text(encoding="utf-8"))["name"] == name
        assert profiles.load_profile(path).name == name
        assert profiles.get_target(name).name == name
    assert sorted(profiles.TARGETS.names()) == sorted(p.name.removesuffix(".toml") for p in tomls)


def test_targets_ship_as_package_data():
    """pyproject maps targets/ to edgeconv.targets with its TOMLs and notes, and lists every package (setuptools'
    `find` cannot rename a folder, so the list is explicit and must not miss one)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"edgeconv.targets": "targets"}
    assert set(tool["package-data"]["edgeconv.targets"]) >= {"*.toml", "*.md"}
    on_disk = {".".join(d.relative_to(ROOT).parts) for d in package_dirs() if d.name != "targets"}
    assert set(tool["packages"]) == on_disk | {"edgeconv.targets"}


def test_no_two_modules_share_a_file_name():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts and p.name != "__init__.py")
    assert not [n for n, c in names.items() if c > 1]
    assert not (PACKAGE / "benchmark.py").exists()


def test_every_package_has_an_init_with_a_one_line_docstring():
    for d in package_dirs():
        init = d / "__init__.py"
        assert init.is_file(), f"{d.relative_to(ROOT)} has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), f"{init.relative_to(ROOT)}: no one-line docstring"
