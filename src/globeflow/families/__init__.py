"""Generative families behind one interface (:class:`GeoModel`)."""

from .base import DenoisingModel, GeoModel, effective_area_km2
from .diffusion import Diffusion
from .flow import FlowMatching
from .riemannian_flow import RiemannianFlowMatching

DENOISING_FAMILIES: dict[str, type[DenoisingModel]] = {
    "rfm": RiemannianFlowMatching,
    "flow": FlowMatching,
    "diffusion": Diffusion,
}

__all__ = [
    "GeoModel",
    "DenoisingModel",
    "RiemannianFlowMatching",
    "FlowMatching",
    "Diffusion",
    "DENOISING_FAMILIES",
    "effective_area_km2",
]
