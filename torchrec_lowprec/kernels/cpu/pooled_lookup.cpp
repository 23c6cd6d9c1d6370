// Pooled lookup over FBGEMM IntNBit rows, and the id range check, CPU.
//
// FBGEMM 1.8's CPU IntNBit forward (int_nbit_split_embedding_codegen_lookup_function) runs
// its tables one after another on ONE thread, while the FP32 training TBE forward it is
// compared with runs its tables on all of torch's intra-op threads. This kernel reads the
// same rows ([fp16 scale][fp16 bias][codes, low bits first], or plain fp16 / fp32 rows) and
// computes each bag exactly as FBGEMM's reference (EmbeddingSpMDM_ref /
// EmbeddingSpMDMNBit_ref, which its JIT kernels match): per row `scale = w * s`,
// `bias = w * b`, `out[j] = fma(scale, q[j], out[j] + bias)`; fp16 / fp32 rows
// `out[j] = fma(w, x[j], out[j])`; MEAN multiplies by `1.f / len` at the end. So the output
// is bit-identical to FBGEMM's (tests/kernels/test_pooled_lookup.py), but the bags are
// spread over at::parallel_for's threads, and the row `kPrefetchAhead` ids ahead is
// prefetched, every line of it (FBGEMM's JIT kernels prefetch 16 ids ahead too).
//
// count_out_of_range is the forward's id check in one pass over the ids (the PyTorch version
// built a per-id limit tensor: ~0.7 ms per 131k ids, here tens of microseconds).
// kjt_length_stats is the KJT consistency check's one pass over the lengths: on CPU tensors
// the numbers are read where they are, so the check needs no tensor-to-host copy at all.
//
// Compiled with the update kernel's flags (-ffp-contract=off, no fast-math): the explicit
// fmaf calls are the only fused operations.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "half.h"
#include "prefetch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPrefetchAhead = 16;

using torchrec_lowprec::h2f;
using torchrec_lowprec::prefetch_lines;

// FBGEMM's nbit::padded_row_size_in_bytes with 4 scale/bias bytes.
int64_t row_bytes_of(int64_t bits, int64_t dim, int64_t alignment) {
  int64_t unpadded = 0;
  switch (bits) {
    case 32: unpadded = 4 * dim; break;
    case 16: unpadded = 2 * dim; break;
    case 8: unpadded = dim + 4; break;
    case 4: unpadded = (dim + 1) / 2 + 4; break;
    case 2: unpadded = (dim + 3) / 4 + 4; break;
    default: TORCH_CHECK(false, "pooled_lookup: bits must be 2, 4, 8, 16 or 32, got ", bits);
  }
  return (unpadded + alignment - 1) / alignment * alignment;
}

constexpr int64_t kUnpackChunk = 256;  // a multiple of 4: chunks start on a byte

#if defined(__SSE2__)
// 16 packed bytes -> 8 / BITS vectors of 16 codes, one byte each, low bits first (FBGEMM's
// order): out[i] holds the codes of bytes [16 i / (8 / BITS), 16 (i + 1) / (8 / BITS)).
template <int BITS>
inline void split_codes(__m128i v, __m128i* out) {
  const __m128i mask = _mm_set1_epi8(static_cast<char>((1 << BITS) - 1));
  if constexpr (BITS == 4) {
    const __m128i lo = _mm_and_si128(v, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    out[0] = _mm_unpacklo_epi8(lo, hi);
    out[1] = _mm_unpackhi_epi8(lo, hi);
  } else {
    static_assert(BITS == 2, "bits");
    const __m128i a0 = _mm_and_si128(v, mask);
    const __m128i a1 = _mm_and_si128(_mm_srli_epi16(v, 2), mask);
    const __m128i a2 = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    const __m128i a3 = _mm_and_si128(_mm_srli_epi16(v, 6), mask);
    const __m128i p01lo = _mm_unpacklo_epi8(a0, a1), p01hi = _mm_unpackhi_epi8(a0, a1);
    const __m128i p23lo = _mm_unpacklo_epi8(a2, a3), p23hi = _mm_unpackhi_epi8(a2, a3);
    out[0] = _mm_unpacklo_epi16(p01lo, p23lo);
    out[1] = _mm_unpackhi_epi16(p01lo, p23lo);
    out[2] = _mm_unpacklo_epi16(p01hi, p23hi);
    out[3] = _mm_unpackhi_epi16(p01hi, p23hi);
  }
}
#endif

// `nbytes` packed bytes -> one code per byte in `q` (low bits first, FBGEMM's order). GCC does
// not vectorise the scalar loop well (a strided store per code), so x86 uses SSE2 shuffles.
template <int BITS>
inline void unpack_codes(const uint8_t* c, int64_t nbytes, uint8_t* q) {
  constexpr int kPerByte = 8 / BITS;
  constexpr uint8_t kMask = (1 << BITS) - 1;
  int64_t k = 0;
#if defined(__SSE2__)
  for (; k + 16 <= nbytes; k += 16) {
    __m128i codes[kPerByte];
    split_codes<BITS>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k)), codes);
    for (int i = 0; i < kPerByte; ++i)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k * kPerByte + 16 * i), codes[i]);
  }
#endif
  for (; k < nbytes; ++k) {
    const uint8_t byte = c[k];
    for (int i = 0; i < kPerByte; ++i) q[k * kPerByte + i] = (byte >> (i * BITS)) & kMask;
  }
}

// out[j] = fma(scale, q[j], out[j] + bias): FBGEMM's reference, in the order it rounds.
inline void accumulate_codes(const uint8_t* __restrict q, int64_t n, float scale, float bias,
                             float* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] = __builtin_fmaf(scale, static_cast<float>(q[j]), out[j] + bias);
}

#if defined(__AVX2__) && defined(__FMA__)
// 16 codes (one per byte of `codes`) into out[0:16): the same fma and add as accumulate_codes,
// so the same bits.
inline void fma16(__m128i codes, __m256 scale, __m256 bias, float* out) {
  const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
  const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
  _mm256_storeu_ps(out, _mm256_fmadd_ps(scale, q0, _mm256_add_ps(_mm256_loadu_ps(out), bias)));
  _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(scale, q1, _mm256_add_ps(_mm256_loadu_ps(out + 8), bias)));
}

// Int4 / int2 codes straight from the shuffled registers (no round trip through a byte buffer),
// 16 packed bytes at a time; returns how many codes it did (the caller does the rest).
template <int BITS>
inline int64_t accumulate_packed_avx2(const uint8_t* c, int64_t D, float scale, float bias, float* out) {
  constexpr int kPerByte = 8 / BITS;
  const __m256 vs = _mm256_set1_ps(scale), vb = _mm256_set1_ps(bias);
  int64_t k = 0;
  for (; (k + 16) * kPerByte <= D; k += 16) {
    __m128i codes[kPerByte];
    split_codes<BITS>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k)), codes);
    for (int i = 0; i < kPerByte; ++i) fma16(codes[i], vs, vb, out + k * kPerByte + 16 * i);
  }
  return k * kPerByte;
}
#endif

// `D` codes of width BITS (8 / 4 / 2; `c` at a whole byte) into out[0:D), as FBGEMM rounds.
template <int BITS>
inline void accumulate_code_run(const uint8_t* c, int64_t D, float scale, float bias, float* __restrict out) {
  int64_t start = 0;  // codes done by the AVX2 loop
  if constexpr (BITS == 8) {
#if defined(__AVX2__) && defined(__FMA__)
    // GCC's auto-vectorised byte loop widens through 16-bit lanes; this is ~1.5x faster.
    const __m256 vs = _mm256_set1_ps(scale), vb = _mm256_set1_ps(bias);
    for (; start + 16 <= D; start += 16)
      fma16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + start)), vs, vb, out + start);
#endif
    accumulate_codes(c + start, D - start, scale, bias, out + start);
  } else {
    constexpr int kPerByte = 8 / BITS;
#if defined(__AVX2__) && defined(__FMA__)
    start = accumulate_packed_avx2<BITS>(c, D, scale, bias, out);
#endif
    // Packed codes -> one byte per code (low bits first, FBGEMM's order), then the int8 loop.
    uint8_t q[kUnpackChunk];
    for (int64_t j0 = start; j0 < D; j0 += kUnpackChunk) {
      const int64_t n = std::min<int64_t>(kUnpackChunk, D - j0);
      const uint8_t* cc = c + j0 / kPerByte;  // start and kUnpackChunk are whole bytes of codes
      unpack_codes<BITS>(cc, (n + kPerByte - 1) / kPerByte, q);
      accumulate_codes(q, n, scale, bias, out + j0);
    }
  }
}

// One row into the bag's accumulator `out[0:D)`, weighted by `w`.
template <int BITS>
inline void accumulate_row(const uint8_t* row, int64_t D, float w, float* __restrict out) {
  if constexpr (BITS == 32) {
    const float* x = reinterpret_cast<const float*>(row);
    for (int64_t j = 0; j < D; ++j) out[j] = __builtin_fmaf(w, x[j], out[j]);
  } else if constexpr (BITS == 16) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(row);
    for (int64_t j = 0; j < D; ++j) out[j] = __builtin_fmaf(w, h2f(x[j]), out[j]);
  } else {
    uint16_t sb[2];
    std::memcpy(sb, row, 4);
    accumulate_code_run<BITS>(row + 4, D, w * h2f(sb[0]), w * h2f(sb[1]), out);
  }
}

struct Slot {
  const uint8_t* table;
  int64_t rows, dim, row_bytes, col, bits;
};

#if defined(__AVX2__) && defined(__FMA__)
constexpr int kRowsPerPass = 32;

// 64 codes of width BITS starting at `c` (a whole byte) as 4 vectors of 16, one code a byte.
template <int BITS>
inline void load64(const uint8_t* c, __m128i* q) {
  if constexpr (BITS == 8) {
    for (int i = 0; i < 4; ++i) q[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * i));
  } else if constexpr (BITS == 4) {
    split_codes<4>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), q);
    split_codes<4>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)), q + 2);
  } else {
    split_codes<2>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), q);
  }
}

// Columns [j, j + COLS) of `n` rows (their codes, scaled by `scale`, shifted by `bias`) into
// o[j:j + COLS), the accumulator held in registers across the rows: the same fma and add per
// element, in the same row order, as accumulate_row, so the same bits, without a load and a
// store of `o` per row. COLS is 64 (any width) or 16 (int8).
template <int BITS, int COLS>
inline void block_columns(const uint8_t* const* codes, const float* scale, const float* bias, int n, int64_t j,
                          float* o) {
  constexpr int kRegs = COLS / 8;
  __m256 acc[kRegs];
  for (int i = 0; i < kRegs; ++i) acc[i] = _mm256_loadu_ps(o + j + 8 * i);
  for (int r = 0; r < n; ++r) {
    const __m256 vs = _mm256_set1_ps(scale[r]), vb = _mm256_set1_ps(bias[r]);
    __m128i q[4];
    if constexpr (COLS == 64) {
      load64<BITS>(codes[r] + j * BITS / 8, q);
    } else {
      static_assert(BITS == 8 && COLS == 16, "16-column blocks are int8's");
      q[0] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes[r] + j));
    }
    for (int i = 0; i < kRegs / 2; ++i) {
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q[i]));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q[i], 8)));
      acc[2 * i] = _mm256_fmadd_ps(vs, lo, _mm256_add_ps(acc[2 * i], vb));
      acc[2 * i + 1] = _mm256_fmadd_ps(vs, hi, _mm256_add_ps(acc[2 * i + 1], vb));
    }
  }
  for (int i = 0; i < kRegs; ++i) _mm256_storeu_ps(o + j + 8 * i, acc[i]);
}

// Rows `codes[0:n)` added into o[0:D): register blocks, then each row's remaining columns.
template <int BITS>
inline void blocked_rows(const uint8_t* const* codes, const float* scale, const float* bias, int n, int64_t D,
                         float* o) {
  int64_t j = 0;
  for (; j + 64 <= D; j += 64) block_columns<BITS, 64>(codes, scale, bias, n, j, o);
  if constexpr (BITS == 8)
    for (; j + 16 <= D; j += 16) block_columns<8, 16>(codes, scale, bias, n, j, o);
  if (j < D)
    for (int r = 0; r < n; ++r) accumulate_code_run<BITS>(codes[r] + j * BITS / 8, D - j, scale[r], bias[r], o + j);
}
#endif

// Row p's bytes (null: its id is outside the table), after prefetching the row
// kPrefetchAhead ids ahead if that position is before `end`.
template <typename index_t>
inline const uint8_t* row_at(const Slot& s, const index_t* idx, int64_t p, int64_t end) {
  const int64_t ahead = p + kPrefetchAhead;
  if (ahead < end) {
    const int64_t r = static_cast<int64_t>(idx[ahead]);
    if (r >= 0 && r < s.rows) prefetch_lines(s.table + r * s.row_bytes, s.row_bytes);
  }
  const int64_t r = static_cast<int64_t>(idx[p]);
  return r >= 0 && r < s.rows ? s.table + r * s.row_bytes : nullptr;
}

// Bags [begin, end) of the flattened (feature, sample) grid; returns whether every id was in range.
template <typename index_t, int BITS>
bool pool_bags(const Slot& s, int64_t first_bag, int64_t last_bag, int64_t B, const index_t* idx,
               const index_t* off, const float* psw, bool mean, float* out, int64_t total_D) {
  bool ok = true;
  const int64_t end_pos = off[last_bag];
  for (int64_t k = first_bag; k < last_bag; ++k) {
    float* o = out + (k % B) * total_D + s.col;
    std::fill(o, o + s.dim, 0.0f);
    const int64_t p0 = off[k], p1 = off[k + 1];
#if defined(__AVX2__) && defined(__FMA__)
    constexpr bool kBlocked = BITS <= 8;
#else
    constexpr bool kBlocked = false;
#endif
    if constexpr (kBlocked) {
#if defined(__AVX2__) && defined(__FMA__)
      // Up to kRowsPerPass rows' pointers and scales first, then their columns in registers.
      const uint8_t* codes[kRowsPerPass];
      float scale[kRowsPerPass], bias[kRowsPerPass];
      for (int64_t q0 = p0; q0 < p1; q0 += kRowsPerPass) {
        const int64_t q1 = std::min<int64_t>(p1, q0 + kRowsPerPass);
        int n = 0;
        for (int64_t p = q0; p < q1; ++p) {
          const uint8_t* row = row_at(s, idx, p, end_pos);
          if (row == nullptr) {
            ok = false;
            continue;
          }
          uint16_t sb[2];
          std::memcpy(sb, row, 4);
          const float w = psw ? psw[p] : 1.0f;
          scale[n] = w * h2f(sb[0]);
          bias[n] = w * h2f(sb[1]);
          codes[n++] = row + 4;
        }
        blocked_rows<BITS>(codes, scale, bias, n, s.dim, o);
      }
#endif
    } else {
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* row = row_at(s, idx, p, end_pos);
        if (row == nullptr) {
          ok = false;
          continue;
        }
        accumulate_row<BITS>(row, s.dim, psw ? psw[p] : 1.0f, o);
      }
    }
    if (mean && p1 > p0) {
      const float inv = 1.f / static_cast<float>(p1 - p0);
      for (int64_t j = 0; j < s.dim; ++j) o[j] *= inv;
    }
  }
  return ok;
}

// Bags [k0, k1) of the flattened (feature, sample) grid, split at feature boundaries:
// `body(bits, slot, first, last)` with `bits` a std::integral_constant of the slot's width.
template <typename Body>
bool for_each_slot_run(const std::vector<Slot>& slots, int64_t k0, int64_t k1, int64_t B, Body&& body) {
  bool ok = true;
  while (k0 < k1) {
    const int64_t t = k0 / B;
    const int64_t stop = std::min(k1, (t + 1) * B);
    const Slot& s = slots[t];
    switch (s.bits) {
      case 8: ok &= body(std::integral_constant<int, 8>{}, s, k0, stop); break;
      case 4: ok &= body(std::integral_constant<int, 4>{}, s, k0, stop); break;
      case 2: ok &= body(std::integral_constant<int, 2>{}, s, k0, stop); break;
      case 16: ok &= body(std::integral_constant<int, 16>{}, s, k0, stop); break;
      default: ok &= body(std::integral_constant<int, 32>{}, s, k0, stop); break;
    }
    k0 = stop;
  }
  return ok;
}

// Sequence mode (FBGEMM's PoolingMode::NONE): id p of a bag is dequantized into output row p
// (`out[j] = fma(scale, q[j], bias)`, the pooled formula for one row of weight 1).
template <typename index_t, int BITS>
bool gather_bags(const Slot& s, int64_t first_bag, int64_t last_bag, const index_t* idx, const index_t* off,
                 float* out) {
  bool ok = true;
  const int64_t p_begin = off[first_bag], p_end = off[last_bag];
  for (int64_t p = p_begin; p < p_end; ++p) {
    float* o = out + p * s.dim;
    std::fill(o, o + s.dim, 0.0f);
    const uint8_t* row = row_at(s, idx, p, p_end);
    if (row == nullptr) {
      ok = false;
      continue;
    }
    accumulate_row<BITS>(row, s.dim, 1.0f, o);
  }
  return ok;
}

// The checks both lookups make, and each feature's slot (`col`: its first output column).
std::vector<Slot> make_slots(const char* op, const torch::Tensor& weights, const torch::Tensor& indices,
                             const torch::Tensor& offsets, const std::vector<int64_t>& table_offsets,
                             const std::vector<int64_t>& bits, const std::vector<int64_t>& dims,
                             const std::vector<int64_t>& rows, int64_t row_alignment, int64_t* total_D) {
  const int64_t T = static_cast<int64_t>(table_offsets.size());
  TORCH_CHECK(T > 0 && bits.size() == table_offsets.size() && dims.size() == table_offsets.size() &&
                  rows.size() == table_offsets.size(),
              op, ": table_offsets, bits, dims and rows need one entry per feature");
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == torch::kUInt8 && weights.is_contiguous(),
              op, ": weights must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(indices.dim() == 1 && offsets.dim() == 1 && indices.scalar_type() == offsets.scalar_type() &&
                  (indices.scalar_type() == torch::kInt64 || indices.scalar_type() == torch::kInt32),
              op, ": indices and offsets must be 1-D int32/int64 tensors of the same dtype");
  TORCH_CHECK(row_alignment >= 1, op, ": row_alignment must be >= 1");
  const int64_t n_off = offsets.numel() - 1;
  TORCH_CHECK(n_off >= 0 && n_off % T == 0, op, ": offsets must hold T * B + 1 entries (T = ", T, "), got ",
              offsets.numel());
  std::vector<Slot> slots(T);
  *total_D = 0;
  const int64_t nbytes = weights.numel();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t rb = row_bytes_of(bits[t], dims[t], row_alignment);
    TORCH_CHECK(table_offsets[t] >= 0 && rows[t] >= 0 && table_offsets[t] + rows[t] * rb <= nbytes, op,
                ": feature ", t, "'s table (", rows[t], " rows of ", rb, " B at byte ", table_offsets[t],
                ") does not fit in the ", nbytes, "-byte buffer");
    slots[t] = Slot{weights.data_ptr<uint8_t>() + table_offsets[t], rows[t], dims[t], rb, *total_D, bits[t]};
    *total_D += dims[t];
  }
  return slots;
}

// Runs `range_fn(idx, off, k0, k1)` (false: an id was out of range) over the flattened bag grid
// [0, n_off) on torch's intra-op threads, for int32 or int64 ids.
template <typename F>
void for_each_bag_range(const char* op, const torch::Tensor& idx_t, const torch::Tensor& off_t, F&& range_fn) {
  const int64_t n_off = off_t.numel() - 1;
  std::atomic<bool> all_ok{true};
  AT_DISPATCH_INDEX_TYPES(idx_t.scalar_type(), "for_each_bag_range", [&] {
    const index_t* idx = idx_t.data_ptr<index_t>();
    const index_t* off = off_t.data_ptr<index_t>();
    TORCH_CHECK(off[0] == 0 && off[n_off] == idx_t.numel(), op, ": offsets must run from 0 to indices.numel()");
    // Grain: bags of a few hundred ids per task; the split follows the flattened bag grid.
    at::parallel_for(0, n_off, 256, [&](int64_t k0, int64_t k1) {
      if (!range_fn(idx, off, k0, k1)) all_ok = false;
    });
  });
  TORCH_CHECK_INDEX(all_ok.load(), op, ": an id is out of range for its table (ids are checked before the "
                    "lookup; this is a bug in the caller)");
}

}  // namespace

// [B, sum(dims)] fp32: feature t's bags pooled from the table at byte `table_offsets[t]` of `weights`.
torch::Tensor pooled_lookup(torch::Tensor weights, torch::Tensor indices, torch::Tensor offsets,
                            std::vector<int64_t> table_offsets, std::vector<int64_t> bits,
                            std::vector<int64_t> dims, std::vector<int64_t> rows, int64_t row_alignment,
                            bool mean, c10::optional<torch::Tensor> per_sample_weights) {
  int64_t total_D = 0;
  const std::vector<Slot> slots = make_slots("pooled_lookup", weights, indices, offsets, table_offsets, bits,
                                             dims, rows, row_alignment, &total_D);
  const int64_t T = static_cast<int64_t>(slots.size());
  const int64_t n_off = offsets.numel() - 1;
  const int64_t B = n_off / T;
  auto idx_t = indices.contiguous();
  auto off_t = offsets.contiguous();
  const float* psw = nullptr;
  torch::Tensor psw_t;
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    psw_t = per_sample_weights->to(torch::kFloat32).contiguous();
    TORCH_CHECK(psw_t.numel() == indices.numel(), "pooled_lookup: one per-sample weight per index is needed");
    psw = psw_t.data_ptr<float>();
  }
  auto out = torch::empty({B, total_D}, weights.options().dtype(torch::kFloat32));
  if (B == 0) return out;
  float* o = out.data_ptr<float>();
  for_each_bag_range("pooled_lookup", idx_t, off_t, [&](const auto* idx, const auto* off, int64_t k0, int64_t k1) {
    using index_t = std::remove_cv_t<std::remove_pointer_t<decltype(idx)>>;
    return for_each_slot_run(slots, k0, k1, B, [&](auto bits, const Slot& s, int64_t a, int64_t b) {
      return pool_bags<index_t, decltype(bits)::value>(s, a, b, B, idx, off, psw, mean, o, total_D);
    });
  });
  return out;
}

// [N, dim] fp32, N = indices.numel(): id p dequantized into row p (FBGEMM's PoolingMode::NONE,
// which needs every feature at the same dim, as torchrec.EmbeddingCollection does).
torch::Tensor sequence_lookup(torch::Tensor weights, torch::Tensor indices, torch::Tensor offsets,
                              std::vector<int64_t> table_offsets, std::vector<int64_t> bits,
                              std::vector<int64_t> dims, std::vector<int64_t> rows, int64_t row_alignment) {
  int64_t total_D = 0;
  const std::vector<Slot> slots = make_slots("sequence_lookup", weights, indices, offsets, table_offsets, bits,
                                             dims, rows, row_alignment, &total_D);
  const int64_t T = static_cast<int64_t>(slots.size());
  for (const Slot& s : slots)
    TORCH_CHECK(s.dim == slots[0].dim, "sequence_lookup: every feature needs the same dim (got ", s.dim, " and ",
                slots[0].dim, ")");
  const int64_t n_off = offsets.numel() - 1;
  const int64_t B = n_off / T;
  auto idx_t = indices.contiguous();
  auto off_t = offsets.contiguous();
  auto out = torch::empty({indices.numel(), slots[0].dim}, weights.options().dtype(torch::kFloat32));
  if (B == 0 || indices.numel() == 0) return out;
  float* o = out.data_ptr<float>();
  for_each_bag_range("sequence_lookup", idx_t, off_t, [&](const auto* idx, const auto* off, int64_t k0, int64_t k1) {
    using index_t = std::remove_cv_t<std::remove_pointer_t<decltype(idx)>>;
    return for_each_slot_run(slots, k0, k1, B, [&](auto bits, const Slot& s, int64_t a, int64_t b) {
      return gather_bags<index_t, decltype(bits)::value>(s, a, b, idx, off, o);
    });
  });
  return out;
}

// How many ids of `values` fall outside [0, rows[t]) for their feature t (features key-major,
// `lengths` holding one length per (feature, sample), `batch` samples per feature).
int64_t count_out_of_range(torch::Tensor values, torch::Tensor lengths, std::vector<int64_t> rows, int64_t batch) {
  const int64_t T = static_cast<int64_t>(rows.size());
  TORCH_CHECK(values.device().is_cpu() && lengths.device().is_cpu(), "count_out_of_range: CPU tensors only");
  TORCH_CHECK(lengths.numel() == T * batch, "count_out_of_range: lengths needs ", T * batch, " entries, got ",
              lengths.numel());
  auto len_t = lengths.to(torch::kInt64).contiguous();
  const int64_t* len = len_t.data_ptr<int64_t>();
  std::vector<int64_t> ends(T);
  int64_t pos = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < batch; ++b) pos += len[t * batch + b];
    ends[t] = pos;
  }
  TORCH_CHECK(pos == values.numel(), "count_out_of_range: lengths sum to ", pos, " but values holds ",
              values.numel());
  auto val_t = values.contiguous();
  std::atomic<int64_t> bad{0};
  AT_DISPATCH_INDEX_TYPES(val_t.scalar_type(), "count_out_of_range", [&] {
    const index_t* v = val_t.data_ptr<index_t>();
    at::parallel_for(0, pos, 1 << 15, [&](int64_t p0, int64_t p1) {
      int64_t t = std::upper_bound(ends.begin(), ends.end(), p0) - ends.begin();
      int64_t n = 0;
      while (p0 < p1) {
        const int64_t stop = std::min(p1, ends[t]);
        const uint64_t limit = static_cast<uint64_t>(rows[t]);
        // One unsigned compare catches negative ids too.
        for (int64_t p = p0; p < stop; ++p) n += static_cast<uint64_t>(static_cast<int64_t>(v[p])) >= limit;
        p0 = stop;
        ++t;
      }
      bad += n;
    });
  });
  return bad.load();
}

// The numbers validate_kjt checks, in one pass over `lengths` (key-major, num_keys x batch):
// (smallest length, the first position holding it, sum, offsets[0], offsets[-1], per-key sums).
// `offsets` empty: the offsets entries are 0 and the sum.
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, std::vector<int64_t>> kjt_length_stats(
    torch::Tensor lengths, torch::Tensor offsets, int64_t num_keys) {
  TORCH_CHECK(lengths.device().is_cpu() && offsets.device().is_cpu(), "kjt_length_stats: CPU tensors only");
  TORCH_CHECK(lengths.dim() == 1 && num_keys > 0 && lengths.numel() % num_keys == 0,
              "kjt_length_stats: lengths needs a multiple of ", num_keys, " entries, got ", lengths.numel());
  const int64_t batch = lengths.numel() / num_keys;
  std::vector<int64_t> per_key(num_keys, 0);
  int64_t low = 0, low_at = 0, total = 0;
  auto len_t = lengths.contiguous();
  AT_DISPATCH_INDEX_TYPES(len_t.scalar_type(), "kjt_length_stats", [&] {
    const index_t* len = len_t.data_ptr<index_t>();
    if (len_t.numel() > 0) low = static_cast<int64_t>(len[0]);
    for (int64_t k = 0; k < num_keys; ++k) {
      int64_t sum = 0;
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t v = static_cast<int64_t>(len[k * batch + b]);
        sum += v;
        if (v < low) {
          low = v;
          low_at = k * batch + b;
        }
      }
      per_key[k] = sum;
      total += sum;
    }
  });
  int64_t first = 0, last = total;
  if (offsets.numel() > 0) {
    auto off_t = offsets.contiguous();
    AT_DISPATCH_INDEX_TYPES(off_t.scalar_type(), "kjt_length_stats", [&] {
      const index_t* off = off_t.data_ptr<index_t>();
      first = static_cast<int64_t>(off[0]);
      last = static_cast<int64_t>(off[off_t.numel() - 1]);
    });
  }
  return {low, low_at, total, first, last, per_key};
}

