"""FLOP counts and CPU throughputs behind the cost estimates of docs/scaling.md.

Counted (``torch.utils.flop_counter.FlopCounterMode``, matrix products and convolutions; a
multiply-add is 2 FLOPs):

- the network (``net_dim``/``net_depth``, default the paper's dim 512, depth 12, expansion 4,
  cond_dim 1024, 36M parameters): FLOPs per sample of the RFM loss forward and of a training
  step (forward + backward), and the operator count of one whole training step with AdamW and
  with LAMB (on a GPU each operator is at least one kernel launch);
- the encoders, per image: EfficientNet-Lite0 (the offline default; real weights) and the
  paper's ViT-L/14 encoders at the 336 px our encoders feed them (StreetCLIP: CLIP ViT-L/14-336;
  DINOv2 ViT-L/14 with 4 registers), built from their published configurations on the meta
  device (no weights needed: FLOPs depend on shapes only).

Measured on this machine's CPU (float32): network training steps/s at batch ``batch_size``,
Lite0 images/s (forward only, batch 32), ViT-L/14-336 seconds per image (random weights,
forward only) and JPEG decode + preprocessing images/s on one thread. GPU times in
docs/scaling.md are estimates from these counts and published peak rates, not measurements.

Usage: ``python benchmarks/run.py flops [--threads 2]``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import count_flops, loadavg
from _registry import experiment
from torch.utils._python_dispatch import TorchDispatchMode

from globeflow.core.families import RiemannianFlowMatching
from globeflow.core.network import Denoiser
from globeflow.jobs.training import Lamb


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched (each is at least one kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def network_counts(dim: int, depth: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=dim, depth=depth, cond_dim=1024))
    params = sum(p.numel() for p in model.parameters())
    x0 = torch.nn.functional.normalize(torch.randn(batch, 3), dim=-1)
    emb = torch.randn(batch, 1024)
    g = torch.Generator().manual_seed(0)
    forward = count_flops(lambda: model.loss(x0, emb, generator=g))
    step = count_flops(lambda: model.loss(x0, emb, generator=g).backward())
    ops = {}
    for name, opt in (
        ("adamw", torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)),  # CUDA default
        ("lamb", Lamb(model.parameters(), lr=1e-4)),
    ):
        counter = OpCounter()
        opt.zero_grad()
        model.loss(x0, emb, generator=g).backward()
        opt.step()  # first step allocates the moments; count a later one
        with counter:
            opt.zero_grad()
            model.loss(x0, emb, generator=g).backward()
            opt.step()
        ops[name] = counter.count
    return {
        "parameters": params,
        "forward_flops_per_sample": forward / batch,
        "train_flops_per_sample": step / batch,
        "ops_per_step": ops,
    }


def measure_train_steps(dim: int, depth: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = RiemannianFlowMatching(Denoiser(dim=dim, depth=depth, cond_dim=1024))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.nn.functional.normalize(torch.randn(batch, 3), dim=-1)
    emb = torch.randn(batch, 1024)
    g = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        model.loss(x0, emb, generator=g).backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def clip_vit_l14_336():
    """StreetCLIP's vision tower: the published CLIP ViT-L/14-336 configuration."""
    import transformers

    return transformers.CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
    )


def vit_counts() -> dict:
    import transformers

    clip = clip_vit_l14_336()
    dino = transformers.Dinov2WithRegistersConfig(
        image_size=518,  # the published position grid; our encoder feeds 336 px (interpolated)
        patch_size=14,
        hidden_size=1024,
        mlp_ratio=4,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_register_tokens=4,
    )
    out = {}
    for name, cls, cfg in (
        ("streetclip (CLIP ViT-L/14-336)", transformers.CLIPVisionModel, clip),
        ("dinov2-vitl14-reg (336 px)", transformers.Dinov2WithRegistersModel, dino),
    ):
        with torch.device("meta"):
            model = cls(cfg)
            x = torch.zeros(1, 3, 336, 336)
        out[name] = {
            "flops_per_image": count_flops(lambda m=model, x=x: m(pixel_values=x)),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    return out


def measure_vit_cpu(images: int) -> float:
    """Seconds per image of a randomly initialised CLIP ViT-L/14-336 forward, float32."""
    import transformers

    model = transformers.CLIPVisionModel(clip_vit_l14_336()).eval()
    x = torch.randn(1, 3, 336, 336)
    with torch.inference_mode():
        model(pixel_values=x)
        start = time.perf_counter()
        for _ in range(images):
            model(pixel_values=x)
    return (time.perf_counter() - start) / images


def lite_counts_and_speed(batch: int, reps: int) -> dict:
    from globeflow.data.encoders import get_encoder

    out = {}
    for name in ("efficientnet-lite0", "efficientnet-lite0-geo"):
        enc = get_encoder(name)
        x = torch.randn(batch, 3, enc.image_size, enc.image_size)
        with torch.inference_mode():
            flops = count_flops(lambda e=enc, x=x[:1]: e.forward_batch(x))
            enc.forward_batch(x)
            start = time.perf_counter()
            for _ in range(reps):
                enc.forward_batch(x)
            per_s = reps * batch / (time.perf_counter() - start)
        out[name] = {"flops_per_image": flops, "cpu_images_per_s": per_s, "dim": enc.dim}
    return out


def measure_decode(reps: int) -> float:
    """Images/s of one thread decoding the bundled example JPEGs (about 450 x 336) and
    preprocessing them as the ViT-L/14-336 encoders do (resize, centre crop, normalise)."""
    from globeflow.data.encoders import (
        CLIP_MEAN,
        CLIP_STD,
        center_crop,
        resize_short_side,
        to_tensor,
    )
    from globeflow.data.images import load_image

    photos = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))
    start = time.perf_counter()
    for _ in range(reps):
        for path in photos:
            img = center_crop(resize_short_side(load_image(path), 336), 336)
            to_tensor(img, CLIP_MEAN, CLIP_STD)
    return reps * len(photos) / (time.perf_counter() - start)


@experiment(
    "flops",
    quick={"net_dim": 32, "net_depth": 1, "batch_size": 16, "train_steps": 1, "vit_images": 0},
    threads=2,
)
def flops(
    *,
    net_dim: int = 512,
    net_depth: int = 12,
    batch_size: int = 1024,
    train_steps: int = 5,
    vit_images: int = 2,
) -> dict:
    """FLOP counts of the network and encoders, and their CPU rates here (the run's threads)."""
    load_start, threads = loadavg(), torch.get_num_threads()
    net = network_counts(net_dim, net_depth, batch_size)
    net["cpu_train_steps_per_s"] = measure_train_steps(net_dim, net_depth, batch_size, train_steps)
    encoders = lite_counts_and_speed(batch=32, reps=3)
    encoders.update(vit_counts())
    if vit_images:  # 0: the counts alone (a smoke run)
        vit = encoders["streetclip (CLIP ViT-L/14-336)"]
        vit["cpu_seconds_per_image"] = measure_vit_cpu(vit_images)
    torch.set_num_threads(1)
    decode = measure_decode(reps=20)
    result = {
        "network": {"dim": net_dim, "depth": net_depth, "batch": batch_size, **net},
        "encoders": encoders,
        "decode_preprocess_images_per_s_one_thread": decode,
        "threads": threads,
        "loadavg": {"start": load_start, "end": loadavg()},
        "torch": torch.__version__,
    }
    print(f"network: {net['parameters'] / 1e6:.1f}M parameters")
    print(f"  forward {net['forward_flops_per_sample'] / 1e6:.1f} MFLOP/sample")
    print(f"  training step {net['train_flops_per_sample'] / 1e6:.1f} MFLOP/sample")
    print(f"  operators per step {net['ops_per_step']}")
    print(f"  CPU: {net['cpu_train_steps_per_s']:.3f} steps/s at batch {batch_size}")
    for name, e in encoders.items():
        line = f"{name}: {e['flops_per_image'] / 1e9:.2f} GFLOP/image"
        if "cpu_images_per_s" in e:
            line += f", CPU {e['cpu_images_per_s']:.1f} images/s"
        if "cpu_seconds_per_image" in e:
            line += f", CPU {e['cpu_seconds_per_image']:.1f} s/image"
        print(line)
    print(f"JPEG decode + 336 px preprocessing: {decode:.0f} images/s on one thread")
    return result
