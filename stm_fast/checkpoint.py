"""Loading official hustvl/Vim checkpoints (and our own) strictly, safely, and with errors that say what to do."""

from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import zipfile

import torch

from .registry import MODEL_CONFIGS, name_for

__all__ = ["CheckpointError", "read_state_dict", "load_into", "describe_state_dict"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested model; the message names the problem and the fix."""


def _torch_load(path):
    # Official Vim checkpoints also hold training `args` (an argparse.Namespace); allow exactly that
    # class on top of tensors and containers. weights_only=True never runs code from the file.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _pickled_code(path):
    """For a plain (non-zip) pickle: the first class/function it references, found by reading opcodes only."""
    if zipfile.is_zipfile(path):
        return None
    found = None
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):  # reads opcodes, executes nothing
                if found is None and op.name in ("GLOBAL", "INST"):
                    found = str(arg).replace(" ", ".")
                elif found is None and op.name in ("STACK_GLOBAL", "REDUCE", "OBJ", "NEWOBJ"):
                    found = f"a Python object (pickle opcode {op.name})"
    except Exception:  # not a well-formed pickle: garbage, not code
        return None
    return found


def _unreadable(path, msg):
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    return (f"{path} is not a readable torch checkpoint (truncated download, an error page saved as .pth, or not "
            f"written by torch.save): {first[:200]}")


def read_state_dict(path, key=None, ema=False):
    """The state dict stored in ``path``: a bare state dict, or the entry ``key`` (default ``model``,
    or ``model_ema`` with ``ema=True``) of a checkpoint dict. A ``module.`` prefix (DDP) is removed."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, expected a .pth file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    try:
        obj = _torch_load(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, LookupError, ValueError,
            TypeError, AttributeError) as e:
        msg = str(e)
        code = _pickled_code(path)
        if "Unsupported global" in msg or code:  # a class or function reference: loading would run code
            detail = next((ln.strip() for ln in msg.splitlines() if "Unsupported global" in ln), f"it references {code}")
            raise CheckpointError(
                f"refusing to load {path}: it contains Python objects that could run code, and checkpoints are "
                f"loaded with weights_only=True ({detail[:200]}). If you trust the file, re-save just the state "
                f"dict: torch.save({{'model': model.state_dict()}}, path)") from None
        raise CheckpointError(_unreadable(path, msg)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict or a dict with a 'model' entry")
    if key is None:
        key = "model_ema" if ema else None
    if key is None and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        key = key or ("model" if "model" in obj else "state_dict" if "state_dict" in obj else "model")
        if key not in obj:
            found = ", ".join(sorted(map(str, obj.keys()))[:12])
            hint = " (this file has no EMA weights; drop --ema)" if key == "model_ema" else ""
            raise CheckpointError(f"{path} has no '{key}' entry{hint}; its top-level keys are: {found}")
        sd = obj[key]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}['{key}'] is a {type(sd).__name__}, not a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def describe_state_dict(sd):
    """Best guess of the architecture a state dict belongs to (for error messages): dict or None.

    The patch count comes from ``pos_embed`` (patches + class token); a registered model with the same
    width, depth and patch count (e.g. the stride-8 ``vim_tiny_plus``: 730 tokens) gives the image size and
    stride, otherwise non-overlapping patches are assumed."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.dim() != 4:
        return None
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("layers.") and k.split(".")[1].isdigit()}
    info = {"embed_dim": w.shape[0], "channels": w.shape[1], "patch_size": w.shape[2], "depth": max(layers) + 1 if layers else 0}
    patches = None
    if "pos_embed" in sd:
        info["tokens"] = sd["pos_embed"].shape[1]
        patches = info["tokens"] - 1
    if "head.weight" in sd:
        info["num_classes"] = sd["head.weight"].shape[0]
    if "layers.0.mixer.A_log" in sd:
        info["d_state"] = sd["layers.0.mixer.A_log"].shape[1]
    name = name_for(info["embed_dim"], info["depth"], patches)
    if name is not None and MODEL_CONFIGS[name].patch_size == info["patch_size"]:
        info.update(img_size=MODEL_CONFIGS[name].img_size, stride=MODEL_CONFIGS[name].patch_stride)
    elif patches is not None:
        name = None
        info["img_size"] = int(round(patches ** 0.5)) * w.shape[2]
    info["name"] = name
    return info


def _fmt(info):
    if info is None:
        return "an unrecognised architecture"
    parts = ", ".join(f"{k}={v}" for k, v in info.items() if k != "name")
    return f"{info['name'] or 'a custom Vim'} ({parts})"


def _model_line(cfg, found):
    """What the error says about the model the file was loaded into, and which name to pass instead."""
    own = name_for(cfg.embed_dim, cfg.depth, cfg.num_patches)
    line = (f"The model is {own or 'a custom Vim'} (embed_dim={cfg.embed_dim}, depth={cfg.depth}, img_size={cfg.img_size}, "
            f"stride={cfg.patch_stride}, {cfg.num_tokens} tokens, num_classes={cfg.num_classes}): ")
    if found is not None and found.get("name") and found["name"] != own:
        return line + f"pass --model {found['name']} (create_model('{found['name']}', ...)) for this file."
    return line + "pick the matching --model / create_model name, or pass overrides that match the file."


def load_into(model, sd, source="checkpoint"):
    """Strictly copy ``sd`` into ``model``: every key present, no extra key, every shape equal, else CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [(k, tuple(own[k].shape), tuple(sd[k].shape)) for k in sorted(set(own) & set(sd)) if own[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit this model."]
        if shapes:
            lines.append(f"{len(shapes)} shape mismatch(es) (key: model expects -> file has): " +
                         "; ".join(f"{k}: {a} -> {b}" for k, a, b in shapes[:8]) + (" ..." if len(shapes) > 8 else ""))
        if missing:
            lines.append(f"{len(missing)} key(s) missing from the file: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected key(s) in the file: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        cfg = getattr(model, "cfg", None)
        lines.append(f"The file looks like {_fmt(describe_state_dict(sd))}.")
        if cfg is not None:
            lines.append(_model_line(cfg, describe_state_dict(sd)))
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    return model
