"""stm_fast.analysis: per-layer class-token deviation (Figure 3) and its plot."""

import torch

from stm_fast.analysis import layer_losses, plot_layer_losses
from tests.builders import random_model


def test_layer_losses_are_zero_until_a_layer_has_seen_merged_tokens():
    """The merge after layer 1 leaves the class token itself untouched; layer 2 is the first to read merged tokens."""
    m = random_model(4, 16, 4, 12, 4, 8, dtype=torch.float32)
    x = torch.randn(3, 3, 16, 16)
    curve = layer_losses(m, x, "stm", schedule=[0, 2, 2])
    assert len(curve) == 4
    assert curve[0] == 0.0 and curve[1] == 0.0
    assert curve[2] > 0 and curve[3] > 0
    assert m.reduction is None, "the model's own reduction is restored"


def test_no_reduction_gives_zero_deviation_everywhere():
    m = random_model(4, 16, 4, 12, 4, 8, dtype=torch.float32)
    assert layer_losses(m, torch.randn(2, 3, 16, 16), "stm", rate=0) == [0.0] * 4


def test_plot_writes_a_png(tmp_path):
    path = plot_layer_losses({"stm": [1e-3, 2e-3, 1e-3], "tome": [1e-2, 3e-2, 2e-2]}, tmp_path / "fig3.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
