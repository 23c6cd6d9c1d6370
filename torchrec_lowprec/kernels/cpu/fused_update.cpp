// Fused sparse update of low-precision embedding rows, CPU (see kernels/spec.py for the
// contract and kernels/reference.py for the PyTorch oracle this matches bit for bit).
//
// One call: group the occurrences by row (LSD radix sort of (id, position), stable, so each
// row's gradients are summed in occurrence order), then one pass per touched row, parallel
// over chunks of touched rows. Rows are processed in blocks of kBlock so that the
// sequential sums over d (row-wise Adagrad, LSQ), which must run column 0 first, run as
// kBlock independent chains instead of one latency-bound chain.
//
// fused_update_many updates many tables in one call, in ONE parallel region: the threads
// work through the tables in order from shared counters, grouping a table (a whole table
// per thread, so grouping is parallel across tables) just before its touched rows are
// processed, in chunks taken by whichever thread is free (see run_jobs). Same bits, and
// same skipped-row counts, as one call per table.
//
// Must be compiled with -ffp-contract=off and without -ffast-math: every fp32 operation is
// the same IEEE operation, in the same order, as the reference's PyTorch ops. Python float
// scalars are cast to fp32 once, as PyTorch does for a scalar operand of an fp32 tensor op.
// (-fno-trapping-math is fine and lets GCC if-convert, hence vectorise, the clamp/select
// loops; it changes no value, only whether FP exception flags may be raised speculatively.)
// PyTorch details the code follows: `c / t` is `reciprocal(t) * c`; `t / c` is a true
// division; square roots are correctly rounded (the reference computes them in fp64 and
// rounds, which equals IEEE fp32 sqrt), so the CPU, CUDA and reference bits agree.

#include <torch/extension.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include "half.h"
#include "prefetch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <ostream>
#include <thread>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif


namespace {

constexpr int kBlock = 8;          // rows per block (independent reduction chains)
constexpr int kPrefetchAhead = 16;  // segments ahead whose row / state lines are prefetched
constexpr int kGradAhead = 6;       // segments ahead whose gradient slices are prefetched
constexpr int64_t kChunkRows = 256;  // touched rows per unit of parallel work
constexpr uint32_t kM1 = 0x7FEB352Du;
constexpr uint32_t kM2 = 0x846CA68Bu;
constexpr uint32_t kGolden = 0x9E3779B9u;

// ---------------------------------------------------------------------------------------
// fp16 <-> fp32 (half.h)

using torchrec_lowprec::f2h;
using torchrec_lowprec::h2f;

inline void h2f_n(const uint8_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = h2f(h);
  }
}

inline void f2h_n(const float* src, uint8_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), h);
  }
#endif
  for (; i < n; ++i) {
    uint16_t h = f2h(src[i]);
    std::memcpy(dst + 2 * i, &h, 2);
  }
}

// ---------------------------------------------------------------------------------------
// Counter-based hash (quant/rounding.py). mix32 there runs on int64 tensors: the first
// xor-shift sees all 64 bits (arithmetic shift), the multiplies keep the low 32 bits.

inline uint32_t mix32_u32(uint32_t x) {
  x ^= x >> 16;
  x *= kM1;
  x ^= x >> 15;
  x *= kM2;
  x ^= x >> 16;
  return x;
}

inline uint32_t mix32_i64(int64_t x) {
  uint32_t y = static_cast<uint32_t>(x ^ (x >> 16));
  y *= kM1;
  y ^= y >> 15;
  y *= kM2;
  y ^= y >> 16;
  return y;
}

// row_keys(key, global_row)
inline uint32_t row_key(int64_t key, int64_t grow) {
  const int64_t lo = grow & int64_t{0xFFFFFFFF};
  const int64_t hi = grow >> 32;
  const int64_t a = static_cast<int64_t>(mix32_i64(lo ^ key));
  return mix32_i64(a ^ hi);
}

// out[i] = sqrt(in[i]), correctly rounded (vectorised sqrtps is IEEE)
inline void sqrt_n(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::sqrt(in[i]);
}

inline bool all_finite(const float* g, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, g + i, 4);
    bad |= static_cast<uint32_t>((b & 0x7F800000u) == 0x7F800000u);
  }
  return bad == 0;
}

// ---------------------------------------------------------------------------------------
// Scalars of one call

struct Params {
  int bits;
  int64_t dim;
  int opt;
  bool stochastic;
  bool learn;
  bool grow;  // grow a row's step when the updated row leaves its grid (spec step 5b)
  uint32_t dither;  // 24-bit offset added to the stochastic draws (spec step 6; 0: plain SR)
  int64_t key;
  int64_t row_offset;
  int64_t col_offset;
  // fp32 casts of the float args
  float lr, wd, eps, b1, omb1, b2, omb2, bc1, bc2, step_lr, lsq_scale, min_s, max_s, grow_thr;
  bool has_wd;  // the reference adds wd * x only when wd != 0.0 (a Python double test)
  float dim_f;  // (float)dim: the row-wise Adagrad divisor
};

struct Tensors {
  uint8_t* rows;
  int64_t row_stride;
  int64_t row_bytes;
  float* step;  // [R] or null
  int64_t step_stride;
  float* s1;  // [R] or [R, D] or null
  int64_t s1_stride;
  float* s2;
  int64_t s2_stride;
  const float* grad;
  const int64_t* goff;  // grad offset of each occurrence, in grouped order
  const float* occw;    // weight of each occurrence, in grouped order, or null
};

// Sequential sums over d of kBlock rows at once: out[r] = ((0 + p[r][0]) + p[r][1]) + ...
inline void block_row_sums(const float* p, int64_t D, int nb, float* out) {
  if (nb == kBlock) {
    float acc[kBlock];
    for (int r = 0; r < kBlock; ++r) acc[r] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
#pragma GCC unroll 8
      for (int r = 0; r < kBlock; ++r) acc[r] = acc[r] + p[r * D + d];
    }
    for (int r = 0; r < kBlock; ++r) out[r] = acc[r];
  } else {
    for (int r = 0; r < nb; ++r) {
      float acc = 0.0f;
      const float* pr = p + r * D;
      for (int64_t d = 0; d < D; ++d) acc = acc + pr[d];
      out[r] = acc;
    }
  }
}

// Per-row work buffers (every element is written before it is read). One per thread,
// reused across chunks and calls: grows to the largest dim seen.
struct Scratch {
  std::vector<float> g, x, gopt, p, q;
  std::vector<uint32_t> h;
  std::vector<int32_t> codes;
  void ensure(int64_t D) {
    if (h.size() >= static_cast<size_t>(D)) return;
    for (auto* v : {&g, &x, &gopt, &p, &q}) v->resize(kBlock * D);
    h.resize(D);
    codes.resize(D);
  }
};

Scratch& thread_scratch(int64_t D) {
  static thread_local Scratch S;
  S.ensure(D);
  return S;
}

// Dequantize one stored row into x[0:D]
template <int BITS>
inline void dequantize_row(const uint8_t* row, int64_t D, float* x) {
  if constexpr (BITS == 32) {
    std::memcpy(x, row, 4 * D);
  } else if constexpr (BITS == 16) {
    h2f_n(row, x, D);
  } else {
    uint16_t sh;
    std::memcpy(&sh, row, 2);
    const float s = h2f(sh);
    const uint8_t* c = row + 4;
    constexpr int half = 1 << (BITS - 1);
    if constexpr (BITS == 8) {
      for (int64_t d = 0; d < D; ++d) x[d] = s * static_cast<float>(static_cast<int32_t>(c[d]) - half);
    } else if constexpr (BITS == 4) {
      for (int64_t k = 0; k < D / 2; ++k) {
        const int32_t b = c[k];
        x[2 * k] = s * static_cast<float>((b & 15) - half);
        x[2 * k + 1] = s * static_cast<float>((b >> 4) - half);
      }
    } else {
      for (int64_t k = 0; k < D / 4; ++k) {
        const int32_t b = c[k];
        x[4 * k] = s * static_cast<float>((b & 3) - half);
        x[4 * k + 1] = s * static_cast<float>(((b >> 2) & 3) - half);
        x[4 * k + 2] = s * static_cast<float>(((b >> 4) & 3) - half);
        x[4 * k + 3] = s * static_cast<float>((b >> 6) - half);
      }
    }
  }
}

// h[d] = mix32(row_key + (d + col_offset) * GOLDEN), the per-element hash
inline void element_hash(uint32_t rk, const Params& P, uint32_t* h) {
  const uint32_t c0 = static_cast<uint32_t>(P.col_offset);
  for (int64_t d = 0; d < P.dim; ++d) {
    const uint32_t c = c0 + static_cast<uint32_t>(d);
    h[d] = mix32_u32(rk + c * kGolden);
  }
}

// Spec step 5b: the smallest step that holds the updated row x on the b-bit grid, if it is
// larger than s (max/min are exact; the two divisions are IEEE, as torch's).
//
// The row's max / min are taken in kLanes independent lanes (lane l sees x[d] for d = l mod
// kLanes in the full blocks; the tail and the lane merge are sequential), so the compiler
// emits vector max/min. MinMax accumulates them while the optimizer writes x (one pass over
// the row, issue 13: "fuse the growth max/min pass into the optimizer pass"); max/min are
// exact, so the result does not depend on where it is computed.
constexpr int kLanes = 8;

struct MinMax {
#if defined(__AVX__)
  // vmaxps(x, h) is (x > h) ? x : h and vminps(x, m) is (x < m) ? x : m, lane by lane: the
  // scalar selects below, exactly (NaN x keeps h; equal values keep h). GCC kept the scalar
  // form as eight vmaxss / vminss per block (seen with objdump), hence the intrinsics.
  __m256 hv, lv;
#else
  float hi8[kLanes], lo8[kLanes];
#endif
  float hi, lo;  // the tail (d >= D / kLanes * kLanes)
  inline void init(float x0) {
#if defined(__AVX__)
    hv = lv = _mm256_set1_ps(x0);
#else
    for (int l = 0; l < kLanes; ++l) hi8[l] = lo8[l] = x0;
#endif
    hi = lo = x0;
  }
  inline void block(const float* x) {  // x[0:kLanes], one full block
#if defined(__AVX__)
    const __m256 xv = _mm256_loadu_ps(x);
    hv = _mm256_max_ps(xv, hv);
    lv = _mm256_min_ps(xv, lv);
#else
    for (int l = 0; l < kLanes; ++l) {
      hi8[l] = x[l] > hi8[l] ? x[l] : hi8[l];
      lo8[l] = x[l] < lo8[l] ? x[l] : lo8[l];
    }
#endif
  }
  inline void tail(float v) {
    hi = v > hi ? v : hi;
    lo = v < lo ? v : lo;
  }
  // (max, min) of the row, merged in the order the scan above defines.
  inline void result(float& rhi, float& rlo, float x0) const {
#if defined(__AVX__)
    float hi8[kLanes], lo8[kLanes];
    _mm256_storeu_ps(hi8, hv);
    _mm256_storeu_ps(lo8, lv);
#endif
    float h = x0, m = x0;
    for (int l = 0; l < kLanes; ++l) {
      h = hi8[l] > h ? hi8[l] : h;
      m = lo8[l] < m ? lo8[l] : m;
    }
    // the tail after the lanes, as the sequential scan
    rhi = hi > h ? hi : h;
    rlo = lo < m ? lo : m;
  }
};

inline void row_minmax(const float* x, int64_t D, float& hi, float& lo) {
  MinMax mm;
  mm.init(x[0]);
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) mm.block(x + d);
  for (; d < D; ++d) mm.tail(x[d]);
  mm.result(hi, lo, x[0]);
}

// x[d] -= rate * g[d] for one row; with GROW, also the row's (max, min) of the new x, in
// the same pass (the lane structure of row_minmax, so the same values).
template <bool GROW>
inline void axpy_row(float* x, const float* g, float rate, int64_t D, float& hi, float& lo) {
  if constexpr (!GROW) {
    for (int64_t d = 0; d < D; ++d) x[d] = x[d] - rate * g[d];
  } else {
    const float x0 = x[0] - rate * g[0];
    MinMax mm;
    mm.init(x0);
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) {
      for (int l = 0; l < kLanes; ++l) x[d + l] = x[d + l] - rate * g[d + l];
      mm.block(x + d);
    }
    for (; d < D; ++d) {
      x[d] = x[d] - rate * g[d];
      mm.tail(x[d]);
    }
    mm.result(hi, lo, x0);
  }
}

template <int BITS>
inline float grown_from(float s, float hi, float lo, float max_s, float thr) {
  constexpr int half = 1 << (BITS - 1);
  const float need_hi = hi / static_cast<float>(half - 1);
  const float need_lo = lo / static_cast<float>(-half);
  const float need = need_hi > need_lo ? need_hi : need_lo;
  if (need > thr * s) return need > max_s ? max_s : need;
  return s;
}

// Write the updated fp32 row x back into its stored form.
template <int BITS>
inline void write_row(uint8_t* row, const float* x, float s16, int64_t grow, const Params& P, Scratch& S) {
  const int64_t D = P.dim;
  if constexpr (BITS == 32) {
    std::memcpy(row, x, 4 * D);
  } else if constexpr (BITS == 16) {
    if (P.stochastic) {
      uint32_t* h = S.h.data();
      element_hash(row_key(P.key, grow), P, h);
      float* y = S.p.data();  // free at this point
      for (int64_t d = 0; d < D; ++d) {
        uint32_t b;
        std::memcpy(&b, x + d, 4);
        const bool fin = (b & 0x7F800000u) != 0x7F800000u;
        uint32_t t = (b + (((h[d] & 0x1FFFu) + (P.dither >> 11)) & 0x1FFFu)) & 0xFFFFE000u;
        t = fin ? t : b;
        std::memcpy(y + d, &t, 4);
      }
      f2h_n(y, row, D);
    } else {
      f2h_n(x, row, D);
    }
  } else {
    constexpr int half = 1 << (BITS - 1);
    constexpr float qmin = static_cast<float>(-half);
    constexpr float qmax = static_cast<float>(half - 1);
    const float inv = 1.0f / s16;  // reciprocal(s16) * 1.0
    // 8-bit codes go straight into the row; 4/2-bit ones through a buffer, then packed.
    int32_t* code = S.codes.data();
    uint8_t* c8 = row + 4;
    if (P.stochastic) {
      uint32_t* h = S.h.data();
      element_hash(row_key(P.key, grow), P, h);
      const float two_m24 = 1.0f / 16777216.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float u = static_cast<float>(static_cast<int32_t>(((h[d] >> 8) + P.dither) & 0xFFFFFFu)) * two_m24;
        const float v = x[d] * inv;
        float t = std::floor(v + u);
        t = t < qmin ? qmin : t;
        t = t > qmax ? qmax : t;
        t = (t == t) ? t : 0.0f;  // NaN: the reference's int32 cast + packing gives code 0
        if constexpr (BITS == 8) {
          c8[d] = static_cast<uint8_t>(static_cast<int32_t>(t) + half);
        } else {
          code[d] = static_cast<int32_t>(t) + half;
        }
      }
    } else {
      for (int64_t d = 0; d < D; ++d) {
        const float v = x[d] * inv;
        float t = std::floor(v + 0.5f);
        t = t < qmin ? qmin : t;
        t = t > qmax ? qmax : t;
        t = (t == t) ? t : 0.0f;
        if constexpr (BITS == 8) {
          c8[d] = static_cast<uint8_t>(static_cast<int32_t>(t) + half);
        } else {
          code[d] = static_cast<int32_t>(t) + half;
        }
      }
    }
    const uint16_t sb = f2h(s16);
    const uint16_t bb = f2h(s16 * -static_cast<float>(half));
    std::memcpy(row, &sb, 2);
    std::memcpy(row + 2, &bb, 2);
    uint8_t* c = row + 4;
    if constexpr (BITS == 4) {
      for (int64_t k = 0; k < D / 2; ++k) c[k] = static_cast<uint8_t>(code[2 * k] | (code[2 * k + 1] << 4));
    } else if constexpr (BITS == 2) {
      for (int64_t k = 0; k < D / 4; ++k)
        c[k] = static_cast<uint8_t>(code[4 * k] | (code[4 * k + 1] << 2) | (code[4 * k + 2] << 4) |
                                    (code[4 * k + 3] << 6));
    }
  }
}

// Update nb (<= kBlock) rows whose summed gradients are in S.g[r*D:(r+1)*D].
template <int BITS, int OPT>
void process_block(const int64_t* rid, int nb, const Params& P, const Tensors& T, Scratch& S,
                   int64_t& bounded) {
  const int64_t D = P.dim;
  float* G = S.g.data();
  float* X = S.x.data();
  for (int r = 0; r < nb; ++r) dequantize_row<BITS>(T.rows + rid[r] * T.row_stride, D, X + r * D);

  // Weight decay: g_opt = g + wd * x
  float* GO = G;
  if (P.has_wd) {
    GO = S.gopt.data();
    const float wd = P.wd;
    for (int64_t i = 0; i < nb * D; ++i) GO[i] = G[i] + wd * X[i];
  }

  // Optimizer. With growth (b-bit rows), SGD and row-wise Adagrad also take each updated
  // row's max / min in the pass that writes it; the others take them right after (in L1).
  const float lr = P.lr, eps = P.eps;
  const bool grow = BITS <= 8 && P.grow;
  float rhi[kBlock], rlo[kBlock];
  bool have_minmax = false;
  if constexpr (OPT == 0) {
    if (grow) {
      for (int r = 0; r < nb; ++r) axpy_row<true>(X + r * D, GO + r * D, lr, D, rhi[r], rlo[r]);
      have_minmax = true;
    } else {
      for (int64_t i = 0; i < nb * D; ++i) X[i] = X[i] - lr * GO[i];
    }
  } else if constexpr (OPT == 1) {
    float* hn = S.p.data();
    float* sq = S.q.data();
    for (int r = 0; r < nb; ++r) {
      float* h = T.s1 + rid[r] * T.s1_stride;
      const float* g = GO + r * D;
      float* hr = hn + r * D;
      for (int64_t d = 0; d < D; ++d) {
        hr[d] = h[d] + g[d] * g[d];
        h[d] = hr[d];
      }
    }
    sqrt_n(hn, sq, nb * D);
    for (int64_t i = 0; i < nb * D; ++i) {
      const float den = sq[i] + eps;
      const float upd = (lr * GO[i]) / den;
      X[i] = X[i] - (den == 0.0f ? 0.0f : upd);  // eps = 0, zero state: no step (spec 4)
    }
  } else if constexpr (OPT == 2) {
    float* sqg = S.p.data();
    for (int64_t i = 0; i < nb * D; ++i) sqg[i] = GO[i] * GO[i];
    float sums[kBlock], hn[kBlock], sq[kBlock];
    block_row_sums(sqg, D, nb, sums);
    const float dimf = P.dim_f;
    for (int r = 0; r < nb; ++r) {
      float* hp = T.s1 + rid[r] * T.s1_stride;
      hn[r] = *hp + sums[r] / dimf;
      *hp = hn[r];
    }
    sqrt_n(hn, sq, nb);
    for (int r = 0; r < nb; ++r) {
      const float den = sq[r] + eps;
      const float rate = den == 0.0f ? 0.0f : (1.0f / den) * lr;  // lr / t == reciprocal(t) * lr
      if (grow) {
        axpy_row<true>(X + r * D, GO + r * D, rate, D, rhi[r], rlo[r]);
      } else {
        axpy_row<false>(X + r * D, GO + r * D, rate, D, rhi[r], rlo[r]);
      }
    }
    have_minmax = grow;
  } else {
    const float b1 = P.b1, omb1 = P.omb1, b2 = P.b2, omb2 = P.omb2, bc1 = P.bc1, bc2 = P.bc2;
    float* vb = S.p.data();
    float* sq = S.q.data();
    for (int r = 0; r < nb; ++r) {
      float* m = T.s1 + rid[r] * T.s1_stride;
      float* v = T.s2 + rid[r] * T.s2_stride;
      const float* g = GO + r * D;
      float* vr = vb + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const float mn = b1 * m[d] + omb1 * g[d];
        const float vn = b2 * v[d] + omb2 * (g[d] * g[d]);
        m[d] = mn;
        v[d] = vn;
        vr[d] = vn / bc2;
      }
    }
    sqrt_n(vb, sq, nb * D);
    for (int r = 0; r < nb; ++r) {
      const float* m = T.s1 + rid[r] * T.s1_stride;
      float* x = X + r * D;
      const float* sr = sq + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const float den = sr[d] + eps;
        const float upd = (lr * (m[d] / bc1)) / den;
        x[d] = x[d] - (den == 0.0f ? 0.0f : upd);
      }
    }
  }

  if (grow && !have_minmax) {
    for (int r = 0; r < nb; ++r) row_minmax(X + r * D, D, rhi[r], rlo[r]);
  }

  // ALPT: LSQ step-size update (raw gradient g, updated x, fp32 master step)
  float s16[kBlock] = {};
  if constexpr (BITS <= 8) {
    if (P.learn) {
      constexpr int half = 1 << (BITS - 1);
      constexpr float qmin = static_cast<float>(-half);
      constexpr float qmax = static_cast<float>(half - 1);
      float* prod = S.p.data();
      float s[kBlock];
      for (int r = 0; r < nb; ++r) {
        s[r] = T.step[rid[r] * T.step_stride];
        const float inv = 1.0f / s[r];
        const float* x = X + r * D;
        const float* g = G + r * D;
        float* pr = prod + r * D;
        for (int64_t d = 0; d < D; ++d) {
          const float v = x[d] * inv;
          const float inner = std::floor(v + 0.5f) - v;
          const float dxs = v <= qmin ? qmin : (v >= qmax ? qmax : inner);
          pr[d] = g[d] * dxs;
        }
      }
      float sums[kBlock];
      block_row_sums(prod, D, nb, sums);
      for (int r = 0; r < nb; ++r) {
        const float lsq = sums[r] * P.lsq_scale;
        float sn = s[r] - P.step_lr * lsq;
        sn = sn < P.min_s ? P.min_s : sn;  // torch.clamp (NaN stays NaN)
        sn = sn > P.max_s ? P.max_s : sn;
        if (grow) sn = grown_from<BITS>(sn, rhi[r], rlo[r], P.max_s, P.grow_thr);
        T.step[rid[r] * T.step_stride] = sn;
        bounded += sn >= P.max_s;
        s16[r] = h2f(f2h(sn));
      }
    } else {
      for (int r = 0; r < nb; ++r) {
        uint16_t sh;
        std::memcpy(&sh, T.rows + rid[r] * T.row_stride, 2);
        if (grow) {
          const float sn = grown_from<BITS>(h2f(sh), rhi[r], rlo[r], P.max_s, P.grow_thr);
          bounded += sn >= P.max_s;
          s16[r] = h2f(f2h(sn));
        } else {
          s16[r] = h2f(sh);
        }
      }
    }
  }

  for (int r = 0; r < nb; ++r) {
    write_row<BITS>(T.rows + rid[r] * T.row_stride, X + r * D, s16[r], rid[r] + P.row_offset, P, S);
  }
}

// Rows skipped (non-finite gradient) and rows whose step hit the bound (spec 5c).
struct Counts {
  int64_t skipped = 0;
  int64_t bounded = 0;
  Counts& operator+=(const Counts& o) {
    skipped += o.skipped;
    bounded += o.bounded;
    return *this;
  }
};

// Process segments [u0, u1) of the grouped occurrences.
template <int BITS, int OPT>
Counts run_segments(int64_t u0, int64_t u1, const int64_t* uniq, const int64_t* seg, const Params& P,
                     const Tensors& T) {
  const int64_t D = P.dim;
  Scratch& S = thread_scratch(D);
  int64_t rid[kBlock];
  int nb = 0;
  int64_t skipped = 0;
  int64_t bounded = 0;
  const int64_t gbytes = 4 * D;
  // Prefetch (into L1, read; measured faster than prefetchw here) what updating a row touches:
  // its bytes, its step size, its optimizer state. A lambda forced inline: GCC drops calls to
  // an out-of-line function that only prefetches (it is side-effect free).
  auto prefetch_row = [&](int64_t row) __attribute__((always_inline)) {
    torchrec_lowprec::prefetch_lines(T.rows + row * T.row_stride, T.row_bytes);
    if (P.learn) __builtin_prefetch(T.step + row * T.step_stride, 0, 3);
    if constexpr (OPT == 2) {
      __builtin_prefetch(T.s1 + row * T.s1_stride, 0, 3);
    } else if constexpr (OPT == 1 || OPT == 3) {
      torchrec_lowprec::prefetch_lines(T.s1 + row * T.s1_stride, gbytes);
      if constexpr (OPT == 3) torchrec_lowprec::prefetch_lines(T.s2 + row * T.s2_stride, gbytes);
    }
  };
  for (int64_t u = u0; u < std::min<int64_t>(u1, u0 + kPrefetchAhead); ++u) prefetch_row(uniq[u]);
  for (int64_t u = u0; u < u1; ++u) {
    if (u + kPrefetchAhead < u1) prefetch_row(uniq[u + kPrefetchAhead]);
    if (u + kGradAhead < u1) {
      for (int64_t k = seg[u + kGradAhead]; k < seg[u + kGradAhead + 1]; ++k) {
        torchrec_lowprec::prefetch_lines(T.grad + T.goff[k], gbytes);
      }
    }
    float* g = S.g.data() + nb * D;
    for (int64_t d = 0; d < D; ++d) g[d] = 0.0f;
    const int64_t e = seg[u + 1];
    if (T.occw != nullptr) {
      for (int64_t k = seg[u]; k < e; ++k) {
        const float* src = T.grad + T.goff[k];
        const float w = T.occw[k];
        for (int64_t d = 0; d < D; ++d) g[d] = g[d] + w * src[d];
      }
    } else {
      for (int64_t k = seg[u]; k < e; ++k) {
        const float* src = T.grad + T.goff[k];
        for (int64_t d = 0; d < D; ++d) g[d] = g[d] + src[d];
      }
    }
    if (!all_finite(g, D)) {
      ++skipped;
      continue;
    }
    rid[nb++] = uniq[u];
    if (nb == kBlock) {
      process_block<BITS, OPT>(rid, nb, P, T, S, bounded);
      nb = 0;
    }
  }
  if (nb > 0) process_block<BITS, OPT>(rid, nb, P, T, S, bounded);
  return Counts{skipped, bounded};
}

using RunFn = Counts (*)(int64_t, int64_t, const int64_t*, const int64_t*, const Params&, const Tensors&);

template <int BITS>
RunFn pick_opt(int opt) {
  switch (opt) {
    case 0: return &run_segments<BITS, 0>;
    case 1: return &run_segments<BITS, 1>;
    case 2: return &run_segments<BITS, 2>;
    default: return &run_segments<BITS, 3>;
  }
}

RunFn pick(int bits, int opt) {
  switch (bits) {
    case 8: return pick_opt<8>(opt);
    case 4: return pick_opt<4>(opt);
    case 2: return pick_opt<2>(opt);
    case 16: return pick_opt<16>(opt);
    default: return pick_opt<32>(opt);
  }
}

// ---------------------------------------------------------------------------------------
// Grouping: stable LSD radix sort of (id << 32 | position); buffers reused across calls.

struct GroupBuffers {
  std::vector<uint64_t> a, b;
  std::vector<int64_t> uniq, seg, off;
  std::vector<float> w;
};

// Size buf for n occurrences (a no-op once it is large enough).
void reserve_group(GroupBuffers& buf, int64_t n) {
  if (buf.a.size() < static_cast<size_t>(n)) {
    buf.a.resize(n);
    buf.b.resize(n);
    buf.off.resize(n);
    buf.w.resize(n);
    buf.uniq.resize(n);
    buf.seg.resize(n + 1);
  }
}

GroupBuffers& group_buffers() {
  static thread_local GroupBuffers buf;
  return buf;
}

// Fills buf.uniq[0:U] (ascending unique ids), buf.seg[0:U+1] (segment starts) and, in grouped
// order (by id, then by position), buf.off / buf.w: the occurrences' grad offsets and weights
// (weights only if occw is given). Returns U.
int64_t group_by_row(const int64_t* ids, const int64_t* goff, const float* occw, int64_t n, int64_t max_id,
                     GroupBuffers& buf) {
  reserve_group(buf, n);
  int64_t* off = buf.off.data();
  float* w = buf.w.data();
  uint64_t* a = buf.a.data();
  uint64_t* b = buf.b.data();
  if (max_id <= static_cast<int64_t>(0xFFFFFFFFu)) {
    for (int64_t i = 0; i < n; ++i) a[i] = (static_cast<uint64_t>(ids[i]) << 32) | static_cast<uint64_t>(i);
    int nbits = 0;
    while (nbits < 32 && (static_cast<uint64_t>(max_id) >> nbits) != 0) ++nbits;
    if (nbits > 0) {
      const int npass = (nbits + 10) / 11;
      const int width = (nbits + npass - 1) / npass;  // bits per digit (<= 11)
      const uint32_t mask = (1u << width) - 1u;
      std::vector<int64_t> cnt(static_cast<size_t>(npass) << width, 0);
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t k = static_cast<uint32_t>(a[i] >> 32);
        for (int p = 0; p < npass; ++p) ++cnt[(static_cast<size_t>(p) << width) + ((k >> (p * width)) & mask)];
      }
      for (int p = 0; p < npass; ++p) {
        int64_t* c = cnt.data() + (static_cast<size_t>(p) << width);
        int64_t run = 0;
        bool trivial = false;
        for (uint32_t j = 0; j <= mask; ++j) {
          if (c[j] == n) trivial = true;
          const int64_t t = c[j];
          c[j] = run;
          run += t;
        }
        if (trivial) continue;  // every key has the same digit: this pass is the identity
        const int shift = 32 + p * width;
        for (int64_t i = 0; i < n; ++i) b[c[(a[i] >> shift) & mask]++] = a[i];
        std::swap(a, b);
      }
    }
  } else {
    // ids beyond 2**32: comparison sort on (id, position)
    for (int64_t i = 0; i < n; ++i) a[i] = static_cast<uint64_t>(i);
    std::stable_sort(a, a + n, [&](uint64_t x, uint64_t y) { return ids[x] < ids[y]; });
    int64_t u = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids[a[i]];
      if (i == 0 || id != buf.uniq[u - 1]) {
        buf.uniq[u] = id;
        buf.seg[u] = i;
        ++u;
      }
      off[i] = goff[a[i]];
      if (occw != nullptr) w[i] = occw[a[i]];
    }
    buf.seg[u] = n;
    return u;
  }
  int64_t u = 0;
  int64_t prev = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = static_cast<int64_t>(a[i] >> 32);
    if (id != prev) {
      buf.uniq[u] = id;
      buf.seg[u] = i;
      ++u;
      prev = id;
    }
    const uint64_t p = a[i] & 0xFFFFFFFFu;
    off[i] = goff[p];
    if (occw != nullptr) w[i] = occw[p];
  }
  buf.seg[u] = n;
  return u;
}

// Who is checking, for error messages: "fused_update" or "fused_update_many: table i".
// (Formatted only when a check fails.)
struct Who {
  int64_t table;  // -1: the single-table entry
};

std::ostream& operator<<(std::ostream& os, const Who& w) {
  if (w.table < 0) return os << "fused_update";
  return os << "fused_update_many: table " << w.table;
}

void check_state(const torch::Tensor& t, const char* name, int64_t R, int64_t D, bool rowwise,
                 const char* opt, Who who) {
  TORCH_CHECK(t.device().is_cpu(), who, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, who, ": ", name, " must be float32, got ",
              t.scalar_type());
  if (rowwise) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == R, who, ": ", name, " must have shape [", R,
                "] for ", opt, ", got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == R && t.size(1) == D, who, ": ", name,
                " must have shape [", R, ", ", D, "] for ", opt, ", got ", t.sizes());
    TORCH_CHECK(t.stride(1) == 1, who, ": ", name, " must have unit stride along D");
  }
}

// ---------------------------------------------------------------------------------------
// One table's update, from its arguments to its grouped occurrences. Both entries (one
// table, many tables) go through: prepare_job (argument checks; serial, may call into
// torch), scan_job + check_job (ids / offsets in range), group_job (grouping; pure C++,
// runs on a worker thread in the batched entry), then run_jobs executes the touched rows.

struct Job {
  Params P{};
  Tensors T{};
  RunFn fn = nullptr;
  int64_t R = 0;
  int64_t N = 0;
  const int64_t* ids = nullptr;
  const int64_t* offs = nullptr;
  const float* w = nullptr;
  torch::Tensor ids_c, off_c, w_c;  // keep converted copies alive
  // scan_job
  int64_t min_id = 0, max_id = 0, min_off = 0, max_off = 0;
  // group_job
  const int64_t* uniq = nullptr;
  const int64_t* seg = nullptr;
  int64_t U = 0;
  // written memory (rows, step sizes, states), for the batched entry's overlap check
  struct Span {
    uintptr_t lo, hi;
  };
  Span spans[4];
  int nspans = 0;
};

void add_span(Job& J, const torch::Tensor& t, int64_t elem, int64_t rows, int64_t row_stride, int64_t row_bytes) {
  if (rows == 0) return;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  J.spans[J.nspans++] = {lo, lo + static_cast<uintptr_t>(((rows - 1) * row_stride) * elem + row_bytes)};
}

void prepare_job(Job& J, const torch::Tensor& rows, const torch::Tensor& step_size, const torch::Tensor& state1,
                 const torch::Tensor& state2, const torch::Tensor& ids, const torch::Tensor& grad_offsets,
                 const torch::Tensor& occ_weights, const torch::Tensor& grad, const std::vector<double>& float_args,
                 const std::vector<int64_t>& int_args, Who who) {
  TORCH_CHECK(float_args.size() == 14, who, ": float_args must have 14 values "
              "[lr, wd, eps, b1, 1-b1, b2, 1-b2, bc1, bc2, step_lr, lsq_scale, min_s, max_s, growth_threshold], got ",
              float_args.size());
  TORCH_CHECK(int_args.size() == 9 || int_args.size() == 10, who, ": int_args must have 9 or 10 values "
              "[bits, dim, optimizer, stochastic, learn_step_size, key, row_offset, col_offset, grow_step, (dither)], got ",
              int_args.size());
  Params& P = J.P;
  P.bits = static_cast<int>(int_args[0]);
  P.dim = int_args[1];
  P.opt = static_cast<int>(int_args[2]);
  P.stochastic = int_args[3] != 0;
  P.learn = int_args[4] != 0 && P.bits <= 8;
  P.key = int_args[5];
  P.row_offset = int_args[6];
  P.col_offset = int_args[7];
  P.grow = int_args[8] != 0 && P.bits <= 8;
  P.dither = int_args.size() > 9 ? static_cast<uint32_t>(int_args[9] & 0xFFFFFF) : 0u;
  P.lr = static_cast<float>(float_args[0]);
  P.wd = static_cast<float>(float_args[1]);
  P.has_wd = float_args[1] != 0.0;
  P.eps = static_cast<float>(float_args[2]);
  P.b1 = static_cast<float>(float_args[3]);
  P.omb1 = static_cast<float>(float_args[4]);
  P.b2 = static_cast<float>(float_args[5]);
  P.omb2 = static_cast<float>(float_args[6]);
  P.bc1 = static_cast<float>(float_args[7]);
  P.bc2 = static_cast<float>(float_args[8]);
  P.step_lr = static_cast<float>(float_args[9]);
  P.lsq_scale = static_cast<float>(float_args[10]);
  P.min_s = static_cast<float>(float_args[11]);
  P.max_s = static_cast<float>(float_args[12]);
  P.grow_thr = static_cast<float>(float_args[13]);
  P.dim_f = static_cast<float>(static_cast<double>(P.dim));

  const int bits = P.bits;
  const int64_t D = P.dim;
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2 || bits == 16 || bits == 32,
              who, ": bits must be one of 8, 4, 2, 16, 32, got ", bits);
  TORCH_CHECK(D > 0, who, ": dim must be > 0, got ", D);
  TORCH_CHECK(bits >= 8 || (D * bits) % 8 == 0, who, ": dim ", D, " is not a multiple of ",
              8 / bits, " as ", bits, "-bit packing needs");
  TORCH_CHECK(P.opt >= 0 && P.opt <= 3, who, ": optimizer code must be 0..3 (SGD, Adagrad, "
              "RowWiseAdagrad, Adam), got ", P.opt);
  const int64_t nbytes = bits == 32 ? 4 * D : bits == 16 ? 2 * D : D * bits / 8 + 4;

  TORCH_CHECK(rows.device().is_cpu(), who, ": rows must be a CPU tensor (this is the CPU kernel), got ",
              rows.device());
  TORCH_CHECK(rows.scalar_type() == torch::kUInt8, who, ": rows must be uint8, got ", rows.scalar_type());
  TORCH_CHECK(rows.dim() == 2, who, ": rows must be 2-D [R, >=row_bytes], got ", rows.sizes());
  TORCH_CHECK(rows.size(1) >= nbytes, who, ": rows has ", rows.size(1), " bytes per row, a ", bits,
              "-bit row of dim ", D, " needs ", nbytes);
  TORCH_CHECK(rows.stride(1) == 1, who, ": rows must have unit stride along a row, got strides ",
              rows.strides());
  const int64_t R = rows.size(0);
  J.R = R;

  TORCH_CHECK(ids.device().is_cpu() && grad_offsets.device().is_cpu() && occ_weights.device().is_cpu() &&
                  grad.device().is_cpu() && step_size.device().is_cpu(),
              who, ": all tensors must be on the CPU");
  const auto is_index = [](const torch::Tensor& t) {
    return t.scalar_type() == torch::kInt64 || t.scalar_type() == torch::kInt32;
  };
  TORCH_CHECK(is_index(ids) && ids.dim() == 1, who, ": ids must be a 1-D int64 (or int32) tensor, got ",
              ids.scalar_type(), " ", ids.sizes());
  const int64_t N = ids.size(0);
  J.N = N;
  TORCH_CHECK(is_index(grad_offsets) && grad_offsets.dim() == 1 && grad_offsets.size(0) == N,
              who, ": grad_offsets must be int64 (or int32) [", N, "] (one per id), got ",
              grad_offsets.scalar_type(), " ", grad_offsets.sizes());
  const bool has_w = occ_weights.numel() > 0;
  if (has_w) {
    TORCH_CHECK(occ_weights.scalar_type() == torch::kFloat32 && occ_weights.dim() == 1 &&
                    occ_weights.size(0) == N,
                who, ": occ_weights must be float32 [", N, "] or empty, got ", occ_weights.scalar_type(), " ",
                occ_weights.sizes());
  }
  TORCH_CHECK(grad.scalar_type() == torch::kFloat32, who, ": grad must be float32, got ", grad.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), who, ": grad must be contiguous");
  TORCH_CHECK(N < (int64_t{1} << 31), who, ": at most 2**31-1 occurrences per call, got ", N);

  Tensors& T = J.T;
  T.rows = rows.data_ptr<uint8_t>();
  T.row_stride = rows.stride(0);
  T.row_bytes = nbytes;
  add_span(J, rows, 1, R, T.row_stride, nbytes);
  if (P.learn) {
    TORCH_CHECK(step_size.scalar_type() == torch::kFloat32 && step_size.dim() == 1 && step_size.size(0) == R,
                who, ": learn_step_size needs step_size float32 [", R, "], got ", step_size.scalar_type(), " ",
                step_size.sizes());
    T.step = step_size.data_ptr<float>();
    T.step_stride = step_size.stride(0);
    add_span(J, step_size, 4, R, T.step_stride, 4);
  }
  static const char* kOptNames[] = {"SGD", "Adagrad", "RowWiseAdagrad", "Adam"};
  if (P.opt == 1 || P.opt == 3) {
    check_state(state1, "state1", R, D, false, kOptNames[P.opt], who);
    T.s1 = state1.data_ptr<float>();
    T.s1_stride = state1.stride(0);
    add_span(J, state1, 4, R, T.s1_stride, 4 * D);
  } else if (P.opt == 2) {
    check_state(state1, "state1", R, D, true, kOptNames[P.opt], who);
    T.s1 = state1.data_ptr<float>();
    T.s1_stride = state1.stride(0);
    add_span(J, state1, 4, R, T.s1_stride, 4);
  }
  if (P.opt == 3) {
    check_state(state2, "state2", R, D, false, kOptNames[P.opt], who);
    T.s2 = state2.data_ptr<float>();
    T.s2_stride = state2.stride(0);
    add_span(J, state2, 4, R, T.s2_stride, 4 * D);
  }
  T.grad = grad.data_ptr<float>();
  J.fn = pick(bits, P.opt);
  if (N == 0) return;

  J.ids_c = ids.to(torch::kInt64).contiguous();
  J.off_c = grad_offsets.to(torch::kInt64).contiguous();
  J.ids = J.ids_c.data_ptr<int64_t>();
  J.offs = J.off_c.data_ptr<int64_t>();
  if (has_w) {
    J.w_c = occ_weights.contiguous();
    J.w = J.w_c.data_ptr<float>();
  }
}

// Ranges of the ids and grad offsets (checked by check_job). Pure C++.
void scan_job(Job& J) {
  int64_t max_id = 0, min_id = 0, max_off = 0, min_off = 0;
  const int64_t* idp = J.ids;
  const int64_t* offp = J.offs;
  for (int64_t i = 0; i < J.N; ++i) {
    max_id = std::max(max_id, idp[i]);
    min_id = std::min(min_id, idp[i]);
    max_off = std::max(max_off, offp[i]);
    min_off = std::min(min_off, offp[i]);
  }
  J.min_id = min_id;
  J.max_id = max_id;
  J.min_off = min_off;
  J.max_off = max_off;
}

bool job_in_range(const Job& J, int64_t gnumel) {
  return J.min_id >= 0 && J.max_id < J.R && J.min_off >= 0 && J.max_off <= gnumel - J.P.dim;
}

void check_job(const Job& J, int64_t gnumel, Who who) {
  TORCH_CHECK(J.min_id >= 0 && J.max_id < J.R, who, ": ids must be in [0, ", J.R, "), got values in [",
              J.min_id, ", ", J.max_id, "]");
  TORCH_CHECK(J.min_off >= 0 && J.max_off <= gnumel - J.P.dim, who, ": grad_offsets must be in [0, ",
              gnumel - J.P.dim, "] (grad has ", gnumel, " elements, dim ", J.P.dim, "), got values in [",
              J.min_off, ", ", J.max_off, "]");
}

// Group the occurrences by row into buf (pure C++ once buf is sized by reserve_group).
void group_job(Job& J, GroupBuffers& buf) {
  J.U = group_by_row(J.ids, J.offs, J.w, J.N, J.max_id, buf);
  J.uniq = buf.uniq.data();
  J.seg = buf.seg.data();
  J.T.goff = buf.off.data();
  J.T.occw = J.w != nullptr ? buf.w.data() : nullptr;
}

inline void spin_pause(int64_t& spins) {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
  if (++spins % 64 == 0) std::this_thread::yield();  // a descheduled peer gets the core
}

// Update the touched rows of every job; returns the skipped / bounded row counts per job.
//
// Work: chunks of kChunkRows touched rows. With `grouped` true (the single-table entry: the
// jobs are already checked and grouped), the chunks of all jobs are numbered in order and
// taken from one shared counter. With `grouped` false (the batched entry), ONE parallel
// region runs a pipeline over the jobs in order: a thread takes the next chunk of the front
// job (the lowest one with chunks left) if that job is grouped, and otherwise claims the next
// ungrouped job (claims go in job order, from a counter), checks its ids / offsets and groups
// it. So grouping is parallel across jobs, each job is grouped just before its rows are
// processed (its ids and grouping buffers are still in cache), and no thread waits between
// jobs. The range check is made job by job as in a loop of single calls: when job k fails
// it, jobs 0..k-1 are completed, jobs k.. are left untouched, and the call raises for job k.
// Rows are independent and a row's math does not depend on the chunking, so the result is
// the same bits as running the jobs one after the other.
std::vector<Counts> run_jobs(std::vector<Job>& jobs, bool grouped, int64_t gnumel) {
  const int64_t nj = static_cast<int64_t>(jobs.size());
  std::vector<Counts> result(nj);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const auto nchunks_of = [](const Job& J) { return (J.U + kChunkRows - 1) / kChunkRows; };
  int64_t total_n = 0, max_n = 0;
  for (const Job& J : jobs) {
    total_n += J.N;
    max_n = std::max(max_n, J.N);
  }
  // One thread, a nested call, or too few occurrences for a second thread to pay off.
  const bool serial = nthreads == 1 || at::in_parallel_region() || total_n <= kChunkRows;

  if (!grouped && serial) {
    GroupBuffers& buf = group_buffers();  // one job at a time: one buffer, hot in cache
    reserve_group(buf, max_n);
    for (int64_t j = 0; j < nj; ++j) {
      Job& J = jobs[j];
      if (J.N == 0) continue;
      scan_job(J);
      check_job(J, gnumel, Who{j});
      group_job(J, buf);
      if (J.U > 0) result[j] = J.fn(0, J.U, J.uniq, J.seg, J.P, J.T);
    }
    return result;
  }

  std::vector<Counts> skipped(static_cast<size_t>(nthreads) * nj);
  if (grouped) {
    int64_t total = 0;
    for (const Job& J : jobs) total += nchunks_of(J);
    if (serial || total <= 1) {
      for (int64_t j = 0; j < nj; ++j) {
        Job& J = jobs[j];
        if (J.U > 0) result[j] = J.fn(0, J.U, J.uniq, J.seg, J.P, J.T);
      }
      return result;
    }
    std::atomic<int64_t> next_chunk{0};
    at::parallel_for(0, nthreads, 1, [&](int64_t tb, int64_t) {
      Counts* sk = skipped.data() + tb * nj;
      int64_t j = 0;
      int64_t first = 0;  // first global chunk of job j
      for (int64_t c = next_chunk.fetch_add(1);; c = next_chunk.fetch_add(1)) {
        // c only grows for this thread: advance the job cursor.
        while (j < nj && c >= first + nchunks_of(jobs[j])) first += nchunks_of(jobs[j++]);
        if (j == nj) break;
        const Job& J = jobs[j];
        const int64_t u0 = (c - first) * kChunkRows;
        sk[j] += J.fn(u0, std::min(J.U, u0 + kChunkRows), J.uniq, J.seg, J.P, J.T);
      }
    });
  } else {
    // Grouping buffers: a ring of kSlots, job j in slot j % kSlots, reused (so they stay in
    // cache) once job j - kSlots is done, which the pipeline's short lookahead makes the usual
    // case by the time job j is grouped.
    // (The calling thread's pool: the workers get pointers, not the thread_local by name.)
    const int64_t kSlots = std::min<int64_t>(nj, nthreads + 2);
    static thread_local std::vector<std::unique_ptr<GroupBuffers>> pool;
    while (static_cast<int64_t>(pool.size()) < kSlots) pool.push_back(std::make_unique<GroupBuffers>());
    std::vector<GroupBuffers*> slots(kSlots);
    for (int64_t k = 0; k < kSlots; ++k) {
      slots[k] = pool[k].get();
      reserve_group(*slots[k], max_n);
    }
    std::atomic<int64_t> next_group{0}, front{0};
    // Jobs [0, limit) are run: limit drops to the first job that fails its check (or whose
    // grouping throws); the ones before it still complete.
    std::atomic<int64_t> limit{nj};
    const auto lower_limit = [&](int64_t g) {
      int64_t cur = limit.load();
      while (g < cur && !limit.compare_exchange_weak(cur, g)) {
      }
    };
    // Per job: grouped yet (release-stored after group_job), next chunk to take, chunks done.
    std::unique_ptr<std::atomic<int>[]> ready(new std::atomic<int>[nj]);
    std::unique_ptr<std::atomic<int64_t>[]> next_chunk(new std::atomic<int64_t>[nj]);
    std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[nj]);
    for (int64_t j = 0; j < nj; ++j) {
      ready[j].store(0, std::memory_order_relaxed);
      next_chunk[j].store(0, std::memory_order_relaxed);
      done[j].store(0, std::memory_order_relaxed);
    }
    std::exception_ptr error;
    std::atomic<bool> error_set{false};
    at::parallel_for(0, nthreads, 1, [&](int64_t tb, int64_t) {
      Counts* sk = skipped.data() + tb * nj;
      int64_t j = 0;
      int64_t spins = 0;
      while (true) {
        j = std::max(j, front.load(std::memory_order_acquire));
        if (j >= limit.load(std::memory_order_acquire)) break;
        Job& J = jobs[j];
        if (ready[j].load(std::memory_order_acquire) == 0) {
          const int64_t g = next_group.fetch_add(1);
          if (g >= limit.load(std::memory_order_acquire)) {
            spin_pause(spins);  // nothing left to group: job j is being grouped by another thread
            continue;
          }
          Job& G = jobs[g];
          if (G.N > 0) {
            // Wait until the slot's previous job p is grouped (claimed before g, so its
            // grouping is under way; U is valid only once ready) and done (its chunks are
            // taken by, or will be taken by, threads that do not wait on g).
            const int64_t p = g - kSlots;
            if (p >= 0) {
              while (p < limit.load(std::memory_order_acquire) &&
                     (ready[p].load(std::memory_order_acquire) == 0 ||
                      done[p].load(std::memory_order_acquire) < nchunks_of(jobs[p])))
                spin_pause(spins);
            }
            if (g < limit.load(std::memory_order_acquire)) {
              try {
                scan_job(G);
                if (job_in_range(G, gnumel)) {
                  group_job(G, *slots[g % kSlots]);
                } else {
                  lower_limit(g);
                }
              } catch (...) {
                if (!error_set.exchange(true)) error = std::current_exception();
                lower_limit(g);
              }
            }
          }
          ready[g].store(1, std::memory_order_release);
          continue;
        }
        const int64_t c = next_chunk[j].fetch_add(1);
        if (c < nchunks_of(J)) {
          const int64_t u0 = c * kChunkRows;
          sk[j] += J.fn(u0, std::min(J.U, u0 + kChunkRows), J.uniq, J.seg, J.P, J.T);
          done[j].fetch_add(1, std::memory_order_acq_rel);
        } else {
          int64_t f = j;
          front.compare_exchange_strong(f, j + 1);
          ++j;
        }
      }
    });
    if (error) std::rethrow_exception(error);
    const int64_t k = limit.load();
    if (k < nj) {
      check_job(jobs[k], gnumel, Who{k});
      TORCH_CHECK(false, "fused_update_many: internal error (table ", k, " failed a check that passes now)");
    }
  }
  for (int64_t t = 0; t < nthreads; ++t) {
    for (int64_t j = 0; j < nj; ++j) result[j] += skipped[t * nj + j];
  }
  return result;
}

// Tables updated together must not share the memory they write (they would race, and the
// result would not be that of one call after the other).
void check_disjoint(const std::vector<Job>& jobs) {
  struct Iv {
    uintptr_t lo, hi;
    int64_t job;
  };
  std::vector<Iv> iv;
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j) {
    if (jobs[j].N == 0) continue;  // not written
    for (int k = 0; k < jobs[j].nspans; ++k) iv.push_back({jobs[j].spans[k].lo, jobs[j].spans[k].hi, j});
  }
  std::sort(iv.begin(), iv.end(), [](const Iv& a, const Iv& b) { return a.lo < b.lo; });
  // The two largest ends so far that belong to different jobs.
  uintptr_t end1 = 0, end2 = 0;
  int64_t job1 = -1;
  for (const Iv& x : iv) {
    const uintptr_t reach = x.job == job1 ? end2 : end1;
    TORCH_CHECK(x.lo >= reach, "fused_update_many: table ", x.job,
                " writes memory (rows, step sizes or optimizer state) that another table of the "
                "call also writes; tables updated together must not share storage");
    if (x.job == job1) {
      end1 = std::max(end1, x.hi);
    } else if (x.hi > end1) {
      end2 = end1;
      end1 = x.hi;
      job1 = x.job;
    } else {
      end2 = std::max(end2, x.hi);
    }
  }
}

}  // namespace

// (rows skipped for a non-finite gradient, rows whose step hit the bound)
std::tuple<int64_t, int64_t> fused_update(torch::Tensor rows, torch::Tensor step_size, torch::Tensor state1, torch::Tensor state2,
                     torch::Tensor ids, torch::Tensor grad_offsets, torch::Tensor occ_weights,
                     torch::Tensor grad, std::vector<double> float_args, std::vector<int64_t> int_args) {
  const Who who{-1};
  std::vector<Job> jobs(1);
  Job& J = jobs[0];
  prepare_job(J, rows, step_size, state1, state2, ids, grad_offsets, occ_weights, grad, float_args, int_args, who);
  if (J.N == 0) return {0, 0};
  const int64_t gnumel = grad.numel();
  scan_job(J);
  check_job(J, gnumel, who);
  GroupBuffers& buf = group_buffers();
  reserve_group(buf, J.N);
  group_job(J, buf);
  const Counts c = run_jobs(jobs, /*grouped=*/true, gnumel)[0];
  return {c.skipped, c.bounded};
}

// Per table: (rows skipped for a non-finite gradient, rows whose step hit the bound).
std::tuple<std::vector<int64_t>, std::vector<int64_t>> fused_update_many(std::vector<torch::Tensor> rows, std::vector<torch::Tensor> step_size,
                                       std::vector<torch::Tensor> state1, std::vector<torch::Tensor> state2,
                                       std::vector<torch::Tensor> ids, std::vector<torch::Tensor> grad_offsets,
                                       std::vector<torch::Tensor> occ_weights, torch::Tensor grad,
                                       std::vector<std::vector<double>> float_args,
                                       std::vector<std::vector<int64_t>> int_args) {
  const size_t n = rows.size();
  TORCH_CHECK(step_size.size() == n && state1.size() == n && state2.size() == n && ids.size() == n &&
                  grad_offsets.size() == n && occ_weights.size() == n && float_args.size() == n &&
                  int_args.size() == n,
              "fused_update_many: every per-table list must have one entry per table (", n, " rows tensors; got ",
              step_size.size(), " step_size, ", state1.size(), " state1, ", state2.size(), " state2, ",
              ids.size(), " ids, ", grad_offsets.size(), " grad_offsets, ", occ_weights.size(),
              " occ_weights, ", float_args.size(), " float_args, ", int_args.size(), " int_args)");
  std::vector<Job> jobs(n);
  int64_t total_n = 0;
  for (size_t j = 0; j < n; ++j) {
    prepare_job(jobs[j], rows[j], step_size[j], state1[j], state2[j], ids[j], grad_offsets[j], occ_weights[j],
                grad, float_args[j], int_args[j], Who{static_cast<int64_t>(j)});
    total_n += jobs[j].N;
  }
  std::vector<int64_t> skipped(n, 0), bounded(n, 0);
  if (total_n == 0) return {skipped, bounded};
  if (n > 1) check_disjoint(jobs);
  const std::vector<Counts> c = run_jobs(jobs, /*grouped=*/false, grad.numel());
  for (size_t j = 0; j < n; ++j) {
    skipped[j] = c[j].skipped;
    bounded[j] = c[j].bounded;
  }
  return {skipped, bounded};
}

// pooled_lookup.cpp
torch::Tensor pooled_lookup(torch::Tensor weights, torch::Tensor indices, torch::Tensor offsets,
                            std::vector<int64_t> table_offsets, std::vector<int64_t> bits,
                            std::vector<int64_t> dims, std::vector<int64_t> rows, int64_t row_alignment,
                            bool mean, c10::optional<torch::Tensor> per_sample_weights);
torch::Tensor sequence_lookup(torch::Tensor weights, torch::Tensor indices, torch::Tensor offsets,
                              std::vector<int64_t> table_offsets, std::vector<int64_t> bits,
                              std::vector<int64_t> dims, std::vector<int64_t> rows, int64_t row_alignment);
int64_t count_out_of_range(torch::Tensor values, torch::Tensor lengths, std::vector<int64_t> rows, int64_t batch);
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, std::vector<int64_t>> kjt_length_stats(
    torch::Tensor lengths, torch::Tensor offsets, int64_t num_keys);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pooled_lookup", &pooled_lookup,
        "Pooled lookup over FBGEMM IntNBit rows, parallel over bags; bit-identical to FBGEMM's "
        "int_nbit_split_embedding_codegen_lookup_function (see kernels/cpu/pooled_lookup.cpp)",
        py::arg("weights"), py::arg("indices"), py::arg("offsets"), py::arg("table_offsets"), py::arg("bits"),
        py::arg("dims"), py::arg("rows"), py::arg("row_alignment"), py::arg("mean"),
        py::arg("per_sample_weights"));
  m.def("sequence_lookup", &sequence_lookup,
        "Sequence (unpooled) lookup over FBGEMM IntNBit rows: [N, dim], id p in row p; the same bits "
        "as one-row bags of pooled_lookup (see kernels/cpu/pooled_lookup.cpp)",
        py::arg("weights"), py::arg("indices"), py::arg("offsets"), py::arg("table_offsets"), py::arg("bits"),
        py::arg("dims"), py::arg("rows"), py::arg("row_alignment"));
  m.def("count_out_of_range", &count_out_of_range,
        "How many ids fall outside [0, rows[t]) of their feature t (key-major lengths, one pass)",
        py::arg("values"), py::arg("lengths"), py::arg("rows"), py::arg("batch"));
  m.def("kjt_length_stats", &kjt_length_stats,
        "A KJT's lengths checked in one pass: (min, first position of the min, sum, offsets[0], "
        "offsets[-1], per-key sums); empty offsets give 0 and the sum",
        py::arg("lengths"), py::arg("offsets"), py::arg("num_keys"));
  m.def("fused_update", &fused_update,
        "Fused sparse update of low-precision embedding rows, in place; returns (rows skipped for a "
        "non-finite gradient, rows whose step hit max_step) (see torchrec_lowprec/kernels/spec.py)",
        py::arg("rows"), py::arg("step_size"), py::arg("state1"), py::arg("state2"), py::arg("ids"),
        py::arg("grad_offsets"), py::arg("occ_weights"), py::arg("grad"), py::arg("float_args"),
        py::arg("int_args"));
  m.def("fused_update_many", &fused_update_many,
        "fused_update for many tables in one call (one parallel region, one work queue over all "
        "tables' touched rows), all reading the same grad; the same bits as one fused_update call "
        "per table in order. Per-table lists of the fused_update arguments; returns (skipped-row counts, "
        "step-bound counts), one per table. Tables must not share the memory they write.",
        py::arg("rows"), py::arg("step_size"), py::arg("state1"), py::arg("state2"), py::arg("ids"),
        py::arg("grad_offsets"), py::arg("occ_weights"), py::arg("grad"), py::arg("float_args"),
        py::arg("int_args"));
}
