"""Speed of the paper's encoders at full size, and of `predict` end to end, without downloading.

Builds DINOv2-L/14 with registers (336 px) and CLIP ViT-L/14-336 (StreetCLIP's vision tower)
from their configs with random weights, saves them, and loads them through globeflow's encoders,
so every mode is measured on the code users run. For each encoder, precision (fp32, bf16 under
autocast, bf16 weights) x attention kernel (eager, SDPA) x batch size: images/s (preprocessing
included; best of interleaved repetitions), the ratio to the fp32 + eager baseline measured in
the same run, and the minimum cosine of the embeddings to that baseline's. Then seconds/photo
for `predict` at its default settings with the YFCC-size network (dim 512, depth 12, cond_dim
1024, random weights) and the DINOv2 encoder at its default precision, through Locator.

With ``answer_photos=N`` only the answer part beyond the encoder is timed (no encoder is
built): ``Locator.locate_embeddings`` at its defaults on N random embeddings, seconds per photo
by stage (samples, localizability, best guess, regions, place names), the matrix-product FLOPs
of a photo's answer and the seconds they take at the GEMM rate measured in the run, with the
CPU model.

    python benchmarks/run.py encoders_paper [-p images=2] [-p batch_sizes=1,2] [-p reps=2]
    python benchmarks/run.py encoders_paper --quick    # tiny models, a smoke run of ~1 minute
    python benchmarks/run.py encoders_paper -p answer_photos=4 -p reps=3   # beyond the encoder

Random weights stand in for the real ones: speeds are those of the real architectures, while the
cosines only estimate the bf16 error on real weights.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _registry import experiment
from PIL import Image

MODES = [  # (precision, attention); the first is the baseline
    ("fp32", "eager"),
    ("fp32", "sdpa"),
    ("bf16-autocast", "sdpa"),
    ("bf16", "sdpa"),
    ("bf16", "eager"),
]


def dinov2_config(quick: bool):
    import transformers as tf

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    if not quick:  # facebook/dinov2-with-registers-large
        size = dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        )
    return tf.Dinov2WithRegistersConfig(
        **size,
        patch_size=14,
        image_size=518,
        num_register_tokens=4,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )


def clip_vision_config(quick: bool):
    import transformers as tf

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    if not quick:  # openai/clip-vit-large-patch14-336 = geolocal/StreetCLIP's vision tower
        size = dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        )
    return tf.CLIPVisionConfig(
        **size, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5
    )


def build_random_models(root: Path, quick: bool) -> dict[str, Path]:
    """Random-weight checkpoints of both encoders under ``root`` (seeded)."""
    import transformers as tf

    paths = {"dinov2-vitl14-reg": root / "dinov2", "streetclip": root / "clip"}
    torch.manual_seed(0)
    tf.Dinov2WithRegistersModel(dinov2_config(quick)).save_pretrained(paths["dinov2-vitl14-reg"])
    torch.manual_seed(1)
    tf.CLIPVisionModel(clip_vision_config(quick)).save_pretrained(paths["streetclip"])
    return paths


def synthetic_photos(n: int, seed: int = 0) -> list[Image.Image]:
    """Photo-sized images with structure (gradients, blocks, noise), sizes varying."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (800, 533), (512, 512)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
        blocks = (np.floor(xx / 37) + np.floor(yy / 53)) % 2 * 40
        noise = rng.normal(0, 12, (h, w, 3))
        arr = np.clip(base + blocks[..., None] + noise, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr))
    return out


def time_embed(encoder, images, batch_size: int) -> tuple[float, torch.Tensor]:
    """Seconds to embed ``images`` and the embeddings."""
    start = time.perf_counter()
    emb = encoder.embed(images, batch_size=batch_size)
    return time.perf_counter() - start, emb


def bench_encoder(name: str, path: Path, images, batch_sizes: list[int], reps: int) -> list[dict]:
    """Every mode x batch size, repetitions interleaved (so load changes on a shared machine
    hit all modes alike); the best repetition counts."""
    from globeflow.data.encoders import get_encoder

    encoders = {}
    for precision, attention in MODES:
        enc = get_encoder(name, path=path, precision=precision, attention=attention)
        enc.embed(images[:1])  # warm-up: kernel selection, first-call allocations
        encoders[precision, attention] = enc
    best: dict[tuple, float] = {}
    embeddings: dict[tuple, torch.Tensor] = {}
    for _ in range(reps):
        for mode, enc in encoders.items():
            for bs in batch_sizes:
                seconds, emb = time_embed(enc, images, bs)
                best[mode, bs] = min(seconds, best.get((mode, bs), float("inf")))
                embeddings[mode] = emb
    reference = embeddings[MODES[0]]
    rows = []
    for (precision, attention), bs in best:
        emb = embeddings[precision, attention]
        rate = len(images) / best[(precision, attention), bs]
        cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
        rows.append(
            {
                "encoder": name,
                "precision": precision,
                "attention": attention,
                "batch_size": bs,
                "images_per_s": rate,
                "ratio_to_fp32_eager": best[MODES[0], bs] / best[(precision, attention), bs],
                "min_cosine_to_fp32": float(cos.min()),
                "max_abs_diff_to_fp32": float((emb - reference).abs().max()),
            }
        )
        print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    print(
        f"| {r['encoder']} | {r['precision']} | {r['attention']} | {r['batch_size']} | "
        f"{r['images_per_s']:.3f} | {r['ratio_to_fp32_eager']:.2f}x | "
        f"{r['min_cosine_to_fp32']:.6f} |",
        flush=True,
    )


def bench_predict(dinov2_path: Path, photos: int, quick: bool, tmp: Path) -> dict:
    """`predict` at its default settings through Locator: seconds per photo, and the share
    spent in the encoder."""
    from globeflow.apps.pipeline import Locator
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser
    from globeflow.data.encoders import get_encoder

    encoder = get_encoder("dinov2-vitl14-reg", path=dinov2_path)
    torch.manual_seed(3)
    size = dict(dim=64, depth=2) if quick else dict(dim=512, depth=12)  # PLONK_YFCC: 36M params
    model = RiemannianFlowMatching(Denoiser(**size, cond_dim=encoder.dim))
    locator = Locator(model, encoder, model_name="random YFCC-size network")
    paths = []
    for i, img in enumerate(synthetic_photos(photos, seed=7)):
        paths.append(tmp / f"photo_{i}.jpg")
        img.save(paths[-1], quality=90)
    kwargs = dict(num_samples=32, steps=4) if quick else {}
    start = time.perf_counter()
    results = locator.locate_paths(paths, progress=False, with_density=False, **kwargs)
    seconds = time.perf_counter() - start
    assert all(r["ok"] for r in results)
    start = time.perf_counter()
    encoder.embed([Image.open(p).convert("RGB") for p in paths])
    encoder_seconds = time.perf_counter() - start
    settings = results[0]["settings"]
    return {
        "photos": photos,
        "seconds_per_photo": seconds / photos,
        "encoder_seconds_per_photo": encoder_seconds / photos,
        "encoder_precision": encoder.precision,
        "num_samples": settings["num_samples"],
        "steps": settings["steps"],
        "guidance": settings["guidance"],
        "network_parameters": sum(p.numel() for p in model.network.parameters()),
    }


def bench_answer(photos: int, reps: int, quick: bool, gemm: dict) -> dict:
    """`predict` beyond the encoder: ``Locator.locate_embeddings`` at its default settings on
    ``photos`` random embeddings, YFCC-size network (random weights), seconds per photo by stage
    (median of ``reps`` calls after a first call, which is reported apart: it loads the reverse
    geocoder). Stages: samples (the guided answer samples), localizability (its own unguided
    pass; at guidance 0 one pass gives samples and localizability together), best guess, regions,
    place names, and the rest (result assembly). Also the matrix-product FLOPs of one photo's
    answer and the seconds they take at the GEMM rate ``gemm`` measured in the run (the floor
    of this arithmetic on this machine)."""
    import statistics

    from _common import EmbeddingsOnly, count_flops, stage_timers, yfcc_size_model

    from globeflow.apps import pipeline
    from globeflow.core.families import RiemannianFlowMatching
    from globeflow.core.network import Denoiser

    model, _ = yfcc_size_model(seed=3)
    if quick:
        model = RiemannianFlowMatching(Denoiser(dim=64, depth=2, cond_dim=1024)).eval()
    emb = torch.randn(photos, model.cond_dim, generator=torch.Generator().manual_seed(5))
    locator = pipeline.Locator(model, EmbeddingsOnly(model.cond_dim), "random YFCC-size network")
    targets = [
        (locator, "_draw", "draw"),
        (model, "sample", "samples"),
        (pipeline, "best_guess", "best guess"),
        (pipeline, "top_regions", "regions"),
        (pipeline, "_place_names", "place names"),
    ]
    calls = []
    for _ in range(reps + 1):
        with stage_timers(targets) as stages:
            start = time.perf_counter()
            results = locator.locate_embeddings(emb)
            stages["total"] = time.perf_counter() - start
        stages["localizability"] = stages.pop("draw") - stages.get("samples", 0.0)
        named = sum(v for k, v in stages.items() if k != "total")
        stages["other"] = stages["total"] - named
        calls.append({k: v / photos for k, v in stages.items()})
    per_photo = {k: statistics.median(c.get(k, 0.0) for c in calls[1:]) for k in calls[-1]}
    flops = count_flops(lambda: locator.locate_embeddings(emb[:1]))
    dtype = "bfloat16" if results[0]["settings"]["precision"] == "bf16" else "float32"
    return {
        "photos": photos,
        "repetitions": reps,
        "settings": results[0]["settings"],
        "seconds_per_photo_by_stage": per_photo,
        "first_call_seconds_per_photo": calls[0],
        "network_parameters": sum(p.numel() for p in model.network.parameters()),
        "gemm_flops_per_photo": flops,
        "ceiling_seconds_per_photo": flops / (gemm[dtype]["peak"] * 1e9),
        "ceiling_dtype": dtype,
        "aim_seconds_per_photo": 1.0,
    }


def print_answer(answer: dict) -> None:
    s = answer["settings"]
    print(
        f"\n`predict` beyond the encoder, {answer['photos']} photos, solver {s['solver']}, "
        f"{s['steps']} steps, {s['precision']}, {s['num_samples']} samples, "
        f"guidance {s['guidance']}: seconds per photo by stage (median of {answer['repetitions']})"
    )
    print("| stage | s/photo |\n|---|---|")
    for stage, seconds in answer["seconds_per_photo_by_stage"].items():
        print(f"| {stage} | {seconds:.3f} |")
    print(
        f"matrix products: {answer['gemm_flops_per_photo'] / 1e12:.3f} TFLOP per photo = "
        f"{answer['ceiling_seconds_per_photo']:.2f} s at this run's {answer['ceiling_dtype']} "
        "GEMM peak (the floor of this arithmetic here)"
    )


@experiment("encoders_paper", quick={"quick": True, "reps": 1}, threads=None)
def encoders_paper(
    *,
    images: int = 2,
    batch_sizes: str = "1,2",
    reps: int = 2,
    encoders: str = "dinov2-vitl14-reg,streetclip",
    predict_photos: int = 1,
    answer_photos: int = 0,
    quick: bool = False,
) -> dict:
    """Options (see the module docstring for the rest):

    - ``images``: images per measurement
    - ``reps``: interleaved repetitions; best counts
    - ``predict_photos``: 0 skips the predict timing
    - ``answer_photos``: time only the answer part (from embeddings, no encoder) on this many photos
    - ``quick``: tiny models: a smoke run
    """
    sizes = [int(b) for b in batch_sizes.split(",")]
    photos = synthetic_photos(2 if quick else images)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "machine": platform.machine(),
        "load_average_start": os.getloadavg(),
        "images": len(photos),
        "reps": reps,
        "quick": quick,
    }
    if answer_photos > 0:  # no encoder: the answer part only
        from _common import cpu_model, gemm_rates

        meta.update(cpu_model=cpu_model(), gemm_gflops=gemm_rates())
        print(json.dumps(meta), flush=True)
        answer = bench_answer(answer_photos, reps, quick, meta["gemm_gflops"])
        meta["load_average_end"] = os.getloadavg()
        print_answer(answer)
        return {"meta": meta, "answer": answer}
    print(json.dumps(meta), flush=True)
    print("| encoder | precision | attention | batch | images/s | vs fp32+eager | min cosine |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_random_models(Path(tmp), quick)
        rows = []
        for name in [n for n in encoders.split(",") if n]:  # --encoders "": predict only
            rows += bench_encoder(name, paths[name], photos, sizes, reps)
        predict = None
        if predict_photos > 0:
            predict = bench_predict(paths["dinov2-vitl14-reg"], predict_photos, quick, Path(tmp))
            print(f"predict end to end: {json.dumps(predict)}", flush=True)
    meta["load_average_end"] = os.getloadavg()
    return {"meta": meta, "encoders": rows, "predict": predict}
