// palitorch::skinny_linear(x [..., K], w [N, K]) -> x @ w.T, float32 or bfloat16, for a few rows of x by a large
// weight; or, for an int8 weight (palitorch/model/quant.py), x @ w.T in float32 for the caller to scale.
//
// Such a product (a decode step's: one row per sequence) is bound by reading the weight from memory. On the
// 2-core VMs of BENCHMARKS.md one core streams ~12-15 GB/s whatever the kernel, so what counts is how many cache
// misses each core keeps in flight. This kernel reads NS weight rows side by side, from NS places far apart in the
// thread's share of the weight, so that each core follows NS sequential streams at once; BLAS's one-row path reads
// one. Measured on the Intel Xeon VM (benchmarks/bench_linear.py, the mid-size model's weights): 26-28 GB/s at one
// row against MKL's 24-26; 1.2-1.35x oneDNN's speed at 4-12 rows.
//
// bfloat16 weights are widened to float32 as they are read (a bfloat16 is a float32's top 16 bits) and the sums
// are kept in float32, then rounded to bfloat16 once, as torch's bfloat16 matmuls do; x is widened once up front.
// int8 weights are widened to float32 as they are read too (exactly: every int8 is a float32), with float32 x (a
// bfloat16 x is widened once), so the sums are those of the dequantized weight before its row scale: a quarter of
// float32's bytes to read per value.
// On CPUs with AVX512-BF16 but no AMX (AMD Zen 4 on), bfloat16 products take that extension's pair-product
// instruction instead (`pair_rows`: 32 weights times 32 inputs, summed in pairs into 16 float32 lanes, with nothing
// to widen): on the AMD EPYC VM of BENCHMARKS.md, the mid-size model's weights at 4 / 8 rows in 15.5 / 21.0 ms
// where widening took 18.8 / 27.5 and torch 22.7 / 25.6 (the same at one row). On the Intel Xeon VM it had timed no
// faster at one row and slower at 4-12 (there it issues on one port where the FMAs use two), and that CPU has AMX:
// builds with AMX keep widening. On CPUs with AMX, bfloat16 products of suitable shapes take AMX tiles instead
// (`amx_product`), whatever the number of rows.
//
// Built on first use by palitorch/native/__init__.py for this machine (-march=native); the vector code is picked
// by the compiler's target macros: AVX-512, AVX2 + FMA, or plain scalar C++ (correct anywhere; the per-process
// timing in palitorch/model/kernels.py keeps torch's kernels where it is slower).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__AMX_TILE__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define PALITORCH_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__) && !defined(PALITORCH_AMX)
#define PALITORCH_PAIRS 1  // bfloat16 pair products (see above)
#endif

namespace {

#if defined(PALITORCH_PAIRS)
constexpr bool kPairs = true;
#else
constexpr bool kPairs = false;
#endif

inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(uint16_t v) {  // one bfloat16's bits -> float32
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
inline Vec vload(const uint16_t* p) {  // 16 bfloat16 -> float32: zero-extend, then shift into the top half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline Vec vload(const int8_t* p) {  // 16 int8 -> float32: sign-extend, then convert
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec vload(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline Vec vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#else
constexpr int kLanes = 1;
using Vec = float;
inline Vec vzero() { return 0.f; }
inline Vec vload(const float* p) { return *p; }
inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
inline float vsum(Vec a) { return a; }
inline Vec vload(const uint16_t* p) { return widen(*p); }
inline Vec vload(const int8_t* p) { return widen(*p); }
#endif

// The outputs of `rows` and `pair_rows`: each accumulator's lanes summed, then the k past the last full vector.
template <int NS, int B, typename W, typename X>
inline void finish(const Vec (&acc)[NS][B], const W* const* p, const X* x, float* y, int64_t k, int64_t K, int64_t N,
                   int64_t r, int64_t stride) {
  for (int g = 0; g < NS; ++g)
    for (int b = 0; b < B; ++b) {
      float s = vsum(acc[g][b]);
      for (int64_t j = k; j < K; ++j) s += widen(p[g][j]) * widen(x[b * K + j]);
      y[b * N + r + g * stride] = s;
    }
}

// y[b, r + g * stride] = w[r + g * stride] . x[b] for g < NS, b < B: NS weight rows, `stride` rows apart, each
// read once for all B input rows; NS * B accumulators (8 or more) hide the FMA latency. W is the weight's element:
// float, or uint16_t for bfloat16's bits. Each output is summed in the same order whatever NS and B (vector lanes
// over k, then the lanes, then the leftover k), so a row's result does not depend on the other rows of x: a
// request gets the same numbers alone or in a batch. (Two accumulators per output at one row timed no faster.)
template <int NS, int B, typename W>
inline void rows(const W* w, const float* x, float* y, int64_t K, int64_t N, int64_t r, int64_t stride) {
  Vec acc[NS][B];
  const W* p[NS];
  for (int g = 0; g < NS; ++g) {
    p[g] = w + (r + g * stride) * K;
    for (int b = 0; b < B; ++b) acc[g][b] = vzero();
  }
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vec xv[B];
    for (int b = 0; b < B; ++b) xv[b] = vload(x + b * K + k);
    for (int g = 0; g < NS; ++g) {
      const Vec wv = vload(p[g] + k);
      for (int b = 0; b < B; ++b) acc[g][b] = vfma(wv, xv[b], acc[g][b]);
    }
  }
  finish<NS, B>(acc, p, x, y, k, K, N, r, stride);
}

#if defined(PALITORCH_PAIRS)
// `rows` for bfloat16 weights and inputs (their bits), by pair products: each step multiplies 32 weights by 32
// inputs and adds the pairs' sums to 16 float32 lanes (products of two bfloat16 are exact in float32). Each output
// is summed in one order whatever NS and B, as in `rows`.
template <int NS, int B>
inline void pair_rows(const uint16_t* w, const uint16_t* x, float* y, int64_t K, int64_t N, int64_t r,
                      int64_t stride) {
  Vec acc[NS][B];  // __m512: pair products are built with AVX-512 only
  const uint16_t* p[NS];
  for (int g = 0; g < NS; ++g) {
    p[g] = w + (r + g * stride) * K;
    for (int b = 0; b < B; ++b) acc[g][b] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv[B];
    for (int b = 0; b < B; ++b) xv[b] = (__m512bh)_mm512_loadu_si512(x + b * K + k);
    for (int g = 0; g < NS; ++g) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(p[g] + k);
      for (int b = 0; b < B; ++b) acc[g][b] = _mm512_dpbf16_ps(acc[g][b], wv, xv[b]);
    }
  }
  finish<NS, B>(acc, p, x, y, k, K, N, r, stride);
}
#endif

// Weight rows [r0, r1) for B input rows: NS streams over the span, then the rows left over one by one. X is x's
// element: float, or (with pair products) uint16_t for bfloat16's bits.
template <int NS, int B, typename W, typename X>
void span(const W* w, const X* x, float* y, int64_t K, int64_t N, int64_t r0, int64_t r1) {
  const int64_t len = (r1 - r0) / NS;
  if constexpr (std::is_same_v<X, float>) {
    for (int64_t i = 0; i < len; ++i) rows<NS, B>(w, x, y, K, N, r0 + i, len);
    for (int64_t r = r0 + NS * len; r < r1; ++r) rows<1, B>(w, x, y, K, N, r, 0);
  } else {  // bfloat16 x: only called where pair products are built (kPairs)
#if defined(PALITORCH_PAIRS)
    for (int64_t i = 0; i < len; ++i) pair_rows<NS, B>(w, x, y, K, N, r0 + i, len);
    for (int64_t r = r0 + NS * len; r < r1; ++r) pair_rows<1, B>(w, x, y, K, N, r, 0);
#endif
  }
}

// How many weight rows a block of B input rows reads side by side (NS in `rows`): 8 streams at one row, fewer as
// each weight value feeds more accumulators (NS * B of them). From four rows on, builds with AVX512-BF16 and no AMX
// (AMD Zen 4) read more streams than the registers hold accumulators for (at B = 8: 32 accumulators and 8 inputs
// in 32 registers, so some live in L1): on the AMD EPYC VM of BENCHMARKS.md (session 19) a pass over the mid-size
// model's weights took 10-22% less time at 4-8 rows in float32 and 4-26% in bfloat16 (the 3B shapes in bfloat16:
// 8% at 4 rows, 20% at 8), 15-20% less at 9-12 rows in float32 and 6-8% in bfloat16 with 3 streams, the same at
// 1-3 rows. Other builds keep two streams from four rows on, as measured on the Intel VM.
template <int B>
constexpr int streams() {
  if constexpr (B <= 3) return B == 1 ? 8 : B == 2 ? 4 : 3;
  else if constexpr (kPairs) return B == 4 ? 6 : B <= 8 ? 4 : 3;
  else return 2;
}

// Input rows [m, m + B): the thread's span of the weight, read once for them -> B.
template <int B, typename W, typename X>
int64_t block(const W* wp, const X* xp, float* yp, int64_t m, int64_t K, int64_t N, int64_t r0, int64_t r1) {
  span<streams<B>(), B>(wp, xp + m * K, yp + m * N, K, N, r0, r1);
  return B;
}

// y [M, N] = x [M, K] @ w.T, float32 y: threads split the weight's rows, input rows go in blocks of up to 12, each
// block reading the thread's span of the weight once.
template <typename W, typename X>
void product(const W* wp, const X* xp, float* yp, int64_t M, int64_t K, int64_t N) {
  at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t m = 0; m < M;) {
      switch (std::min<int64_t>(M - m, 12)) {
        case 1: m += block<1>(wp, xp, yp, m, K, N, r0, r1); break;
        case 2: m += block<2>(wp, xp, yp, m, K, N, r0, r1); break;
        case 3: m += block<3>(wp, xp, yp, m, K, N, r0, r1); break;
        case 4: m += block<4>(wp, xp, yp, m, K, N, r0, r1); break;
        case 5: m += block<5>(wp, xp, yp, m, K, N, r0, r1); break;
        case 6: m += block<6>(wp, xp, yp, m, K, N, r0, r1); break;
        case 7: m += block<7>(wp, xp, yp, m, K, N, r0, r1); break;
        case 8: m += block<8>(wp, xp, yp, m, K, N, r0, r1); break;
        case 9: m += block<9>(wp, xp, yp, m, K, N, r0, r1); break;
        case 10: m += block<10>(wp, xp, yp, m, K, N, r0, r1); break;
        case 11: m += block<11>(wp, xp, yp, m, K, N, r0, r1); break;
        default: m += block<12>(wp, xp, yp, m, K, N, r0, r1); break;
      }
    }
  });
}

#if defined(PALITORCH_AMX)
// bfloat16 on CPUs with AMX (Intel Xeon from Sapphire Rapids on): a tile instruction multiplies a 16 x 32 block of
// the weight by a 32 x 16 block of x transposed (bfloat16 pairs, products summed into float32), so the product
// costs a few instructions per kilobyte of weight, where widening and FMAs bound the vector code from a few rows on.
// Linux hands AMX's tile registers only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA).
bool amx_usable() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// y[m, n0 + r] for m < M <= 16, r < 16: tile 0 (float32 sums, 16 weight rows x 16 columns of x) accumulates tile 1
// (16 weight rows x 32 k, read from 16 rows of w at once) times tile 2 (x's 32 k x 16 columns, packed in pairs).
// Each output is summed in the same order whatever M, so results do not depend on the other rows here either.
void amx_block(const uint16_t* w, const uint32_t* xp, float* y, int64_t K, int64_t N, int64_t M, int64_t n0) {
  _tile_zero(0);
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(2, xp + k * 8, 64);  // block k / 32 of the packed x: 256 pairs
    _tile_loadd(1, w + n0 * K + k, K * 2);
    _tile_dpbf16ps(0, 1, 2);
  }
  alignas(64) float out[16][16];
  _tile_stored(0, out, 64);
  for (int r = 0; r < 16; ++r)
    for (int64_t m = 0; m < M; ++m) y[m * N + n0 + r] = out[r][m];
}

// y [M, N] = x @ w.T for bfloat16 x and w, K % 32 == 0 and N % 16 == 0: x in blocks of 16 rows, each packed as
// AMX wants it ([K / 32][16 k-pairs][16 rows] of bfloat16 pairs, zeros past the block's rows), threads over w's rows.
void amx_product(const uint16_t* w, const uint16_t* x, float* y, int64_t M, int64_t K, int64_t N) {
  std::vector<uint32_t> packed(K * 8);  // zeros
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t mb = std::min<int64_t>(16, M - m0);
    if (m0 > 0 && mb < 16) std::fill(packed.begin(), packed.end(), 0u);  // a last, partial block after full ones
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t p = 0; p < K / 2; ++p)  // the pair x[m, 2p], x[m, 2p + 1]
        std::memcpy(&packed[(p / 16) * 256 + (p % 16) * 16 + m], x + (m0 + m) * K + 2 * p, 4);
    at::parallel_for(0, N / 16, 4, [&](int64_t b0, int64_t b1) {
      TileConfig cfg;
      for (int t = 0; t < 3; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
      }
      _tile_loadconfig(&cfg);
      for (int64_t b = b0; b < b1; ++b) amx_block(w, packed.data(), y + m0 * N, K, N, mb, b * 16);
      _tile_release();
    });
  }
}
#else
bool amx_usable() { return false; }
void amx_product(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t) {}
#endif

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w) {
  const bool bf16 = w.scalar_type() == at::kBFloat16, int8 = w.scalar_type() == at::kChar;
  TORCH_CHECK(int8 ? x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16
                   : x.scalar_type() == w.scalar_type() && (bf16 || w.scalar_type() == at::kFloat),
              "skinny_linear: x and w must both be float32 or both bfloat16, or w int8 and x float32 or bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "skinny_linear: the weight must be a contiguous 2D tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "skinny_linear: x's last dimension must match w's columns");
  const int64_t K = w.size(1), N = w.size(0), M = K ? x.numel() / K : 0;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return int8 ? y : y.to(x.scalar_type());
  float* yp = y.data_ptr<float>();
  if (int8) {  // float32 out, unscaled
    const at::Tensor xc = x.to(at::kFloat).contiguous();
    product(w.data_ptr<int8_t>(), xc.data_ptr<float>(), yp, M, K, N);
    return y;
  }
  if (!bf16) {
    const at::Tensor xc = x.contiguous();
    product(w.data_ptr<float>(), xc.data_ptr<float>(), yp, M, K, N);
    return y;
  }
  static_assert(sizeof(c10::BFloat16) == sizeof(uint16_t));
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  if (K % 32 == 0 && N % 16 == 0 && amx_usable()) {  // every row count, so a row's result never depends on M
    const at::Tensor xc = x.contiguous();
    amx_product(wp, reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>()), yp, M, K, N);
  } else if (kPairs) {
    const at::Tensor xc = x.contiguous();
    product(wp, reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>()), yp, M, K, N);
  } else {
    const at::Tensor xc = x.to(at::kFloat).contiguous();  // widened once
    product(wp, xc.data_ptr<float>(), yp, M, K, N);
  }
  return y.to(at::kBFloat16);  // rounded to nearest even, once
}

at::Tensor skinny_linear_meta(const at::Tensor& x, const at::Tensor& w) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return at::empty(sizes, x.options().dtype(w.scalar_type() == at::kChar ? at::kFloat : x.scalar_type()));
}

int64_t skinny_lanes() { return kLanes; }  // which vector code was compiled: 16, 8 or 1 floats at a time
bool skinny_amx() { return amx_usable(); }   // whether bfloat16 products of suitable shapes take the AMX path
bool skinny_pairs() { return kPairs; }     // whether other bfloat16 products take AVX512-BF16's pair products

}  // namespace

TORCH_LIBRARY_FRAGMENT(palitorch, m) {
  m.def("skinny_linear(Tensor x, Tensor w) -> Tensor");
  m.def("skinny_lanes() -> int", &skinny_lanes);
  m.def("skinny_amx() -> bool", &skinny_amx);
  m.def("skinny_pairs() -> bool", &skinny_pairs);
}
TORCH_LIBRARY_IMPL(palitorch, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
TORCH_LIBRARY_IMPL(palitorch, Meta, m) { m.impl("skinny_linear", &skinny_linear_meta); }
