"""Train one embedded testbed model: ``python -m stm_fast.train_tiny [--testbed T] --seed S [--out PATH]``.

Deterministic for a given seed on a given machine (fixed seeds for torch and the augmentation, a fixed
thread count, data in a fixed order per epoch, subnormals flushed to zero). Recipe (docs/testbeds.md):
AdamW, weight decay 0.05, linear warm-up then cosine decay, label smoothing 0.1, batch 32; ``digits``: lr
3e-3, no warm-up, random shifts of up to 1 pixel, 30 epochs, one thread, the torch scan; ``paper-geometry``:
lr 2e-3, 2 warm-up epochs, the frame's edges jittered by up to 0.6 source pixels, 40 epochs, two threads,
the compiled training scan (``fused``). Writes ``{'model': state_dict, 'config': ..., 'meta': {...}}``
(loads with weights_only=True); ``--half`` stores the weights in float16 (they load into float32).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .digits import TESTBEDS, load_test_split, testbed
from .runtime import HelpFormatter, flush_denormals, positive_int


def evaluate(model, x, y, batch=120):
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def train(seed, epochs=None, batch=None, lr=None, out=None, threads=None, progress=True, max_steps=None,
          testbed_name="digits", half=False, data_dir=None, resume=False):
    """Train seed ``seed`` of a testbed and write its checkpoint; returns (test accuracy, meta, path). Options
    left None take the testbed's recipe (``stm_fast.digits.TESTBEDS``). ``max_steps`` stops early (for tests
    of determinism). ``data_dir``: the training files of a testbed that does not ship them (fashion-mnist).
    After every epoch the whole training state is written beside ``out`` (``<out>.resume``); ``resume``
    continues from it, to the same weights as an uninterrupted run. Subnormals are flushed meanwhile (epochs
    are several times slower without: trained decays exp(delta*A) reach float32's subnormal range)."""
    bed = testbed(testbed_name)
    given = dict(epochs=epochs, batch=batch, lr=lr, threads=threads)
    recipe = {**bed.recipe, **{k: v for k, v in given.items() if v is not None}}
    out = out or os.path.basename(bed.checkpoint_path(seed))  # never the shipped file unless asked (--replace-shipped)
    prev_threads = torch.get_num_threads()
    try:
        with flush_denormals():
            return _train(bed, seed, recipe, out, progress, max_steps, half, data_dir, resume)
    finally:
        torch.set_num_threads(prev_threads)


def _schedule(opt, recipe, steps_per_epoch):
    """Linear warm-up over ``warmup`` epochs, then cosine decay to 0 at the last step."""
    steps = recipe["epochs"] * steps_per_epoch
    warm = int(round(recipe["warmup"] * steps_per_epoch))  # warm-up may be a fraction of an epoch

    def factor(s):
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(s - warm, steps - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _epoch(bed, model, opt, sched, data, rng, batch, budget):
    """One epoch; returns (mean loss, steps done). ``budget``: steps still allowed (None: no limit)."""
    x_raw, x_tr, y_tr = data
    model.train()
    order = torch.as_tensor(rng.permutation(len(x_tr)))
    total, done = 0.0, 0
    for i in range(0, len(x_tr), batch):
        idx = order[i:i + batch]
        xb = bed.augment(x_raw, idx, x_tr, rng)
        loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(idx)
        done += 1
        if budget is not None and done >= budget:
            break
    return total / len(x_tr), done


_RESUMED = ("testbed", "seed", "recipe")  # what a resume file must match to be continued


def _resume_state(path, expected):
    """The training state saved after an epoch at ``path`` (None if absent); ValueError if it was written for
    another testbed, seed or recipe."""
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in _RESUMED:
        if state[key] != expected[key]:
            raise ValueError(f"{path} continues {key} {state[key]!r}, not {expected[key]!r}: delete it to start afresh")
    return state


def _save_resume(path, model, opt, sched, rng, expected, epochs_done, seconds, history):
    state = {**expected, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "epochs_done": epochs_done,
             "seconds": seconds, "history": history}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _train(bed, seed, recipe, out, progress, max_steps, half, data_dir, resume):
    torch.manual_seed(seed)
    torch.set_num_threads(recipe["threads"])
    rng = np.random.default_rng(seed)
    x_raw, y_tr = bed.read_train(data_dir)  # read once: the raw images feed the augmentation, prepared ones the rest
    x_tr, (x_te, y_te) = bed.prepare(x_raw), load_test_split(bed.name)
    model = bed.create_model().train()
    model.set_scan_backend(recipe["backend"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.05)
    sched = _schedule(opt, recipe, math.ceil(len(x_tr) / recipe["batch"]))
    expected = {"testbed": bed.name, "seed": seed, "recipe": dict(recipe)}
    state = _resume_state(out + ".resume", expected) if resume else None
    start, spent, history = 0, 0.0, []
    if state is not None:
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        rng.bit_generator.state, start, spent, history = state["rng"], state["epochs_done"], state["seconds"], state["history"]
        torch.set_rng_state(state["torch_rng"])
    t0 = time.time() - spent
    bar = tqdm(range(start, recipe["epochs"]), desc=f"{bed.name} seed {seed}", disable=not progress,
               initial=start, total=recipe["epochs"])
    done = 0
    for epoch in bar:
        loss, steps = _epoch(bed, model, opt, sched, (x_raw, x_tr, y_tr), rng, recipe["batch"],
                             None if max_steps is None else max_steps - done)
        done += steps
        if max_steps is not None and done >= max_steps:
            break
        acc = evaluate(model, x_te, y_te)  # logged only: nothing is chosen by it
        history.append({"epoch": epoch + 1, "loss": round(loss, 4), "test_accuracy": acc, "seconds": round(time.time() - t0, 1)})
        _save_resume(out + ".resume", model, opt, sched, rng, expected, epoch + 1, time.time() - t0, history)
        model.train()
        bar.set_postfix(loss=f"{loss:.3f}", test=f"{100 * acc:.2f}%")
    result = _save(bed, model, seed, recipe, out, half, x_te, y_te, time.time() - t0, history)
    if max_steps is None and os.path.exists(out + ".resume"):
        os.remove(out + ".resume")
    return result


def _save(bed, model, seed, recipe, out, half, x_te, y_te, seconds, history=()):
    """Write the checkpoint (float16 weights with ``half``); the recorded accuracy is that of what is written."""
    model.eval()
    model.set_scan_backend(None)
    acc = acc32 = evaluate(model, x_te, y_te)
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
    if half:  # the file holds the rounded weights: record their accuracy
        model.load_state_dict({k: v.float() for k, v in state.items()})
        acc = evaluate(model, x_te, y_te)
    meta = {"seed": seed, "testbed": bed.name, **{k: recipe[k] for k in ("epochs", "batch", "lr", "warmup")},
            "test_accuracy": acc, "test_accuracy_float32": acc32, "weights": "float16" if half else "float32",
            "train_seconds": round(seconds, 1), "torch": str(torch.__version__), "threads": recipe["threads"],
            "test_images": len(x_te), "history": list(history),
            "command": f"python -m stm_fast.train_tiny --testbed {bed.name} --seed {seed}" + (" --half" if half else "")
            + (f" --threads {recipe['threads']}" if recipe["threads"] != bed.recipe["threads"] else "")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save({"model": state, "config": dict(bed.config), "meta": meta}, tmp)
    os.replace(tmp, out)
    return acc, meta, out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m stm_fast.train_tiny", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--testbed", default="digits", choices=list(TESTBEDS), help="which testbed's model")
    ap.add_argument("--seed", type=int, required=True, help="the seed to train (0, 1, 2 are the shipped models)")
    ap.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the testbed's, 30)")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="torch threads (default: the testbed's; the weights are deterministic for a seed, a machine and "
                         "a thread count)")
    ap.add_argument("--data-dir", default=None,
                    help="fashion-mnist: the folder with the training files (default: Debian's dataset-fashion-mnist "
                         "folder, /usr/share/datasets/fashion-mnist; torchvision's FashionMNIST/raw layout works too)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from <out>.resume, written after every epoch (the same weights as an uninterrupted run)")
    ap.add_argument("--half", action="store_true", help="store the weights in float16 (the shipped paper-geometry models)")
    ap.add_argument("--out", default=None,
                    help="where to write the checkpoint (default: the shipped file's name, in the current folder; the "
                         "package's shipped models are only replaced with --replace-shipped)")
    ap.add_argument("--replace-shipped", action="store_true",
                    help="write into the package's shipped checkpoint of this seed (what the embedded default evaluates)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    shipped = os.path.abspath(testbed(args.testbed).checkpoint_path(args.seed))
    out = args.out or (shipped if args.replace_shipped else os.path.basename(shipped))
    if os.path.abspath(out) == shipped and not args.replace_shipped:
        ap.error(f"--out {out} is the package's shipped model of seed {args.seed}: pass --replace-shipped to replace it")
    if os.path.isdir(out):
        ap.error(f"--out {out} is a folder: give a file name")
    try:
        acc, meta, out = train(args.seed, epochs=args.epochs, out=out, testbed_name=args.testbed, half=args.half,
                               threads=args.threads, data_dir=args.data_dir, resume=args.resume)
    except ValueError as e:  # missing training files, a resume file of another run
        ap.exit(2, f"error: {e}\n")
    print(f"{args.testbed} seed {args.seed}: test accuracy {100 * acc:.2f}% on {meta['test_images']} images, "
          f"{meta['train_seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    main()
