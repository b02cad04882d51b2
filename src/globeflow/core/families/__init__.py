"""Generative families behind one interface (:class:`GeoModel`), by name in
:mod:`~globeflow.core.families.registry`."""

from globeflow.core.families.base import (
    UNIFORM_LOCALIZABILITY_BITS,
    DenoisingModel,
    GeoModel,
    NonFiniteOutputError,
    effective_area_km2,
)
from globeflow.core.families.diffusion import Diffusion
from globeflow.core.families.flow import FlowMatching
from globeflow.core.families.registry import (
    FAMILIES,
    FAMILY_NAMES,
    denoising_family_names,
    family_class,
    family_names,
    register_family,
)
from globeflow.core.families.riemannian_flow import RiemannianFlowMatching

DENOISING_FAMILIES: dict[str, type[DenoisingModel]] = {
    name: FAMILIES[name] for name in denoising_family_names()
}
"""The built-in families that hold a denoising network (rfm, flow, diffusion), by name."""

__all__ = [
    "GeoModel",
    "DenoisingModel",
    "RiemannianFlowMatching",
    "FlowMatching",
    "Diffusion",
    "DENOISING_FAMILIES",
    "FAMILIES",
    "FAMILY_NAMES",
    "denoising_family_names",
    "family_class",
    "family_names",
    "register_family",
    "NonFiniteOutputError",
    "effective_area_km2",
    "UNIFORM_LOCALIZABILITY_BITS",
]
