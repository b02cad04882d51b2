"""Entry point of the processes a benchmark starts (torchrun ranks, child processes): the
experiment modules have no ``main`` of their own.

    python benchmarks/_worker.py MODULE FUNCTION KWARGS_JSON [REPORT]

calls ``MODULE.FUNCTION(**KWARGS)`` and writes its JSON result to ``REPORT`` (``{rank}`` in the
path: the process's torchrun ``RANK``, 0 without one), else prints it as the last line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

WORKER = Path(__file__).resolve()
"""This file: the script a benchmark passes to ``python`` or ``torchrun``."""


def command(module: str, function: str, kwargs: dict, report: str | None = None) -> list[str]:
    """The arguments after the interpreter (or torchrun) that run ``module.function(**kwargs)``."""
    return [str(WORKER), module, function, json.dumps(kwargs)] + ([report] if report else [])


def main(argv: list[str]) -> None:
    module, function, kwargs = argv[0], argv[1], json.loads(argv[2])
    result = getattr(importlib.import_module(module), function)(**kwargs)
    if len(argv) > 3:
        path = Path(argv[3].format(rank=int(os.environ.get("RANK", 0))))
        path.write_text(json.dumps(result))
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
