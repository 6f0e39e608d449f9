// Vector helpers shared by the CPU scan kernels (selective_scan_cpu.cpp: inference; selective_scan_cpu_grad.cpp:
// training): ATen Vectorized aliases, lane loads and stores, the float decay polynomial, the FP-mode guard.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define STM_HAVE_MXCSR 1
#endif

namespace {

// The inliner's choices changed with unrelated edits (an uninlined polynomial cost 1.8x); pin them.
#define STM_HOT C10_ALWAYS_INLINE

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int kVecs = 2;  // vectors per channel block: 2 x 8 floats keeps 16-channel rows in one cache line

template <typename T>
constexpr int64_t lanes() { return kVecs * Vec<T>::size(); }

// count lanes of a strided row into kVecs vectors (zeros past count, so tails stay finite).
template <typename T>
STM_HOT void load_lanes(const T* p, int64_t stride, int64_t count, Vec<T>* out) {
  constexpr int64_t W = Vec<T>::size();
  if (stride == 1) {
    for (int k = 0; k < kVecs; ++k) {
      const int64_t c = count - k * W;
      out[k] = c >= W ? Vec<T>::loadu(p + k * W) : c > 0 ? Vec<T>::loadu(p + k * W, c) : Vec<T>(T(0));
    }
    return;
  }
  alignas(64) T tmp[lanes<T>()] = {};
  for (int64_t i = 0; i < count; ++i) tmp[i] = p[i * stride];
  for (int k = 0; k < kVecs; ++k) out[k] = Vec<T>::loadu(tmp + k * W);
}

template <typename T>
STM_HOT void store_lanes(T* p, int64_t stride, int64_t count, const Vec<T>* v) {
  constexpr int64_t W = Vec<T>::size();
  if (stride == 1) {
    for (int k = 0; k < kVecs; ++k) {
      const int64_t c = count - k * W;
      if (c >= W) v[k].store(p + k * W);
      else if (c > 0) v[k].store(p + k * W, c);
    }
    return;
  }
  alignas(64) T tmp[lanes<T>()];
  for (int k = 0; k < kVecs; ++k) v[k].store(tmp + k * W);
  for (int64_t i = 0; i < count; ++i) p[i * stride] = tmp[i];
}

// i << 23, i.e. 2^i's exponent field. ATen's operator<< is a variable shift (vpsllvd), slower than the
// immediate form on AVX2.
STM_HOT at::vec::Vectorized<int32_t> exponent_field(const at::vec::Vectorized<int32_t>& i) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_slli_epi32(i, 23);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_slli_epi32(i, 23);
#else
  return i << at::vec::Vectorized<int32_t>(23);
#endif
}

// The decays Abar = 2^(dt * A log2 e) of G (state, lane-vector) pairs: the kernel's hot spot, N per
// channel and step. double: ATen's Sleef exp2 (1 ulp), accuracy first.
template <bool kClamp, int G>
STM_HOT void exp2_decays(const Vec<double>* dt, const Vec<double>* a2, Vec<double>* out) {
  for (int j = 0; j < G; ++j) out[j] = (dt[j] * a2[j]).exp2();
}

// 2^(i + f) from t = i + 1.5 * 2^23 (i in the low mantissa bits) and f in [-1/2, 1/2]: a degree-6
// minimax polynomial for 2^f (relative error 2e-9), i added into its exponent. Degree 5 (8e-8) was
// biased by 5e-8 on average, which a long scan of decays near 1 accumulates coherently (10x the error
// of the torch backend on the last state). Needs -126 <= i + f and i <= 127 (normal results).
// G values advance in lock step, one Horner step for all at a time: Zen's small FP scheduler otherwise
// holds about one dependency chain at once (measured 20 -> 15 cycles per vector with G = 8).
template <int G>
STM_HOT void pow2_parts(const Vec<float>* t, const Vec<float>* f, Vec<float>* out) {
  static constexpr float c[] = {1.f, 6.93147182e-1f, 2.40226462e-1f, 5.55032864e-2f, 9.61848907e-3f,
                                1.33999309e-3f, 1.53458124e-4f};
  Vec<float> p[G];
  for (int j = 0; j < G; ++j) p[j] = at::vec::fmadd(f[j], Vec<float>(c[6]), Vec<float>(c[5]));
  for (int k = 4; k >= 0; --k)
    for (int j = 0; j < G; ++j) p[j] = at::vec::fmadd(f[j], p[j], Vec<float>(c[k]));
  for (int j = 0; j < G; ++j)
    out[j] = at::vec::cast<float>(at::vec::cast<int32_t>(p[j]) + exponent_field(at::vec::cast<int32_t>(t[j])));
}

// 1.5 * 2^23: adding it to |x| < 2^22 rounds x to an integer, held in the low mantissa bits.
inline Vec<float> kShifter() { return Vec<float>(12582912.f); }

// float decays: inline instead of a call into Sleef, which spills the loop's registers and measured 2x
// slower per decay on AVX2. Unclamped (the caller checked |dt * a2| <= 125), the product is folded into
// the rounding: one FMA rounds dt*a2 to an integer, another gives the exact remainder. Clamped, the
// argument is limited to [-126, 127]: a decay below 2^-126 becomes 2^-126 rather than a subnormal.
template <bool kClamp, int G>
STM_HOT void exp2_decays(const Vec<float>* dt, const Vec<float>* a2, Vec<float>* out) {
  Vec<float> t[G], f[G];
  for (int j = 0; j < G; ++j) {
    if (kClamp) {
      // NaN-propagating bounds (ATen's clamp would turn a NaN into -126)
      const Vec<float> x = at::vec::maximum(at::vec::minimum(dt[j] * a2[j], Vec<float>(127.f)), Vec<float>(-126.f));
      t[j] = x + kShifter();
      f[j] = x - (t[j] - kShifter());
    } else {
      t[j] = at::vec::fmadd(dt[j], a2[j], kShifter());
    }
  }
  if (!kClamp)
    for (int j = 0; j < G; ++j) f[j] = at::vec::fmsub(dt[j], a2[j], t[j] - kShifter());
  pow2_parts<G>(t, f, out);
}

// Workers follow the caller's flush-to-zero / denormals-are-zero mode (torch.set_flush_denormal sets it on
// the calling thread only): trained decays reach the subnormal range, where x86 arithmetic is far slower.
struct FpModeGuard {
#ifdef STM_HAVE_MXCSR
  static constexpr unsigned kMask = 0x8040u;  // FTZ | DAZ
  explicit FpModeGuard(unsigned mode) : saved(_mm_getcsr()) { _mm_setcsr((saved & ~kMask) | (mode & kMask)); }
  ~FpModeGuard() { _mm_setcsr(saved); }
  static unsigned current() { return _mm_getcsr(); }
  unsigned saved;
#else
  explicit FpModeGuard(unsigned) {}
  static unsigned current() { return 0; }
#endif
};

}  // namespace
