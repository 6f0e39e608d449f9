"""Vision Mamba (hustvl/Vim, bimamba v2, middle class token) in plain PyTorch; reference twin: ``stm_ref.vim``.

Forward semantics are the official model's (docs/conventions.md §2, §9): patch embedding, class token
inserted at M // 2, absolute position embedding, then per layer Add -> RMSNorm -> bidirectional Mamba
mixer with the residual stream kept in float32 (float64 for a float64 model), the backward branch
scanning t = L-1 .. 0 with its own parameters (the official code flips the sequence; the scan backends
here do that or index backward, ``stm_fast.ops.backends``), ``(y_f + y_b) / 2`` in position order before
``out_proj``, a final Add -> RMSNorm and the head on the class token. The mixer knows no backend: it
calls ``stm_fast.ssm``'s conv and scan. Parameter names are the official ones, so ``state_dict()`` loads
into the official code and official checkpoints load here.

Token reduction plugs into the one layer loop (``VisionMamba.forward_features``) through two small
interfaces, ``TokenReduction`` and ``ReductionPass`` below: the model asks, per layer, what the layer must
export and which decay scales it applies, and hands the stream to the reduction after each reducing
layer. The model knows nothing about any method; ``stm_fast.reduction`` implements the interfaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import compute_dtype
from .ssm import causal_conv, scan_steps
from .layer_stats import DirectionStats, LayerStats, StatsRequest

__all__ = ["VimConfig", "VisionMamba", "MambaMixer", "Block", "RMSNorm", "PatchEmbed", "TokenReduction",
           "ReductionPass"]


class ReductionPass(Protocol):
    """One forward's view of the installed reduction: per-image bookkeeping of where the tokens went."""

    def layer_inputs(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, StatsRequest | None]:
        """(decay scales (forward, backward) of shape (batch, L) or None, what layer i must export or None)."""

    def reduces_after(self, i: int) -> bool:
        """Whether the stream is reduced after layer i."""

    def reduce(self, i: int, x: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        """The stream x (batch, L, d) after layer i, reduced (the next layer takes it as its residual)."""

    def class_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's class-token row of x (batch, L, d) -> (batch, d), wherever the class token is now."""


class TokenReduction(Protocol):
    """What ``VisionMamba.reduction`` holds (or None): ``begin`` returns the pass of one forward, or None
    when the reduction removes nothing (the plain loop then runs, bitwise the unreduced model)."""

    def begin(self, hidden: torch.Tensor) -> ReductionPass | None:
        """Start a forward on the embedded tokens ``hidden`` (batch, L, d)."""


@dataclass(frozen=True)
class VimConfig:
    """A Vision Mamba's architecture. ``stride`` is the patch embedding's stride (None: the patch size, i.e.
    non-overlapping patches); hustvl's "+" models use patch 16 with stride 8, a 27 x 27 grid at 224 px."""

    img_size: int = 224
    patch_size: int = 16
    stride: int | None = None
    channels: int = 3
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    num_classes: int = 1000
    norm_eps: float = 1e-5

    @property
    def patch_stride(self):
        """The stride of the patch embedding (the patch size unless ``stride`` is set)."""
        return self.stride or self.patch_size

    @property
    def grid(self):
        """Patches per image side: (img_size - patch_size) // stride + 1 (docs/conventions.md §2)."""
        return (self.img_size - self.patch_size) // self.patch_stride + 1

    @property
    def num_tokens(self):
        """L = M patches + the class token."""
        return self.num_patches + 1

    @property
    def num_patches(self):
        return self.grid * self.grid

    @property
    def cls_position(self):
        """Where the class token is inserted: M // 2 of the M patch tokens (docs/conventions.md §2)."""
        return self.num_patches // 2

    @property
    def d_inner(self):
        return self.expand * self.embed_dim

    @property
    def dt_rank(self):
        return math.ceil(self.embed_dim / 16)

    def with_overrides(self, **kw):
        return replace(self, **kw)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in the input's precision (float32 residual)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return y


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.grid = cfg.grid
        self.channels = cfg.channels
        self.proj = nn.Conv2d(cfg.channels, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_stride)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(
                f"expected images of shape (batch, {self.channels}, {self.img_size}, {self.img_size}), got "
                f"{tuple(x.shape)}: resize/crop to {self.img_size}x{self.img_size} (the eval transform does), or build "
                f"the model with img_size={x.shape[-1] if x.dim() == 4 else '...'} (position embeddings are fixed to "
                f"{self.grid}x{self.grid} patches)")
        return self.proj(x).flatten(2).transpose(1, 2)


class MambaMixer(nn.Module):
    """Bidirectional Mamba mixer (Vim's bimamba v2): a forward branch and a backward one (t = L-1 .. 0)."""

    def __init__(self, cfg: VimConfig, layer_idx=0):
        super().__init__()
        E, N, R, K = cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
        self.d_inner, self.d_state, self.dt_rank = E, N, R
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(cfg.embed_dim, 2 * E, bias=False)
        self.out_proj = nn.Linear(E, cfg.embed_dim, bias=False)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(E, E, K, groups=E, padding=K - 1, bias=True))
            setattr(self, "x_proj" + suffix, nn.Linear(E, R + 2 * N, bias=False))
            setattr(self, "dt_proj" + suffix, nn.Linear(R, E, bias=True))
            A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
            setattr(self, ("A_log" if suffix == "" else "A_b_log"), nn.Parameter(torch.log(A)))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(E)))
        self.scan_backend = None  # None: automatic (see stm_fast.ssm)

    def reset_dt(self, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
        """Mamba's initialisation of dt_proj: weights ±rank^-1/2, bias = softplus^-1 of log-uniform dt."""
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _params(self, reverse):
        """(conv1d, x_proj, dt_proj, A_log, D) of the forward or the backward direction."""
        if reverse:
            return self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        return self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D

    def branch(self, x, z, reverse=False, decay_scale=None, keep=False, first_steps=0):
        """One direction on (batch, E, L) inputs in token position order: the causal conv + SiLU,
        projections and the selective scan, the backward direction (``reverse``) scanning t = L-1 .. 0.
        Returns (y (batch, E, L); with ``keep`` this direction's ``DirectionStats`` (pre-bias delta, bias, B,
        C, A, y, u), else None; its first ``first_steps`` scan steps (``FirstSteps``) when the backend
        returned them, else None): what eq. 5 and eq. 11 need, computed by the forward itself.

        x and z are (batch, E, L) views of channel-last (batch, L, E) memory, as the input projection makes
        them; every step keeps that layout, so no transpose is ever materialised, and y comes back in it.
        ``decay_scale`` (batch, L): multiplies delta in Abar only (ToP-ViM's hidden-state alignment).
        """
        conv, x_proj, dt_proj, A_log, Dp = self._params(reverse)
        ct = compute_dtype(A_log)
        x = causal_conv(x, conv.weight, conv.bias, reverse=reverse, backend=self.scan_backend, dtype=ct)
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # bias goes in as delta_bias, as upstream
        B, C = B.transpose(1, 2), C.transpose(1, 2)
        A, bias = -torch.exp(A_log.to(ct)), dt_proj.bias.to(ct)
        if decay_scale is None:
            d, d_bias = delta, bias
        else:  # the step before scaling, formed here (the scan then scales it for Abar only)
            d, d_bias = F.softplus(delta.transpose(1, 2).to(ct) + bias).transpose(1, 2), None
        out = scan_steps(x, d, A, B, C, Dp.to(ct), z=z, delta_bias=d_bias, delta_softplus=decay_scale is None,
                         backend=self.scan_backend, decay_scale=decay_scale, reverse=reverse,
                         first_steps=first_steps if keep else 0)
        stats = DirectionStats(delta, bias, B, C, A, out.y, reverse=reverse, u=x) if keep else None
        return out.y, stats, out.first

    def forward(self, hidden, decay_scale=None, request: StatsRequest | None = None):
        """(mixer output (batch, L, d), statistics). With a ``request`` the statistics are both directions'
        ``LayerStats`` (token position order) with, when the request asks for n first steps and the backend
        returns them, their stacked delta/Abar/B; without one they are None."""
        xz = self.in_proj(hidden)  # (batch, L, 2E): the branches read x and z as (batch, E, L) views of it
        x, z = (t.transpose(1, 2) for t in xz.chunk(2, dim=-1))
        sf, sb = (None, None) if decay_scale is None else decay_scale
        keep, n = request is not None, request.first_steps if request is not None else 0
        y_f, st_f, first_f = self.branch(x, z, False, sf, keep, n)
        y_b, st_b, first_b = self.branch(x, z, True, sb, keep, n)
        stats = LayerStats(st_f, st_b, (first_f, first_b) if first_f is not None and first_b is not None else None) \
            if keep else None
        y_b = y_b.transpose(1, 2)  # (batch, L, E) rows
        # in place only into a buffer nobody else holds: kept statistics refer to y_b
        y = (y_b + y_f.transpose(1, 2) if keep else y_b.add_(y_f.transpose(1, 2))).mul_(0.5)
        out = self.out_proj(y)
        if keep and request.output:
            stats.output = out
        return out, stats


class Block(nn.Module):
    """Add -> RMSNorm -> mixer, returning (mixer output, residual, statistics); the residual stays in float32/64."""

    def __init__(self, cfg: VimConfig, layer_idx=0):
        super().__init__()
        self.norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mixer = MambaMixer(cfg, layer_idx)

    def forward(self, hidden, residual=None, decay_scale=None, request: StatsRequest | None = None):
        residual = hidden if residual is None else residual + hidden
        residual = residual.to(compute_dtype(residual))
        normed = self.norm(residual).to(self.norm.weight.dtype)
        out, stats = self.mixer(normed, decay_scale, request)
        return out, residual, stats


class VisionMamba(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim))
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.norm_f = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reduction: TokenReduction | None = None  # installed by stm_fast.reduce; None: the plain model
        self.reset_parameters()

    @property
    def token_position(self):
        return self.cfg.cls_position

    def reset_parameters(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for layer in self.layers:
            layer.mixer.reset_dt()
            # Mamba's prenorm residual rescale of out_proj
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(self.cfg.depth)

    def set_scan_backend(self, backend):
        """Force a scan backend for every layer (a name of ``stm_fast.ops.backends.BACKENDS``; None = automatic)."""
        for layer in self.layers:
            layer.mixer.scan_backend = backend
        return self

    def embed(self, images):
        x = self.patch_embed(images)
        c = self.token_position
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([x[:, :c], cls, x[:, c:]], dim=1)
        return x + self.pos_embed.to(x.dtype)

    def forward_features(self, images, observer=None):
        """Class-token features (batch, d): the one layer loop, reduced by ``self.reduction`` when one is
        installed (``stm_fast.reduce``). ``observer(i, cls_state)`` (optional) sees, after each layer i, the
        class token's entry in the stream the next layer adds up (residual + mixer output), (batch, d)."""
        hidden = self.embed(images)
        reduction_pass = self.reduction.begin(hidden) if self.reduction is not None else None
        rows = reduction_pass.class_rows if reduction_pass is not None else (lambda t: t[:, self.token_position])  # noqa: E731
        residual = None
        for i, layer in enumerate(self.layers):
            scales, request = reduction_pass.layer_inputs(i) if reduction_pass is not None else (None, None)
            hidden, residual, stats = layer(hidden, residual, decay_scale=scales, request=request)
            if reduction_pass is not None and reduction_pass.reduces_after(i):
                # the stream the next layer would add up, reduced: it becomes that layer's residual
                x = residual.add_(hidden) if not torch.is_grad_enabled() else residual + hidden
                hidden, residual = reduction_pass.reduce(i, x, stats), None
            if observer is not None:
                observer(i, rows(hidden) if residual is None else rows(residual) + rows(hidden))
        return rows(self.norm_f(hidden if residual is None else residual + hidden))

    def forward(self, images, observer=None):
        """Logits (batch, classes); ``observer`` as in ``forward_features``."""
        feats = self.forward_features(images, observer)
        return self.head(feats.to(self.head.weight.dtype) if isinstance(self.head, nn.Linear) else feats)
