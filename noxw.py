#!/usr/bin/env python3
"""Bootstrap nox and run it: all a fresh machine with Python 3 needs.

    python3 noxw.py -s conformance
    python3 noxw.py -s tests

Creates ``.nox-bootstrap/`` (a venv holding only nox) on first use, then runs
``nox`` from it with the given arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
HOME = ROOT / ".nox-bootstrap"
NOX = "nox==2026.10.20"


def main() -> int:
    python = HOME / ("Scripts" if os.name == "nt" else "bin") / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(HOME)
        subprocess.check_call([str(python), "-m", "pip", "install", "-q", NOX])
    os.chdir(ROOT)
    return subprocess.call([str(python), "-m", "nox", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
