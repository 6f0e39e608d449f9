// Fused CPU selective scan (inference): the recurrence of the paper's eq. 2-3 in one pass over time.
//
// One task = (batch item, block of lanes<T>() channels, 16 floats or 8 doubles on AVX2). Per time step
// it loads the block's delta, u and z, forms dt = softplus(delta + bias), Abar = exp(dt * A) and
// dt * u * B_t in registers, updates the block's N x lanes state (a per-thread buffer, in L1), reads out
// y_t = (C_t . h_t + D u_t) * silu(z_t) and stores it: nothing of size L x D x N is ever written. SIMD
// lanes run over channels; with channel-last memory (Vim's mixer) a block is contiguous at every t,
// other layouts are gathered lane by lane. Tasks are spread over torch's threads by at::parallel_for.
//
// Where the time goes on a 2-core AVX2 Zen machine at Vim-Ti shapes: the N exponentials per channel and
// step. For float they are an inline polynomial (exp2_decays), computed a few vectors in lock step
// because Zen's small FP scheduler otherwise sees one long dependency chain at a time; the step's
// per-channel activations are formed one step ahead for the same reason. double keeps ATen's Sleef calls.
//
// The Python side (scan_fused.py) validates shapes, converts dtypes and allocates the outputs. The entry
// points are torch operators (TORCH_LIBRARY) rather than a pybind11 module: <torch/extension.h> alone
// took 30 of the 51 s of a cold build.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// (batch, D, L) tensors (u, delta, z, y) and the first-step exports: element (b, d, t) by strides.
template <typename T>
struct View3 {
  T* p = nullptr;
  int64_t sb = 0, sd = 0, st = 0;
};

// B or C: element (b, d, n, t) = p[b*sb + (d / dpg)*sg + n*sn + t*st]. Covers (batch, N, L) (sg = 0),
// (D, N) (sb = st = 0, dpg = 1) and (batch, G, N, L) (dpg = D / G) without copies.
template <typename T>
struct BCView {
  const T* p = nullptr;
  int64_t sb = 0, sg = 0, sn = 0, st = 0, dpg = 1;
};

// The first n scan steps' exports, by strides: dt (n, batch, D), Abar (n, batch, N, D), B (n, batch, N).
template <typename T>
struct FirstStepsOut {
  int64_t n = 0;
  T* dt = nullptr;
  int64_t dt_s = 0, dt_b = 0, dt_d = 0;
  T* abar = nullptr;
  int64_t ab_s = 0, ab_b = 0, ab_n = 0, ab_d = 0;
  T* B = nullptr;  // null: not asked for
  int64_t b_s = 0, b_b = 0, b_n = 0;
};

template <typename T>
struct Params {
  int64_t batch = 0, D = 0, N = 0, L = 0;
  View3<T> u, delta, z, y;
  const T* A = nullptr;  // (D, N)
  int64_t sAd = 0, sAn = 0;
  BCView<T> B, C;
  const T* Dskip = nullptr;  // (D,) strided
  int64_t sDskip = 0;
  const T* bias = nullptr;
  int64_t sbias = 0;
  const T* scale = nullptr;  // decay_scale (batch, L)
  int64_t sscale_b = 0, sscale_t = 0;
  bool softplus = false, reverse = false;
  T* last = nullptr;  // (batch, D, N)
  int64_t slast_b = 0, slast_d = 0, slast_n = 0;
  FirstStepsOut<T> first;
};

// Whether every channel of a block reads the same B_t / C_t row (always for (batch, N, L)): the inner
// loop then broadcasts N scalars straight from the tensor.
template <typename T>
inline bool shared_row(const BCView<T>& v, int64_t d0, int64_t nd) {
  return v.sg == 0 || d0 / v.dpg == (d0 + nd - 1) / v.dpg;
}

template <typename T>
inline const T* bc_row(const BCView<T>& v, int64_t b, int64_t d0, int64_t t) {
  return v.p + b * v.sb + (d0 / v.dpg) * v.sg + t * v.st;
}

// B_t or C_t of a block gathered lane by lane into N x kVecs vectors: per-channel (D, N) constants and
// blocks straddling channel groups.
template <typename T>
void gather_bc(const BCView<T>& v, int64_t b, int64_t d0, int64_t nd, int64_t N, int64_t t, Vec<T>* out) {
  constexpr int64_t W = Vec<T>::size();
  const T* base = v.p + b * v.sb + t * v.st;
  alignas(64) T tmp[lanes<T>()] = {};
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < nd; ++i) tmp[i] = base[((d0 + i) / v.dpg) * v.sg + n * v.sn];
    for (int k = 0; k < kVecs; ++k) out[n * kVecs + k] = Vec<T>::loadu(tmp + k * W);
  }
}

// e^x of G vectors for the per-channel softplus and silu: Sleef for double; for float 2^(x log2 e) with
// log2 e split in two (Cody-Waite) so the reduction stays exact, x clamped to [-87, 88] (e^-87 = 2^-125.5).
// In lock step like the decays: one softplus or silu alone is a ~40-deep dependency chain.
template <int G>
STM_HOT void exp_act(const Vec<double>* x, Vec<double>* out) {
  for (int j = 0; j < G; ++j) out[j] = x[j].exp();
}

template <int G>
STM_HOT void exp_act(const Vec<float>* x, Vec<float>* out) {
  const Vec<float> log2e_hi(1.44269502f), log2e_lo(1.925963e-8f);
  Vec<float> t[G], f[G];
  for (int j = 0; j < G; ++j) {
    const Vec<float> xc = at::vec::clamp(x[j], Vec<float>(-87.f), Vec<float>(88.f));
    t[j] = at::vec::fmadd(xc, log2e_hi, kShifter());
    f[j] = at::vec::fmadd(xc, log2e_lo, at::vec::fmsub(xc, log2e_hi, t[j] - kShifter()));
  }
  pow2_parts<G>(t, f, out);
}

// log1p(e) of G vectors with e in [0, 1] (Sleef's log1p for double). float: e + e * r(e) with r a degree-9
// polynomial for log1p(e)/e - 1 (fit error 5e-9), so r's rounding is scaled by e and the result, measured
// on softplus, has an rms error of 0.3 ulp (Sleef: 0.27); no division, unlike 2 atanh(e / (2 + e)) (0.4).
template <int G>
STM_HOT void log1p_unit(const Vec<double>* e, Vec<double>* out) {
  for (int j = 0; j < G; ++j) out[j] = e[j].log1p();
}

template <int G>
STM_HOT void log1p_unit(const Vec<float>* e, Vec<float>* out) {
  static constexpr float c[] = {-0.4999993145f, 0.3333049119f, -0.2495845705f, 0.1969501227f, -0.1535486877f,
                                0.1068042740f, -0.0576691180f, 0.0202096198f, -0.0033200539f};
  Vec<float> r[G];
  for (int j = 0; j < G; ++j) r[j] = at::vec::fmadd(e[j], Vec<float>(c[8]), Vec<float>(c[7]));
  for (int k = 6; k >= 0; --k)
    for (int j = 0; j < G; ++j) r[j] = at::vec::fmadd(r[j], e[j], Vec<float>(c[k]));
  for (int j = 0; j < G; ++j) out[j] = at::vec::fmadd(e[j], r[j] * e[j], e[j]);
}

// Whether a step's float decays need the clamped exp2: some |dt * A log2 e| > 125 (or a NaN), i.e. some
// |dt| above dt_max = 125 / max |A log2 e|. double always takes Sleef's exp2, which needs no clamp.
template <typename T>
STM_HOT bool needs_clamp(const Vec<T>* dta, T dt_max) {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    Vec<T> m = dta[0].abs();
    for (int k = 1; k < kVecs; ++k) m = at::vec::maximum(m, dta[k].abs());  // propagates NaN
    return (m <= Vec<T>(dt_max)).zero_mask() != 0;  // a lane failing the test is all zero bits
  }
}

// torch's softplus (beta = 1, threshold = 20) of kVecs vectors in place, and the gate silu(z) of kVecs
// more, their exponentials in one lock-step batch. softplus: x itself above the threshold, else
// log1p(e^x), as max(x, 0) + log1p(e^-|x|) so the exponential never overflows and log1p sees [0, 1].
template <typename T, bool kSoftplus, bool kGate>
inline void activations(Vec<T>* dt, Vec<T>* gate) {
  constexpr int G = (kSoftplus + kGate) * kVecs;
  constexpr int g0 = kSoftplus ? kVecs : 0;  // where the gate's exponentials start
  const Vec<T> zero(T(0)), one(T(1));
  Vec<T> arg[G], e[G], lp[kVecs];
  for (int k = 0; k < kVecs; ++k) {
    if (kSoftplus) arg[k] = zero - dt[k].abs();
    if (kGate) arg[g0 + k] = gate[k].neg();
  }
  exp_act<G>(arg, e);
  if (kSoftplus) log1p_unit<kVecs>(e, lp);
  for (int k = 0; k < kVecs; ++k) {
    if (kSoftplus) dt[k] = Vec<T>::blendv(at::vec::maximum(dt[k], zero) + lp[k], dt[k], dt[k] > Vec<T>(T(20)));
    if (kGate) gate[k] = gate[k] / (one + e[g0 + k]);
  }
}

template <typename T>
inline void apply_activations(bool softplus, bool gate, Vec<T>* dt, Vec<T>* z) {
  if (softplus && gate) activations<T, true, true>(dt, z);
  else if (softplus) activations<T, true, false>(dt, z);
  else if (gate) activations<T, false, true>(dt, z);
}

// Per-task scratch: state h, A*log2(e) and gathered B_t, C_t, each N x kVecs vectors.
template <typename T>
struct Scratch {
  explicit Scratch(int64_t N) : h(N * kVecs), a2(N * kVecs), bt(N * kVecs), ct(N * kVecs) {}
  std::vector<Vec<T>> h, a2, bt, ct;
  T dt_max = 0;  // 125 / max |A log2 e| over the block, for needs_clamp
};

// One step's per-channel inputs: dt (eq. 2's Delta, after bias and softplus), dt * decay_scale (the step
// that enters Abar), u, dt * u and the gate silu(z); clamp: whether its decays need the clamped exp2.
template <typename T>
struct StepIn {
  Vec<T> dt[kVecs], dta[kVecs], u[kVecs], dtu[kVecs], gate[kVecs];
  bool clamp = false;
};

template <typename T>
inline void load_step(const Params<T>& p, const Scratch<T>& s, int64_t b, int64_t d0, int64_t nd, int64_t t,
                      const Vec<T>* bias, StepIn<T>& in) {
  load_lanes(p.delta.p + b * p.delta.sb + d0 * p.delta.sd + t * p.delta.st, p.delta.sd, nd, in.dt);
  load_lanes(p.u.p + b * p.u.sb + d0 * p.u.sd + t * p.u.st, p.u.sd, nd, in.u);
  if (p.z.p) load_lanes(p.z.p + b * p.z.sb + d0 * p.z.sd + t * p.z.st, p.z.sd, nd, in.gate);
  const Vec<T> scale(p.scale ? p.scale[b * p.sscale_b + t * p.sscale_t] : T(1));
  if (p.bias)
    for (int k = 0; k < kVecs; ++k) in.dt[k] = in.dt[k] + bias[k];
  apply_activations(p.softplus, p.z.p != nullptr, in.dt, in.gate);
  for (int k = 0; k < kVecs; ++k) {
    in.dtu[k] = in.dt[k] * in.u[k];
    in.dta[k] = p.scale ? in.dt[k] * scale : in.dt[k];
  }
  in.clamp = needs_clamp(in.dta, s.dt_max);
}

// Where the inner loop reads B_t and C_t: rows of N scalars to broadcast, or gathered N x kVecs vectors.
template <typename T>
struct StepBC {
  const T *brow = nullptr, *crow = nullptr;
  int64_t bsn = 0, csn = 0;
  const Vec<T>*bt = nullptr, *ct = nullptr;
};

// The recurrence of eq. 3 for kStates states from n0 on: h = Abar * h + (dt u) B_t, and y += C_t . h.
template <typename T, bool kGathered, bool kClamp, int kStates>
STM_HOT void update_states(Scratch<T>& s, int64_t n0, const StepBC<T>& bc, const StepIn<T>& in, Vec<T>* y) {
  constexpr int G = kStates * kVecs;
  Vec<T> dta[G], abar[G];
  for (int j = 0; j < G; ++j) dta[j] = in.dta[j % kVecs];
  exp2_decays<kClamp, G>(dta, &s.a2[n0 * kVecs], abar);
  for (int j = 0; j < G; ++j) {
    const int64_t n = n0 + j / kVecs, i = n0 * kVecs + j;
    const int k = j % kVecs;
    const Vec<T> bn = kGathered ? bc.bt[i] : Vec<T>(bc.brow[n * bc.bsn]);
    const Vec<T> cn = kGathered ? bc.ct[i] : Vec<T>(bc.crow[n * bc.csn]);
    s.h[i] = at::vec::fmadd(abar[j], s.h[i], in.dtu[k] * bn);
    y[k] = at::vec::fmadd(cn, s.h[i], y[k]);
  }
}

// One step over all N states, two at a time (four decay vectors in lock step; 1, 4 and 8 measured slower:
// fewer chains in flight, or register spills), then the remainder.
template <typename T, bool kGathered, bool kClamp>
STM_HOT void update_state(Scratch<T>& s, int64_t N, const StepBC<T>& bc, const StepIn<T>& in, Vec<T>* y) {
  constexpr int kStates = 2;
  for (int k = 0; k < kVecs; ++k) y[k] = Vec<T>(T(0));
  int64_t n = 0;
  for (; n + kStates <= N; n += kStates) update_states<T, kGathered, kClamp, kStates>(s, n, bc, in, y);
  for (; n < N; ++n) update_states<T, kGathered, kClamp, 1>(s, n, bc, in, y);
}

template <typename T>
inline void step_state(Scratch<T>& s, int64_t N, bool gathered, bool clamp, const StepBC<T>& bc,
                       const StepIn<T>& in, Vec<T>* y) {
  if (gathered)
    clamp ? update_state<T, true, true>(s, N, bc, in, y) : update_state<T, true, false>(s, N, bc, in, y);
  else
    clamp ? update_state<T, false, true>(s, N, bc, in, y) : update_state<T, false, false>(s, N, bc, in, y);
}

// Writes the first scan steps' dt, Abar (recomputed by the very expression the update used) and B_t.
template <typename T>
void export_step(const Params<T>& p, const Scratch<T>& s, int64_t step, int64_t b, int64_t d0, int64_t nd,
                 int64_t t, const Vec<T>* dt, bool clamp) {
  const FirstStepsOut<T>& o = p.first;
  store_lanes(o.dt + step * o.dt_s + b * o.dt_b + d0 * o.dt_d, o.dt_d, nd, dt);
  Vec<T> a[kVecs];
  for (int64_t n = 0; n < p.N; ++n) {
    for (int k = 0; k < kVecs; ++k) {
      const Vec<T>& a2 = s.a2[n * kVecs + k];
      clamp ? exp2_decays<true, 1>(&dt[k], &a2, &a[k]) : exp2_decays<false, 1>(&dt[k], &a2, &a[k]);
    }
    store_lanes(o.abar + step * o.ab_s + b * o.ab_b + n * o.ab_n + d0 * o.ab_d, o.ab_d, nd, a);
  }
  if (o.B && d0 == 0) {
    const T* bsrc = p.B.p + b * p.B.sb + t * p.B.st;
    for (int64_t n = 0; n < p.N; ++n) o.B[step * o.b_s + b * o.b_b + n * o.b_n] = bsrc[n * p.B.sn];
  }
}

// y_t = (C_t . h_t + D u_t) * silu(z_t), stored in y's layout.
template <typename T>
inline void finish_output(const Params<T>& p, int64_t b, int64_t d0, int64_t nd, int64_t t, const Vec<T>* dskip,
                          const StepIn<T>& in, Vec<T>* y) {
  for (int k = 0; k < kVecs; ++k) {
    if (p.Dskip) y[k] = at::vec::fmadd(dskip[k], in.u[k], y[k]);
    if (p.z.p) y[k] = y[k] * in.gate[k];
  }
  store_lanes(p.y.p + b * p.y.sb + d0 * p.y.sd + t * p.y.st, p.y.sd, nd, y);
}

template <typename T>
void store_last_state(const Params<T>& p, const Scratch<T>& s, int64_t b, int64_t d0, int64_t nd) {
  for (int64_t n = 0; n < p.N; ++n)
    store_lanes(p.last + b * p.slast_b + n * p.slast_n + d0 * p.slast_d, p.slast_d, nd, &s.h[n * kVecs]);
}

// Loads the per-channel constants of a block: A log2(e) (exp2 is cheaper than exp), bias and D.
template <typename T>
void load_block_constants(const Params<T>& p, int64_t d0, int64_t nd, Scratch<T>& s, Vec<T>* bias, Vec<T>* dskip) {
  const T log2e = T(1.4426950408889634);
  T amax = 0;
  for (int64_t n = 0; n < p.N; ++n) {
    alignas(64) T row[lanes<T>()] = {};
    for (int64_t i = 0; i < nd; ++i) {
      row[i] = p.A[(d0 + i) * p.sAd + n * p.sAn] * log2e;
      if (!(std::abs(row[i]) <= amax)) amax = std::abs(row[i]);  // a NaN sticks: every step then clamps
    }
    load_lanes(row, 1, lanes<T>(), &s.a2[n * kVecs]);
  }
  s.dt_max = amax > 0 || amax != amax ? T(125) / amax : std::numeric_limits<T>::infinity();
  if (p.bias) load_lanes(p.bias + d0 * p.sbias, p.sbias, nd, bias);
  if (p.Dskip) load_lanes(p.Dskip + d0 * p.sDskip, p.sDskip, nd, dskip);
  std::fill(s.h.begin(), s.h.end(), Vec<T>(T(0)));
}

// B_t, C_t sources of a block at step t; a gathered buffer is refilled only when the tensor varies in t.
template <typename T>
inline StepBC<T> step_bc(const Params<T>& p, Scratch<T>& s, int64_t b, int64_t d0, int64_t nd, int64_t t,
                         bool gathered, bool first) {
  if (!gathered)
    return {bc_row(p.B, b, d0, t), bc_row(p.C, b, d0, t), p.B.sn, p.C.sn, nullptr, nullptr};
  if (first || p.B.st != 0) gather_bc(p.B, b, d0, nd, p.N, t, s.bt.data());
  if (first || p.C.st != 0) gather_bc(p.C, b, d0, nd, p.N, t, s.ct.data());
  return {nullptr, nullptr, 0, 0, s.bt.data(), s.ct.data()};
}

// One (batch item, channel block) task: the whole sequence, in scan order. Software-pipelined: step
// t+1's inputs (loads, softplus, silu: long dependency chains that do not depend on the state) are formed
// before step t's decays, so the out-of-order core can overlap the two.
template <typename T>
void scan_block(const Params<T>& p, int64_t b, int64_t d0, Scratch<T>& s) {
  const int64_t nd = std::min<int64_t>(lanes<T>(), p.D - d0);
  const auto time_of = [&](int64_t step) { return p.reverse ? p.L - 1 - step : step; };
  Vec<T> bias[kVecs], dskip[kVecs], y[kVecs];
  load_block_constants(p, d0, nd, s, bias, dskip);
  const bool gathered = !shared_row(p.B, d0, nd) || !shared_row(p.C, d0, nd);
  StepIn<T> in[2];
  if (p.L > 0) load_step(p, s, b, d0, nd, time_of(0), bias, in[0]);
  for (int64_t step = 0; step < p.L; ++step) {
    const int64_t t = time_of(step);
    const StepIn<T>& cur = in[step & 1];
    if (step + 1 < p.L) load_step(p, s, b, d0, nd, time_of(step + 1), bias, in[(step + 1) & 1]);
    const StepBC<T> bc = step_bc(p, s, b, d0, nd, t, gathered, step == 0);
    step_state(s, p.N, gathered, cur.clamp, bc, cur, y);
    if (step < p.first.n) export_step(p, s, step, b, d0, nd, t, cur.dt, cur.clamp);
    finish_output(p, b, d0, nd, t, dskip, cur, y);
  }
  if (p.last) store_last_state(p, s, b, d0, nd);
}


template <typename T>
void run_scan(const Params<T>& p) {
  const int64_t blocks = (p.D + lanes<T>() - 1) / lanes<T>();
  const unsigned mode = FpModeGuard::current();
  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    FpModeGuard guard(mode);
    Scratch<T> s(p.N);
    for (int64_t task = begin; task < end; ++task)
      scan_block(p, task / blocks, (task % blocks) * lanes<T>(), s);
  });
}

template <typename T>
View3<T> view3(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// B/C's layout from its rank; shapes were validated in Python.
template <typename T>
BCView<T> bc_view(const at::Tensor& m, int64_t D) {
  const T* p = m.data_ptr<T>();
  if (m.dim() == 2) return {p, 0, m.stride(0), m.stride(1), 0, 1};
  if (m.dim() == 3) return {p, m.stride(0), 0, m.stride(1), m.stride(2), D};
  return {p, m.stride(0), m.stride(1), m.stride(2), m.stride(3), D / m.size(1)};
}

template <typename T>
FirstStepsOut<T> first_steps_out(const std::optional<at::Tensor>& dt, const std::optional<at::Tensor>& abar,
                                 const std::optional<at::Tensor>& B, int64_t n) {
  FirstStepsOut<T> o;
  if (!dt || n == 0) return o;
  o.n = n;
  o.dt = dt->data_ptr<T>(), o.dt_s = dt->stride(0), o.dt_b = dt->stride(1), o.dt_d = dt->stride(2);
  o.abar = abar->data_ptr<T>(), o.ab_s = abar->stride(0), o.ab_b = abar->stride(1);
  o.ab_n = abar->stride(2), o.ab_d = abar->stride(3);
  if (B) o.B = B->data_ptr<T>(), o.b_s = B->stride(0), o.b_b = B->stride(1), o.b_n = B->stride(2);
  return o;
}

template <typename T>
Params<T> make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                      const at::Tensor& C, const std::optional<at::Tensor>& Dskip,
                      const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& scale, const at::Tensor& y,
                      const std::optional<at::Tensor>& last) {
  Params<T> p;
  p.batch = u.size(0), p.D = u.size(1), p.L = u.size(2), p.N = A.size(1);
  p.u = view3<T>(u), p.delta = view3<T>(delta), p.y = view3<T>(y);
  if (z) p.z = view3<T>(*z);
  p.A = A.data_ptr<T>(), p.sAd = A.stride(0), p.sAn = A.stride(1);
  p.B = bc_view<T>(B, p.D), p.C = bc_view<T>(C, p.D);
  if (Dskip) p.Dskip = Dskip->data_ptr<T>(), p.sDskip = Dskip->stride(0);
  if (bias) p.bias = bias->data_ptr<T>(), p.sbias = bias->stride(0);
  if (scale) p.scale = scale->data_ptr<T>(), p.sscale_b = scale->stride(0), p.sscale_t = scale->stride(1);
  if (last) p.last = last->data_ptr<T>(), p.slast_b = last->stride(0), p.slast_d = last->stride(1),
            p.slast_n = last->stride(2);
  return p;
}

void check_inputs(const at::Tensor& u, std::initializer_list<const std::optional<at::Tensor>*> opts,
                  std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == u.scalar_type(),
                "selective_scan_cpu: every tensor must be a CPU tensor of u's dtype");
  for (const std::optional<at::Tensor>* t : opts)
    TORCH_CHECK(!t->has_value() || ((*t)->device().is_cpu() && (*t)->scalar_type() == u.scalar_type()),
                "selective_scan_cpu: every tensor must be a CPU tensor of u's dtype");
  TORCH_CHECK(u.dim() == 3, "selective_scan_cpu: u must be (batch, D, L)");
}

// Fills y (and last, and the first-step exports) in place. Everything arrives validated, in one dtype.
void selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const std::optional<at::Tensor>& Dskip,
                        const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                        bool softplus, const std::optional<at::Tensor>& scale, bool reverse, const at::Tensor& y,
                        const std::optional<at::Tensor>& last, const std::optional<at::Tensor>& out_dt,
                        const std::optional<at::Tensor>& out_abar, const std::optional<at::Tensor>& out_B,
                        int64_t n_first) {
  check_inputs(u, {&Dskip, &z, &bias, &scale, &last, &out_dt, &out_abar, &out_B}, {&delta, &A, &B, &C, &y});
  TORCH_CHECK(n_first == 0 || (out_dt && out_abar && !scale && n_first <= u.size(2)),
              "selective_scan_cpu: bad first-step exports");
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu", [&] {
    Params<scalar_t> p = make_params<scalar_t>(u, delta, A, B, C, Dskip, z, bias, scale, y, last);
    p.softplus = softplus, p.reverse = reverse;
    p.first = first_steps_out<scalar_t>(out_dt, out_abar, out_B, n_first);
    run_scan(p);
  });
}

// Mamba's short causal convolution, then SiLU, over channel-last rows (twin: stm_ref.vim.causal_conv1d):
// y[b, t, :] = silu(bias + sum_k w[k, :] * x[b, t - K + 1 + k, :]), zero history before t = 0; reverse:
// the same over the time-reversed sequence, y[b, t] = silu(bias + sum_k w[k] x[b, t + K - 1 - k]), zero
// after t = L - 1 (the backward direction without a flipped copy). One pass over x (the torch path makes
// K + 1); x may be a strided view of rows (the mixer's half of in_proj's output), y is contiguous.
constexpr int64_t kMaxTaps = 8;  // the window kept in registers; Mamba's convolutions have 4 taps

// One task = (batch item, block of lanes<T>() channels), walking t in scan order with the last K inputs in a
// register window: every input is loaded once and every output stored once.
template <typename T>
void conv_rows(const T* x, int64_t xsb, int64_t xst, const T* w, const T* bias, T* y, int64_t batch, int64_t L,
               int64_t E, int64_t K, bool silu, bool reverse) {
  const int64_t block = lanes<T>(), blocks = (E + block - 1) / block;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    Vec<T> win[kMaxTaps][kVecs], wv[kMaxTaps][kVecs], b0[kVecs], acc[kVecs], unused[kVecs];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, d0 = (task % blocks) * block, nd = std::min(block, E - d0);
      for (int64_t j = 0; j < K; ++j) {
        load_lanes(w + j * E + d0, 1, nd, wv[j]);
        for (int k = 0; k < kVecs; ++k) win[j][k] = Vec<T>(T(0));  // zero history
      }
      if (bias) load_lanes(bias + d0, 1, nd, b0);
      else
        for (int k = 0; k < kVecs; ++k) b0[k] = Vec<T>(T(0));
      for (int64_t s = 0; s < L; ++s) {
        const int64_t t = reverse ? L - 1 - s : s;
        for (int64_t j = 0; j + 1 < K; ++j)  // win[j] holds the input K - 1 - j steps back in scan order
          for (int k = 0; k < kVecs; ++k) win[j][k] = win[j + 1][k];
        load_lanes(x + b * xsb + t * xst + d0, 1, nd, win[K - 1]);
        for (int k = 0; k < kVecs; ++k) acc[k] = b0[k];
        for (int64_t j = 0; j < K; ++j)
          for (int k = 0; k < kVecs; ++k) acc[k] = at::vec::fmadd(wv[j][k], win[j][k], acc[k]);
        if (silu) activations<T, false, true>(unused, acc);
        store_lanes(y + (b * L + t) * E + d0, 1, nd, acc);
      }
    }
  });
}

void causal_conv_silu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                      bool silu, bool reverse, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(2) &&
                  y.is_contiguous() && y.sizes() == x.sizes(),
              "causal_conv_silu: x (batch, L, E) rows with contiguous channels, w (K, E), y like x");
  check_inputs(x, {&bias}, {&w, &y});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_silu", [&] {
    const scalar_t* b = bias ? bias->data_ptr<scalar_t>() : nullptr;
    TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == x.size(2)), "causal_conv_silu: bias (E,)");
    TORCH_CHECK(w.size(0) <= kMaxTaps, "causal_conv_silu: at most ", kMaxTaps, " taps");
    conv_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), w.data_ptr<scalar_t>(), b,
                        y.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), w.size(0), silu, reverse);
  });
}

// sum_e a[e] * b[e] * c[e] (c may be null: then sum_e a[e] * b[e]).
template <typename T>
T dot3(const T* a, const T* b, const T* c, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc(T(0));
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    const Vec<T> ab = Vec<T>::loadu(a + e) * Vec<T>::loadu(b + e);
    acc = c ? at::vec::fmadd(ab, Vec<T>::loadu(c + e), acc) : acc + ab;
  }
  alignas(64) T lanes_out[W];
  acc.store(lanes_out);
  T sum = T(0);
  for (int64_t k = 0; k < W; ++k) sum += lanes_out[k];
  for (; e < n; ++e) sum += a[e] * b[e] * (c ? c[e] : T(1));
  return sum;
}

// STM's lsq weights of the ends plan (eq. 11; docs/conventions.md §4) from the scan's exported first steps,
// twin of stm_fast.merge._lsq_from_first_steps: d (n, S, batch, E), abar (n, S, batch, N, E), B (n, S, batch, N)
// contiguous, n > r; w (S, batch, r): w_j = <P_j * Bbar_j, Bbar_r>_F / |Bbar_r|_F^2 with Bbar = d (x) B and
// P_j = Abar_{j+1} ... Abar_r, formed from j = r - 1 down (one product per step, in a per-task buffer).
template <typename T>
void ends_lsq(const T* d, const T* abar, const T* B, T* w, int64_t S, int64_t batch, int64_t N, int64_t E,
              int64_t r, bool norm) {
  const int64_t lanes = S * batch;
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> P(N * E), de(E);
    for (int64_t sb = begin; sb < end; ++sb) {
      const T* dq = d + (r * lanes + sb) * E;
      const T* Bq = B + (r * lanes + sb) * N;
      T den = dot3<T>(dq, dq, nullptr, E) * dot3<T>(Bq, Bq, nullptr, N);
      den = std::max(den, std::numeric_limits<T>::min());  // 0 only if Bbar_r = 0, and then every num is 0
      std::copy(abar + (r * lanes + sb) * N * E, abar + (r * lanes + sb + 1) * N * E, P.begin());
      for (int64_t j = r - 1; j >= 0; --j) {
        const T* dj = d + (j * lanes + sb) * E;
        const T* Bj = B + (j * lanes + sb) * N;
        for (int64_t e = 0; e < E; ++e) de[e] = dj[e] * dq[e];
        T num = T(0);
        for (int64_t n = 0; n < N; ++n) num += Bj[n] * Bq[n] * dot3<T>(P.data() + n * E, de.data(), nullptr, E);
        T wj = num / den;
        w[sb * r + j] = norm ? std::min(std::max(wj, T(0)), T(1)) : wj;
        if (j > 0) {
          const T* aj = abar + (j * lanes + sb) * N * E;
          for (int64_t i = 0; i < N * E; ++i) P[i] *= aj[i];
        }
      }
    }
  });
}

void ends_lsq_weights(const at::Tensor& d, const at::Tensor& abar, const at::Tensor& B, int64_t r, bool norm,
                      const at::Tensor& w) {
  TORCH_CHECK(d.dim() == 4 && abar.dim() == 5 && B.dim() == 4 && w.dim() == 3 && d.is_contiguous() &&
                  abar.is_contiguous() && B.is_contiguous() && w.is_contiguous() && r >= 1 && d.size(0) > r &&
                  abar.size(0) >= d.size(0) && B.size(0) >= d.size(0) && w.size(0) == d.size(1) &&
                  w.size(1) == d.size(2) && w.size(2) == r,
              "ends_lsq_weights: d (n, S, batch, E), abar (n, S, batch, N, E), B (n, S, batch, N) contiguous, n > r, "
              "w (S, batch, r)");
  for (const at::Tensor* t : {&d, &abar, &B, &w})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == d.scalar_type(), "ends_lsq_weights: CPU tensors of one dtype");
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "ends_lsq_weights", [&] {
    ends_lsq<scalar_t>(d.data_ptr<scalar_t>(), abar.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(),
                       w.data_ptr<scalar_t>(), d.size(1), d.size(2), abar.size(3), d.size(3), r, norm);
  });
}

// The floor's exp2 rate (stm_fast/floor.py): out = 2^(x * a2), a2 = 1, by the scan's own decay code (four
// vectors in lock step, as update_states), over a cache-resident float buffer, repeats times, on torch's threads.
void exp2_decays_into(const at::Tensor& x, const at::Tensor& out, int64_t repeats) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && out.is_contiguous() &&
                  out.scalar_type() == at::kFloat && out.numel() == x.numel(),
              "exp2_decays_into: contiguous float tensors of one size");
  constexpr int G = 4;
  constexpr int64_t kChunk = G * Vec<float>::size();
  const int64_t chunks = x.numel() / kChunk;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < repeats; ++r) {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      Vec<float> dt[G], a2[G], e[G];
      for (int j = 0; j < G; ++j) a2[j] = Vec<float>(1.f);
      for (int64_t c = begin; c < end; ++c) {
        for (int j = 0; j < G; ++j) dt[j] = Vec<float>::loadu(src + c * kChunk + j * Vec<float>::size());
        exp2_decays<false, G>(dt, a2, e);
        for (int j = 0; j < G; ++j) e[j].store(dst + c * kChunk + j * Vec<float>::size());
      }
    });
  }
}

// What the build actually vectorises with: lets Python report (and tests check) the capability.
std::string build_info() {
  std::string cap = "DEFAULT";
#if defined(CPU_CAPABILITY_AVX512)
  cap = "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  cap = "AVX2";
#endif
  return cap + " float_lanes=" + std::to_string(Vec<float>::size()) + " double_lanes=" +
         std::to_string(Vec<double>::size()) + " block_vectors=" + std::to_string(kVecs);
}

}  // namespace

// One operator namespace per build (TORCH_EXTENSION_NAME carries the source hash), so builds of other
// versions of this file can be loaded into the same process. y and the optional outputs are written.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool softplus, Tensor? scale, bool reverse, Tensor(a!) y, Tensor(b!)? last, "
        "Tensor(c!)? out_dt, Tensor(d!)? out_abar, Tensor(e!)? out_B, int n_first) -> ()",
        &selective_scan_fwd);
  m.def("build_info() -> str", &build_info);
  m.def("ends_lsq_weights(Tensor d, Tensor abar, Tensor B, int r, bool norm, Tensor(a!) w) -> ()", &ends_lsq_weights);
  m.def("causal_conv_silu(Tensor x, Tensor w, Tensor? bias, bool silu, bool reverse, Tensor(a!) y) -> ()", &causal_conv_silu);
  m.def("exp2_decays_into(Tensor x, Tensor(a!) out, int repeats) -> ()", &exp2_decays_into);
}
