"""Build step of the Python package: compiles the Rust library and bundles it.

`pip install ./bindings/python` runs `cargo build --lib` in the repository and copies
libember (.so / .dylib / .dll) into the package, next to `ember/_ffi.py`, where the package
looks first after EMBER_LIBRARY. Environment variables:

- EMBER_BUILD_PROFILE: `release` (default; about 3 minutes on 2 cores) or `debug` (the
  repository's dev profile: fast, and reuses a `cargo build --lib` already done).
- CARGO_TARGET_DIR: where cargo builds, as for cargo itself (default: target/ in the repo).
- CARGO: the cargo command (default: `cargo`).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

if sys.platform == "win32":
    LIBRARY = "ember.dll"
elif sys.platform == "darwin":
    LIBRARY = "libember.dylib"
else:
    LIBRARY = "libember.so"


def build_library() -> Path:
    """Runs cargo for the chosen profile and returns the library it built."""
    if not (REPO / "Cargo.toml").is_file():
        raise RuntimeError(
            f"{REPO} is not the Ember repository: build the package from its checkout "
            "(pip install ./bindings/python)"
        )
    profile = os.environ.get("EMBER_BUILD_PROFILE", "release")
    if profile not in ("release", "debug"):
        raise RuntimeError(f"EMBER_BUILD_PROFILE={profile!r}: use release or debug")
    command = [os.environ.get("CARGO", "cargo"), "build", "--lib", "--manifest-path",
               str(REPO / "Cargo.toml")]
    if profile == "release":
        command.append("--release")
    subprocess.run(command, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    library = target / profile / LIBRARY
    if not library.is_file():
        raise RuntimeError(f"cargo did not produce {library}")
    return library


class BuildWithLibrary(build_py):
    """build_py that also builds the Rust library and copies it into the package."""

    def run(self) -> None:
        super().run()
        library = build_library()
        destination = Path(self.build_lib) / "ember" / LIBRARY
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library, destination)


class BinaryDistribution(Distribution):
    """The wheel holds a native library: mark it as platform-specific."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
