"""The package as users install it: the passes under ``sac_compiler.passes``, no top-level
``passes`` module, a version, and the typing marker."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import sac_compiler.passes

import sac_compiler


def test_passes_are_a_subpackage_mapped_from_the_repository_folder() -> None:
    repo = Path(__file__).resolve().parents[1]
    assert Path(sac_compiler.passes.__file__).resolve() == repo / "passes" / "__init__.py"
    assert callable(sac_compiler.passes.annotate_memory)
    # From outside the repository (no source folder on sys.path) there is no top-level "passes".
    code = "import importlib.util, sac_compiler.passes; print(importlib.util.find_spec('passes'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path("/"), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_version_is_the_installed_distribution_version() -> None:
    assert sac_compiler.__version__ == importlib.metadata.version("sac-compiler")
    assert "__version__" in sac_compiler.__all__


def test_the_package_is_marked_typed() -> None:
    assert (Path(sac_compiler.__file__).parent / "py.typed").is_file()


def test_passes_log_under_the_package_logger() -> None:
    import logging

    from sac_compiler.passes import annotate_memory as _  # noqa: F401

    names = [name for name in logging.root.manager.loggerDict if "annotate_" in name]
    assert names and all(name.startswith("sac_compiler.passes.") for name in names)
