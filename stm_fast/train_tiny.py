"""Train one embedded digits model: ``python -m stm_fast.train_tiny --seed S [--out PATH]``.

Deterministic for a given seed on a given machine (fixed seeds for torch and the augmentation, a fixed
thread count, data in a fixed order per epoch, subnormals flushed to zero). Recipe (docs/conventions.md §9): AdamW lr 3e-3, weight
decay 0.05, cosine decay, label smoothing 0.1, batch 32, random shifts of up to 1 pixel, 30 epochs, one
thread (as fast as two for a model this small, and it fixes the summation order).
Writes ``{'model': state_dict, 'config': DIGITS_CONFIG, 'meta': {...}}`` (loads with weights_only=True).
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

from .digits import DIGITS_CONFIG, checkpoint_path, create_digits_model, load_split
from .runtime import HelpFormatter, flush_denormals


def shift(x, rng):
    """Shift each image by up to one pixel in each direction, zero (= -1 after scaling) fill."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = rng.integers(0, 3, n), rng.integers(0, 3, n)
    return torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(n)])


def evaluate(model, x, y, batch=120):
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def train(seed, epochs=30, batch=32, lr=3e-3, out=None, threads=1, progress=True, max_steps=None):
    """Train seed ``seed`` and write its checkpoint; returns (test accuracy, meta, path). ``max_steps`` stops
    early (for tests of determinism). Subnormals are flushed meanwhile (epochs are several times slower
    without: trained decays exp(delta*A) reach float32's subnormal range)."""
    prev_threads = torch.get_num_threads()
    try:
        with flush_denormals():
            return _train(seed, epochs, batch, lr, out, threads, progress, max_steps)
    finally:
        torch.set_num_threads(prev_threads)


def _train(seed, epochs, batch, lr, out, threads, progress, max_steps):
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    x_tr, y_tr, x_te, y_te = load_split()
    model = create_digits_model().train()
    model.set_scan_backend("torch")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x_tr) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    bar = tqdm(range(epochs), desc=f"seed {seed}", disable=not progress)
    done = 0
    for epoch in bar:
        model.train()
        order = torch.as_tensor(rng.permutation(len(x_tr)))
        total = 0.0
        for i in range(0, len(x_tr), batch):
            idx = order[i:i + batch]
            xb = shift(x_tr[idx], rng)
            loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            done += 1
            if max_steps is not None and done >= max_steps:
                break
        if max_steps is not None and done >= max_steps:
            break
        bar.set_postfix(loss=f"{total / len(x_tr):.3f}")
    acc = evaluate(model, x_te, y_te)
    meta = {"seed": seed, "epochs": epochs, "batch": batch, "lr": lr, "test_accuracy": acc,
            "train_seconds": round(time.time() - t0, 1), "torch": str(torch.__version__)}
    out = out or f"vim_digits_seed{seed}.pth"  # never the shipped file unless asked for (main: --replace-shipped)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    model.eval()
    torch.save({"model": model.state_dict(), "config": dict(DIGITS_CONFIG), "meta": meta}, tmp)
    os.replace(tmp, out)
    return acc, meta, out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m stm_fast.train_tiny", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--seed", type=int, required=True, help="the seed to train (0, 1, 2 are the shipped models)")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs (the shipped models: 30)")
    ap.add_argument("--out", default=None,
                    help="where to write the checkpoint (default: vim_digits_seed<S>.pth in the current folder; the "
                         "package's shipped models are only replaced with --replace-shipped)")
    ap.add_argument("--replace-shipped", action="store_true",
                    help="write into the package's shipped checkpoint of this seed (what the embedded default evaluates)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    shipped = os.path.abspath(checkpoint_path(args.seed))
    out = args.out or (shipped if args.replace_shipped else f"vim_digits_seed{args.seed}.pth")
    if os.path.abspath(out) == shipped and not args.replace_shipped:
        ap.error(f"--out {out} is the package's shipped model of seed {args.seed}: pass --replace-shipped to replace it")
    if os.path.isdir(out):
        ap.error(f"--out {out} is a folder: give a file name")
    acc, meta, out = train(args.seed, epochs=args.epochs, out=out)
    print(f"seed {args.seed}: test accuracy {100 * acc:.2f}% on 360 images, {meta['train_seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    main()
