"""What the hidden states do: per-layer maps of an image's hidden states and of the class token's hidden
attention (the paper's Figure 1), and the class token's drift under a reduction (Figure 3)."""

from __future__ import annotations

import math

import torch

from dataclasses import replace

import numpy as np

from .reduction.merge import ends_weights
from .reduction import reduced
from .reduction.evit import class_attention
from .layer_stats import StatsRequest

__all__ = ["layer_losses", "plot_layer_losses", "hidden_state_maps", "plot_hidden_state_maps", "lsq_weights_used",
           "weight_summary"]


class _Observer:
    """A reduction that removes nothing and keeps every layer's statistics: after each layer the stream is
    handed back unchanged, which is the unreduced forward exactly (the next layer takes it as its residual)."""

    def __init__(self, cls):
        self.cls, self.stats = cls, []

    def begin(self, hidden):
        self.stats = []
        return self

    def layer_inputs(self, i):
        return None, StatsRequest()

    def reduces_after(self, i):
        return True

    def reduce(self, i, x, stats):
        self.stats.append(stats)
        return x

    def class_rows(self, x):
        return x[:, self.cls]


def _state_norms(st):
    """||h_t|| over (channels, states) at every token position of one direction: (batch, L), float64.
    The recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t (eq. 3) in the direction's scan order."""
    in_scan_order = (lambda t: t.flip(-1)) if st.reverse else (lambda t: t)  # noqa: E731
    delta, u, B = (in_scan_order(t).transpose(1, 2).double() for t in (st.delta, st.u, st.B))  # (batch, L, .)
    A = st.A.double()
    h = torch.zeros(delta.shape[0], A.shape[0], A.shape[1], dtype=torch.float64, device=delta.device)
    norms = []
    for t in range(delta.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        norms.append(h.flatten(1).norm(dim=1))
    out = torch.stack(norms, dim=1)
    return out.flip(1) if st.reverse else out


def hidden_state_maps(model, images):
    """Per layer: the norm of each direction's hidden state at every patch and the class token's hidden
    attention to it (eq. 5, |alpha[cls, j]| averaged over channels, forward side left of the class token and
    backward side right of it), as {"forward", "backward", "attention"}: (depth, batch, grid, grid) float64
    maps of the unreduced model, the class token's own position left out."""
    with torch.inference_mode():
        return _maps(model, images)


def _maps(model, images):
    cls = model.token_position
    observer = _Observer(cls)
    with reduced(model, observer):
        model.forward_features(images)
    grid = model.cfg.grid
    patches = lambda t: torch.cat([t[:, :cls], t[:, cls + 1:]], dim=1).reshape(t.shape[0], grid, grid)  # noqa: E731
    out = {"forward": [], "backward": [], "attention": []}
    for st in observer.stats:
        out["forward"].append(patches(_state_norms(st.forward)))
        out["backward"].append(patches(_state_norms(st.backward)))
        where = torch.full((images.shape[0],), cls, dtype=torch.long, device=images.device)
        out["attention"].append(patches(class_attention(st, where).double()))
    return {k: torch.stack(v) for k, v in out.items()}


def plot_hidden_state_maps(maps, path, image=0, layers=None, title="Hidden states and class-token attention"):
    """Draw ``hidden_state_maps``'s maps of one image, a row per layer (default: up to 6 spread over the
    depth), columns: forward ||h||, backward ||h||, class-token hidden attention. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = maps["forward"].shape[0]
    layers = layers or sorted({round(i * (depth - 1) / max(min(depth, 6) - 1, 1)) for i in range(min(depth, 6))})
    fig, axes = plt.subplots(len(layers), 3, figsize=(7.5, 2.3 * len(layers)), dpi=110, squeeze=False)
    for row, layer in zip(axes, layers):
        for ax, (key, name) in zip(row, (("forward", "forward ||h||"), ("backward", "backward ||h||"),
                                         ("attention", "class-token attention (eq. 5)"))):
            im = ax.imshow(maps[key][layer, image].cpu().numpy(), cmap="viridis")
            ax.set_title(f"layer {layer}: {name}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _class_states(model, images):
    states = []
    with torch.inference_mode():
        model.forward_features(images, observer=lambda i, s: states.append(s.to(torch.float64, copy=True)))  # s may be a view
    return torch.stack(states, dim=1)  # (batch, depth, d)


def layer_losses(model, images: torch.Tensor, method, rate: float | None = None, schedule=None, **options) -> list[float]:
    """Per layer l: mean over images of ||c_l - c*_l|| / ||c_l||, where c_l is the class token's entry in the
    stream after layer l (residual + mixer output, what layer l+1 adds up) of the unreduced model and c*_l
    that of the model reduced with (method, rate or schedule, options). Returns a list of depth floats.

    ``method`` may also be a ``Reduction`` value. The model's own reduction is restored afterwards."""
    with reduced(model, "none"):
        ref = _class_states(model, images)
    with reduced(model, method, rate=rate, schedule=schedule, **options):
        red = _class_states(model, images)
    dev = (ref - red).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    return dev.mean(dim=0).tolist()


def plot_layer_losses(curves: dict[str, list[float]], path, title: str = "Class-token deviation from the unreduced model"):
    """Plot {label: per-layer losses} (e.g. from ``layer_losses`` for several methods) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative L2 deviation of the class token")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def lsq_weights_used(model, images, reduction) -> np.ndarray:
    """Every scalar weight (eq. 11, ``lsq``) that STM's steps compute in one forward of ``images`` under
    ``reduction`` (an STM ``Reduction`` with the ``ends`` plan), as a flat float64 array. The weights are
    recomputed from each step's layer statistics before the step runs (the step itself is unchanged)."""
    impl = reduction.impl
    if reduction.method != "stm" or impl.options["positions"] != "ends":
        raise ValueError("lsq_weights_used needs an STM reduction with positions='ends'")
    found = []

    def hook(step, args):
        i, k, x, tokens, stats = args
        left, right = ends_weights(replace(stats, first_pair=None), *impl.side_split(k), "lsq")
        found.extend([left.double().flatten(), right.double().flatten()])
        return step(*args)

    with reduced(model, reduction.with_step_hook(hook)), torch.inference_mode():
        model(images)
    return torch.cat(found).cpu().numpy() if found else np.zeros(0)


def weight_summary(w) -> dict:
    """Quantiles of a sample of merge weights and how many lie near 1 (a plain sum) or below 0."""
    w = np.asarray(w, dtype=np.float64)
    if w.size == 0:
        return {"n": 0}
    q = [float(v) for v in np.quantile(w, [0.05, 0.25, 0.5, 0.75, 0.95])]
    return {"n": int(w.size), "q05": q[0], "q25": q[1], "median": q[2], "q75": q[3], "q95": q[4],
            "near_1": float(np.mean(np.abs(w - 1) <= 0.1)), "negative": float(np.mean(w < 0)), "max": float(w.max())}
