"""The one build step setup.cfg cannot declare: ship spec/vectors/*.json inside the package.

spec/vectors/ stays the normative copy; the build copies its JSON files into
improto/conformance/vectors/ of the wheel, where the conformance suite finds them once
installed (improto/conformance/checks_framing.py; docs/ARCHITECTURE.md, "Packages").
MANIFEST.in puts them in the sdist, which the wheel is built from.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import FileError

VECTORS = Path("spec", "vectors")
PACKAGED = Path("improto", "conformance", "vectors")


class BuildPyWithVectors(build_py):
    """build_py that adds the test vectors to the package data (not run by editable installs,
    which read spec/vectors in place)."""

    def build_package_data(self) -> None:
        super().build_package_data()
        sources = sorted(VECTORS.glob("*.json"))
        if not sources:  # a wheel without them runs fewer conformance checks: refuse it
            raise FileError(f"no test vectors in {VECTORS} (is it in the sdist? MANIFEST.in)")
        target = Path(self.build_lib) / PACKAGED
        self.mkpath(str(target))
        for src in sources:
            self.copy_file(str(src), str(target / src.name))


setup(cmdclass={"build_py": BuildPyWithVectors})
