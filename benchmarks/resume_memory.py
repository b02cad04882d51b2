"""Peak memory of resuming a 1,000,000-row answers folder, against a fresh run (issue 23, item 3).

``globeflow predict --embeddings STORE --out DIR`` (the job, :func:`globeflow.jobs.locate.
locate_archive`) on a synthetic store, with a stand-in locator whose answers cost microseconds
(canned answers with the fields of real ones: place, two regions, localizability, settings), so
that a million rows go through the real listing, resume index, store reading and part writing in
a minute or two. Each phase runs in its own process and reports its own peak RSS
(``ru_maxrss``):

- ``imports``: the modules and the stand-in locator, nothing run (the floor);
- ``fresh``: every row of an N-row store answered into an empty folder;
- ``resume``: the same folder, the store grown by ``extra`` rows: N already answered, the
  extra ones answered now;
- ``index``: the resume index of the folder alone (:class:`globeflow.data.id_index.IdIndex`);
- ``set``: the Python set of the stored ids that resume held before (``done_ids``), for
  comparison;
- with ``baseline_src=DIR`` (the ``src`` folder of an earlier version, e.g. from ``git
  archive``), ``fresh`` and ``resume`` again with that version's job, on its own folder.

Usage: ``python benchmarks/run.py resume_memory [-p rows=1000000] [-p extra=256]
[-p baseline_src=DIR]``. Writes the stores and the answers under ``work`` (a temporary folder by
default, removed at the end).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import gemm_rates, print_table
from _registry import experiment
from _worker import command

ENCODER = "bench-stand-in"
DIM = 8


class StandInLocator:
    """What :func:`~globeflow.jobs.locate.locate_archive` needs of a locator, answering from a
    canned result (the job's own work, not the model's, is measured)."""

    encoder_name = ENCODER
    model_name = "stand-in"

    def __init__(self) -> None:
        import torch

        torch.manual_seed(0)  # the same weights in every phase: the same model fingerprint
        self.model = torch.nn.Linear(DIM, 3)
        place = {"city": "Yvoir", "region": "Namur", "country": "Belgium", "country_code": "BE"}
        region = {"lat": 50.3, "lon": 4.9, "probability": 0.61, "radius_km": 12.0,
                  "spread_km": 5.0, "place": place, "label": "Yvoir, Namur, Belgium"}  # fmt: skip
        self.answer = {
            "best_guess": {"lat": 50.33, "lon": 4.88, "place": place, "label": region["label"]},
            "regions": [region, {**region, "probability": 0.2, "lat": 48.0}],
            "localizability_bits": 21.5,
            "localizability_vs_uniform_bits": 25.2,
            "localizability_stderr_bits": 0.1,
            "effective_area_km2": 120.0,
            "osm_url": "https://www.openstreetmap.org/?mlat=50.33&mlon=4.88#map=12/50.33/4.88",
            "settings": {"model": "stand-in", "num_samples": 1024, "seed": 0},
        }

    def locate_embeddings(self, emb, photo_ids=None, with_density=False, **settings) -> list:
        return [dict(self.answer) for _ in range(emb.shape[0])]


def _ids(start: int, stop: int) -> list[str]:
    return [f"archive/{i // 1000:04d}/photo_{i:07d}.jpg" for i in range(start, stop)]


def write_store(path: Path, start: int, stop: int) -> None:
    """Rows ``start`` to ``stop`` of the synthetic store (float16 embeddings, no coordinates)."""
    import numpy as np

    from globeflow.data.embedding_store import EmbeddingWriter

    rng = np.random.default_rng(start)
    with EmbeddingWriter(path, ENCODER, DIM, chunk_size=65536, dtype="float16") as writer:
        for lo in range(start, stop, 65536):
            hi = min(stop, lo + 65536)
            writer.add(_ids(lo, hi), rng.standard_normal((hi - lo, DIM)).astype(np.float32))


def phase(name: str, store: str, answers: str) -> dict:
    """Run one phase in this process (on the store and answers folders); its peak RSS and
    seconds."""
    store, out = Path(store), Path(answers)
    started = time.perf_counter()
    extra: dict = {}
    if name.startswith("store:"):  # rows start:stop, written by the version measured
        start, stop = map(int, name.split(":")[1:])
        write_store(store, start, stop)
    elif name in ("imports", "fresh", "resume"):
        from globeflow.jobs.locate import locate_archive

        locator = StandInLocator()
        if name != "imports":
            report = locate_archive(locator, {"seed": 0}, embeddings=store, output=out,
                                    batch_size=4096, progress=False)  # fmt: skip
            extra = {"located": report.located, "skipped_existing": report.skipped_existing}
    elif name == "index":
        from globeflow.data.embedding_store import store_parts
        from globeflow.data.id_index import IdIndex

        extra = {"ids": len(IdIndex.of_parts(store_parts(out)))}
    elif name == "set":
        import pyarrow.parquet as pq

        from globeflow.data.embedding_store import store_parts

        done: set[str] = set()
        for part in store_parts(out):
            done.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
        extra = {"ids": len(done)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"phase": name, "peak_rss_mib": rss, "seconds": time.perf_counter() - started, **extra}


def run_phase(name: str, store: Path, out: Path, src: str | None = None) -> dict:
    """:func:`phase` in a fresh process (with the package from ``src`` when given)."""
    kwargs = {"name": name, "store": str(store), "answers": str(out)}
    cmd = [sys.executable, *command("resume_memory", "phase", kwargs)]
    env = {**os.environ, "PYTHONPATH": src} if src else None
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "phase": f"{name} (baseline)"} if src else row


def runs(work: Path, rows: int, extra: int, src: str | None = None) -> list[dict]:
    """A fresh run on a store of ``rows`` rows, the store grown by ``extra``, then a resume."""
    store, answers = work / "store.parquet", work / "answers"
    run_phase(f"store:0:{rows}", store, answers, src)
    measured = [run_phase("fresh", store, answers, src)]
    run_phase(f"store:{rows}:{rows + extra}", store, answers, src)  # the store grows
    measured.append(run_phase("resume", store, answers, src))
    if src is None:
        measured += [run_phase(p, store, answers) for p in ("index", "set")]
    shutil.rmtree(store)  # the next runs write their own
    return measured


@experiment("resume_memory", quick={"rows": 2000, "extra": 16}, threads=None)
def resume_memory(
    *,
    rows: int = 1_000_000,
    extra: int = 256,
    work: str | None = None,
    baseline_src: str | None = None,
) -> dict:
    """Options (see the module docstring for the rest):

    - ``work``: folder for the store and the answers
    - ``baseline_src``: src folder of an earlier version
    """
    folder = Path(work or tempfile.mkdtemp(prefix="globeflow-resume-"))
    try:
        measured = [run_phase("imports", folder / "none", folder / "none")]
        measured += runs(folder / "now", rows, extra)
        if baseline_src:
            measured += runs(folder / "baseline", rows, extra, baseline_src)
    finally:
        if work is None:
            shutil.rmtree(folder, ignore_errors=True)
    floor = measured[0]["peak_rss_mib"]
    for row in measured:
        row["above_imports_mib"] = row["peak_rss_mib"] - floor
    by = {row["phase"]: row for row in measured}
    report = {
        "gemm": gemm_rates(0.3),
        "rows": rows,
        "extra": extra,
        "baseline_src": baseline_src,
        "phases": measured,
        "resume_over_fresh_rss": by["resume"]["peak_rss_mib"] / by["fresh"]["peak_rss_mib"],
        "baseline_resume_over_resume_rss": by["resume (baseline)"]["peak_rss_mib"]
        / by["resume"]["peak_rss_mib"]
        if "resume (baseline)" in by
        else None,
        "set_over_index_above_imports": by["set"]["above_imports_mib"]
        / max(by["index"]["above_imports_mib"], 1e-9),
    }
    print_table(measured, ["phase", "peak_rss_mib", "above_imports_mib", "seconds", "located",
                       "skipped_existing", "ids"])  # fmt: skip
    return report
