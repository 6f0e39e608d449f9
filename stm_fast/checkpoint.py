"""Loading official hustvl/Vim checkpoints (and our own) strictly, safely, and with errors that say what to do."""

from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import re
import zipfile

import torch

from .registry import MODEL_CONFIGS, name_for

__all__ = ["CheckpointError", "read_state_dict", "load_into", "describe_state_dict"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested model; the message names the problem and the fix."""


_PREFIXES = ("module.", "_orig_mod.")  # DDP's wrapper, torch.compile's OptimizedModule (in either order)


def _is_safetensors(path):
    """A .safetensors file, by name or by its header (8-byte little-endian length, then a JSON object)."""
    if path.lower().endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _safetensors_load(path):
    """The tensors of a .safetensors file, through the safetensors package when it is installed."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path} is a safetensors file and the safetensors package is not installed: "
                              f"pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError ...
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated download or not written by "
                              f"safetensors; download it again): {first[:200]}") from None


def _strip_prefixes(sd):
    """Remove the wrappers' key prefixes (``module.``, ``_orig_mod.``) shared by every key, repeatedly."""
    while sd:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


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


def _refused_code(path, msg):
    """The CheckpointError for a file that references Python code, or None if ``msg`` is another failure."""
    found = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", msg, re.IGNORECASE)
    name = found.group(1) if found else _pickled_code(path)
    if name is None:
        return None
    return CheckpointError(
        f"refusing to load {path}: it references the Python object {name}, and unpickling it may execute code, "
        f"so it was not loaded (checkpoints are read as tensors and containers only). If you trust the file, "
        f"re-save just the state dict: torch.save({{'model': model.state_dict()}}, path)")


def _entry(obj, path, key, ema):
    """The state dict inside a loaded checkpoint object."""
    if key is None:
        key = "model_ema" if ema else None
    if key is None and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    key = key or ("model" if "model" in obj else "state_dict" if "state_dict" in obj else "model")
    if key not in obj:
        found = ", ".join(sorted(map(str, obj.keys()))[:12])
        hint = (" (this file has no EMA weights; drop --ema)" if key == "model_ema"
                else " (it holds EMA weights only: pass --ema, or ema=True)" if "model_ema" in obj else "")
        raise CheckpointError(f"{path} has no '{key}' entry{hint}; its top-level keys are: {found}")
    if not isinstance(obj[key], dict):
        raise CheckpointError(f"{path}['{key}'] is a {type(obj[key]).__name__}, not a state dict")
    return obj[key]


def _read_torch(path):
    try:
        return _torch_load(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, LookupError, ValueError,
            TypeError, AttributeError) as e:
        raise (_refused_code(path, str(e)) or CheckpointError(_unreadable(path, str(e)))) from None


def read_state_dict(path, key=None, ema=False):
    """The state dict stored in ``path``: a bare state dict, or the entry ``key`` (default ``model``,
    or ``model_ema`` with ``ema=True``) of a checkpoint dict, or the tensors of a ``.safetensors`` file (read by
    the safetensors package where it is installed). ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``)
    prefixes are removed. Tensors holding NaN or inf are refused (a model that computes nothing meaningful)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, expected a .pth file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    obj = _safetensors_load(path) if _is_safetensors(path) else _read_torch(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict or a dict with a 'model' entry")
    sd = _entry(obj, path, key, ema)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"{path}: {len(nonfinite)} tensor(s) hold NaN or inf ({', '.join(nonfinite[:5])}): the "
                              f"file is damaged or from a diverged training run; use another checkpoint")
    return _strip_prefixes(sd)


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
