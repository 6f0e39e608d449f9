"""Analytic FLOPs of a Vision Mamba, with or without token reduction.

Convention (what the tables cite)
---------------------------------
FLOPs are **multiply-adds** (1 MAC = 1 FLOP), per image, reported in GFLOPs (1e9), as in the Vim,
STM and R-MeeTo tables. For a model with embed dim ``d``, inner dim ``E = expand * d``, state size
``N = d_state``, conv width ``K = d_conv``, ``R = dt_rank = ceil(d / 16)``, one layer fed ``L``
tokens costs, under ``convention="paper"``::

    in_proj            L * d * 2E
    out_proj           L * E * d
    conv1d             L * E * K                 (depthwise, one direction)
    x_proj             L * E * (R + 2N)          (one direction)
    dt_proj            L * R * E                 (one direction)
    selective scan     9 * L * E * N + 2 * L * E (one direction: Mamba's count, 9LEN for the
                                                  recurrence and readout, + LE for D*x, + LE for the
                                                  SiLU(z) gate)

i.e. the backward branch of the bidirectional mixer is **not** counted, which is what reproduces the
published baselines: 1.45 / 5.08 / 18.87 G for Vim-Ti / Vim-S / Vim-B at 224 px.
``convention="full"`` counts both directions: conv1d, x_proj, dt_proj and the scan twice (in_proj
and out_proj are shared and counted once either way).

Not counted under either convention: biases, RMSNorm, residual adds, softplus/SiLU/exp, the
direction averaging, position-embedding add, class-token insertion and the final norm.

The whole model adds the patch embedding ``M * C * p * p * d`` (``M`` patches, ``C`` channels,
patch size ``p``) and the head ``d * num_classes`` (the class token only)::

    total = sum_l layer(N_l) + patch_embed + head

where ``N_l`` is the number of tokens entering layer ``l`` (``N_l = L = M + 1`` for every layer
without reduction). With token reduction, the ``Reduction``'s ``tokens_per_layer`` gives ``N_l``;
each step's own cost (its ``overhead_flops_per_layer``, MACs per merge point) is reported separately as
``overhead`` and is **not** part of ``total``; ``total_with_overhead`` adds it. docs/conventions.md §7
states the same conventions for users.
"""

from __future__ import annotations

__all__ = ["flops", "layer_flops"]

CONVENTIONS = ("paper", "full")


def _check_convention(convention):
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; use one of {CONVENTIONS}")


def layer_flops(cfg, L: int, convention: str = "paper") -> int:
    """Multiply-adds (an int, not GFLOPs) of one Vim layer fed ``L`` tokens; see the module docstring.

    ``cfg``: a ``VimConfig`` (uses embed_dim, d_inner, d_state, d_conv, dt_rank).
    ``convention``: ``"paper"`` (one direction's conv/x_proj/dt_proj/scan) or ``"full"`` (both).
    """
    _check_convention(convention)
    L = int(L)
    if L < 0:
        raise ValueError(f"token count must be >= 0, got {L}")
    d, E, N, K, R = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank
    shared = L * d * 2 * E + L * E * d  # in_proj + out_proj
    direction = (L * E * K  # depthwise conv1d
                 + L * E * (R + 2 * N)  # x_proj
                 + L * R * E  # dt_proj
                 + 9 * L * E * N + 2 * L * E)  # selective scan (+ D skip, + z gate)
    n_dir = 1 if convention == "paper" else 2
    return shared + n_dir * direction


def _reduction(reduction, cfg):
    """(method, tokens_per_layer, overhead MACs) of a ``Reduction`` (or None: L everywhere), checked against cfg."""
    L = cfg.num_tokens
    method = "none" if reduction is None else str(reduction.method)
    if method == "none":
        return "none", [L] * cfg.depth, 0
    tokens = [int(n) for n in reduction.tokens_per_layer]
    if len(tokens) != cfg.depth:
        raise ValueError(f"the {method} reduction's tokens_per_layer has {len(tokens)} entries, the model has "
                         f"depth {cfg.depth}")
    bad = [n for n in tokens if not 1 <= n <= L]
    if bad:
        raise ValueError(f"the {method} reduction's tokens_per_layer must lie in [1, {L}] (L = patches + class "
                         f"token), got {bad}")
    return method, tokens, sum(int(o) for o in reduction.overhead_flops_per_layer)


_NOT_GIVEN = object()


def flops(model_or_cfg, img_size: int | None = None, convention: str = "paper", reduction=_NOT_GIVEN) -> dict:
    """GFLOPs (multiply-adds, 1e9) per image under ``convention`` ("paper" or "full").

    ``model_or_cfg``: a model, whose installed reduction (``model.reduction``) is counted unless
    ``reduction`` is given, or a ``VimConfig`` with an optional ``reduction`` (a ``Reduction`` or None).
    ``img_size``, if given, must equal the configuration's (a Vim's token count is fixed by its position
    embedding), else ValueError.

    Returns a dict: ``total`` (layers + patch_embed + head), ``layers``, ``patch_embed``, ``head``,
    ``overhead`` (the reduction steps' own cost, not in ``total``), ``total_with_overhead``, ``convention``,
    ``method``, ``tokens_per_layer`` (tokens entering each layer). All FLOP values in GFLOPs.
    """
    _check_convention(convention)
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if reduction is _NOT_GIVEN:
        reduction = getattr(model_or_cfg, "reduction", None)
    if img_size is not None and int(img_size) != cfg.img_size:
        raise ValueError(f"img_size={img_size} does not match the model's cfg.img_size={cfg.img_size}: a Vim's "
                         f"token count is fixed at build time; build the model with img_size={img_size} "
                         f"(create_model(..., img_size={img_size})) or pass img_size={cfg.img_size}")
    method, tokens, overhead = _reduction(reduction, cfg)
    layers = sum(layer_flops(cfg, n, convention) for n in tokens)
    p = cfg.patch_size
    patch_embed = cfg.num_patches * cfg.channels * p * p * cfg.embed_dim
    head = cfg.embed_dim * cfg.num_classes
    total = layers + patch_embed + head
    g = 1e-9
    return {
        "total": total * g,
        "layers": layers * g,
        "patch_embed": patch_embed * g,
        "head": head * g,
        "overhead": overhead * g,
        "total_with_overhead": (total + overhead) * g,
        "convention": convention,
        "method": method,
        "tokens_per_layer": list(tokens),
    }
