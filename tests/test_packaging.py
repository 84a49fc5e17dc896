"""The package list in setup.cfg names every package of the source roots (a package left out
is missing from the wheel: editable installs hide that; scripts/check_wheel installs the
wheel itself), and the wheel ships the test vectors its conformance suite reads."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from improto.conformance.checks_framing import VECTORS
from improto.conformance.runner import load_checks

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


def test_the_work_tree_suite_reads_spec_vectors() -> None:
    assert VECTORS == ROOT / "spec" / "vectors" / "invalid.json"


def test_the_wheel_ships_spec_vectors_and_its_suite_registers_every_check(
    tmp_path: Path,
) -> None:
    # As scripts/check_wheel builds it: the sdist, then the wheel from the sdist.
    build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)]
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = tmp_path.glob("improto-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    packaged = site / "improto/conformance/vectors"
    assert packaged.is_dir(), f"{wheel.name} has no improto/conformance/vectors/"
    shipped = {p.name: p.read_bytes() for p in packaged.iterdir()}
    assert shipped == {p.name: p.read_bytes() for p in (ROOT / "spec/vectors").glob("*.json")}

    # The unpacked wheel comes first on sys.path, and the work tree is not on it.
    code = (
        "from improto.conformance.checks_framing import VECTORS\n"
        "from improto.conformance.runner import load_checks\n"
        "print(VECTORS)\nprint(len(load_checks()))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    vectors, count = out.stdout.split()
    assert Path(vectors) == site / "improto/conformance/vectors/invalid.json"
    assert int(count) == len(load_checks())
