"""The AdaLN-MLP denoiser (paper section 3.4), with the published PLONK state-dict layout.

The network maps (noisy point y in R^3, signal level gamma, image embedding) to a vector in R^3
(a velocity or a noise prediction, depending on the generative family).

The *condition path* (condition mapper, time embedding and every AdaLN modulation) depends only on
(embedding, gamma). :meth:`Denoiser.condition` computes it once per (condition, time step) and
:meth:`Denoiser.forward_conditioned` reuses it for any number of points of that condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from globeflow.core.packed_linear import PackedLinear, linear, pack
from globeflow.core.sampler_settings import FULL_PRECISION

LAYER_NORM_EPS = 1e-5
TIME_SCALE = 1000.0
"""The published networks embed gamma * 1000."""


class SinusoidalTimeEncoding(nn.Module):
    """Sinusoidal features of gamma * 1000, standardised over the feature axis: (B,) -> (B, 2 F)."""

    def __init__(self, num_channels: int):
        super().__init__()
        half = num_channels // 2
        freqs = (1.0 / 10000.0) ** (2 * torch.arange(half, dtype=torch.float32) / num_channels)
        self.register_buffer("freqs", freqs)

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        angles = (gamma * TIME_SCALE)[..., None] * self.freqs
        feats = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return (feats - feats.mean(-1, keepdim=True)) / feats.std(-1, keepdim=True)


class TimeEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.encode_time = SinusoidalTimeEncoding(dim // 4)
        self.map_time = nn.Sequential(nn.Linear(dim // 4, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        return self.map_time(self.encode_time(gamma))


class AdaLNBlock(nn.Module):
    """Residual MLP block modulated by the condition: x + s * mlp((1 + g) LN(x) + m)."""

    def __init__(self, dim: int, expansion: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * expansion),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim * expansion, dim),
        )
        self.ada_map = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 3))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(..., dim) condition -> (..., 3 dim) packed (g, m, s)."""
        return self.ada_map(cond)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        layers: tuple[PackedLinear, PackedLinear] | None = None,
    ) -> torch.Tensor:
        """x (..., dim) residual stream; modulation (..., 3 dim) packed (g, m, s).

        ``layers``: the MLP's two linear layers prepared for inference
        (:meth:`Denoiser.inference_layers`), possibly in bfloat16; the residual stream,
        LayerNorm and modulation stay in the stream's dtype.
        """
        g, m, s = modulation.chunk(3, dim=-1)
        h = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
        a = torch.addcmul(m, h, 1 + g)
        if layers is None:
            out = self.mlp(a)
        else:
            lin1, lin2 = layers
            z = linear(a.to(lin1.weight.dtype), lin1, gelu=True)
            out = linear(z, lin2).to(x.dtype)
        if torch.is_grad_enabled():
            return x + out * s
        # Inference: reuse the MLP's output buffer instead of allocating two more (B, N, dim)
        # tensors per block (fresh large CPU allocations page-fault on first touch).
        return out.mul_(s).add_(x)


def _modulated_layer_norm_jvp(
    stack: torch.Tensor, g: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """(1 + g) LN(x) + m and its JVPs for a stack (K + 1, ..., C) of the primal x and its K
    tangents; returns a new stack of the same shape."""
    h = stack - stack.mean(-1, keepdim=True)  # centred primal and tangents
    rstd = torch.rsqrt(h[0].square().mean(-1, keepdim=True) + LAYER_NORM_EPS)
    h *= rstd
    # d LN = rstd (dx_c - LN(x) mean(LN(x) dx_c)), with the tangents already centred and scaled.
    h[1:] -= h[0] * (h[1:] * h[0]).mean(-1, keepdim=True)
    h *= 1 + g
    h[0] += m
    return h


def _without_bias(layer: PackedLinear) -> PackedLinear:
    return PackedLinear(layer.weight, None, layer.packed, layer.out_features)


@dataclass
class Conditioning:
    """The cached condition path for a batch of (embedding, gamma) pairs.

    ``blocks[i]`` is the packed (g, m, s) modulation of block i, shape (*lead, B, 1, 3 dim);
    ``final`` the packed (g, m) of the output layer, (*lead, B, 1, 2 dim). The singleton axis
    broadcasts over samples; the optional leading axes index signal levels (see
    :meth:`Denoiser.condition_grid` and :meth:`at`).
    """

    blocks: list[torch.Tensor]
    final: torch.Tensor

    @staticmethod
    def cat(items: list[Conditioning], dim: int = 0) -> Conditioning:
        """Concatenate along an axis (default: the first, the batch axis of an ungridded one)."""
        return Conditioning(
            blocks=[torch.cat(parts, dim) for parts in zip(*(c.blocks for c in items))],
            final=torch.cat([c.final for c in items], dim),
        )

    def at(self, index: int) -> Conditioning:
        """The conditioning at one signal level of a grid (drops the leading axis)."""
        return Conditioning(blocks=[b[index] for b in self.blocks], final=self.final[index])

    def rows(self, levels: torch.Tensor, images: torch.Tensor) -> Conditioning:
        """One row per point of a grid's conditioning (L, B, 1, C): point i at level
        ``levels[i]`` of image ``images[i]`` (both (R,) long) -> a batch of R images of one
        point each, (R, 1, C)."""
        return Conditioning(
            blocks=[b[levels, images] for b in self.blocks], final=self.final[levels, images]
        )

    def expand_batch(self, batch: int) -> Conditioning:
        """Broadcast a batch-1 conditioning (*lead, 1, 1, C) to ``batch`` rows (views)."""
        return Conditioning(
            blocks=[b.expand(*b.shape[:-3], batch, *b.shape[-2:]) for b in self.blocks],
            final=self.final.expand(*self.final.shape[:-3], batch, *self.final.shape[-2:]),
        )


def _stream_dtype(precision: str, default: torch.dtype) -> torch.dtype:
    """dtype of the residual stream of the inference blocks at ``precision``."""
    return torch.bfloat16 if precision == "bf16" else default


class Denoiser(nn.Module):
    """AdaLN-MLP denoiser; constructor arguments are the published ``config.json`` keys."""

    def __init__(
        self,
        input_dim: int = 3,
        dim: int = 512,
        depth: int = 12,
        expansion: int = 4,
        cond_dim: int = 1024,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dim % 8:
            raise ValueError(f"dim must be a multiple of 8, got {dim}")
        self.config = dict(
            input_dim=input_dim, dim=dim, depth=depth, expansion=expansion, cond_dim=cond_dim
        )
        self.time_embedder = TimeEmbedder(dim)
        self.cond_mapper = nn.Linear(cond_dim, dim)
        self.initial_mapper = nn.Linear(input_dim, dim)
        self.blocks = nn.ModuleList(AdaLNBlock(dim, expansion, dropout) for _ in range(depth))
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 2))
        self.final_linear = nn.Linear(dim, input_dim)

    @property
    def cond_dim(self) -> int:
        return self.config["cond_dim"]

    def condition(self, emb: torch.Tensor, gamma: torch.Tensor) -> Conditioning:
        """Condition path for embeddings (B, cond_dim) at signal levels gamma (B,) or scalar."""
        gamma = torch.as_tensor(gamma, dtype=emb.dtype, device=emb.device).expand(emb.shape[0])
        cond = self.cond_mapper(emb) + self.time_embedder(gamma)
        return self._modulations(cond[:, None, :])

    def condition_grid(self, emb: torch.Tensor, gammas: torch.Tensor) -> Conditioning:
        """Condition paths of embeddings (B, cond_dim) at every signal level of gammas (S,): a
        Conditioning with leading axis S (select one with ``.at(i)``).

        Computed one embedding at a time: a matrix product's kernel (and so its rounding)
        depends on the row count, and an image's answer must not depend on the other images of
        its batch. The cost (a few (S, dim) products per image) is small beside sampling."""
        gammas = torch.as_tensor(gammas, dtype=emb.dtype, device=emb.device).reshape(-1)
        time = self.time_embedder(gammas)[:, None]
        rows = [self.cond_mapper(emb[i : i + 1])[None] + time for i in range(emb.shape[0])]
        return Conditioning.cat([self._modulations(c[:, :, None, :]) for c in rows], dim=1)

    def _modulations(self, cond: torch.Tensor) -> Conditioning:
        blocks = [block.modulation(cond) for block in self.blocks]
        return Conditioning(blocks=blocks, final=self.final_adaln(cond))

    def inference_layers(
        self, precision: str = FULL_PRECISION
    ) -> list[tuple[PackedLinear, PackedLinear]]:
        """Every block's two MLP layers prepared for inference, [(lin1, lin2)]: cast to bf16
        for ``precision="bf16"`` (else the parameters' dtype) and prepacked where oneDNN runs.

        Cached: rebuilt only when a parameter changed (training steps and ``load_state_dict``
        bump the parameters' version counters) or moved.
        """
        # The Parameter objects outlive dtype moves and loads (only their data and version
        # change), and listing them through the module tree on every call cost ~8% of a narrow
        # network's localizability pass.
        params = self.__dict__.get("_mlp_parameters")
        if params is None:
            params = [p for block in self.blocks for p in block.mlp.parameters()]
            self.__dict__["_mlp_parameters"] = params
        dtype = torch.bfloat16 if precision == "bf16" else params[0].dtype
        key = (dtype, tuple((p.data_ptr(), p._version) for p in params))
        cache = self.__dict__.setdefault("_inference_cache", {})
        if cache.get(precision, (None,))[0] != key:
            layers = [(pack(b.mlp[0], dtype), pack(b.mlp[3], dtype)) for b in self.blocks]
            cache[precision] = (key, layers)
        return cache[precision][1]

    def forward_conditioned(
        self, y: torch.Tensor, cond: Conditioning, precision: str = FULL_PRECISION
    ) -> torch.Tensor:
        """Points y (B, N, 3) under a cached condition of batch B -> output (B, N, 3).

        Without autograd the blocks run on :meth:`inference_layers`; ``precision="bf16"`` then
        keeps the residual stream, LayerNorm and matrix products of the blocks in bfloat16
        (float32 accumulation); the input and output layers stay float32. With autograd
        (training) the precision is ignored.
        """
        layers = [None] * len(self.blocks)
        if not torch.is_grad_enabled():
            layers = self.inference_layers(precision)
        x = self.initial_mapper(y)
        stream = _stream_dtype(precision, x.dtype) if layers[0] is not None else x.dtype
        x = x.to(stream)
        for block, modulation, lin in zip(self.blocks, cond.blocks, layers):
            x = block(x, modulation.to(stream), lin)
        g, m = cond.final.chunk(2, dim=-1)
        h = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS).to(y.dtype)
        return self.final_linear(torch.addcmul(m, h, 1 + g))

    def forward_with_jvp(
        self,
        y: torch.Tensor,
        tangents: torch.Tensor,
        cond: Conditioning,
        precision: str = FULL_PRECISION,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and Jacobian-vector products in one pass (hand-written forward mode).

        y (B, N, 3) points, tangents (K, B, N, 3) input directions -> (output (B, N, 3),
        J @ tangents (K, B, N, 3)). The primal and its K tangents travel as one stacked tensor
        (K + 1, B, N, dim): one matrix product per layer for all of them, elementwise work in
        place. ``precision="bf16"`` keeps the stack in bfloat16 inside the blocks (as
        :meth:`forward_conditioned`).
        """
        layers = self.inference_layers(precision)
        stream = _stream_dtype(precision, y.dtype)
        stack = torch.cat([y[None], tangents]) @ self.initial_mapper.weight.T
        stack[0] += self.initial_mapper.bias
        stack = stack.to(stream)
        for (lin1, lin2), modulation in zip(layers, cond.blocks):
            g, m, s = modulation.to(stream).chunk(3, dim=-1)
            h = _modulated_layer_norm_jvp(stack, g, m)
            z = linear(h.to(lin1.weight.dtype), _without_bias(lin1))
            z0 = (z[0] + lin1.bias).to(torch.promote_types(z.dtype, torch.float32))
            # GELU(z) = z Phi(z); its derivative Phi(z) + z phi(z) scales the tangents. ATen's
            # fused GELU kernels: a third of the time of ndtr, exp and four products.
            slope = torch.ops.aten.gelu_backward(z0.new_ones(()).expand_as(z0), z0)
            z[1:] *= slope.to(z.dtype)
            z[0] = F.gelu(z0).to(z.dtype)
            out = linear(z.to(lin2.weight.dtype), _without_bias(lin2)).to(stream)
            out[0] += lin2.bias.to(stream)
            stack.addcmul_(out, s)
        g, m = cond.final.chunk(2, dim=-1)
        h = _modulated_layer_norm_jvp(stack.to(y.dtype), g, m)
        out = h @ self.final_linear.weight.T
        return out[0] + self.final_linear.bias, out[1:]

    def forward(self, y: torch.Tensor, gamma: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The published signature: one point per row. y (B, 3), gamma (B,), emb (B, cond_dim)."""
        return self.forward_conditioned(y[:, None, :], self.condition(emb, gamma))[:, 0, :]
