// Differentiable CPU selective scan (training): the recurrence of the paper's eq. 3 forward with state
// checkpoints, and its reverse-mode gradient. Twin: stm_fast/ops/scan_autograd.py (the same function in
// torch ops, which materialises every state); float64 reference: stm_ref.ssm.
//
// Inputs are the caller's dta = Delta * decay scale (what enters Abar = exp(dta A)) and du = Delta * u
// (Euler's Bbar u = Delta B u), channel-last (batch, L, E); A (E, N); B, C (batch, L, N). Forward:
//   h_t = exp(dta_t A) h_{t-1} + du_t B_t,   y_t = C_t . h_t      (per channel, eq. 3)
// One task = one batch item; its channel blocks (lanes<T>() channels, SIMD over channels as in the
// inference kernel) run in turn, so the gradients of B and C, sums over channels, are accumulated by one
// thread without atomics. Every `chunk` steps the state entering the chunk is stored (ck); nothing of
// size L x E x N is kept. Backward: per chunk, last first, its states and decays are recomputed from the
// checkpoint into a per-task buffer (chunk x N x lanes, cache-resident), then walked backward with
//   g_t = C_t gy_t + Abar_{t+1} g_{t+1}                          (dL/dh_t)
//   dL/d dta_t = sum_n g_t h_{t-1} Abar_t A    dL/dA += g_t h_{t-1} Abar_t dta_t
//   dL/d du_t  = sum_n g_t B_t                  dL/dB_t = sum_e g_t du_t    dL/dC_t = sum_e gy_t h_t
// `reverse` scans t = L-1 .. 0 by index arithmetic (the backward direction without flipped copies).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace {

template <typename T>
struct TrainArgs {
  int64_t batch = 0, L = 0, E = 0, N = 0, chunk = 16;
  bool reverse = false;
  const T *dta = nullptr, *du = nullptr, *A = nullptr, *B = nullptr, *C = nullptr;
  int64_t time_of(int64_t step) const { return reverse ? L - 1 - step : step; }
  int64_t chunks() const { return (L + chunk - 1) / chunk; }
};

// A block's N states as N x kVecs vectors, stored from or loaded into rows of stride E (zeros past nd).
template <typename T>
void store_states(T* p, int64_t E, int64_t N, int64_t nd, const Vec<T>* h) {
  for (int64_t n = 0; n < N; ++n) store_lanes(p + n * E, 1, nd, &h[n * kVecs]);
}

template <typename T>
void load_states(const T* p, int64_t E, int64_t N, int64_t nd, Vec<T>* h) {
  for (int64_t n = 0; n < N; ++n) load_lanes(p + n * E, 1, nd, &h[n * kVecs]);
}

// A and A log2(e) of a block, N x kVecs vectors each (zeros past nd: those lanes decay by 2^0 = 1 and
// carry zero inputs, so they stay zero).
template <typename T>
void load_rates(const TrainArgs<T>& a, int64_t d0, int64_t nd, Vec<T>* A, Vec<T>* a2) {
  const Vec<T> log2e(T(1.4426950408889634));
  for (int64_t n = 0; n < a.N; ++n) {
    alignas(64) T row[lanes<T>()] = {};
    for (int64_t i = 0; i < nd; ++i) row[i] = a.A[(d0 + i) * a.N + n];
    load_lanes(row, 1, lanes<T>(), &A[n * kVecs]);
    for (int k = 0; k < kVecs; ++k) a2[n * kVecs + k] = A[n * kVecs + k] * log2e;
  }
}

// Abar of all N states at one step, 2^(dta A log2 e) by the inference kernel's clamped decay code, two
// states (2 kVecs vectors) in lock step.
template <typename T>
STM_HOT void step_decays(int64_t N, const Vec<T>* dta, const Vec<T>* a2, Vec<T>* out) {
  Vec<T> d[2 * kVecs];
  for (int j = 0; j < 2 * kVecs; ++j) d[j] = dta[j % kVecs];
  int64_t n = 0;
  for (; n + 2 <= N; n += 2) exp2_decays<true, 2 * kVecs>(d, &a2[n * kVecs], &out[n * kVecs]);
  for (; n < N; ++n) exp2_decays<true, kVecs>(d, &a2[n * kVecs], &out[n * kVecs]);
}

// One step of eq. 3 for a block: h <- abar * h_prev + du B_t (h and h_prev may alias).
template <typename T>
STM_HOT void advance(int64_t N, const T* Bt, const Vec<T>* du, const Vec<T>* abar, const Vec<T>* h_prev, Vec<T>* h) {
  for (int64_t n = 0; n < N; ++n) {
    const Vec<T> bn(Bt[n]);
    for (int k = 0; k < kVecs; ++k) {
      const int64_t i = n * kVecs + k;
      h[i] = at::vec::fmadd(abar[i], h_prev[i], du[k] * bn);
    }
  }
}

template <typename T>
T lane_sum(const Vec<T>& v) {
  alignas(64) T tmp[Vec<T>::size()];
  v.store(tmp);
  T s = T(0);
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += tmp[i];
  return s;
}

// Per-task buffers: A, A log2 e, the state (forward) or its gradient (backward), dL/dA, the chunk's
// entry state, and the chunk's recomputed states and decays.
template <typename T>
struct Work {
  Work(int64_t N, int64_t chunk)
      : A(N * kVecs), a2(N * kVecs), h(N * kVecs), gA(N * kVecs), h0(N * kVecs), H(chunk * N * kVecs),
        AB(chunk * N * kVecs) {}
  std::vector<Vec<T>> A, a2, h, gA, h0, H, AB;
};

template <typename T>
void forward_block(const TrainArgs<T>& a, int64_t b, int64_t d0, T* y, T* last, T* ck, Work<T>& w) {
  const int64_t nd = std::min<int64_t>(lanes<T>(), a.E - d0), N = a.N, E = a.E;
  load_rates(a, d0, nd, w.A.data(), w.a2.data());
  std::fill(w.h.begin(), w.h.end(), Vec<T>(T(0)));
  Vec<T> dta[kVecs], du[kVecs], yv[kVecs];
  for (int64_t step = 0; step < a.L; ++step) {
    if (step % a.chunk == 0) store_states(ck + (b * a.chunks() + step / a.chunk) * N * E + d0, E, N, nd, w.h.data());
    const int64_t row = b * a.L + a.time_of(step);
    load_lanes(a.dta + row * E + d0, 1, nd, dta);
    load_lanes(a.du + row * E + d0, 1, nd, du);
    step_decays(N, dta, w.a2.data(), w.AB.data());
    advance(N, a.B + row * N, du, w.AB.data(), w.h.data(), w.h.data());
    const T* Ct = a.C + row * N;
    for (int k = 0; k < kVecs; ++k) yv[k] = Vec<T>(T(0));
    for (int64_t n = 0; n < N; ++n)
      for (int k = 0; k < kVecs; ++k) yv[k] = at::vec::fmadd(Vec<T>(Ct[n]), w.h[n * kVecs + k], yv[k]);
    store_lanes(y + row * E + d0, 1, nd, yv);
  }
  store_states(last + b * N * E + d0, E, N, nd, w.h.data());
}

template <typename T>
struct Grads {
  const T *ck = nullptr, *gy = nullptr, *glast = nullptr;  // (batch, chunks, N, E), (batch, L, E), (batch, N, E)
  T *g_dta = nullptr, *g_du = nullptr, *g_A = nullptr, *g_B = nullptr, *g_C = nullptr;
};

// The chunk [s0, s0 + K)'s states H[i] (after step s0 + i) and decays AB[i], from its checkpoint w.h0.
template <typename T>
void recompute_chunk(const TrainArgs<T>& a, int64_t b, int64_t d0, int64_t nd, int64_t s0, int64_t K, Work<T>& w) {
  const int64_t N = a.N, S = N * kVecs;
  Vec<T> dta[kVecs], du[kVecs];
  for (int64_t i = 0; i < K; ++i) {
    const int64_t row = b * a.L + a.time_of(s0 + i);
    load_lanes(a.dta + row * a.E + d0, 1, nd, dta);
    load_lanes(a.du + row * a.E + d0, 1, nd, du);
    step_decays(N, dta, w.a2.data(), &w.AB[i * S]);
    advance(N, a.B + row * N, du, &w.AB[i * S], i ? &w.H[(i - 1) * S] : w.h0.data(), &w.H[i * S]);
  }
}

// One step backward (see the file comment); w.h holds dL/dh_t's carry from step t + 1 and leaves with step t's.
template <typename T>
STM_HOT void backward_step(const TrainArgs<T>& a, const Grads<T>& g, int64_t row, int64_t d0, int64_t nd,
                           const Vec<T>* h_prev, const Vec<T>* h, const Vec<T>* abar, Work<T>& w) {
  const int64_t N = a.N, E = a.E;
  Vec<T> gy[kVecs], dta[kVecs], du[kVecs], gdta[kVecs], gdu[kVecs];
  load_lanes(g.gy + row * E + d0, 1, nd, gy);
  load_lanes(a.dta + row * E + d0, 1, nd, dta);
  load_lanes(a.du + row * E + d0, 1, nd, du);
  for (int k = 0; k < kVecs; ++k) gdta[k] = gdu[k] = Vec<T>(T(0));
  const T *Bt = a.B + row * N, *Ct = a.C + row * N;
  for (int64_t n = 0; n < N; ++n) {
    const Vec<T> bn(Bt[n]), cn(Ct[n]);
    Vec<T> acc_b(T(0)), acc_c(T(0));
    for (int k = 0; k < kVecs; ++k) {
      const int64_t i = n * kVecs + k;
      const Vec<T> gs = at::vec::fmadd(cn, gy[k], w.h[i]);
      const Vec<T> ga = gs * h_prev[i] * abar[i];
      gdta[k] = at::vec::fmadd(ga, w.A[i], gdta[k]);
      w.gA[i] = at::vec::fmadd(ga, dta[k], w.gA[i]);
      gdu[k] = at::vec::fmadd(gs, bn, gdu[k]);
      acc_b = at::vec::fmadd(gs, du[k], acc_b);
      acc_c = at::vec::fmadd(gy[k], h[i], acc_c);
      w.h[i] = abar[i] * gs;
    }
    g.g_B[row * N + n] += lane_sum(acc_b);
    g.g_C[row * N + n] += lane_sum(acc_c);
  }
  store_lanes(g.g_dta + row * E + d0, 1, nd, gdta);
  store_lanes(g.g_du + row * E + d0, 1, nd, gdu);
}

template <typename T>
void backward_block(const TrainArgs<T>& a, const Grads<T>& g, int64_t b, int64_t d0, Work<T>& w) {
  const int64_t nd = std::min<int64_t>(lanes<T>(), a.E - d0), N = a.N, E = a.E, S = N * kVecs;
  load_rates(a, d0, nd, w.A.data(), w.a2.data());
  if (g.glast) load_states(g.glast + b * N * E + d0, E, N, nd, w.h.data());
  else std::fill(w.h.begin(), w.h.end(), Vec<T>(T(0)));
  std::fill(w.gA.begin(), w.gA.end(), Vec<T>(T(0)));
  for (int64_t c = a.chunks() - 1; c >= 0; --c) {
    const int64_t s0 = c * a.chunk, K = std::min(a.chunk, a.L - s0);
    load_states(g.ck + (b * a.chunks() + c) * N * E + d0, E, N, nd, w.h0.data());
    recompute_chunk(a, b, d0, nd, s0, K, w);
    for (int64_t i = K - 1; i >= 0; --i)
      backward_step(a, g, b * a.L + a.time_of(s0 + i), d0, nd, i ? &w.H[(i - 1) * S] : w.h0.data(), &w.H[i * S],
                    &w.AB[i * S], w);
  }
  store_states(g.g_A + b * N * E + d0, E, N, nd, w.gA.data());
}

template <typename T>
TrainArgs<T> train_args(const at::Tensor& dta, const at::Tensor& du, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, bool reverse, int64_t chunk) {
  TrainArgs<T> a;
  a.batch = dta.size(0), a.L = dta.size(1), a.E = dta.size(2), a.N = A.size(1), a.chunk = chunk, a.reverse = reverse;
  a.dta = dta.data_ptr<T>(), a.du = du.data_ptr<T>(), a.A = A.data_ptr<T>(), a.B = B.data_ptr<T>(), a.C = C.data_ptr<T>();
  return a;
}

void check_train(const at::Tensor& dta, std::initializer_list<const at::Tensor*> ts, int64_t chunk) {
  TORCH_CHECK(dta.dim() == 3 && chunk >= 1, "scan_train: dta (batch, L, E), chunk >= 1");
  for (const at::Tensor* t : ts)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dta.scalar_type() && t->is_contiguous(),
                "scan_train: contiguous CPU tensors of one dtype");
}

// y (batch, L, E), last (batch, N, E) and the checkpoints ck (batch, chunks, N, E) are written.
void scan_train_fwd(const at::Tensor& dta, const at::Tensor& du, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, bool reverse, int64_t chunk, const at::Tensor& y, const at::Tensor& last,
                    const at::Tensor& ck) {
  check_train(dta, {&dta, &du, &A, &B, &C, &y, &last, &ck}, chunk);
  AT_DISPATCH_FLOATING_TYPES(dta.scalar_type(), "scan_train_fwd", [&] {
    const TrainArgs<scalar_t> a = train_args<scalar_t>(dta, du, A, B, C, reverse, chunk);
    const unsigned mode = FpModeGuard::current();
    at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
      FpModeGuard guard(mode);
      Work<scalar_t> w(a.N, a.chunk);
      for (int64_t b = begin; b < end; ++b)
        for (int64_t d0 = 0; d0 < a.E; d0 += lanes<scalar_t>())
          forward_block(a, b, d0, y.data_ptr<scalar_t>(), last.data_ptr<scalar_t>(), ck.data_ptr<scalar_t>(), w);
    });
  });
}

// g_dta, g_du (batch, L, E) and the per-item g_A (batch, N, E) are written; g_B, g_C (batch, L, N) arrive
// zeroed and are accumulated into.
void scan_train_bwd(const at::Tensor& dta, const at::Tensor& du, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, const at::Tensor& ck, const at::Tensor& gy,
                    const std::optional<at::Tensor>& glast, bool reverse, int64_t chunk, const at::Tensor& g_dta,
                    const at::Tensor& g_du, const at::Tensor& g_A, const at::Tensor& g_B, const at::Tensor& g_C) {
  check_train(dta, {&dta, &du, &A, &B, &C, &ck, &gy, &g_dta, &g_du, &g_A, &g_B, &g_C}, chunk);
  if (glast) check_train(dta, {&*glast}, chunk);
  AT_DISPATCH_FLOATING_TYPES(dta.scalar_type(), "scan_train_bwd", [&] {
    const TrainArgs<scalar_t> a = train_args<scalar_t>(dta, du, A, B, C, reverse, chunk);
    Grads<scalar_t> g;
    g.ck = ck.data_ptr<scalar_t>(), g.gy = gy.data_ptr<scalar_t>();
    g.glast = glast ? glast->data_ptr<scalar_t>() : nullptr;
    g.g_dta = g_dta.data_ptr<scalar_t>(), g.g_du = g_du.data_ptr<scalar_t>(), g.g_A = g_A.data_ptr<scalar_t>();
    g.g_B = g_B.data_ptr<scalar_t>(), g.g_C = g_C.data_ptr<scalar_t>();
    const unsigned mode = FpModeGuard::current();
    at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
      FpModeGuard guard(mode);
      Work<scalar_t> w(a.N, a.chunk);
      for (int64_t b = begin; b < end; ++b)
        for (int64_t d0 = 0; d0 < a.E; d0 += lanes<scalar_t>()) backward_block(a, g, b, d0, w);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("scan_train_fwd(Tensor dta, Tensor du, Tensor A, Tensor B, Tensor C, bool reverse, int chunk, "
        "Tensor(a!) y, Tensor(b!) last, Tensor(c!) ck) -> ()",
        &scan_train_fwd);
  m.def("scan_train_bwd(Tensor dta, Tensor du, Tensor A, Tensor B, Tensor C, Tensor ck, Tensor gy, Tensor? glast, "
        "bool reverse, int chunk, Tensor(a!) g_dta, Tensor(b!) g_du, Tensor(c!) g_A, Tensor(d!) g_B, "
        "Tensor(e!) g_C) -> ()",
        &scan_train_bwd);
}
