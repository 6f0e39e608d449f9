"""Builders the tests share: small random models, the eval's test data, scan inputs.

Fixtures built from these live in ``tests/conftest.py``; test modules import builders from here, never
from each other.
"""

import argparse

import numpy as np
import torch
from PIL import Image

import stm_fast
from stm_ref import ssm as ref

__all__ = ["random_model", "GEOMETRY", "SYNS", "SMALL", "OVERRIDES", "small_checkpoint", "image_folders", "rel_err",
           "channel_last", "make_case", "numpy_args", "flip_time", "reference"]


def random_model(seed, img_size, patch_size, embed_dim, depth, d_state, num_classes=7, dtype=torch.float64, stride=None):
    """A small Vim with every parameter moved well away from its structured initialisation (so the test discriminates)."""
    torch.manual_seed(seed)
    m = stm_fast.create_model("vim_tiny", img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              d_state=d_state, num_classes=num_classes, dtype=dtype, stride=stride)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 0.3 if "A_" in name or "dt_proj.bias" in name or "dt_proj_b.bias" in name else 0.2
            p.add_(torch.randn_like(p) * scale)
    return m


# tokens -> (img_size, patch_size, stride); 26: overlapping patches on an odd 5 x 5 grid (class token at 12)
GEOMETRY = {17: (16, 4, None), 10: (12, 4, None), 26: (11, 3, 2)}

SYNS = ["n01440764", "n01443537", "n15075141"]  # canonical indices 0, 1, 999
SMALL = dict(img_size=32, patch_size=4, embed_dim=16, depth=4, d_state=8)  # 64 patches + class token
OVERRIDES = [f"--override={k}={v}" for k, v in SMALL.items()]


def small_checkpoint(path):
    """A small-config checkpoint (``SMALL``) in the official format at ``path``: state dict under 'model',
    plus training args; returns the path as a string."""
    torch.manual_seed(0)
    m = stm_fast.create_model("vim_tiny", **SMALL)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    torch.save({"model": m.state_dict(), "epoch": 3, "args": argparse.Namespace(model="vim_tiny")}, path)
    return str(path)


def _image(rng, mode):
    arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    return im.convert(mode) if mode != "RGB" else im


def image_folders(root):
    """Under ``root``: an ImageFolder (synset sub-folders of ``SYNS``) and the same images flat with a CSV,
    one corrupt file in each; returns (tree, flat, labels.csv) as strings."""
    rng = np.random.default_rng(0)
    tree, flat = root / "val", root / "flat"
    flat.mkdir()
    rows = ["filename,label"]
    n = 0
    for s in SYNS:
        (tree / s).mkdir(parents=True)
        for j, mode in enumerate(["RGB", "L", "CMYK", "PNG"]):
            name = f"img_{n:03d}.JPEG"
            im = _image(rng, "RGB" if mode == "PNG" else mode)
            for folder in (tree / s, flat):
                im.save(folder / name, format="PNG" if mode == "PNG" else "JPEG")  # PNG bytes in a .JPEG file
            rows.append(f"{name},{s if j % 2 else SYNS.index(s) if s != 'n15075141' else 999}")
            n += 1
    for folder in (tree / SYNS[0], flat):
        (folder / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    rows.append(f"broken.JPEG,{SYNS[0]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(tree), str(flat), str(root / "labels.csv")


def rel_err(x, ref_value):
    x = np.asarray(x.detach().double().numpy() if torch.is_tensor(x) else x, dtype=np.float64)
    ref_value = np.asarray(ref_value, dtype=np.float64)
    return float(np.abs(x - ref_value).max() / (1.0 + np.abs(ref_value).max())) if x.size else 0.0


def channel_last(t):
    """The same values held (batch, L, channels) in memory, as Vim's mixer hands them over."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def make_case(rng, batch, Dm, N, L, b_layout="variable", c_layout="variable", groups=1, dtype=torch.float64,
              softplus=True, bias=True, skip=True, gate=True, decay=False, u_cl=False, delta_cl=False, z_cl=False):
    """Keyword arguments for a scan; decays stay in (0, 1] (A < 0, delta + bias > 0 or softplus'ed), so
    float32 cannot overflow where float64 does not."""
    r = lambda *s: torch.tensor(rng.standard_normal(s), dtype=dtype)  # noqa: E731
    shapes = {"variable": (batch, N, L), "fixed": (Dm, N), "grouped": (batch, groups, N, L)}
    delta = r(batch, Dm, L) * 0.7 - 1.0 if softplus else torch.tensor(rng.uniform(0.01, 1.0, (batch, Dm, L)), dtype=dtype)
    kw = dict(u=r(batch, Dm, L), delta=delta, A=-torch.tensor(rng.uniform(0.1, 4.0, (Dm, N)), dtype=dtype),
              B=r(*shapes[b_layout]), C=r(*shapes[c_layout]), delta_softplus=softplus)
    if b_layout == "variable":  # as Vim's x_proj makes it: a (batch, N, L) view with stride(1) == 1
        kw["B"] = channel_last(kw["B"])
    kw.update(D=r(Dm) if skip else None, z=r(batch, Dm, L) if gate else None,
              delta_bias=(r(Dm) * 0.3 if softplus else torch.tensor(rng.uniform(0, 0.3, Dm), dtype=dtype)) if bias else None,
              decay_scale=torch.tensor(rng.uniform(0.5, 3.0, (batch, L)), dtype=dtype) if decay else None)
    for name, flag in (("u", u_cl), ("delta", delta_cl), ("z", z_cl)):
        if flag and kw[name] is not None:
            kw[name] = channel_last(kw[name])
    return kw


def numpy_args(kw):
    return {k: (v.double().numpy() if torch.is_tensor(v) else v) for k, v in kw.items()}


def flip_time(kw):
    """The arguments with the time axis reversed (what a reverse scan must equal, flipped back)."""
    out = dict(kw)
    for name in ("u", "delta", "z", "B", "C", "decay_scale"):
        v = kw[name]
        if v is not None and not (name in ("B", "C") and v.dim() == 2):
            out[name] = v.flip(-1)
    return out


def reference(kw, reverse=False):
    """float64 reference y and last state; a reverse scan is the forward one on time-flipped inputs."""
    y, last = ref.selective_scan(**numpy_args(flip_time(kw) if reverse else kw), return_last_state=True)
    return (y[..., ::-1] if reverse else y), last


def shipped_half_checkpoint(bed, seed):
    """A testbed's shipped checkpoint of ``seed``, loaded with weights_only=True, after checking what every
    shipped model holds: under 1 MB, the testbed's config and the seed, float16 weights, and the command
    that trained it."""
    import os

    path = bed.checkpoint_path(seed)
    assert os.path.getsize(path) < 1_000_000
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["config"] == bed.config and ckpt["meta"]["seed"] == seed and ckpt["meta"]["weights"] == "float16"
    assert ckpt["meta"]["command"] == f"python -m stm_fast.train_tiny --testbed {bed.name} --seed {seed} --half"
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    return ckpt
