"""Where the class token drifts: per-layer deviation from the unreduced model (the paper's Figure 3)."""

from __future__ import annotations

import torch

from .reduction import reduced

__all__ = ["layer_losses", "plot_layer_losses"]


def _class_states(model, images):
    states = []
    with torch.inference_mode():
        model.forward_features(images, observer=lambda i, s: states.append(s.double()))
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
