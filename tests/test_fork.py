"""Forks: the suite runs against a peft installed from a local path, and fails on a bad one.

The test builds a local "fork" of the installed peft (a copy of its package with a
``pyproject.toml``), plants a fault in one copy (LoRA scaling doubled: ``alpha / r``
becomes ``2 * alpha / r``), installs each copy *from its path* with pip into a
directory of its own, and runs the real conformance suite with that directory first on
``PYTHONPATH``, as ``nox -s conformance -- --peft-spec PATH`` does in a virtualenv of its
own.  The faulty fork fails the suite on the scaling field; the unmodified fork passes,
so what fails is the fault, not the fork's packaging.  The header names the fork's
install source either way.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from fault_kit import REPO

SCALING = "self.scaling[adapter_name] = lora_alpha / r"
FAULTY = "self.scaling[adapter_name] = 2 * lora_alpha / r"


def _fork(root: Path, fault: bool) -> Path:
    """A buildable copy of the installed peft, with the fault planted if asked."""
    source = Path(importlib.util.find_spec("peft").submodule_search_locations[0])
    fork = root / ("peft-faulty" if fault else "peft-clean")
    shutil.copytree(source, fork / "peft", ignore=shutil.ignore_patterns("__pycache__"))
    version = metadata.version("peft") + ("+fault" if fault else "+clean")
    (fork / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "peft"\nversion = "{version}"\n\n'
        '[tool.setuptools.packages.find]\ninclude = ["peft*"]\n'
    )
    if fault:
        layer = fork / "peft" / "tuners" / "lora" / "layer.py"
        text = layer.read_text()
        assert SCALING in text, "the installed peft no longer computes scaling as expected; update the planted fault"
        layer.write_text(text.replace(SCALING, FAULTY))
    return fork


def _install(fork: Path, target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--target", str(target), str(fork)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # build offline with the installed setuptools
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.mark.parametrize("fault", [True, False], ids=["faulty-fork-fails", "clean-fork-passes"])
def test_suite_against_a_fork_installed_from_its_path(tmp_path, cache, fault):
    fork = _fork(tmp_path, fault)
    site = tmp_path / "site"
    _install(fork, site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "CONFORMANCE_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "conformance/test_conformance.py::test_peft_level_unquantized",
         "--conformance-examples", "15", "--hypothesis-seed", "3", "-p", "no:cacheprovider", "-p", "no:warnings",
         "-x"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    # The run used the fork, and says so in its header.
    assert f"peft {metadata.version('peft')}+{'fault' if fault else 'clean'} (file://" in out, out[-3000:]
    if fault:
        assert proc.returncode == 1, out[-3000:]
        assert "diverge:" in out and "scaling" in out, out[-3000:]
    else:
        assert proc.returncode == 0, out[-3000:]
