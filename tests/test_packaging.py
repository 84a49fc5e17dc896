"""The package list in setup.cfg names every package of the source roots (a package left out
is missing from the wheel: editable installs hide that; scripts/check_wheel installs the
wheel itself)."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _config() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def test_every_package_is_listed() -> None:
    cfg = _config()
    roots = dict(line.split(" = ") for line in _lines(cfg["options"]["package_dir"]))
    found = set()
    for top, folder in roots.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join((top, *rel.parts)))
    assert found, "no package found under the package_dir roots"
    assert set(_lines(cfg["options"]["packages"])) == found


def test_import_paths_are_file_paths() -> None:
    # A package's folder is named like the package, so a reader and a type checker find
    # improto_server.session in server/improto_server/session.py.
    cfg = _config()
    for line in _lines(cfg["options"]["package_dir"]):
        top, folder = line.split(" = ")
        assert Path(folder).name == top
        assert (ROOT / folder / "__init__.py").is_file()
