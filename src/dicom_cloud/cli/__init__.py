"""The ``dicom-cloud`` command line (main.py), and its console-script entry."""

from __future__ import annotations

import gc


def run() -> None:
    """The console script: :func:`.main.run`, imported with the garbage collector paused.

    The command's imports create some hundred thousand objects and no garbage: the collections they
    would set off find nothing. Paused, and the objects then frozen (left out of later collections:
    they live as long as the process), the start costs about 7 ms less CPU out of 110
    (docs/benchmarks.md, 2026-12-05). Importing the package as a library changes nothing."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        from .main import run as run_command
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
    run_command()
