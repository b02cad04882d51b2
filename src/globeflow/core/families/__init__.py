"""Generative families behind one interface (:class:`GeoModel`)."""

from globeflow.core.families.base import (
    UNIFORM_LOCALIZABILITY_BITS,
    DenoisingModel,
    GeoModel,
    NonFiniteOutputError,
    effective_area_km2,
)
from globeflow.core.families.diffusion import Diffusion
from globeflow.core.families.flow import FlowMatching
from globeflow.core.families.riemannian_flow import RiemannianFlowMatching

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
    "NonFiniteOutputError",
    "effective_area_km2",
    "UNIFORM_LOCALIZABILITY_BITS",
]
