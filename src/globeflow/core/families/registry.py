"""Every generative family by name: what checkpoints, training and the command line read.

A family is a :class:`~globeflow.core.families.base.GeoModel` subclass whose ``family``
attribute is its name and whose ``from_config(config)`` rebuilds a model from the dict its
``config_dict()`` wrote. :func:`register_family` adds one at run time (a test's toy family, a
plug-in); the built-in ones are registered here.
"""

from __future__ import annotations

from globeflow.core.families.base import DenoisingModel, GeoModel
from globeflow.core.families.baselines import UniformSphere, VonMisesFisher, VonMisesFisherMixture
from globeflow.core.families.diffusion import Diffusion
from globeflow.core.families.flow import FlowMatching
from globeflow.core.families.riemannian_flow import RiemannianFlowMatching

FAMILIES: dict[str, type[GeoModel]] = {}
"""Family name -> class, in the order the command line lists them."""


def register_family(cls: type[GeoModel]) -> type[GeoModel]:
    """Add the family ``cls`` under ``cls.family`` (usable as a class decorator); a name
    already taken raises."""
    if cls.family in FAMILIES:
        raise ValueError(f"a family named {cls.family!r} is already registered")
    FAMILIES[cls.family] = cls
    return cls


def family_class(name: str) -> type[GeoModel]:
    """The class of the family ``name``; an unknown name raises ``ValueError`` naming those
    there are."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose from {family_names()}") from None


def family_names() -> tuple[str, ...]:
    """The names of every registered family, run-time ones included."""
    return tuple(FAMILIES)


def denoising_family_names() -> tuple[str, ...]:
    """The families that hold a denoising network (a published PLONK network fits them)."""
    return tuple(name for name, cls in FAMILIES.items() if issubclass(cls, DenoisingModel))


for _family in (
    RiemannianFlowMatching,
    FlowMatching,
    Diffusion,
    VonMisesFisher,
    VonMisesFisherMixture,
    UniformSphere,
):
    register_family(_family)

FAMILY_NAMES: tuple[str, ...] = family_names()
"""The built-in families: rfm, flow, diffusion, vmf, vmf-mixture, uniform."""
