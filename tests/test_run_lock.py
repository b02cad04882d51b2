"""One job per run directory (a lock naming its holder) and torchrun workers that end with their
launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from test_training import TINY, cli_train, write_store

from globeflow.jobs.run_lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from globeflow.jobs.run_lock import run_lock\n"
    "with run_lock(Path(sys.argv[1])):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def test_a_second_train_on_a_locked_run_directory_names_the_holder(tmp_path: Path):
    store = write_store(tmp_path / "store.parquet")
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = cli_train("--embeddings", str(store), "-o", str(run), *TINY)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        holder.wait()
    assert busy.exit_code == 2, busy.output
    assert f"in use by PID {holder.pid} on {socket.gethostname()}" in busy.output
    assert not (run / "checkpoint").exists() and not (run / "metrics.jsonl").exists()

    assert str(holder.pid) in (run / LOCK_NAME).read_text()  # stale: its holder is dead
    again = cli_train("--embeddings", str(store), "-o", str(run), *TINY)
    assert again.exit_code == 0, again.output
    assert (run / "final" / "model.safetensors").is_file()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


LAUNCHER = (
    "import os, subprocess, sys, time\n"
    "worker = ('from globeflow.jobs.run_lock import exit_with_launcher\\n'\n"
    "          'import time\\nassert exit_with_launcher(poll_s=0.05)\\n'\n"
    "          'print(\"watching\", flush=True)\\ntime.sleep(120)\\n')\n"
    "env = {**os.environ, 'TORCHELASTIC_RUN_ID': 'test'}\n"
    "p = subprocess.Popen([sys.executable, '-c', worker], env=env, stdout=subprocess.PIPE)\n"
    "assert p.stdout.readline().strip() == b'watching'\n"
    "print(p.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_worker_ends_when_its_launcher_is_killed(tmp_path: Path):
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True, env=ENV
    )
    worker = int(launcher.stdout.readline())
    assert _alive(worker)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the worker outlived its launcher"
