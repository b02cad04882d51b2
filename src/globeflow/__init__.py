"""globeflow: generative visual geolocation on the sphere (PLONK: diffusion, flow matching and
Riemannian flow matching over frozen image embeddings).

>>> import globeflow as gf
>>> model = gf.load_model("path/to/checkpoint")          # or a PLONK hub id
>>> latlon = model.sample(emb)        # (B, N, 2) degrees, with gf.DEFAULT_SAMPLER's recipe
>>> logp = model.log_prob(latlon, emb)                   # (B, N) natural log per steradian
>>> bits = model.localizability(emb)                     # (B,) E_p[log2 p]

The package is layered (``core``: maths and models; ``data``: images, encoders, stores;
``answers``: decoding, places, maps; ``jobs``: embed, train, evaluate; ``apps``: pipeline, CLI,
server). The names below are imported on first use, so that ``import globeflow`` (and the
command line's ``--help``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "globeflow.core.checkpoints",
    "save_model": "globeflow.core.checkpoints",
    "GeoModel": "globeflow.core.families",
    "RiemannianFlowMatching": "globeflow.core.families",
    "FlowMatching": "globeflow.core.families",
    "Diffusion": "globeflow.core.families",
    "effective_area_km2": "globeflow.core.families",
    "Denoiser": "globeflow.core.network",
    "SigmoidSchedule": "globeflow.core.schedules",
    "LinearSchedule": "globeflow.core.schedules",
    "CosineSchedule": "globeflow.core.schedules",
    "haversine_km": "globeflow.core.sphere",
    "latlon_to_unit": "globeflow.core.sphere",
    "unit_to_latlon": "globeflow.core.sphere",
    "SamplerSettings": "globeflow.core.sampler_settings",
    "DEFAULT_SAMPLER": "globeflow.core.sampler_settings",
    "AUTHORS_SAMPLER": "globeflow.core.sampler_settings",
    "DEFAULT_GUIDANCE": "globeflow.core.sampler_settings",
    "recommended_guidance": "globeflow.core.sampler_settings",
    "Locator": "globeflow.apps.pipeline",
    "PlonkPipeline": "globeflow.apps.plonk_compat",
    "PLONKPipeline": "globeflow.apps.plonk_compat",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'globeflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
