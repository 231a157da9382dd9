// Maths shared by fastsoft's CPU kernels (softmax_kl.cpp, layers.cpp): plain arithmetic that the
// compiler vectorises, and the run-time choice between an AVX2+FMA build and the baseline ISA.
#pragma once

#include <cmath>
#include <cstdint>

#define FS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define FS_X86 1
#else
#define FS_X86 0
#endif

namespace fastsoft {
namespace {

// exp(x) for fp32 in plain arithmetic so that loops around it vectorise: x = n ln2 + r,
// |r| <= ln2/2, e^r by the Cephes degree-7 polynomial (about 1 ulp); results below FLT_MIN flush
// to 0 (exp(-inf) = 0); NaN propagates.
FS_INLINE float exp_acc(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.3f ? 88.3f : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  float y = p * scale;
  return x < -87.3f ? 0.0f : y;
}

FS_INLINE double exp_acc(double x) { return std::exp(x); }

// Each fp32 kernel is compiled for AVX2+FMA and for the baseline ISA and chosen once at run time;
// fp64 (the tests' ground-truth path) uses the baseline build only.
#if FS_X86
#define FS_AVX2_ATTR __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
#define FS_AVX2_ATTR
inline bool cpu_has_avx2() { return false; }
#endif

}  // namespace
}  // namespace fastsoft
