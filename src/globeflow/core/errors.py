"""Errors the maths raises and the apps report (kept apart so that any core module can raise
them without importing the families)."""


class NonFiniteOutputError(ValueError):
    """A model gave NaN or infinite values (corrupt weights, non-finite guidance or input)."""
