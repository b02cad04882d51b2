"""Freed heap memory goes back to the system (the cause of the server's memory growth)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from globeflow.apps.heap import release_free_heap

# In a fresh interpreter, so that the RSS figures are this script's alone.
SCRIPT = """
import json, threading
from globeflow.apps.heap import release_free_heap

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

out = {}

def work():  # as the server's worker thread: its own arena
    big = bytearray(16 * 2**20)
    del big  # freeing a large block raises glibc's threshold for fresh mappings
    blocks = [bytearray(512 * 1024) for _ in range(160)]  # 80 MiB from the arena
    last = blocks[-1]  # still in use, so the arena cannot simply shrink from its top
    del blocks
    out["freed"] = rss_mib()
    out["released"] = release_free_heap()
    out["after"] = rss_mib()
    out["last"] = len(last)

thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps(out))
"""


def _run(**env: str) -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": src, **env},
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; glibc only")
def test_freed_arena_memory_is_returned_to_the_system() -> None:
    if not release_free_heap():
        pytest.skip("not glibc: no malloc_trim")
    kept = _run(GLOBEFLOW_MALLOC_TRIM="0")  # as before: 80 MiB freed but still resident
    assert kept["released"] is False
    assert kept["after"] > kept["freed"] - 5
    given_back = _run()
    assert given_back["released"] is True
    assert given_back["after"] < given_back["freed"] - 60  # most of the 80 MiB
