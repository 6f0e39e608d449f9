"""Fused CPU selective scan (inference): a compiled kernel built on first use; float64 twin ``stm_ref.ssm.selective_scan``.

The kernel runs the discretised recurrence of the paper's eq. 2-3 (Euler step, as Mamba's kernels),
Abar_t = exp(Delta_t A), h_t = Abar_t h_{t-1} + Delta_t B_t u_t, y_t = C_t h_t (+ D u_t), gated by silu(z_t),
in one pass over time per (batch item, block of channels): the state stays in L1, nothing of size
L x D x N is materialised (unlike the unrolled sums of eq. 4). Channel-last inputs (Vim's mixer) are
the fast case; any strides are accepted.

The extension is compiled with ``torch.utils.cpp_extension.load`` for this host's ATen CPU capability
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, else generic code) and cached under
``$STM_FUSED_BUILD_DIR``, ``$STM_CACHE_DIR`` or ``$XDG_CACHE_HOME/stm_fast`` (default ``~/.cache/stm_fast``),
in an entry keyed by a hash of the sources (all of ``csrc/``) and the build inputs, not the checkout's path;
a cached library is loaded only if it matches the size and SHA-256 its build recorded (``ops.build``), and
is rebuilt (or refused, with one line) otherwise. ``available()`` never raises.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ..runtime import compute_dtype
from . import build as _cache
from .common import FirstSteps, ScanCall, ScanOutput, around_bare_scan, bc_layout, check_scan_args, reversed_by_flipping
from .scan_autograd import scan_differentiable

__all__ = ["available", "selective_scan_fused", "build_info", "build_dir", "exp2_decays_into",
           "causal_conv_silu", "ends_lsq_weights", "scan_differentiable_fused", "TrainScanFunction", "scan", "check",
           "conv"]

_CSRC = Path(__file__).with_name("csrc")  # every file in it (the .cpp files: one extension; vec_math.h) is keyed
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_state: dict = {}  # "module", "reason": set once by available()

# ATen's Vectorized<T> is only SIMD code when the capability macros are defined; without them it is the
# generic fallback (several times slower). Flags per the capability; no -march=native,
# so a cache shared by hosts with one capability (a network home directory) stays valid for all of them.
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
_GENERIC_FLAGS = ["-DCPU_CAPABILITY=DEFAULT"]


def _capability() -> str:
    """The ATen CPU capability to compile for: ``$STM_FUSED_CAPABILITY`` if set (e.g. DEFAULT, to build the
    generic code), else the one torch dispatches to on this host."""
    forced = os.environ.get("STM_FUSED_CAPABILITY")
    if forced:
        return forced.upper()
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old torch: no capability query, build generic code
        return "DEFAULT"


def _flags(capability: str) -> list:
    cap_flags = _CAPABILITY_FLAGS.get(capability, _GENERIC_FLAGS)
    return ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"] + cap_flags


def _inputs(capability: Optional[str] = None, sources: Optional[dict] = None) -> dict:
    cap = capability or _capability()
    sources = _cache.read_sources(_CSRC) if sources is None else sources
    return _cache.key_inputs(sources, cap, _flags(cap), _LDFLAGS)


def build_dir(capability: Optional[str] = None) -> Path:
    """The cache entry of these sources (all of ``csrc/``), this torch and CPython, the capability and flags."""
    return _cache.entry_dir(_inputs(capability))


def _library_name(entry: Path) -> str:
    """The extension's name: also its operators' namespace (torch.ops.<name>), so one per entry."""
    return "stm_scan_fused_" + entry.name.rsplit("-", 1)[-1]


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its warning that a CPU-only host has no CUDA runtime."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _missing_tool() -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    if not shlex.split(cxx) or shutil.which(shlex.split(cxx)[0]) is None:  # CXX may be "ccache g++"
        return f"C++ compiler {cxx!r} not found (set CXX to a working g++/clang++)"
    if not _cpp_extension().is_ninja_available():
        return "ninja not found (torch.utils.cpp_extension needs it to build the fused scan; pip install ninja)"
    return None


class _Unavailable(RuntimeError):
    """A reason, already one line with its fix, why the kernel cannot be loaded or built here."""


def _load_cached(lib: Path, name: str):
    """The operators of a checked cached library; None (and why) if it does not load."""
    try:
        torch.ops.load_library(str(lib))
        return getattr(torch.ops, name), ""
    except (OSError, RuntimeError, AttributeError) as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return None, f"does not load: {first[:100]}"


def _compile(entry: Path, name: str, sources: dict, inputs: dict, cap: str):
    """Build the entry afresh from ``sources`` (under its lock), load it, then record it in its manifest."""
    cpp = _cache.fresh_entry(entry, sources)
    _cpp_extension().load(name=name, sources=cpp, extra_cflags=_flags(cap), extra_ldflags=_LDFLAGS,
                          build_directory=str(entry), verbose=False, is_python_module=False)
    _cache.write_manifest(entry, f"{name}.so", inputs)
    return getattr(torch.ops, name)  # the library registers its operators in a namespace of this name


def _build():
    """Load the cached kernel if its library matches its manifest, else compile it; raises on any failure."""
    cap = _capability()
    sources = _cache.read_sources(_CSRC)
    inputs = _inputs(cap, sources)
    entry = _cache.entry_dir(inputs)
    name = _library_name(entry)
    lib, damage = _cache.check_entry(entry, f"{name}.so")
    failed = ""  # why a library that matches its manifest does not load (then it is rebuilt)
    if lib is not None:
        module, failed = _load_cached(lib, name)
        if module is not None:
            return module
    missing = _missing_tool()
    if missing:
        damage = failed or damage
        raise _Unavailable(f"cached kernel damaged ({damage}); to rebuild it: {missing}" if damage else missing)
    with _cache.entry_lock(entry):
        lib, damage = _cache.check_entry(entry, f"{name}.so")  # another process may have built it meanwhile
        if lib is not None and not failed:
            module, failed = _load_cached(lib, name)
            if module is not None:
                return module
        damage = failed or damage
        if damage:
            print(f"stm_fast: the cached fused scan kernel in {entry} is damaged ({damage}); rebuilding it "
                  f"(about half a minute; if this repeats, delete {entry})", file=sys.stderr)
        else:  # the first use pays a compile; say so rather than seem to hang
            print(f"stm_fast: building the fused CPU scan kernel for {cap} in {entry} (once; about half a minute)",
                  file=sys.stderr)
        return _compile(entry, name, sources, inputs, cap)


def _one_line(exc: BaseException) -> str:
    """The first compiler error (or the exception's first line), for a one-line reason."""
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    for line in lines:
        if "error:" in line:
            return f"fused scan build failed: {line[line.index('error:'):][:300]}"
    return f"fused scan build failed: {(lines[0] if lines else type(exc).__name__)[:300]}"


def available() -> Tuple[bool, str]:
    """(True, build description) once the kernel is built or loaded; (False, one line why) otherwise.

    Builds on the first call (a minute or so with a cold cache), then caches the answer; never raises."""
    with _lock:
        if "reason" not in _state:
            module, reason = None, None
            try:
                module = _build()
                reason = f"built for {module.build_info()}"
            except _Unavailable as exc:  # no compiler (and no valid cached kernel): its own line
                reason = str(exc)
            except Exception as exc:  # compiler errors, missing headers, unwritable cache...
                reason = _one_line(exc)
            _state.update(module=module, reason=reason)
        return _state["module"] is not None, _state["reason"]


def _module():
    """The loaded extension's operators; RuntimeError naming why when it cannot be built here."""
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"selective_scan_fused is unavailable: {reason}")
    return _state["module"]


def build_info() -> str:
    """The capability and SIMD widths the loaded kernel was compiled for (or why there is none)."""
    return available()[1]


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, decay_scale) -> None:
    check_scan_args(u, delta, A)
    batch, Dm, L = u.shape
    N = A.shape[1]
    bc_layout(B, batch, Dm, N, L, "B")
    bc_layout(C, batch, Dm, N, L, "C")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (Dm,):
            raise ValueError(f"selective_scan_fused: {name} of shape {tuple(v.shape)}, expected (D,)={(Dm,)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan_fused: z of shape {tuple(z.shape)}, expected u's {tuple(u.shape)}")
    if decay_scale is not None and tuple(decay_scale.shape) != (batch, L):
        raise ValueError(f"selective_scan_fused: decay_scale of shape {tuple(decay_scale.shape)}, expected "
                         f"(batch, L)={(batch, L)}")


def _check_first_steps(first_steps, B, batch, Dm, N, L, dtype, decay_scale) -> int:
    """The number n of exported steps; validates the (delta, Abar, B) buffers."""
    if first_steps is None:
        return 0
    if decay_scale is not None:
        raise ValueError("selective_scan_fused: first_steps cannot be exported with decay_scale "
                         "(Abar is then exp(scale*delta*A), not the exp(delta*A) the buffers hold)")
    if len(first_steps) != 3:
        raise ValueError("selective_scan_fused: first_steps must be a tuple (delta_out, Abar_out, B_out or None)")
    d_out, a_out, b_out = first_steps
    n = d_out.shape[0] if d_out.dim() == 3 else -1
    want = {"delta_out": (d_out, (n, batch, Dm)), "Abar_out": (a_out, (n, batch, N, Dm))}
    if b_out is not None:
        if B.dim() != 3:
            raise ValueError("selective_scan_fused: first_steps' B_out needs B of layout (batch, N, L); pass None")
        want["B_out"] = (b_out, (n, batch, N))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape or t.dtype != dtype or t.device.type != "cpu":
            raise ValueError(f"selective_scan_fused: first_steps {name} must be a CPU {dtype} tensor of shape "
                             f"{shape}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if not 0 <= n <= L:
        raise ValueError(f"selective_scan_fused: first_steps of {n} steps, but L={L}")
    return n


def _check_no_grad(tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError("selective_scan_fused: inputs require grad, but the fused CPU kernel is inference only; "
                         "use the torch backend for training")


def _check_devices(tensors) -> None:
    for t in tensors:
        if t is not None and not (t.is_cpu and not t.is_complex()):
            raise ValueError(f"selective_scan_fused: CPU real tensors only, got {t.dtype} on {t.device}")


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """t in the compute dtype; the common case (already there) without the cost of a Tensor.to call."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _new_output(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y in u's layout: channel-last memory (batch, L, D) viewed as (batch, D, L) if u is, else contiguous."""
    batch, Dm, L = u.shape
    if u.stride(1) == 1 and Dm > 1:
        return torch.empty(batch, L, Dm, dtype=dtype).transpose(1, 2)
    return torch.empty(batch, Dm, L, dtype=dtype)


def selective_scan_fused(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                         delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False, decay_scale: Optional[torch.Tensor] = None,
                         first_steps: Optional[tuple] = None,
                         reverse: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Selective scan with mamba-ssm's layout (twin of ``stm_ref.ssm.selective_scan``), on CPU, inference only.

    ``u, delta, z``: (batch, D, L), any strides (channel-last memory, ``stride(1) == 1``, is the fast case);
    ``A``: (D, N); ``B, C``: (batch, N, L), (D, N) or (batch, G, N, L); ``D, delta_bias``: (D,);
    ``decay_scale``: (batch, L), multiplies Delta in Abar only. Delta <- softplus(delta + delta_bias) if asked;
    eq. 2 with Euler's Bbar: Abar = exp(Delta A), Bbar = Delta B; eq. 3: h_t = Abar_t h_{t-1} + Bbar_t u_t,
    y_t = C_t h_t + D u_t, then y *= silu(z). ``reverse``: scan t = L-1 .. 0 (y still indexed by t).
    ``first_steps``: (delta_out (n, batch, D), Abar_out (n, batch, N, D), B_out (n, batch, N) or None),
    filled in place with the first n scan steps' Delta, exp(Delta A) and B (scan order); not with decay_scale.
    Computes in float64 if any of u, delta, A, B, C is float64, else float32; returns y in u's dtype and
    layout, and with ``return_last_state`` the final state (batch, D, N) in the compute dtype.
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias, decay_scale)
    _check_no_grad(tensors)
    _check_devices(tensors)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, decay_scale)
    ct = compute_dtype(u, delta, A, B, C)
    batch, Dm, L = u.shape
    N = A.shape[1]
    n_first = _check_first_steps(first_steps, B, batch, Dm, N, L, ct, decay_scale)
    y = _new_output(u, ct)
    last = torch.empty(batch, Dm, N, dtype=ct) if return_last_state else None
    outs = tuple(first_steps) if n_first else (None, None, None)
    inputs = [_cast(t, ct) for t in (u, delta, A, B, C, D, z, delta_bias)]
    _module().selective_scan_fwd(*inputs, bool(delta_softplus), _cast(decay_scale, ct), bool(reverse),
                                        y, last, *outs, n_first)
    y = _cast(y, u.dtype)
    return (y, last) if return_last_state else y


def exp2_decays_into(x: torch.Tensor, out: torch.Tensor, repeats: int = 1) -> None:
    """out = 2**x by the kernel's own float decay code, ``repeats`` times (the bench's exp2 rate, stm_fast.floor);
    x, out contiguous float32 of one size, their values in the decays' range [-125, 125]."""
    _module().exp2_decays_into(x, out, int(repeats))


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     activation: bool = True, reverse: bool = False) -> torch.Tensor:
    """Mamba's causal depthwise conv (+ SiLU) in one pass, on CPU, inference only (twin of
    ``stm_ref.vim.causal_conv1d``): x (batch, E, L) held channel-last (``x.stride(1) == 1``), weight (E, K)
    or (E, 1, K), bias (E,); y_t = silu(bias + sum_k weight[:, k] x_{t-K+1+k}), returned (batch, E, L) in
    x's dtype (float32/float64) and channel-last layout. ``reverse``: the conv of the time-reversed sequence,
    indexed by t (y_t = silu(bias + sum_k weight[:, k] x_{t+K-1-k})), as a backward scan reads it."""
    _check_no_grad((x, weight, bias))
    _check_devices((x, weight, bias))
    if x.dim() != 3 or x.stride(1) != 1 or x.dtype not in (torch.float32, torch.float64):
        raise ValueError("causal_conv_silu: x must be a float32/float64 (batch, E, L) view of channel-last rows")
    w = weight.reshape(weight.shape[0], -1)
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv_silu: weight of shape {tuple(weight.shape)} does not match E={x.shape[1]}")
    rows = x.transpose(1, 2)
    y = torch.empty(rows.shape, dtype=x.dtype)
    _module().causal_conv_silu(rows, w.t().to(x.dtype).contiguous(),
                                      None if bias is None else bias.to(x.dtype).contiguous(), bool(activation),
                                      bool(reverse), y)
    return y.transpose(1, 2)


def ends_lsq_weights(d: torch.Tensor, abar: torch.Tensor, B: torch.Tensor, r: int, variant: str = "lsq") -> torch.Tensor:
    """STM's ``lsq`` or ``lsq_norm`` weights (``variant``) of the ``ends`` plan, (S, batch, r) in scan order, from
    the first steps the kernel exported: d (n, S, batch, E), abar (n, S, batch, N, E), B (n, S, batch, N),
    contiguous, n > r (eq. 11; a compiled form of those variants' definitions in ``stm_fast.reduction.merge``,
    record in ``stm_fast.ops.weight_kernels``). abar is left untouched."""
    if variant not in ("lsq", "lsq_norm"):
        raise ValueError(f"ends_lsq_weights computes the 'lsq' and 'lsq_norm' weights, not {variant!r}")
    w = torch.empty(d.shape[1], d.shape[2], r, dtype=d.dtype)
    _module().ends_lsq_weights(d, abar, B, int(r), variant == "lsq_norm", w)
    return w


class TrainScanFunction(torch.autograd.Function):
    """y_t = C_t . h_t, h_t = exp(dta_t A) h_{t-1} + du_t B_t (eq. 3) by the compiled training kernel, with its
    hand-written backward (``csrc/selective_scan_cpu_grad.cpp``). dta, du: (batch, L, D) contiguous; A: (D, N);
    B, C: (batch, L, N) contiguous. Returns y (batch, L, D) and the last state (batch, D, N)."""

    @staticmethod
    def forward(ctx, dta, du, A, B, C, reverse=False, chunk=16):
        batch, L, Dm = dta.shape
        N = A.shape[1]
        y = torch.empty_like(dta)
        last = dta.new_empty(batch, N, Dm)
        ck = dta.new_empty(batch, (L + chunk - 1) // chunk, N, Dm)
        _module().scan_train_fwd(dta, du, A, B, C, bool(reverse), int(chunk), y, last, ck)
        ctx.save_for_backward(dta, du, A, B, C, ck)
        ctx.reverse, ctx.chunk = bool(reverse), int(chunk)
        return y, last.transpose(1, 2)

    @staticmethod
    def backward(ctx, gy, glast):
        dta, du, A, B, C, ck = ctx.saved_tensors
        batch, L, Dm = dta.shape
        N = A.shape[1]
        g_dta, g_du = torch.empty_like(dta), torch.empty_like(du)
        g_A = dta.new_empty(batch, N, Dm)
        g_B, g_C = torch.zeros_like(B), torch.zeros_like(C)
        gy = torch.zeros_like(dta) if gy is None else gy.contiguous()
        glast = None if glast is None else glast.transpose(1, 2).contiguous()
        _module().scan_train_bwd(dta, du, A, B, C, ck, gy, glast, ctx.reverse, ctx.chunk, g_dta, g_du, g_A, g_B, g_C)
        return g_dta, g_du, g_A.sum(0).t(), g_B, g_C, None, None


def scan_differentiable_fused(u, delta, A, B, C, decay_scale=None, reverse=False):
    """Twin of ``ops.scan_autograd.scan_differentiable`` on the compiled training kernel: y_ssm (batch, D, L) =
    C.h and the last state (batch, D, N), differentiable in every input (eq. 3). B, C: (batch, N, L); delta
    already biased and softplused; D and z are applied by the caller. ``reverse``: scan t = L-1 .. 0."""
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError("scan_differentiable_fused: B and C must be (batch, N, L)")
    ct = compute_dtype(u, delta, A, B, C)
    du = (delta * u).to(ct)
    dta = (delta if decay_scale is None else delta * decay_scale[:, None, :]).to(ct)
    rows = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  (channel-last inputs: no copy)
    y, last = TrainScanFunction.apply(rows(dta), rows(du), A.to(ct).contiguous(), rows(B.to(ct)), rows(C.to(ct)),
                                      reverse)
    return y.transpose(1, 2), last


def check(device) -> None:
    """Raise unless the kernel is built (or loads) and ``device`` is the CPU."""
    if device.type != "cpu":
        raise RuntimeError(f"it is a CPU kernel, not for {device}")
    ok, reason = available()
    if not ok:
        raise RuntimeError(reason)


def conv(x, weight, bias, reverse=False):
    """The kernel's one-pass causal conv + SiLU (backward by index arithmetic) where it takes the call
    (float32/64 channel-last rows, at most 8 taps, no gradient), else the torch conv."""
    from .conv import causal_conv1d

    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if grad or x.dtype not in (torch.float32, torch.float64) or x.dim() != 3 or x.stride(1) != 1 or weight.shape[-1] > 8:
        return causal_conv1d(x, weight, bias, reverse=reverse)
    return causal_conv_silu(x, weight.reshape(weight.shape[0], -1), bias, True, reverse)


def _first_steps(call, n):
    """(delta, Abar, B) buffers the kernel fills with the first n scan steps (B only for (batch, N, L))."""
    batch, Dm, L = call.u.shape
    N, n = call.A.shape[1], min(n, L)
    new = lambda shape: torch.empty(shape, dtype=call.dtype)  # noqa: E731
    return new((n, batch, Dm)), new((n, batch, N, Dm)), new((n, batch, N)) if call.B.dim() == 3 else None


def scan(call: ScanCall) -> ScanOutput:
    """A ``ScanCall`` on the compiled kernels: the inference kernel (first steps exported, reverse by index
    arithmetic), or with gradients the training kernel (``TrainScanFunction``; B and C of other layouts than
    (batch, N, L) through the torch twin ``scan_autograd``, as before this backend was differentiable)."""
    if call.grad and (call.B.dim() != 3 or call.C.dim() != 3):  # the training kernel takes (batch, N, L) only
        return reversed_by_flipping(call, scan) if call.reverse else around_bare_scan(call, scan_differentiable)
    if call.grad:
        return around_bare_scan(call, lambda *a, **kw: scan_differentiable_fused(*a, **kw, reverse=call.reverse))
    outs = _first_steps(call, call.first_steps) if call.first_steps and call.decay_scale is None else None
    out = selective_scan_fused(call.u, call.delta, call.A, call.B, call.C, call.D, call.z, call.delta_bias,
                               call.delta_softplus, call.last_state, decay_scale=call.decay_scale, first_steps=outs,
                               reverse=call.reverse)  # the last state only when asked: a fresh buffer per call
    y, last = out if call.last_state else (out, None)
    return ScanOutput(y, last, None if outs is None else FirstSteps(*outs))
