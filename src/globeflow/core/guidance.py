"""The network's output under classifier-free guidance, with the condition path precomputed.

A sampler or likelihood solve evaluates the network at a fixed set of signal levels (its time
grid). :class:`GuidedField` computes the condition path of every (image, level) pair once, in one
batched pass, and then evaluates (1 + w) f(x | c) - w f(x | null) for any points, running the
conditional and the null branch as one stacked batch (one matrix product per layer instead of
two). The null condition (the all-zeros embedding) is shared by every image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from globeflow.core.network import Conditioning, Denoiser
from globeflow.core.sampler_settings import (
    FULL_PRECISION,
    MIXED,
    MIXED_BF16_BELOW,
    PRECISIONS,
    SAMPLE_PRECISIONS,
)


def check_precision(precision: str, choices: tuple[str, ...] = PRECISIONS) -> str:
    """Validate a precision name (one of ``choices``: "fp32" or "bf16"; a sampler also takes
    "mixed"). The message is the one every command gives (``predict`` checks with the same
    names through its settings table)."""
    if precision not in choices:
        raise ValueError(f"--precision {precision}: must be one of {', '.join(choices)}")
    return precision


def level_precisions(
    precision: str, gammas: torch.Tensor, bf16_below: float = MIXED_BF16_BELOW
) -> list[str]:
    """The precision of the network's evaluations at each signal level of ``gammas`` (S,):
    ``precision`` at every level, or for "mixed" (:data:`~globeflow.core.sampler_settings.
    MIXED`) bf16 below ``bf16_below`` (the sampler's :data:`~globeflow.core.sampler_settings.
    MIXED_BF16_BELOW`) and fp32 from there to the data end."""
    if check_precision(precision, SAMPLE_PRECISIONS) != MIXED:
        return [precision] * len(gammas)
    return ["bf16" if level < bf16_below else "fp32" for level in gammas.tolist()]


class GuidedField:
    """Guided network outputs for embeddings emb (B, D) at signal levels gammas (S,), each
    level's at its precision (:func:`level_precisions`).

    ``output(x, node)`` gives the guided output at level ``gammas[node]`` for points x (B, N, 3);
    ``output_and_jvp`` the unguided output with Jacobian-vector products (for divergences).
    """

    def __init__(
        self,
        network: Denoiser,
        emb: torch.Tensor,
        gammas: torch.Tensor,
        guidance: float = 0.0,
        precision: str = FULL_PRECISION,
        bf16_below: float = MIXED_BF16_BELOW,
    ):
        self.network = network
        self.guidance = float(guidance)
        self.gammas = gammas.to(emb.dtype)
        self.precisions = level_precisions(precision, self.gammas, bf16_below)
        self.cond = network.condition_grid(emb, self.gammas)
        self.null = None
        if self.guidance != 0.0:
            zeros = torch.zeros_like(emb[:1])
            self.null = network.condition_grid(zeros, self.gammas).expand_batch(emb.shape[0])

    def output(self, x: torch.Tensor, node: int) -> torch.Tensor:
        """(1 + w) f(x | c) - w f(x | null) at level node: x (B, N, 3) -> (B, N, 3)."""
        out_cond, out_null = self.branches(x, node)
        if out_null is None:
            return out_cond
        return guided_combination(out_cond, out_null, self.guidance)

    def branches(self, x: torch.Tensor, node: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """f(x | c) and f(x | null) (None without guidance) at level node, each (B, N, 3), from
        one stacked batch."""
        cond = self.cond.at(node)
        if self.null is None:
            return self.network.forward_conditioned(x, cond, self.precisions[node]), None
        both = Conditioning.cat([cond, self.null.at(node)])
        out = self.network.forward_conditioned(torch.cat([x, x]), both, self.precisions[node])
        out_cond, out_null = out.chunk(2)
        return out_cond, out_null

    def output_and_jvp(
        self, x: torch.Tensor, tangents: torch.Tensor, node: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unguided output (B, N, 3) and J @ tangents (K, B, N, 3) at level node."""
        if self.null is not None:
            raise ValueError("densities are defined for the unguided model (guidance 0)")
        return self.network.forward_with_jvp(x, tangents, self.cond.at(node), self.precisions[node])


class PointConditionedField:
    """:class:`GuidedField`'s unguided evaluations with one conditioning row per point, for
    points on grids of their own (:mod:`globeflow.core.point_grids`): ``cond`` (L, B, 1, C)
    holds every level of every grid for images emb (B, D); the points x (P, 1, 3) are the
    first P of the points whose images are ``images`` (R,) long, and ``node`` (P, 1) long is
    each one's level in ``cond``. "mixed" runs each point at the precision of its own level
    (bf16 below ``bf16_below``, the levels read from ``levels`` (L,)), so that its value does
    not depend on the others' levels; without ``levels`` it runs fp32."""

    def __init__(
        self,
        network: Denoiser,
        cond: Conditioning,
        images: torch.Tensor,
        precision: str,
        levels: torch.Tensor | None = None,
        bf16_below: float = MIXED_BF16_BELOW,
    ):
        self.network = network
        self.cond = cond
        self.images = images
        self.mixed_levels = levels if precision == MIXED else None
        self.bf16_below = bf16_below
        self.precision = FULL_PRECISION if precision == MIXED else check_precision(precision)

    def output(self, x: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """f(x | c) at each point's own level: (P, 1, 3)."""
        groups = self._groups(node)
        if len(groups) == 1:
            return self.network.forward_conditioned(x, self._rows(node), groups[0][1])
        out = torch.empty_like(x)
        for rows, precision in groups:
            out[rows] = self.network.forward_conditioned(x[rows], self._rows(node, rows), precision)
        return out

    def output_and_jvp(
        self, x: torch.Tensor, tangents: torch.Tensor, node: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x | c) (P, 1, 3) and J @ tangents (K, P, 1, 3) at each point's own level."""
        groups = self._groups(node)
        if len(groups) == 1:
            return self.network.forward_with_jvp(x, tangents, self._rows(node), groups[0][1])
        out, jvp = torch.empty_like(x), torch.empty_like(tangents)
        for rows, precision in groups:
            out[rows], jvp[:, rows] = self.network.forward_with_jvp(
                x[rows], tangents[:, rows], self._rows(node, rows), precision
            )
        return out, jvp

    def _groups(self, node: torch.Tensor) -> list[tuple[torch.Tensor | slice, str]]:
        """The points (rows of ``node`` (P, 1)) to evaluate at each precision."""
        if self.mixed_levels is None:
            return [(slice(None), self.precision)]
        low = self.mixed_levels[node[:, 0]] < self.bf16_below
        count = int(low.sum())  # one device sync per evaluation
        if count in (0, low.numel()):
            return [(slice(None), "bf16" if count else FULL_PRECISION)]
        return [(low.nonzero()[:, 0], "bf16"), ((~low).nonzero()[:, 0], FULL_PRECISION)]

    def _rows(self, node: torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> Conditioning:
        images = self.images[: node.shape[0]]
        return self.cond.rows(node[rows, 0], images[rows])


def guided_combination(cond: torch.Tensor, null: torch.Tensor, guidance: float) -> torch.Tensor:
    """(1 + w) cond - w null: classifier-free guidance of any quantity that is affine in the
    network output (outputs, velocities, data predictions)."""
    return torch.lerp(null, cond, 1.0 + guidance)


class GuidedVelocity:
    """A guided velocity field as the solvers of :mod:`globeflow.core.solvers` see it:
    ``field(x, node, False) -> ((1 + w) v_c - w v_null, None)``, plus the two branches
    ``branches(x, node) -> (v_c (B, N, 3), v_null (B, N, 3) or None)`` for solvers that treat
    the guidance term on its own (``data-2m``). Guided fields have no density: asking for a
    divergence is an error."""

    def __init__(
        self,
        branches: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]],
        guidance: float,
    ):
        self.branches = branches
        self.guidance = float(guidance)

    def __call__(
        self, x: torch.Tensor, node: int, with_divergence: bool = False
    ) -> tuple[torch.Tensor, None]:
        if with_divergence:
            raise ValueError("a guided field has no density; divergences need guidance 0")
        cond, null = self.branches(x, node)
        return (cond if null is None else guided_combination(cond, null, self.guidance)), None
