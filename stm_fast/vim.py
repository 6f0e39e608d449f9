"""Vision Mamba (hustvl/Vim, bimamba v2, middle class token) in plain PyTorch; reference twin: ``stm_ref.vim``.

Forward semantics are the official model's (SPEC §2, §7): patch embedding, class token inserted at
M // 2, absolute position embedding, then per layer Add -> RMSNorm -> bidirectional Mamba mixer with
the residual stream kept in float32 (float64 for a float64 model), the backward branch scanning the
flipped sequence with its own parameters, ``(y_f + flip(y_b)) / 2`` before ``out_proj``, a final
Add -> RMSNorm and the head on the class token. Parameter names are the official ones, so
``state_dict()`` loads into the official code and official checkpoints load here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import causal_conv1d
from .scan import selective_scan

__all__ = ["VimConfig", "VisionMamba", "MambaMixer", "Block", "RMSNorm", "PatchEmbed", "DirectionStats"]


@dataclass(frozen=True)
class VimConfig:
    img_size: int = 224
    patch_size: int = 16
    channels: int = 3
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    num_classes: int = 1000
    norm_eps: float = 1e-5

    @property
    def grid(self):
        return self.img_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid * self.grid

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
        self.patch_size = cfg.patch_size
        self.channels = cfg.channels
        self.proj = nn.Conv2d(cfg.channels, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(
                f"expected images of shape (batch, {self.channels}, {self.img_size}, {self.img_size}), got "
                f"{tuple(x.shape)}: resize/crop to {self.img_size}x{self.img_size} (the eval transform does), or build "
                f"the model with img_size={x.shape[-1] if x.dim() == 4 else '...'} (position embeddings are fixed to "
                f"{self.img_size // self.patch_size}x{self.img_size // self.patch_size} patches)")
        return self.proj(x).flatten(2).transpose(1, 2)


class DirectionStats:
    """One direction's per-token statistics of a layer, read lazily at token positions.

    Holds what the branch computed anyway, in scan order (the backward branch's run over the flipped
    sequence): the pre-bias step ``delta_raw`` (batch, E, L), ``bias`` (E,), ``B``, ``C`` (batch, N, L),
    ``A`` (E, N), the SSM output ``y`` (batch, E, L). Accessors return token-position order; ``*_at``
    read only the requested positions, so a merge step touches a handful of tokens, not the sequence.
    """

    def __init__(self, delta_raw, bias, B, C, A, y, reverse=False):
        self.delta_raw, self.bias, self._B, self._C, self.A, self._y = delta_raw, bias, B, C, A, y
        self.reverse = reverse
        self.L = delta_raw.shape[-1]

    def _idx(self, pos):
        pos = torch.as_tensor(pos, device=self.delta_raw.device)
        return self.L - 1 - pos if self.reverse else pos

    def _full(self, t):
        return t.flip(-1) if self.reverse else t

    def _step(self, d_raw):
        """The scan's step softplus(delta + bias) from pre-bias rows (batch, len, E)."""
        return F.softplus(d_raw.to(self.bias.dtype) + self.bias)

    def delta_at(self, pos):
        """softplus(delta + bias) at token positions: (batch, E, len(pos))."""
        return self.delta_rows(pos).transpose(1, 2)

    def B_at(self, pos):
        return self._B.index_select(-1, self._idx(pos))

    def delta_rows(self, pos):
        """softplus(delta + bias) at token positions, channels last: (batch, len(pos), E)."""
        return self._step(self.delta_raw.transpose(1, 2).index_select(1, self._idx(pos)))

    def B_rows(self, pos):
        """B at token positions, states last: (batch, len(pos), N)."""
        return self._B.transpose(1, 2).index_select(1, self._idx(pos))

    def scan_rows(self, n):
        """softplus(delta + bias) and B of this direction's first n scan steps: (batch, n, E), (batch, n, N).
        The mixer's projections are (batch, L, channels) in memory, so these are slices, not gathers."""
        return self._step(self.delta_raw.transpose(1, 2)[:, :n]), self._B.transpose(1, 2)[:, :n]

    def C_at(self, pos):
        return self._C.index_select(-1, self._idx(pos))

    @property
    def delta(self):
        return self._step(self._full(self.delta_raw).transpose(1, 2)).transpose(1, 2)

    @property
    def B(self):
        return self._full(self._B)

    @property
    def C(self):
        return self._full(self._C)

    @property
    def y(self):
        return self._full(self._y)


class MambaMixer(nn.Module):
    """Bidirectional Mamba mixer (Vim's bimamba v2): forward branch and a flipped backward branch."""

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
        self.scan_backend = None  # None: automatic (see stm_fast.scan)
        self.keep_stats = False  # token reducers switch this on to read delta/B/C/y of the layer just run
        self.stats_head = 0  # and ask for the first n scan steps' delta and Abar of each direction (STM's ends plan)
        self.stats = None

    def reset_dt(self, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
        """Mamba's initialisation of dt_proj: weights ±rank^-1/2, bias = softplus^-1 of log-uniform dt."""
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def branch(self, x, z, conv, x_proj, dt_proj, A_log, Dp, decay_scale=None, head=None):
        """One direction on (batch, E, L) inputs in scan order: conv + SiLU, projections, selective scan.

        x and z are (batch, E, L) views of channel-last (batch, L, E) memory, as the input projection makes
        them; every step keeps that layout (the conv as shifted multiply-adds, the projections on contiguous
        rows, the scan reading rows), so no transpose is ever materialised. y comes back in that layout too.
        Returns y (batch, E, L) and, with ``keep_stats``, this direction's statistics in scan order (pre-bias
        delta, bias, B, C, A, y): what eq. 5 and eq. 11 need to form Abar and Bbar, computed by the forward
        itself, no extra projection and no copy.
        ``decay_scale`` (batch, L): multiplies delta in Abar only (hidden-state alignment of pruned
        sequences, ToP-ViM); None for the plain model. ``head``: see ``stm_fast.scan.selective_scan``.
        """
        x = causal_conv1d(x, conv.weight, conv.bias)
        x_dbl = x_proj(x.transpose(1, 2))  # (batch, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # bias goes in as delta_bias, as upstream
        B = B.transpose(1, 2)
        C = C.transpose(1, 2)
        ct = torch.float64 if A_log.dtype == torch.float64 else torch.float32
        A = -torch.exp(A_log.to(ct))
        bias = dt_proj.bias.to(ct)
        if decay_scale is None:
            y = selective_scan(x, delta, A, B, C, Dp.to(ct), z=z, delta_bias=bias, delta_softplus=True,
                               backend=self.scan_backend, head=head)
        else:
            d = F.softplus(delta.transpose(1, 2).to(ct) + bias).transpose(1, 2)
            y = selective_scan(x, d, A, B, C, Dp.to(ct), z=z, decay_scale=decay_scale, backend=self.scan_backend)
        return y, ((delta, bias, B, C, A, y) if self.keep_stats else None)

    def forward(self, hidden, decay_scale=None):
        """Mixer output (batch, L, d). With ``keep_stats``, ``self.stats`` holds both directions'
        ``DirectionStats`` (read in token position order) and, with ``stats_head`` = n and a backend that
        exports them, "heads": delta (n, 2, batch, E), Abar (n, 2, batch, N, E) and B (n, 2, batch, N) of each
        direction's first n scan steps (forward first on the second axis)."""
        xz = self.in_proj(hidden)  # (batch, L, 2E): the branches read x and z as (batch, E, L) views of it
        x, z = (t.transpose(1, 2) for t in xz.chunk(2, dim=-1))
        sf = sb = None
        if decay_scale is not None:
            sf, sb = decay_scale
        heads = hf = hb = None
        if self.keep_stats and self.stats_head:
            # the scan's delta and Abar of the first n steps of both directions, in one buffer each
            batch, E, _ = x.shape
            ct = torch.float64 if self.A_log.dtype == torch.float64 else torch.float32
            n = self.stats_head
            heads = tuple(x.new_empty((n, 2, batch) + shape, dtype=ct) for shape in ((E,), (self.d_state, E), (self.d_state,)))
            hf, hb = ({"n": n, "out": tuple(h[:, i] for h in heads)} for i in (0, 1))
        y_f, st_f = self.branch(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, sf, hf)
        xb, zb = (t.transpose(1, 2) for t in xz.flip(1).chunk(2, dim=-1))  # one flipped copy, still channel-last
        y_b, st_b = self.branch(xb, zb, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                                self.D_b, None if sb is None else sb.flip(-1), hb)
        if self.keep_stats:
            self.stats = {"forward": DirectionStats(*st_f), "backward": DirectionStats(*st_b, reverse=True)}
            if heads is not None and "Abar" in hf and "Abar" in hb:  # the backend exported them
                self.stats["heads"] = heads if hf["B"] is not None and hb["B"] is not None else heads[:2] + (None,)
        y = y_b.transpose(1, 2).flip(1).add_(y_f.transpose(1, 2)).mul_(0.5)  # (y_f + flip(y_b)) / 2, (batch, L, E) rows
        return self.out_proj(y)


class Block(nn.Module):
    """Add -> RMSNorm -> mixer, returning (mixer output, residual); the residual stays in float32/64."""

    def __init__(self, cfg: VimConfig, layer_idx=0):
        super().__init__()
        self.norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mixer = MambaMixer(cfg, layer_idx)

    def forward(self, hidden, residual=None, decay_scale=None):
        residual = hidden if residual is None else residual + hidden
        residual = residual.to(torch.float64 if residual.dtype == torch.float64 else torch.float32)
        normed = self.norm(residual).to(self.norm.weight.dtype)
        return self.mixer(normed, decay_scale), residual


class VisionMamba(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.norm_f = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def token_position(self):
        return self.cfg.num_patches // 2

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
        """Force a scan backend for every layer ('torch', 'triton', 'mamba_ssm', 'loop'; None = automatic)."""
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
        """Class-token features. ``observer(i, cls_state)`` (optional) sees, after each layer i, the class
        token's entry in the stream the next layer adds up (residual + mixer output), (batch, d)."""
        hidden = self.embed(images)
        reducer = getattr(self, "reducer", None)
        if reducer is None or not reducer.active:
            residual = None
            c = self.token_position
            for i, layer in enumerate(self.layers):
                hidden, residual = layer(hidden, residual)
                if observer is not None:
                    observer(i, residual[:, c] + hidden[:, c])
            out = self.norm_f(residual + hidden)
            return out[:, c]
        return reducer.forward_features(self, hidden, observer)

    def forward(self, images):
        feats = self.forward_features(images)
        return self.head(feats.to(self.head.weight.dtype) if isinstance(self.head, nn.Linear) else feats)
