"""Checkpoint loading through ``stm_fast.create_model``: round trips, strict key/shape checks, hostile or
broken files, and the user-facing messages of ``CheckpointError`` / ValueError / TypeError."""

import argparse
import pickle
import re

import pytest
import torch

from stm_fast import CheckpointError, create_model, list_models

TINY = dict(img_size=16, patch_size=4, embed_dim=8, depth=2, d_state=4, num_classes=5)


def tiny(checkpoint_path=None, seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("vim_tiny", checkpoint_path, **{**TINY, **kw})


def randomise(model, seed=1, scale=0.5):
    """Add noise to every parameter so a load that silently kept the init would be caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def batch(img_size=16, n=3, seed=123):
    return torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture
def src():
    return randomise(tiny(seed=0))


def assert_same_logits(a, b, x=None):
    x = batch() if x is None else x
    la, lb = logits(a, x), logits(b, x)
    assert torch.isfinite(la).all()
    assert torch.equal(la, lb)


# ---------------------------------------------------------------- 1. round trips


def test_fresh_models_differ(src):
    """Sanity: the tests below are discriminative (a model that ignored the file would fail them)."""
    assert not torch.equal(logits(src, batch()), logits(tiny(seed=7), batch()))


def test_round_trip_model_entry(src, tmp_path):
    f = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, f)
    assert_same_logits(src, tiny(f, seed=7))


def test_round_trip_str_path(src, tmp_path):
    f = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, f)
    assert_same_logits(src, tiny(str(f), seed=7))


def test_round_trip_bare_state_dict(src, tmp_path):
    f = tmp_path / "bare.pth"
    torch.save(src.state_dict(), f)
    assert_same_logits(src, tiny(f, seed=7))


@pytest.mark.parametrize("wrap", [True, False], ids=["model_entry", "bare"])
def test_round_trip_ddp_prefix(src, tmp_path, wrap):
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    f = tmp_path / "ddp.pth"
    torch.save({"model": sd} if wrap else sd, f)
    assert_same_logits(src, tiny(f, seed=7))


def test_round_trip_official_layout(src, tmp_path):
    """Official hustvl/Vim checkpoints: model + args (argparse.Namespace) + epoch + optimizer (+ scaler)."""
    opt = torch.optim.AdamW(src.parameters(), lr=1e-3)
    ckpt = {
        "model": src.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": {"last_epoch": 3, "base_lrs": [1e-3]},
        "epoch": 299,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="vim_tiny_patch16_224", lr=5e-4, drop_path=0.0, batch_size=128),
    }
    f = tmp_path / "official.pth"
    torch.save(ckpt, f)
    assert_same_logits(src, tiny(f, seed=7))


def test_round_trip_ema(src, tmp_path):
    ema = randomise(tiny(seed=3), seed=99)
    assert not torch.equal(logits(src, batch()), logits(ema, batch()))
    f = tmp_path / "ema.pth"
    torch.save({"model": src.state_dict(), "model_ema": ema.state_dict(), "epoch": 5,
                "args": argparse.Namespace(model_ema=True)}, f)
    assert_same_logits(ema, create_model("vim_tiny", f, ema=True, **TINY))
    # and without ema=True the plain weights are the ones loaded
    assert_same_logits(src, create_model("vim_tiny", f, **TINY))
    # checkpoint_key selects an entry explicitly
    assert_same_logits(ema, create_model("vim_tiny", f, checkpoint_key="model_ema", **TINY))


def test_round_trip_into_float64(src, tmp_path):
    f = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, f)
    m = create_model("vim_tiny", f, dtype=torch.float64, **TINY)
    for (k, a), b in zip(src.state_dict().items(), m.state_dict().values()):
        assert b.dtype == torch.float64, k
        assert torch.equal(a.double(), b), k


def test_loaded_model_is_in_eval_mode(src, tmp_path):
    f = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, f)
    assert not tiny(f).training


# ---------------------------------------------------------------- 2. keys and shapes


def load_error(sd, f):
    """The CheckpointError message of loading state dict ``sd``, saved to ``f`` in the official format, into ``tiny()``."""
    torch.save({"model": sd}, f)
    with pytest.raises(CheckpointError) as ei:
        tiny(f)
    return str(ei.value)


def test_missing_key(src, tmp_path):
    sd = src.state_dict()
    del sd["layers.1.mixer.A_b_log"]
    f = tmp_path / "missing.pth"
    msg = load_error(sd, f)
    assert "missing" in msg
    assert "layers.1.mixer.A_b_log" in msg
    assert "unexpected" not in msg
    assert str(f) in msg


def test_unexpected_key(src, tmp_path):
    sd = src.state_dict()
    sd["layers.0.mixer.bogus_extra"] = torch.zeros(3)
    msg = load_error(sd, tmp_path / "extra.pth")
    assert "unexpected key(s) in the file: layers.0.mixer.bogus_extra" in msg
    assert "missing" not in msg


def test_shape_mismatch_embed_dim(tmp_path):
    msg = load_error(randomise(tiny(embed_dim=16)).state_dict(), tmp_path / "wide.pth")
    assert "shape mismatch" in msg
    # key: model expects -> file has
    assert "cls_token: (1, 1, 8) -> (1, 1, 16)" in msg
    assert "embed_dim=16" in msg  # what the file looks like
    assert re.search(r"The model is .*embed_dim=8", msg)


def test_depth_mismatch(tmp_path):
    msg = load_error(randomise(tiny(depth=3)).state_dict(), tmp_path / "deep.pth")
    assert "unexpected key(s)" in msg
    assert "layers.2.mixer.A_log" in msg  # the first 8 unexpected keys, sorted, are listed
    unexpected_line = next(line for line in msg.splitlines() if "unexpected" in line)
    listed = unexpected_line.split(": ", 1)[1].removesuffix(" ...").split(", ")
    assert listed and all(k.startswith("layers.2.") for k in listed)
    assert "17 unexpected key(s)" in msg  # every parameter of one Vim block
    assert "missing" not in msg and "shape mismatch" not in msg
    assert "depth=3" in msg and "depth=2" in msg


def test_depth_mismatch_other_way(tmp_path):
    assert "missing from the file: layers.1." in load_error(randomise(tiny(depth=1)).state_dict(),
                                                            tmp_path / "shallow.pth")


def test_vim_small_file_into_vim_tiny(tmp_path):
    torch.manual_seed(0)
    sd = create_model("vim_small").state_dict()
    f = tmp_path / "vim_small.pth"
    torch.save({"model": sd}, f)
    del sd
    with pytest.raises(CheckpointError) as ei:
        create_model("vim_tiny", f)
    msg = str(ei.value)
    assert "The file looks like vim_small (embed_dim=384" in msg
    assert "The model is vim_tiny (embed_dim=192" in msg
    assert "(1, 1, 192) -> (1, 1, 384)" in msg


def test_stride_8_official_checkpoint_round_trips(tmp_path):
    """A small stride < patch model saved in the official layout loads back (strictly) with the same stride."""
    src = randomise(tiny(seed=0, img_size=10, stride=2))
    assert src.cfg.grid == 4 and src.pos_embed.shape[1] == 17
    f = tmp_path / "strided.pth"
    torch.save({"model": src.state_dict(), "epoch": 9, "args": argparse.Namespace(model="vim_tiny_patch16_stride8_224")}, f)
    assert_same_logits(src, tiny(f, seed=7, img_size=10, stride=2), batch(img_size=10))
    with pytest.raises(CheckpointError, match=r"pos_embed: \(1, 10, 8\) -> \(1, 17, 8\)"):
        tiny(f, img_size=12)  # the same file as non-overlapping patches: 3 x 3 + 1 tokens


def test_vim_tiny_plus_file_given_as_vim_tiny_names_the_stride_8_model(tmp_path):
    """A Vim-Ti+ checkpoint (730-token pos_embed) loaded as vim_tiny: the message names vim_tiny_plus."""
    torch.manual_seed(0)
    f = tmp_path / "vim_t_plus.pth"
    torch.save({"model": create_model("vim_tiny_plus").state_dict()}, f)
    with pytest.raises(CheckpointError) as ei:
        create_model("vim_tiny", f)
    msg = str(ei.value)
    assert "pos_embed: (1, 197, 192) -> (1, 730, 192)" in msg
    assert "The file looks like vim_tiny_plus (" in msg and "tokens=730" in msg and "stride=8" in msg
    assert "pass --model vim_tiny_plus (create_model('vim_tiny_plus', ...))" in msg
    assert create_model("vim_tiny_plus", f).pos_embed.shape == (1, 730, 192)


# ---------------------------------------------------------------- 3. bad files


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as ei:
        tiny(tmp_path / "nope.pth")
    assert "nope.pth" in str(ei.value)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.pth"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        tiny(f)


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        tiny(tmp_path)


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.9])
def test_truncated_checkpoint(src, tmp_path, fraction):
    f = tmp_path / "full.pth"
    torch.save({"model": src.state_dict()}, f)
    data = f.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        tiny(cut)


def test_zip_header_then_junk(tmp_path):
    f = tmp_path / "junk.pth"
    f.write_bytes(b"PK\x03\x04" + b"junk" * 50)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        tiny(f)




@pytest.mark.parametrize("text", [
    b"<html><body>404 Not Found</body></html>\n",  # a failed download often leaves an HTML page
    b"garbage " * 100,
], ids=["html", "garbage"])
def test_text_garbage_unsupported_opcode(tmp_path, text):
    f = tmp_path / "garbage.pth"
    f.write_bytes(text)
    with pytest.raises(CheckpointError):
        tiny(f)



def test_html_error_page_message(tmp_path):
    f = tmp_path / "download.pth"
    f.write_text("<html><body>404 Not Found</body></html>\n")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        tiny(f)




@pytest.mark.parametrize("text", [
    b"this is not a checkpoint\n",
    b"hello world garbage",
], ids=["this_is_not", "hello_world"])
def test_text_garbage(tmp_path, text):
    f = tmp_path / "garbage.pth"
    f.write_bytes(text)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        tiny(f)


_RAN = []


def _payload(*args):
    _RAN.append(args)
    print("pwned")


class PrintPayload:
    def __reduce__(self):
        return (print, ("pwned",))


class FlagPayload:
    def __reduce__(self):
        return (_payload, ("pwned",))


class PlainObject:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("make", [
    lambda: PrintPayload(),
    lambda: FlagPayload(),
    lambda: {"model": {"w": torch.zeros(2)}, "extra": FlagPayload()},
    lambda: PlainObject(),
], ids=["print_reduce", "flag_reduce", "payload_inside_dict", "plain_instance"])
@pytest.mark.parametrize("writer", ["torch_save", "pickle_dump"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_malicious_pickle_is_refused_and_not_run(tmp_path, capsys, make, writer):
    f = tmp_path / "evil.pth"
    obj = make()
    if writer == "torch_save":
        torch.save(obj, f)
    else:
        with open(f, "wb") as fh:
            pickle.dump(obj, fh)
    capsys.readouterr()
    _RAN.clear()
    with pytest.raises(CheckpointError) as ei:
        tiny(f)
    msg = str(ei.value)
    assert "unpickling it may execute code, so it was not loaded" in msg and "references the Python object" in msg
    assert "weights_only=False" not in msg and "safe_globals" not in msg, "never advice that would run the code"
    assert "model.state_dict()" in msg  # the fix
    assert _RAN == []
    assert "pwned" not in capsys.readouterr().out


def test_payload_would_run_under_plain_pickle(tmp_path, capsys):
    """Control: the payload is live, so the test above really checks that nothing ran."""
    _RAN.clear()
    pickle.loads(pickle.dumps(FlagPayload()))
    assert _RAN == [("pwned",)]
    assert "pwned" in capsys.readouterr().out
    _RAN.clear()


def test_dict_without_model_entry(tmp_path):
    f = tmp_path / "nomodel.pth"
    torch.save({"foo": {"w": torch.zeros(2)}, "bar": 1}, f)
    with pytest.raises(CheckpointError) as ei:
        tiny(f)
    msg = str(ei.value)
    assert "no 'model' entry" in msg
    assert "top-level keys are: bar, foo" in msg


def test_state_dict_entry_name_is_accepted(src, tmp_path):
    f = tmp_path / "sd.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 1}, f)
    assert_same_logits(src, tiny(f, seed=7))


def test_ema_requested_but_absent(src, tmp_path):
    f = tmp_path / "noema.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, f)
    with pytest.raises(CheckpointError) as ei:
        tiny(f, ema=True)
    msg = str(ei.value)
    assert "no EMA weights" in msg
    assert "'model_ema'" in msg
    assert "epoch, model" in msg


def test_ema_requested_on_bare_state_dict(src, tmp_path):
    f = tmp_path / "bare.pth"
    torch.save(src.state_dict(), f)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        tiny(f, ema=True)


def test_model_entry_with_non_tensor(src, tmp_path):
    sd = src.state_dict()
    sd["norm_f.weight"] = [1.0, 2.0]
    sd["step"] = 7
    f = tmp_path / "nontensor.pth"
    torch.save({"model": sd}, f)
    with pytest.raises(CheckpointError) as ei:
        tiny(f)
    msg = str(ei.value)
    assert "not tensors" in msg
    assert "norm_f.weight" in msg and "step" in msg


def test_model_entry_not_a_dict(tmp_path):
    f = tmp_path / "weird.pth"
    torch.save({"model": [torch.zeros(2)]}, f)
    with pytest.raises(CheckpointError, match=r"\['model'\] is a list, not a state dict"):
        tiny(f)


def test_file_holding_a_tensor(tmp_path):
    f = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), f)
    with pytest.raises(CheckpointError, match="holds a Tensor, expected a state dict"):
        tiny(f)


def test_empty_state_dict(tmp_path):
    f = tmp_path / "emptysd.pth"
    torch.save({}, f)
    with pytest.raises(CheckpointError, match="missing from the file") as ei:
        tiny(f)
    assert "unrecognised architecture" in str(ei.value)


# ---------------------------------------------------------------- 4. create_model arguments


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vim_huge'") as ei:
        create_model("vim_huge")
    msg = str(ei.value)
    assert not isinstance(ei.value, CheckpointError)
    for name in ("vim_tiny", "vim_small", "vim_base"):
        assert name in msg
    assert set(list_models()) >= {"vim_tiny", "vim_small", "vim_base"}


def test_official_alias_builds():
    m = create_model("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", **TINY)
    assert m.cfg.embed_dim == 8


def test_unknown_override():
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['embed_dims'\]") as ei:
        create_model("vim_tiny", embed_dims=8)
    msg = str(ei.value)
    for k in ("img_size", "patch_size", "embed_dim", "depth", "d_state", "num_classes", "channels"):
        assert k in msg


def test_patch_grid_floors_as_the_official_patch_embed():
    """hustvl/Vim's PatchEmbed takes (img_size - patch) // stride + 1 patches per side (its Conv2d floors):
    18 px in patches of 4 is a 4 x 4 grid, the last 2 pixels unread; a patch larger than the image is refused."""
    m = create_model("vim_tiny", **{**TINY, "img_size": 18})
    assert m.cfg.grid == 4 and m.cfg.num_tokens == 17
    assert m(torch.randn(1, 3, 18, 18)).shape == (1, TINY.get("num_classes", 1000))
    with pytest.raises(ValueError, match="img_size 18 is smaller than patch_size 20"):
        create_model("vim_tiny", **{**TINY, "img_size": 18, "patch_size": 20})


# ---------------------------------------------------------------- 5. wrong image size at forward


def test_wrong_image_size_at_forward():
    m = tiny()
    with pytest.raises(ValueError) as ei:
        m(torch.randn(1, 3, 20, 20))
    msg = str(ei.value)
    assert "(batch, 3, 16, 16)" in msg and "(1, 3, 20, 20)" in msg
    assert "resize/crop to 16x16" in msg
    assert "img_size=20" in msg


def test_wrong_channels_at_forward():
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 16, 16\)"):
        tiny()(torch.randn(1, 1, 16, 16))


# ---------------------------------------------------------------- 6. Vim-Ti at full size


@pytest.mark.slow
def test_vim_tiny_full_size_round_trip(tmp_path):
    torch.manual_seed(0)
    src = create_model("vim_tiny")
    assert src.cfg.img_size == 224 and src.cfg.depth == 24 and src.cfg.embed_dim == 192
    f = tmp_path / "vim_tiny.pth"
    torch.save({"model": src.state_dict()}, f)
    torch.manual_seed(1)
    dst = create_model("vim_tiny", f)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = src(x)
        b = dst(x)
    assert a.shape == (2, 1000)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


# ---------------------------------------------------------------- 7. torch.compile prefixes and safetensors files


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("wrap", [True, False], ids=["model_entry", "bare"])
def test_round_trip_torch_compile_prefix(src, tmp_path, prefix, wrap):
    """A state dict saved from ``torch.compile(model)`` (keys ``_orig_mod.*``), alone or with DDP's ``module.``."""
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    f = tmp_path / "compiled.pth"
    torch.save({"model": sd} if wrap else sd, f)
    assert_same_logits(src, tiny(f, seed=7))


def test_a_key_prefix_not_shared_by_every_key_is_kept(src, tmp_path):
    """Only a prefix on every key is a wrapper's: one stray ``_orig_mod.`` key is reported, not stripped."""
    sd = dict(src.state_dict())
    sd["_orig_mod.extra"] = torch.zeros(1)
    f = tmp_path / "stray.pth"
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) in the file: _orig_mod.extra"):
        tiny(f)


def _write_safetensors(sd, path):
    """A .safetensors file written by hand (8-byte little-endian header length, JSON header, raw data), so a
    test can make one without the safetensors package."""
    import json
    header, blobs, offset = {}, [], 0
    names = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
    for k, v in sd.items():
        data = v.detach().contiguous().numpy().tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


@pytest.mark.parametrize("name", ["model.safetensors", "renamed.pth"])
def test_safetensors_file_loads_with_the_package(src, tmp_path, name):
    """Through the safetensors package (recent torch.load reads ``*.safetensors`` names itself, but not a
    safetensors file saved as .pth, which is recognised by its header)."""
    pytest.importorskip("safetensors", reason="the safetensors package is not installed (pip install safetensors)")
    f = tmp_path / name
    _write_safetensors(src.state_dict(), f)
    assert_same_logits(src, tiny(f, seed=7))


def test_truncated_safetensors_file_says_so(src, tmp_path):
    pytest.importorskip("safetensors", reason="the safetensors package is not installed (pip install safetensors)")
    f = tmp_path / "model.safetensors"
    _write_safetensors(src.state_dict(), f)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as ei:
        tiny(f)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("name", ["model.safetensors", "renamed.pth"])
def test_safetensors_file_without_the_package_names_the_install(src, tmp_path, monkeypatch, name):
    """Without the package (its import made to fail): one line naming ``pip install safetensors``, not a
    "truncated download"; a safetensors file saved as .pth is recognised by its header."""
    import sys

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    f = tmp_path / name
    _write_safetensors(src.state_dict(), f)
    with pytest.raises(CheckpointError) as ei:
        tiny(f)
    msg = str(ei.value)
    assert "\n" not in msg and msg.endswith("pip install safetensors") and "truncated" not in msg, msg
