// Decode attention over the paged KV cache on the CPU: one query token per sequence reads its K and V rows in place
// through its block table (no gathered copy, no SDPA call), in fp32, its context cut into fixed pieces that the
// threads share (flash-decoding: each piece keeps its own max, sum and weighted values, merged at the end).
//
// Shapes as ferry/model/layers/paged_attention.py: q [S, Hq, D]; pools [blocks, block_size, Hkv, D]; block_tables
// [S, W] int32; context_lens [S] int32 (0: a padding row, output zeros). Query head h reads KV head h / (Hq / Hkv).
// q and the pools are fp32 or bf16 (one dtype); the output has q's dtype. Slots past a context are never read, so
// stale or NaN values there cannot reach the output.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FERRY_ATTN_X86 1
#endif

namespace {

// Contexts are split into pieces of this many tokens (rounded up to whole blocks), whatever the batch and the thread
// count: a sequence's output then depends on its own context alone, so a request gives the same bits alone, in any
// batch, eager or compiled (the serving engine's greedy answers equal `ferry generate`'s); and a batch-1 step at a
// few hundred tokens still has a piece per thread.
constexpr int64_t SPLIT_TOKENS = 256;

struct Step {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* tables;
  const int32_t* lens;
  bool bf16;
  int64_t S, Hq, Hkv, D, G, block_size, width;
  int64_t row_stride;  // elements between one token's row and the next within a block: Hkv * D
  float scale;
  int64_t splits, split_len;
  float* part_max;  // [S, Hkv, splits, G]
  float* part_sum;  // [S, Hkv, splits, G]
  float* part_acc;  // [S, Hkv, splits, G, D]
};

inline float load_one(const void* base, int64_t i, bool bf16) {
  if (!bf16) return static_cast<const float*>(base)[i];
  uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline int64_t slot_of(const Step& p, int64_t s, int64_t t) {
  const int64_t block = p.tables[s * p.width + t / p.block_size];
  return block * p.block_size + t % p.block_size;
}

// The scalar path (any CPU, any head size): the same two passes as the vector one.
void split_scalar(const Step& p, int64_t s, int64_t h, int64_t c, std::vector<float>& scores) {
  const int64_t len = p.lens[s], t0 = c * p.split_len, t1 = std::min(len, t0 + p.split_len);
  const int64_t base = (s * p.Hkv + h) * p.splits + c;
  float* m = p.part_max + base * p.G;
  float* l = p.part_sum + base * p.G;
  float* acc = p.part_acc + base * p.G * p.D;
  std::fill(acc, acc + p.G * p.D, 0.f);
  if (t0 >= t1) {
    for (int64_t g = 0; g < p.G; ++g) m[g] = -std::numeric_limits<float>::infinity(), l[g] = 0.f;
    return;
  }
  scores.resize(p.G * (t1 - t0));
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t qoff = (s * p.Hq + h * p.G + g) * p.D;
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t koff = slot_of(p, s, t) * p.row_stride + h * p.D;
      float dot = 0.f;
      for (int64_t d = 0; d < p.D; ++d) dot += load_one(p.q, qoff + d, p.bf16) * load_one(p.k, koff + d, p.bf16);
      dot *= p.scale;
      scores[g * (t1 - t0) + t - t0] = dot;
      best = std::max(best, dot);
    }
    float total = 0.f;
    for (int64_t t = t0; t < t1; ++t) {
      const float w = std::exp(scores[g * (t1 - t0) + t - t0] - best);
      total += w;
      const int64_t voff = slot_of(p, s, t) * p.row_stride + h * p.D;
      for (int64_t d = 0; d < p.D; ++d) acc[g * p.D + d] += w * load_one(p.v, voff + d, p.bf16);
    }
    m[g] = best;
    l[g] = total;
  }
}

#ifdef FERRY_ATTN_X86
#define FERRY_ATTN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("fma");
  return has;
}

FERRY_ATTN_AVX512 inline __m512 load16(const void* base, int64_t i, bool bf16) {
  if (!bf16) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// e^x for x <= 0 (scores minus their max): 2^(x log2 e) as 2^n * 2^f, f in [-0.5, 0.5], 2^f by its Taylor series
// to the 7th power (relative error ~1e-7); vscalefps applies 2^n, giving 0 (or a denormal) far below the range.
FERRY_ATTN_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.f));  // -inf (padding) would make y - n NaN; e^-103 is 0 in fp32
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(y, n), _mm512_set1_ps(0.693147180559945309f));  // (y - n) ln 2
  __m512 r = _mm512_set1_ps(1.f / 5040.f);
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.f / 720.f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.f / 120.f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.f / 24.f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.f / 6.f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(0.5f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(r, n);
}

constexpr int MAX_GROUP = 8;   // query heads per KV head the vector path keeps in registers at once
constexpr int MAX_CHUNKS = 8;  // D <= 128

// 16 vectors -> one: lane L is the sum of the lanes of v[(L >> 2) | ((L & 3) << 2)] (a transposing tree of
// shuffles and adds: 15 adds for 16 sums where 16 horizontal reductions take ~8 instructions each).
FERRY_ATTN_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int j = 0; j < 8; ++j)  // 256-bit halves: w[j] = [8 partials of v[2j] | 8 of v[2j+1]]
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // 128-bit quarters: x[j] quarter k = 4 partials of v[4j + k]
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0xDD));
  for (int j = 0; j < 2; ++j)  // y[j] quarter k = [2 partials of v[8j + k], 2 of v[8j + 4 + k]]
    y[j] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * j], x[2 * j + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * j], x[2 * j + 1], 0xEE));
  // lane 4k + m = the sum of v[k + 4m]
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// One (sequence, KV head, split): the split's K rows 16 tokens at a time (splits start on a block and blocks are
// multiples of 16 tokens, so 16 tokens are 16 consecutive slots of one block: no table lookup per token), scores
// of every query head of the group; their softmax; then one pass over the V rows. Head size a multiple of 16, at
// most 128; a group of at most 8.
FERRY_ATTN_AVX512 void split_avx512(const Step& p, int64_t s, int64_t h, int64_t c, std::vector<float>& scores) {
  const int64_t len = p.lens[s], t0 = c * p.split_len, t1 = std::min(len, t0 + p.split_len);
  const int64_t base = (s * p.Hkv + h) * p.splits + c;
  float* m = p.part_max + base * p.G;
  float* l = p.part_sum + base * p.G;
  float* acc = p.part_acc + base * p.G * p.D;
  const int G = static_cast<int>(p.G), chunks = static_cast<int>(p.D / 16);
  if (t0 >= t1) {
    for (int g = 0; g < G; ++g) m[g] = -std::numeric_limits<float>::infinity(), l[g] = 0.f;
    std::fill(acc, acc + p.G * p.D, 0.f);
    return;
  }
  const int64_t n = t1 - t0, padded = (n + 15) / 16 * 16;
  scores.resize(G * padded);
  __m512 q[MAX_GROUP][MAX_CHUNKS];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < chunks; ++j)
      q[g][j] = _mm512_mul_ps(load16(p.q, (s * p.Hq + h * G + g) * p.D + j * 16, p.bf16), _mm512_set1_ps(p.scale));
  const int32_t* table = p.tables + s * p.width;
  for (int64_t tb = t0; tb < t1; tb += 16) {
    const int64_t rows = std::min<int64_t>(16, t1 - tb);
    const int64_t first = (static_cast<int64_t>(table[tb / p.block_size]) * p.block_size + tb % p.block_size) *
                          p.row_stride + h * p.D;
    for (int g = 0; g < G; ++g) {
      __m512 dots[16];
      for (int i = 0; i < 16; ++i) {
        const int at = (i >> 2) | ((i & 3) << 2);  // sum16's lane order
        if (i >= rows) {
          dots[at] = _mm512_setzero_ps();
          continue;
        }
        const int64_t row = first + i * p.row_stride;
        __m512 dot = _mm512_mul_ps(q[g][0], load16(p.k, row, p.bf16));
        for (int j = 1; j < chunks; ++j) dot = _mm512_fmadd_ps(q[g][j], load16(p.k, row + j * 16, p.bf16), dot);
        dots[at] = dot;
      }
      _mm512_storeu_ps(scores.data() + g * padded + (tb - t0), sum16(dots));
    }
  }
  for (int g = 0; g < G; ++g) {
    float* row = scores.data() + g * padded;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < padded; i += 16) {
      const __mmask16 real = i + 16 <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
      mx = _mm512_mask_max_ps(mx, real, mx, _mm512_loadu_ps(row + i));
    }
    const float top = _mm512_reduce_max_ps(mx);
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < padded; i += 16) {
      const __mmask16 real = i + 16 <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);  // padding: 0
      const __m512 w = _mm512_maskz_mov_ps(real, exp16(_mm512_sub_ps(_mm512_loadu_ps(row + i), _mm512_set1_ps(top))));
      _mm512_storeu_ps(row + i, w);
      total = _mm512_add_ps(total, w);
    }
    m[g] = top;
    l[g] = _mm512_reduce_add_ps(total);
  }
  __m512 out[MAX_GROUP][MAX_CHUNKS];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < chunks; ++j) out[g][j] = _mm512_setzero_ps();
  for (int64_t tb = t0; tb < t1; tb += 16) {
    const int64_t rows = std::min<int64_t>(16, t1 - tb);
    const int64_t first = (static_cast<int64_t>(table[tb / p.block_size]) * p.block_size + tb % p.block_size) *
                          p.row_stride + h * p.D;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = first + i * p.row_stride;
      __m512 v[MAX_CHUNKS];
      for (int j = 0; j < chunks; ++j) v[j] = load16(p.v, row + j * 16, p.bf16);
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(scores[g * padded + tb - t0 + i]);
        for (int j = 0; j < chunks; ++j) out[g][j] = _mm512_fmadd_ps(w, v[j], out[g][j]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < chunks; ++j) _mm512_storeu_ps(acc + g * p.D + j * 16, out[g][j]);
}
#else
bool cpu_has_avx512() { return false; }
#endif

bool vector_path(int64_t head_dim, int64_t group, int64_t block_size) {
  return cpu_has_avx512() && head_dim % 16 == 0 && head_dim <= 128 && group <= 8 && block_size % 16 == 0;
}

}  // namespace

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, bool vector) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(),
              "paged_decode: expected q [S, Hq, D] and pools [blocks, block_size, Hkv, D] of one shape");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "paged_decode: q and the pools must all be fp32 or all bf16");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_decode: the pools must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_decode: block_tables and context_lens must be int32");
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_pool.size(1), Hkv = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D && Hq % Hkv == 0, "paged_decode: head sizes must match, Hq a multiple of Hkv");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == S && context_lens.numel() == S,
              "paged_decode: block_tables [S, W] and context_lens [S] expected");
  at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  int64_t longest = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(len_ptr[s] >= 0 && len_ptr[s] <= tables.size(1) * block_size,
                "paged_decode: context ", len_ptr[s], " of row ", s, " does not fit its ", tables.size(1), " blocks");
    longest = std::max<int64_t>(longest, len_ptr[s]);
  }
  at::Tensor out = at::empty({S, Hq, D}, q.options());
  if (S == 0) return out;
  const int64_t split_len = (SPLIT_TOKENS + block_size - 1) / block_size * block_size;  // whole blocks
  const int64_t splits = std::max<int64_t>(1, (longest + split_len - 1) / split_len);
  const int64_t pairs = S * Hkv;
  const int64_t G = Hq / Hkv;
  std::vector<float> part_max(pairs * splits * G), part_sum(pairs * splits * G), part_acc(pairs * splits * G * D);
  Step p{qc.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), tables.data_ptr<int32_t>(), len_ptr,
         q.scalar_type() == at::kBFloat16, S, Hq, Hkv, D, G, block_size, tables.size(1), Hkv * D,
         static_cast<float>(scale), splits, split_len, part_max.data(), part_sum.data(), part_acc.data()};
#ifdef FERRY_ATTN_X86
  const bool vec = vector && vector_path(D, G, block_size);
#else
  const bool vec = false;
#endif
  at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item % splits, pair = item / splits;
#ifdef FERRY_ATTN_X86
      if (vec) {
        split_avx512(p, pair / Hkv, pair % Hkv, c, scores);
        continue;
      }
#endif
      split_scalar(p, pair / Hkv, pair % Hkv, c, scores);
    }
  });
  // Merge the splits of each (sequence, query head): weights e^(m_c - M) on each split's sums.
  const bool bf16 = p.bf16;
  void* dst = out.data_ptr();
  std::vector<float> row(D);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t g = 0; g < G; ++g) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < splits; ++c) top = std::max(top, part_max[((s * Hkv + h) * splits + c) * G + g]);
        std::fill(row.begin(), row.end(), 0.f);
        float total = 0.f;
        if (top != -std::numeric_limits<float>::infinity()) {  // else a padding row: zeros
          for (int64_t c = 0; c < splits; ++c) {
            const int64_t at = ((s * Hkv + h) * splits + c) * G + g;
            const float w = std::exp(part_max[at] - top);
            total += w * part_sum[at];
            const float* a = part_acc.data() + at * D;
            for (int64_t d = 0; d < D; ++d) row[d] += w * a[d];
          }
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        const int64_t o = (s * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float val = row[d] * inv;
          if (bf16) {
            uint32_t bits;
            std::memcpy(&bits, &val, 4);
            bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even, as torch does
            static_cast<uint16_t*>(dst)[o + d] = static_cast<uint16_t>(bits >> 16);
          } else {
            static_cast<float*>(dst)[o + d] = val;
          }
        }
      }
  return out;
}

std::string paged_decode_isa(int64_t head_dim, int64_t group) {
  return vector_path(head_dim, group, 16) ? "avx512" : "scalar";
}

TORCH_LIBRARY_FRAGMENT(ferry_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor context_lens, float scale, "
        "bool vector=True) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
  m.def("paged_decode_isa(int head_dim, int group) -> str", &paged_decode_isa);
}
