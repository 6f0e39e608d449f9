"""Vision Mamba forward in float64 NumPy from a state dict of arrays (the oracle for ``stm_fast.vim``).

Same semantics as the official hustvl/Vim model (bimamba v2, middle class token, RMSNorm, see
docs/conventions.md §2 and §9), written step by step: the patch embedding as a matrix product over flattened patches, the
causal depthwise conv as an explicit sum over its taps, and each direction's SSM through
``stm_ref.ssm.selective_scan`` (a sequential scan). The configuration is read off the array shapes.
"""

from __future__ import annotations

import math

import numpy as np

from . import reduction as reduction_steps
from .ssm import selective_scan, silu, softplus

__all__ = ["config_from_state_dict", "patch_stride", "forward", "forward_features", "final_tokens", "embed", "mixer", "rms_norm", "causal_conv1d"]


def config_from_state_dict(sd):
    """embed_dim, depth, patch_size, channels, grid (patches per side), d_state, d_conv, dt_rank, num_classes.

    The stride of the patch embedding is not in a state dict; ``embed`` reads it off the image size."""
    w = sd["patch_embed.proj.weight"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    grid = int(round(math.sqrt(sd["pos_embed"].shape[1] - 1)))
    return {
        "embed_dim": w.shape[0], "channels": w.shape[1], "patch_size": w.shape[2], "grid": grid,
        "depth": depth, "d_state": sd["layers.0.mixer.A_log"].shape[1],
        "d_conv": sd["layers.0.mixer.conv1d.weight"].shape[-1], "dt_rank": sd["layers.0.mixer.dt_proj.weight"].shape[1],
        "num_classes": sd["head.weight"].shape[0] if "head.weight" in sd else 0,
    }


def rms_norm(x, weight, eps=1e-5):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def causal_conv1d(x, weight, bias):
    """Depthwise causal conv over (channels, L): y_t = bias + sum_k w[k] x_{t-K+1+k} (zero before t = 0)."""
    w = weight.reshape(weight.shape[0], -1)
    E, K = w.shape
    L = x.shape[1]
    y = np.repeat(bias[:, None], L, axis=1).astype(np.float64)
    for k in range(K):
        shift = K - 1 - k
        if shift < L:
            y[:, shift:] += w[:, k : k + 1] * x[:, : L - shift]
    return y


def patch_stride(image_size, patch_size, grid):
    """The stride that puts ``grid`` patches of ``patch_size`` across ``image_size`` pixels, edge to edge:
    (image_size - patch_size) / (grid - 1) (docs/conventions.md §2); ValueError if there is none."""
    if grid == 1:
        if image_size != patch_size:
            raise ValueError(f"one patch of {patch_size} pixels does not cover an image of {image_size}")
        return patch_size
    stride, rest = divmod(image_size - patch_size, grid - 1)
    if rest or stride < 1:
        raise ValueError(f"{grid} patches of {patch_size} pixels cannot tile an image of {image_size} pixels")
    return stride


def embed(sd, image, stride=None):
    """Patch embedding of one image (C, H, W), patches of size p taken every ``stride`` pixels (overlapping
    when the stride is smaller than p), in row-major order; the class token inserted at M // 2 and pos_embed
    added: (L, d). Without ``stride`` it follows from the image size and the position embedding's grid when
    the patches reach the image's edge exactly; given, the grid is (H - p) // stride + 1, the pixels past
    the last whole patch unused (as the official PatchEmbed's Conv2d floors)."""
    cfg = config_from_state_dict(sd)
    p, g, C = cfg["patch_size"], cfg["grid"], cfg["channels"]
    if image.ndim != 3 or image.shape[0] != C or image.shape[1] != image.shape[2]:
        raise ValueError(f"expected a square image of {C} channels, got {image.shape}")
    s = patch_stride(image.shape[1], p, g) if stride is None else stride
    if (image.shape[1] - p) // s + 1 != g:
        raise ValueError(f"patches of {p} every {s} pixels give {(image.shape[1] - p) // s + 1} per side, not {g}")
    patches = np.stack([image[:, i * s:i * s + p, j * s:j * s + p].reshape(-1) for i in range(g) for j in range(g)])
    W = sd["patch_embed.proj.weight"].reshape(cfg["embed_dim"], -1)  # (d, C * p * p), the same (C, p, p) order
    x = patches @ W.T + sd["patch_embed.proj.bias"]
    c = x.shape[0] // 2
    x = np.concatenate([x[:c], sd["cls_token"].reshape(1, -1), x[c:]], axis=0)
    return x + sd["pos_embed"][0]


def _branch(sd, pre, x, z, suffix, decay_scale=None):
    """One direction of the mixer on (E, L) inputs, in scan order; returns y (E, L) and the statistics
    {delta (after softplus, (E, L)), B, C ((N, L)), A ((E, N)), y, u (the scan's input, (E, L))} in scan order."""
    E, L = x.shape
    R = sd[f"{pre}dt_proj{suffix}.weight"].shape[1]
    N = sd[f"{pre}A_log"].shape[1]
    xc = silu(causal_conv1d(x, sd[f"{pre}conv1d{suffix}.weight"], sd[f"{pre}conv1d{suffix}.bias"]))
    x_dbl = sd[f"{pre}x_proj{suffix}.weight"] @ xc  # (R + 2N, L)
    dt, B, C = x_dbl[:R], x_dbl[R : R + N], x_dbl[R + N :]
    delta = sd[f"{pre}dt_proj{suffix}.weight"] @ dt  # (E, L), bias added inside the scan
    A = -np.exp(sd[f"{pre}A_log" if suffix == "" else f"{pre}A_b_log"])
    y = selective_scan(xc[None], delta[None], A, B[None], C[None], D=sd[f"{pre}D{suffix}"], z=z[None],
                       delta_bias=sd[f"{pre}dt_proj{suffix}.bias"], delta_softplus=True,
                       decay_scale=None if decay_scale is None else decay_scale[None])[0]
    d = softplus(delta + sd[f"{pre}dt_proj{suffix}.bias"][:, None])
    return y, {"delta": d, "B": B, "C": C, "A": A, "y": y, "u": xc}


def mixer(sd, i, hidden, decay_scale=None, return_stats=False):
    """Bimamba-v2 mixer of layer i on (L, d): forward branch, flipped backward branch, average, out_proj.

    ``decay_scale``: optional (forward, backward) position-order scales of Abar (pruned-sequence alignment).
    With ``return_stats`` also returns both directions' statistics in token position order.
    """
    pre = f"layers.{i}.mixer."
    xz = sd[pre + "in_proj.weight"] @ hidden.T  # (2E, L)
    E = xz.shape[0] // 2
    x, z = xz[:E], xz[E:]
    sf, sb = (None, None) if decay_scale is None else decay_scale
    y_f, st_f = _branch(sd, pre, x, z, "", sf)
    y_b, st_b = _branch(sd, pre, x[:, ::-1], z[:, ::-1], "_b", None if sb is None else sb[::-1])
    y = (y_f + y_b[:, ::-1]) / 2
    out = (sd[pre + "out_proj.weight"] @ y).T
    if not return_stats:
        return out
    back = {k: (v if k == "A" else v[:, ::-1]) for k, v in st_b.items()}
    return out, {"forward": st_f, "backward": back}


def forward_features(sd, image, eps=1e-5, reduction=None, image_index=0, stride=None):
    """Class-token features of one image (C, H, W) after the final Add -> RMSNorm: (d,). The arguments are
    those of ``final_tokens``."""
    out, cls = final_tokens(sd, image, eps, reduction, image_index, stride)
    return out[cls]


def final_tokens(sd, image, eps=1e-5, reduction=None, image_index=0, stride=None):
    """Every token of one image (C, H, W) after the final Add -> RMSNorm, (L_final, d), and the class token's
    index among them.

    ``reduction``: {"method", "schedule" (tokens removed after each layer), "options"}, e.g. the
    ``to_dict()`` of the ``Reduction`` that ``stm_fast.reduce`` installs; the same reduction in float64.
    ``image_index``: the image's place in its batch (only ToP-ViM's released code treats image 0 apart).
    ``stride``: the patch embedding's (see ``embed``).
    """
    sd = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}
    hidden = embed(sd, np.asarray(image, dtype=np.float64), stride)
    depth = config_from_state_dict(sd)["depth"]
    L = hidden.shape[0]
    state = {"cls": (L - 1) // 2, "pos": np.arange(L), "size": np.ones(L)}
    schedule = list(reduction["schedule"]) if reduction and reduction.get("method", "none") != "none" else []
    twin = None
    if schedule and any(schedule):
        twin = reduction_steps.twin_for(reduction["method"], {**reduction.get("options", {}), "image_index": image_index})
    residual = None
    for i in range(depth):
        residual = hidden if residual is None else residual + hidden
        k = schedule[i] if i < len(schedule) else 0
        scale = twin.decay_scales(state) if twin is not None else None
        normed = rms_norm(residual, sd[f"layers.{i}.norm.weight"], eps)
        if k > 0:
            hidden, stats = mixer(sd, i, normed, scale, return_stats=True)
            (hidden, residual), state = twin.step(i, k, (hidden, residual), state, stats)
        else:
            hidden = mixer(sd, i, normed, scale)
    return rms_norm(residual + hidden, sd["norm_f.weight"], eps), state["cls"]


def forward(sd, images, eps=1e-5, reduction=None, stride=None):
    """Logits (batch, classes) for images (batch, C, H, W): the float64 oracle of ``VisionMamba.forward``
    (with ``reduction``, of the model after ``stm_fast.reduce``: pass its ``model.reduction.to_dict()``;
    ``stride``: the patch embedding's, when the patches do not reach the image's edge, see ``embed``)."""
    sd = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}
    feats = np.stack([forward_features(sd, im, eps, reduction, b, stride)
                      for b, im in enumerate(np.asarray(images, dtype=np.float64))])
    return feats @ sd["head.weight"].T + sd["head.bias"]
