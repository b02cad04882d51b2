"""The experiments of ``benchmarks/run.py``, registered by name.

An experiment is a function of keyword-only parameters (each with a default: the full run)
returning its report, a JSON-ready dict; it prints its own tables as it goes. ``@experiment``
registers it under a name, with the parameter overrides of its ``--quick`` smoke run and
whether ``make bench`` runs it. The runner owns output, threads and the machine record, so an
experiment module has no ``main``: its parameters are the options, set from the command line by
``python benchmarks/run.py NAME --param key=value``.

Convention (asv's, in miniature): every module in ``benchmarks/`` whose name does not start with
an underscore registers at least one experiment; helpers are ``_``-prefixed.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
RUNNER_MODULES = ("run",)
"""Modules of benchmarks/ that are not experiment modules."""


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: ``run(**params) -> report``.

    ``quick``: parameter overrides of the smoke run (tiny sizes, a few minutes for all of them;
    None: no smoke run, e.g. a recipe that builds data); ``default``: part of the default set
    (``make bench``); ``threads``: torch threads unless the
    runner's ``--threads`` says otherwise (None: torch's own default, one per core; an
    experiment with a ``threads`` parameter gets the same number); ``module``: where it is defined.
    """

    name: str
    run: Callable[..., dict]
    quick: dict | None = field(default_factory=dict)
    default: bool = False
    threads: int | None = 1
    module: str = ""

    @property
    def summary(self) -> str:
        """The first line of its module's docstring, or of its own where the module registers
        several experiments."""
        several = sum(e.module == self.module for e in EXPERIMENTS.values()) > 1
        doc = inspect.getdoc(self.run if several else inspect.getmodule(self.run)) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The keyword parameters and their defaults (the full run's values)."""
        return dict(inspect.signature(self.run).parameters)

    def defaults(self, quick: bool = False) -> dict:
        """Parameter values of a full run, or of the ``--quick`` run."""
        values = {n: p.default for n, p in self.parameters().items()}
        return {**values, **(self.quick or {})} if quick else values

    def coerce(self, key: str, text: str) -> object:
        """``text`` (a command-line value) as the type of parameter ``key``: bool, int, float,
        Path or str (lists are comma-separated strings, parsed by the experiment); "none" gives
        None where the parameter may be None."""
        hints = typing.get_type_hints(self.run)
        kind = hints.get(key, str)
        optional = type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if optional and text.lower() == "none":
            return None
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{self.name}: {key} takes true or false, not {text!r}")
        if kind in (int, float, Path):
            return kind(text)
        return text


class Skipped(Exception):
    """An experiment cannot run here (its data is absent): the runner records it as skipped,
    with this message, instead of as failed."""


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(
    name: str, *, quick: dict | None = None, default: bool = False, threads: int | None = 1
) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Register the decorated function as experiment ``name`` (see :class:`Experiment`;
    ``quick`` None: the experiment has no smoke run)."""

    def register(fn: Callable[..., dict]) -> Callable[..., dict]:
        kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        if kinds - {inspect.Parameter.KEYWORD_ONLY}:
            raise TypeError(f"experiment {name}: parameters must be keyword-only")
        if name in EXPERIMENTS and EXPERIMENTS[name].run.__qualname__ != fn.__qualname__:
            raise ValueError(f"experiment {name!r} registered twice")
        unknown = set(quick or {}) - set(inspect.signature(fn).parameters)
        if unknown:
            raise TypeError(f"experiment {name}: quick sets unknown parameters {sorted(unknown)}")
        EXPERIMENTS[name] = Experiment(name, fn, quick, default, threads, fn.__module__)
        return fn

    return register


def experiment_modules() -> list[str]:
    """The experiment modules of benchmarks/: every module not starting with "_", runner aside."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(BENCHMARKS)])
        if not m.name.startswith("_") and m.name not in RUNNER_MODULES
    )


def discover() -> dict[str, Experiment]:
    """Import every experiment module (registering its experiments); the registry by name."""
    for module in experiment_modules():
        importlib.import_module(module)
    return dict(sorted(EXPERIMENTS.items()))
