"""Several photos of one place: accuracy against a known answer, and seconds.

1. Accuracy (testbed with a known answer, tests/_fusion_testbed.py): around each of
   ``cases`` random true locations, four "photos" each reveal one cue (country scale, a coast,
   the latitude band, city scale); every density is a von Mises-Fisher mixture, so the exact
   fused posterior (the oracle) is known. For the fused answer (globeflow.answers.fusion, as
   Locator.locate_together runs it) and for each single photo: sliced Wasserstein distance to
   oracle samples (km) and the distance between best guesses (km). The floor is the same
   distance between two independent oracle sample sets. Also the estimated log Bayes factor
   and localizability against their exact values, in standard errors.
2. Seconds for fusing 2, 5 and 20 photos with the bundled model (crops of examples/paris.jpg as
   views of one place), with the usual one-photo answer measured in the same run as baseline.
3. Real photos (../shared/data/im2gps3k-train) with the bundled model, photographers it never
   saw: groups of 2-4 photos by one photographer within ``group_km`` of each other (one place)
   and pairs of photos by different photographers over ``far_km`` apart (different places).
   For each: every single photo's usual answer, one answer for the photos' mean embedding (a
   heuristic), and the fused answer under each of ``products``; errors against the truth,
   GeoScore gain over the single photos (paired, bootstrap interval, sign test), the same-place
   log Bayes factor, and, over refusal thresholds, false refusals (groups refused) against false
   fusions (far pairs answered).
4. Two photos of a model trained on synthetic patterns (``testbed``, e.g. syn-small): pairs of
   patterns sharing one city (is the fused answer there?) and sharing none (refused?), with
   seconds.

    python benchmarks/run.py fusion --threads 1
"""

from __future__ import annotations

import math
import sys
import time

import torch
from _common import REPO, print_table
from _registry import experiment

sys.path.insert(0, str(REPO / "tests"))
import _fusion_testbed as tb  # noqa: E402

from globeflow.answers.decode import best_guess  # noqa: E402
from globeflow.answers.fusion import draw_posterior, fused_sample  # noqa: E402
from globeflow.core import fusion as core_fusion  # noqa: E402
from globeflow.core.sphere import haversine_km, unit_to_latlon  # noqa: E402
from globeflow.jobs.metrics import geoscore, sliced_wasserstein_km  # noqa: E402

CUES = ("country", "coast", "latitude band", "city")


def accuracy_case(seed: int, num_samples: int, names: tuple[str, ...] = CUES) -> dict:
    """One testbed case with the cues ``names``: distances to the oracle of the fused answer
    and of each single photo."""
    g = torch.Generator().manual_seed(seed)
    truth = (
        float(torch.rand((), generator=g)) * 120 - 60,
        float(torch.rand((), generator=g)) * 360 - 180,
    )
    prior, cues = tb.scenario(truth, g)
    members = [cues[name] for name in names]
    n = len(names)
    model = tb.ClosedFormCues(prior, members)
    start = time.perf_counter()
    draw = draw_posterior(fused_sample(model, torch.eye(n), 1, g), num_samples, g)
    seconds = time.perf_counter() - start
    exact = tb.oracle(prior, members)
    oracle = unit_to_latlon(exact.sample(num_samples, g)).float()
    floor = unit_to_latlon(exact.sample(num_samples, g)).float()
    oracle_guess = best_guess(oracle)

    def scores(samples: torch.Tensor) -> tuple[float, float]:
        sw = float(sliced_wasserstein_km(samples.float(), oracle))
        return sw, float(haversine_km(best_guess(samples.float()), oracle_guess))

    row = {"case": seed, "seconds": seconds, "ESS": draw.effective_sample_size}
    row["rounds"] = draw.rounds
    row["fused SW km"], row["fused guess km"] = scores(draw.samples)
    # The same with every round drawn from the photos' posteriors only (no kernel rounds).
    share, core_fusion.ADAPTIVE_SHARE = core_fusion.ADAPTIVE_SHARE, 0.0
    try:
        plain = draw_posterior(fused_sample(model, torch.eye(n), 1, g), num_samples, g)
    finally:
        core_fusion.ADAPTIVE_SHARE = share
    row["members only ESS"] = plain.effective_sample_size
    row["members only SW km"], row["members only guess km"] = scores(plain.samples)
    row["floor SW km"], row["floor guess km"] = scores(floor)
    singles = model.sample(torch.eye(n), num_samples, generator=g)
    for name, samples in zip(names, singles):
        row[f"{name} SW km"], row[f"{name} guess km"] = scores(samples)
    exact_bf = tb.log_bayes_factor(prior, members)
    row["log BF z"] = (draw.log_bayes_factor - exact_bf) / draw.log_bayes_factor_stderr
    x = exact.sample(4096, g)
    bits = exact.normalised().log_density(x) / math.log(2.0)
    se = math.hypot(draw.localizability_stderr_bits, float(bits.std()) / 64.0)
    row["localizability z"] = (draw.localizability_bits - float(bits.mean())) / se
    return row


def paris_views(locator, count: int) -> torch.Tensor:
    """Embeddings (count, D) of crops of examples/paris.jpg: views of one place."""
    from PIL import Image

    image = Image.open(REPO / "examples" / "paris.jpg").convert("RGB")
    w, h = image.size
    crops = []
    for i in range(count):
        f = 0.6 + 0.4 * ((i * 7) % count) / max(count - 1, 1)
        x0, y0 = int((w - f * w) * ((i * 3) % 5) / 4), int((h - f * h) * ((i * 2) % 3) / 2)
        crops.append(image.crop((x0, y0, x0 + int(f * w), y0 + int(f * h))))
    return locator.encoder.embed(crops)


def timing(counts: list[int], num_samples: int) -> list[dict]:
    """Seconds of Locator.locate_together for each number of photos, and the usual one-photo
    answer as baseline."""
    from globeflow.apps.pipeline import Locator

    locator = Locator.from_pretrained()
    emb = paris_views(locator, max(counts))
    locator.locate_embeddings(emb[:1], num_samples=64)  # warm-up
    start = time.perf_counter()
    locator.locate_embeddings(emb[:1], num_samples=num_samples)
    single = time.perf_counter() - start
    rows = [{"photos": 1, "seconds": single, "vs one photo": 1.0, "note": "usual answer"}]
    for n in counts:
        start = time.perf_counter()
        result = locator.locate_together(emb[:n], num_samples=num_samples)
        seconds = time.perf_counter() - start
        fusion = result["fusion"]
        rows.append(
            {
                "photos": n,
                "seconds": seconds,
                "vs one photo": seconds / single,
                "rounds": fusion["rounds"],
                "proposals": fusion["proposals"],
                "density evaluations": (n + 1) * fusion["proposals"],
                "ESS": result["effective_sample_size"],
                "log BF": fusion["log_bayes_factor_same_place"],
                "note": result["error"] or "",
            }
        )
    return rows


def held_out_authors(locator) -> set[str]:
    """Photographers the bundled model never saw: its validation authors (the training split
    rebuilt: examples/authors.txt left out, 15% of the authors, the seed in its metadata; the
    number of validation rows must match its metadata) and the example photos' authors."""
    import csv

    from _common import IM2GPS

    from globeflow.jobs.train_data import split_rows

    rows = list(csv.DictReader(open(IM2GPS / "locations.csv", encoding="utf-8")))
    examples = set((REPO / "examples" / "authors.txt").read_text().split())
    kept = [r for r in rows if r["author"] not in examples]
    meta = locator.model.metadata
    seed = int(meta["training"]["seed"])
    _, val = split_rows([r["author"] for r in kept], len(kept), 0.15, seed)
    if len(val) != int(meta["data"]["val"]["rows"]):
        raise SystemExit(
            f"rebuilt validation split has {len(val)} rows, the model's metadata says "
            f"{meta['data']['val']['rows']}: cannot tell which photographers it was trained on"
        )
    return {kept[i]["author"] for i in val.tolist()} | examples


def real_cases(
    groups: int, pairs: int, group_km: float, far_km: float, authors: set[str] | None,
    per_author: int = 1,
) -> list[dict]:  # fmt: skip
    """Groups of one photographer's photos within ``group_km`` of a first photo (2-4 distinct
    photos; at most ``per_author`` places per photographer, taken round-robin over the
    photographers in sorted order) and far-apart pairs of photos by different photographers
    (``far_km`` and more), deterministic. ``authors``: only these photographers (None: all)."""
    import csv
    from collections import defaultdict

    from _common import IM2GPS

    rows = list(csv.DictReader(open(IM2GPS / "locations.csv", encoding="utf-8")))
    if authors is not None:
        rows = [r for r in rows if r["author"] in authors]
    by_author = defaultdict(list)
    for r in rows:
        by_author[r["author"]].append(r)

    def km(a: dict, b: dict) -> float:
        ya = torch.tensor([[float(a["lat"]), float(a["lon"])]])
        return float(haversine_km(ya, torch.tensor([[float(b["lat"]), float(b["lon"])]])))

    places: dict[str, list[list[dict]]] = {}
    for author in sorted(by_author):
        left, found = list(by_author[author]), []
        while left and len(found) < per_author:
            first = left[0]
            near = [p for p in left if km(first, p) <= group_km][:4]
            left = [p for p in left if p not in near] if len(near) >= 2 else left[1:]
            if len(near) >= 2:
                found.append(near)
        places[author] = found
    cases = []
    for rank in range(per_author):
        for author in sorted(places):
            if rank < len(places[author]) and len(cases) < groups:
                photos = places[author][rank]
                cases.append({"kind": "one place", "author": author, "photos": photos})
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(rows), generator=g).tolist()
    far = 0
    for i, j in zip(order[::2], order[1::2]):
        if far >= pairs:
            break
        a, b = rows[i], rows[j]
        if a["author"] != b["author"] and km(a, b) >= far_km:
            cases.append({"kind": "different places", "author": "", "photos": [a, b]})
            far += 1
    return cases


THRESHOLDS = (-math.inf, -6.0, math.log(1 / 20), -2.0, -1.0, 0.0)
PRODUCTS = {
    "exact": lambda n: 1.0,
    "tempered": lambda n: 0.5,
    "e=0.75": lambda n: 0.75,
    "sqrt": lambda n: 0.5 / math.sqrt(n),
    "pool": lambda n: 0.5 / n,
}
"""Products compared on real photos: name -> exponent e of each likelihood ratio for n photos
(w = -0.5, the bundled model's recommended guidance): exact e = 1; tempered e = 1 + w; "sqrt"
e = (1 + w) / sqrt(n); "pool" e = (1 + w) / n, the geometric mean of the n photos' usual
answers (the default for this model)."""


def fused_with(locator, emb: torch.Tensor, samples: int, exponent: float) -> dict:
    """``locator.locate_together`` with the product's exponent forced to ``exponent``."""
    from globeflow.answers import fusion as answers_fusion

    rule = answers_fusion.fusion_product
    name = "exact" if exponent == 1.0 else "tempered"
    answers_fusion.fusion_product = lambda model, photos=1: answers_fusion.Product(
        exponent, name, "bench"
    )
    try:
        return locator.locate_together(emb, num_samples=samples)
    finally:
        answers_fusion.fusion_product = rule


def median(values: list[float]) -> float:
    values, half = sorted(values), len(values) // 2
    return values[half] if len(values) % 2 else (values[half - 1] + values[half]) / 2


def versus_single(label: str, rows: list[dict], key: str | None, singles: list[list[float]]):
    """One summary row: the answers' errors ``key`` (None: the single photos themselves)
    against each group's single photos, paired: median km, mean GeoScore and its mean gain
    over the group's single photos with a 95% bootstrap interval (4,000 resamples of the
    groups, seed 0), groups where the answer is at least as close as the median single photo,
    and the one-sided sign-test p-value of that count."""
    base = [sum(geoscore(d) for d in g) / len(g) for g in singles]
    if key is None:
        km, score = [median(g) for g in singles], base
    else:
        km = [r[key] for r in rows]
        score = [geoscore(d) for d in km]
    gain = torch.tensor([a - b for a, b in zip(score, base, strict=True)], dtype=torch.float64)
    pick = torch.randint(len(rows), (4000, len(rows)), generator=torch.Generator().manual_seed(0))
    means = gain[pick].mean(1).sort().values
    row = {
        "answer": label,
        "groups": len(rows),
        "median km": median(km),
        "mean GeoScore": sum(score) / len(score),
        "gain": float(gain.mean()),
        "gain 95% interval": f"{float(means[100]):.0f}..{float(means[3899]):.0f}",
    }
    if key is not None:
        wins = sum(d <= median(g) for d, g in zip(km, singles, strict=True))
        n = len(rows)
        p = sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n
        row |= {"at least as close": f"{wins} of {n}", "sign test p": p}
    return row


def real_photos(
    groups: int, pairs: int, group_km: float, far_km: float, samples: int,
    products: list[str], held_out: bool = True, per_author: int = 1, shard: str = "0/1",
):  # fmt: skip
    """Rows per case and the threshold table (module doc, part 3)."""
    from _common import IM2GPS
    from PIL import Image

    from globeflow.apps.pipeline import Locator

    locator = Locator.from_pretrained()
    authors = held_out_authors(locator) if held_out else None
    rows = []
    cases = real_cases(groups, pairs, group_km, far_km, authors, per_author)
    index, count = (int(v) for v in shard.split("/"))
    cases = cases[index::count]  # one of ``count`` processes sharing the cases
    for number, case in enumerate(cases, 1):
        photos = case["photos"]
        images = [Image.open(IM2GPS / "images" / p["image"]).convert("RGB") for p in photos]
        emb = locator.encoder.embed(images)
        truth = torch.tensor([[float(p["lat"]), float(p["lon"])] for p in photos])
        singles = locator.locate_embeddings(emb, num_samples=samples)
        single_km = [
            float(haversine_km(torch.tensor([[r["best_guess"]["lat"], r["best_guess"]["lon"]]]),
                               truth[i : i + 1]))
            for i, r in enumerate(singles)
        ]  # fmt: skip
        # Not a product: one answer for the photos' mean embedding, a heuristic beside them.
        mean_emb = locator.locate_embeddings(emb.mean(0, keepdim=True), num_samples=samples)[0]
        mean_guess = [[mean_emb["best_guess"]["lat"], mean_emb["best_guess"]["lon"]]]
        row = {
            "kind": case["kind"],
            "author": case["author"],
            "photos": len(photos),
            "best single km": min(single_km),
            "median single km": median(single_km),
            "single km": single_km,
            "mean embedding km": median(haversine_km(torch.tensor(mean_guess), truth).tolist()),
        }
        for label in products:
            start = time.perf_counter()
            exponent = PRODUCTS[label](len(photos))
            fused = fused_with(locator, emb, samples, exponent)
            seconds = time.perf_counter() - start
            bf = fused["fusion"]["log_bayes_factor_same_place"]
            row[f"{label} log BF"] = bf
            row[f"{label} s"] = seconds
            row[f"{label} ESS"] = fused["effective_sample_size"]
            if "best_guess" in fused:  # an answer is drawn unless the ESS is too low
                guess = torch.tensor([[fused["best_guess"]["lat"], fused["best_guess"]["lon"]]])
                row[f"{label} km"] = float(median(haversine_km(guess, truth).tolist()))
                row[f"{label} <= median single"] = bool(
                    row[f"{label} km"] <= row["median single km"]
                )
            else:
                row[f"{label} km"] = None
        rows.append(row)
        print(f"[{number}/{len(cases)}] {row}", flush=True)
    table = []
    same = [r for r in rows if r["kind"] == "one place"]
    far = [r for r in rows if r["kind"] == "different places"]
    for label in products:
        for t in THRESHOLDS:
            table.append(
                {
                    "product": label,
                    "refuse below log BF": t,
                    "false refusals": sum(r[f"{label} log BF"] < t for r in same),
                    "groups": len(same),
                    "false fusions": sum(r[f"{label} log BF"] >= t for r in far),
                    "far pairs": len(far),
                }
            )
    summary = []
    if same:
        singles = [r["single km"] for r in same]
        summary.append(versus_single("single photo (usual answer)", same, None, singles))
        summary.append(versus_single("best single photo (oracle)", same, "best single km", singles))
        summary.append(versus_single("mean embedding (heuristic)", same, "mean embedding km",
                                     singles))  # fmt: skip
    for label in products:
        answered = [r for r in same if r[f"{label} km"] is not None]
        if answered:
            summary.append(
                versus_single(label, answered, f"{label} km", [r["single km"] for r in answered])
                | {"median seconds": median([r[f"{label} s"] for r in answered])}
            )
    print("\nReal photos, bundled model: fused (median error over the group's photos) vs single")
    if summary:
        columns = ["answer", "groups", "median km", "mean GeoScore", "gain", "gain 95% interval"]
        print_table(summary, [*columns, "at least as close", "sign test p", "median seconds"])
    print("\nRefusal thresholds: false refusals (one place) vs false fusions (far-apart pairs)")
    print_table(table, list(table[0]))
    return rows, summary, table


def pattern_pairs(cities: list[tuple[str, ...]], limit: int) -> list[tuple[int, int, str | None]]:
    """Pairs of synthetic patterns (i, j, the one city they share or None): pairs sharing
    exactly one city where at least one pattern says "one of these three places" (two
    three-city patterns first: only one place fits both), and pairs of one-city patterns
    sharing none; ``limit`` of each kind, spread over the candidates."""
    shared, apart = [], []
    for i in range(len(cities)):
        for j in range(i + 1, len(cities)):
            common = set(cities[i]) & set(cities[j])
            if len(common) == 1 and max(len(cities[i]), len(cities[j])) == 3:
                shared.append((i, j, common.pop()))
            elif not common and len(cities[i]) == len(cities[j]) == 1:
                apart.append((i, j, None))
    shared.sort(key=lambda pair: -min(len(cities[pair[0]]), len(cities[pair[1]])))

    def spread(pairs: list) -> list:  # evenly over the list, not the first pattern's pairs only
        return pairs[:: max(1, len(pairs) // max(limit, 1))][:limit]

    return spread(shared) + spread(apart)


def trained_pairs(testbed: str, limit: int, num_samples: int) -> list[dict]:
    """Two held-out photos of a model trained by ``globeflow train`` on synthetic patterns
    (benchmarks/_testbeds.py; no recommended guidance, so the exact product): pairs of patterns
    that share one city (is the fused best guess there, where a single photo of a three-city
    pattern is right a third of the time?) and pairs that share none (refused?). Seconds per
    fused answer beside the two single answers'."""
    from _common import EmbeddingsOnly
    from _testbeds import TRAINED_ROOT

    from globeflow.apps.pipeline import Locator
    from globeflow.core.checkpoints import load_model
    from globeflow.data import synthetic

    directory = TRAINED_ROOT / testbed
    if not (directory / "model" / "config.json").is_file():
        print(f"\n{directory}: no trained testbed (python benchmarks/run.py testbeds_build "
              f"-p only={testbed}); skipping the trained pairs")  # fmt: skip
        return []
    model = load_model(directory / "model")
    locator = Locator(model, EmbeddingsOnly(model.cond_dim), testbed)
    patterns = synthetic.load_patterns(directory)
    held = synthetic.load_heldout(directory / "heldout.pt")
    locator.locate_embeddings(held["embeddings"][:1], num_samples=64)  # warm-up
    rows = []
    for i, j, city in pattern_pairs(patterns.cities, limit):
        first = [int((held["pattern"] == p).nonzero()[0]) for p in (i, j)]
        emb = held["embeddings"][first]
        start = time.perf_counter()
        singles = locator.locate_embeddings(emb, num_samples=num_samples)
        single_s = time.perf_counter() - start
        start = time.perf_counter()
        fused = locator.locate_together(emb, num_samples=num_samples)
        seconds = time.perf_counter() - start
        row = {
            "patterns": f"{patterns.names[i]} + {patterns.names[j]}",
            "shared city": city or "none",
            "seconds": seconds,
            "vs two single answers": seconds / single_s,
            "log BF": fused["fusion"]["log_bayes_factor_same_place"],
            "answered": "best_guess" in fused,
        }
        if city is not None:
            p = i if city in patterns.cities[i] else j
            centre = patterns.centres[p, patterns.cities[p].index(city)][None].float()

            def km(result: dict, centre=centre) -> float:
                guess = [[result["best_guess"]["lat"], result["best_guess"]["lon"]]]
                return float(haversine_km(torch.tensor(guess), centre))

            row["single km"] = [round(km(r), 1) for r in singles]
            row["fused km"] = km(fused) if row["answered"] else None
        rows.append(row)
        print(row, flush=True)
    print(f"\nTwo photos of {testbed} (exact product, {num_samples} samples, "
          f"{torch.get_num_threads()} threads): km from the shared city's centre")  # fmt: skip
    columns = ["patterns", "shared city", "single km", "fused km", "log BF", "answered"]
    print_table(rows, [*columns, "seconds", "vs two single answers"])
    return rows


def accuracy(count: int, num_samples: int) -> tuple[list[dict], list[dict]]:
    """Summary rows and per-case rows of both testbeds: all four cues, and without the city one
    (where the fused answer is much sharper than any single photo)."""
    summary, all_cases = [], []
    for label, names in (("4 cues", CUES), ("3 cues (no city)", CUES[:3])):
        cases = [accuracy_case(seed, num_samples, names) for seed in range(count)]
        all_cases += [{**c, "testbed": label} for c in cases]
        for name in ("fused", "members only", "floor", *names):
            sw = [c[f"{name} SW km"] for c in cases]
            guess = [c[f"{name} guess km"] for c in cases]
            closer = sum(c["fused SW km"] < c[f"{name} SW km"] for c in cases)
            summary.append(
                {
                    "testbed": label,
                    "answer": name,
                    "median SW km": sorted(sw)[len(sw) // 2],
                    "mean SW km": sum(sw) / len(sw),
                    "median guess km": sorted(guess)[len(guess) // 2],
                    "fused closer (cases)": closer,
                }
                | (
                    {"median ESS": sorted(c[ess] for c in cases)[len(cases) // 2]}
                    if (ess := {"fused": "ESS", "members only": "members only ESS"}.get(name))
                    else {}
                )
            )
    print(f"\nTestbeds, {count} cases each, {num_samples} samples: distance to the oracle")
    columns = ["testbed", "answer", "median SW km", "mean SW km", "median guess km"]
    print_table(summary, [*columns, "fused closer (cases)", "median ESS"])
    return summary, all_cases


@experiment(
    "fusion",
    quick={
        "cases": 1,
        "samples": 64,
        "photos": "2",
        "groups": 1,
        "pairs": 1,
        "real_samples": 32,
        "testbed_pairs": 1,
    },
)
def fusion(
    *,
    cases: int = 12,
    samples: int = 1024,
    photos: str = "2,5,20",
    groups: int = 8,
    pairs: int = 8,
    group_km: float = 5.0,
    far_km: float = 3000.0,
    real_samples: int = 256,
    products: str = "exact,tempered,sqrt,pool",
    shard: str = "0/1",
    per_author: int = 2,
    trained_photographers: bool = False,
    testbed: str = "syn-small",
    testbed_pairs: int = 6,
) -> dict:
    """Options (see the module docstring for the rest):

    - ``photos``: numbers of photos to time
    - ``groups``: real one-place groups (0: none)
    - ``pairs``: real far-apart pairs
    - ``products``: comma-separated, of :data:`PRODUCTS`
    - ``shard``: i/k: the i-th of k interleaved case shares
    - ``per_author``: places per photographer at most
    - ``trained_photographers``: take photos of every photographer, also those the bundled
      model was trained on
    - ``testbed``, ``testbed_pairs``: a trained synthetic testbed and how many pattern pairs
      of each kind (sharing one city, sharing none) to fuse (0: none)
    """
    summary, case_rows = accuracy(cases, samples) if cases else ([], [])
    calibration: dict = {}
    if case_rows:
        z_bf = [c["log BF z"] for c in case_rows]
        z_loc = [c["localizability z"] for c in case_rows]
        calibration = {
            "log BF |z| <= 2": sum(abs(z) <= 2 for z in z_bf),
            "localizability |z| <= 2": sum(abs(z) <= 2 for z in z_loc),
            "cases": len(case_rows),
            "min ESS": min(c["ESS"] for c in case_rows),
            "median ESS": sorted(c["ESS"] for c in case_rows)[len(case_rows) // 2],
        }
        print(f"\n{calibration}")
    real = {}
    if groups or pairs:
        from _common import IM2GPS

        if not (IM2GPS / "locations.csv").is_file():
            print(f"\n{IM2GPS} is absent: skipping the real photos")
        else:
            rows, real_summary, thresholds = real_photos(
                groups, pairs, group_km, far_km, real_samples,
                products.split(","), not trained_photographers, per_author,
                shard,
            )  # fmt: skip
            real = {"cases": rows, "summary": real_summary, "thresholds": thresholds}
    trained = trained_pairs(testbed, testbed_pairs, samples) if testbed_pairs else []
    counts = [int(v) for v in photos.split(",") if v]
    speed = timing(counts, samples) if counts else []
    if speed:
        print(
            f"\nSeconds with the bundled model ({samples} samples, "
            f"{torch.get_num_threads()} thread)"
        )
        print_table(
            speed,
            [
                "photos",
                "seconds",
                "vs one photo",
                "rounds",
                "proposals",
                "density evaluations",
                "ESS",
                "log BF",
                "note",
            ],
        )
    return {
        "accuracy": summary,
        "calibration": calibration,
        "cases": case_rows,
        "timing": speed,
        "real_photos": real,
        "trained_pairs": trained,
    }
