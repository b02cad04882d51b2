"""globeflow: generative visual geolocation on the sphere (PLONK: diffusion, flow matching and
Riemannian flow matching over frozen image embeddings).

>>> import globeflow as gf
>>> model = gf.load_model("path/to/checkpoint")          # or a PLONK hub id
>>> latlon = model.sample(emb, num_samples=64, steps=32, guidance=2.0)   # (B, N, 2) degrees
>>> logp = model.log_prob(latlon, emb)                   # (B, N) natural log per steradian
>>> bits = model.localizability(emb)                     # (B,) E_p[log2 p]
"""

from .checkpoints import load_model, save_model
from .families import (
    Diffusion,
    FlowMatching,
    GeoModel,
    RiemannianFlowMatching,
    effective_area_km2,
)
from .network import Denoiser
from .schedules import CosineSchedule, LinearSchedule, SigmoidSchedule
from .sphere import haversine_km, latlon_to_unit, unit_to_latlon

__version__ = "0.1.0"

__all__ = [
    "load_model",
    "save_model",
    "GeoModel",
    "RiemannianFlowMatching",
    "FlowMatching",
    "Diffusion",
    "Denoiser",
    "SigmoidSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "haversine_km",
    "latlon_to_unit",
    "unit_to_latlon",
    "effective_area_km2",
]
