"""The 1-km merge of regions against none, in one process: samples drawn and seconds per photo.

Guided sampling condenses a sharp place into clusters metres apart; without the merge
(:data:`~globeflow.answers.decode.MIN_REGION_SEPARATION_KM`) each is a region whose share the
adaptive count pins down with more samples. For each cell asked, the default
``Locator.locate_embeddings`` answer at ``guidance`` with the merge and with
``min_separation_km=0`` in the adaptive count's check (the answer's reported regions keep the
default either way), interleaved, ``repeats`` times, on the trained testbeds (one held-out
photo per pattern). The samples drawn are deterministic (the photo's own stream); the seconds
are the whole answer beyond the encoder.

    python benchmarks/run.py region_merge --threads 2
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from unittest import mock

from _common import EmbeddingsOnly, print_table
from _registry import experiment
from _testbeds import TRAINED_ROOT, trained_testbeds

from globeflow.answers import decode, draw
from globeflow.apps import pipeline

SEPARATIONS = {"without merge": 0.0, "1-km merge": decode.MIN_REGION_SEPARATION_KM}


def _answers(locator, emb, guidance: float, separation_km: float) -> tuple[float, list[int]]:
    """Seconds per photo and samples drawn of one default answer per photo."""
    merge = functools.partial(decode.top_regions, min_separation_km=separation_km)
    with mock.patch.object(draw, "top_regions", merge):
        start = time.perf_counter()
        results = locator.locate_embeddings(emb, guidance=guidance)
        seconds = (time.perf_counter() - start) / len(results)
    return seconds, [r["monte_carlo"]["samples"] for r in results]


@experiment("region_merge", quick={"cells": "syn-small-1km-x1", "repeats": 1})
def region_merge(
    *,
    cells: str = "syn-published-1km-x1,syn-small-5km-x1,syn-small-1km-x1",
    guidance: float = 2.0,
    repeats: int = 2,
    root: str = str(TRAINED_ROOT),
) -> dict:
    """Each cell's answers with and without the merge, interleaved.

    - ``cells``: comma-separated testbed cells (``<testbed>-<cell>``)
    - ``guidance``: the guidance scale (2, what published checkpoints run)
    - ``repeats``: interleaved repeats of the pair
    - ``root``: the trained testbeds' folder
    """
    rows = []
    for cell in cells.split(","):
        testbed = next(t for t in ("syn-published", "syn-small") if cell.startswith(t))
        try:
            beds = trained_testbeds(testbed, Path(root), per_pattern=1, guidance=guidance)
        except FileNotFoundError as err:
            return {"skipped": str(err)}
        bed = next((b for b in beds if b.name == cell), None)
        if bed is None:
            return {"skipped": f"no trained testbed cell {cell!r} under {root}"}
        locator = pipeline.Locator(bed.model, EmbeddingsOnly(bed.model.cond_dim), bed.name)
        locator.locate_embeddings(bed.emb[:1], guidance=guidance)  # warm-up
        seen = {label: {"seconds": []} for label in SEPARATIONS}
        for _ in range(repeats):
            for label, km in SEPARATIONS.items():
                seconds, drawn = _answers(locator, bed.emb, guidance, km)
                seen[label]["seconds"].append(seconds)
                seen[label]["samples"] = drawn
        before, after = seen["without merge"], seen["1-km merge"]
        rows.append(
            {
                "cell": cell,
                "photos": len(after["samples"]),
                "samples without": before["samples"],
                "samples with": after["samples"],
                "s/photo without": min(before["seconds"]),
                "s/photo with": min(after["seconds"]),
                "speed-up": min(before["seconds"]) / min(after["seconds"]),
                "runs": seen,
            }
        )
    columns = ["cell", "photos", "samples without", "samples with", "s/photo without",
               "s/photo with", "speed-up"]  # fmt: skip
    print_table(rows, columns)
    return {"guidance": guidance, "rows": rows}
