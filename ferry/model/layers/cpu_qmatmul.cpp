// x W^T on the CPU with W in 4- or 8-bit groups of 32 and x quantized to int8 per group of 32 on the fly: the
// integer dot products run as AVX-512 VNNI vpdpbusd (u8 weights x s8 activations -> s32), where torch's int4
// kernel expands every weight to bf16 and multiplies in floats. This is the scheme llama.cpp runs GGUF weights
// with (Q8 activations against Q4/Q8 blocks).
//
// Weight layout (made once at load, ferry/model/weights/repack.py): output rows in tiles of 16; per tile and
// group of 32 inputs the tile's values as unsigned u (w = d * u + m) interleaved so that one 64-byte load holds
// 4 consecutive inputs of all 16 rows: byte r * 4 + e is row r's input 4c + e (chunk c of the group). 8-bit
// weights store 8 such chunks per group; 4-bit ones 4 loads of 64 bytes, chunk 2p in the low nibbles and chunk
// 2p + 1 in the high ones. One vpdpbusd with the chunk's 4 activation bytes broadcast then adds 4 products to each
// of the 16 rows' sums, so a group ends with its 16 row sums in one register: no horizontal sums anywhere.
// Scales d (and mins m) are fp16 [tiles, groups, 16]; without mins, w = d * (u - offset) (Q4_0: 8, Q8_0: 128).
//
// Per group g of a row: sum_i w_i x_i = d * dx * sum_i u_i qx_i + (m - offset * d) * dx * sum_i qx_i, where x_i ~
// dx * qx_i, qx_i = round(x_i / dx) in -127..127, dx = max|x| / 127.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FERRY_X86 1
#endif

namespace {

constexpr int GROUP = 32;
constexpr int TILE = 16;
constexpr int MBLOCK = 4;  // activation rows per pass over a weight tile (registers: 4 float accumulators)

struct QuantizedRows {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> dx;      // [M, G]
  std::vector<float> sx;      // [M, G]: dx * sum(q)
  std::vector<int32_t> qsum;  // [M, G]
};

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float half_to_float(uint16_t h) {
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// One row's group of 32 activations -> int8 (round half to even, as vcvtps2dq does), its scale and sum.
inline void quantize_group(const float* x, int8_t* q, float* dx, int32_t* qsum) {
  float amax = 0.f;
  for (int i = 0; i < GROUP; ++i) amax = std::max(amax, std::fabs(x[i]));
  float d = amax / 127.f;
  float id = d > 0.f ? 1.f / d : 0.f;
  int32_t s = 0;
  for (int i = 0; i < GROUP; ++i) {
    int v = static_cast<int>(std::nearbyint(x[i] * id));
    v = std::min(127, std::max(-127, v));
    q[i] = static_cast<int8_t>(v);
    s += v;
  }
  *dx = d;
  *qsum = s;
}

struct Problem {
  const uint8_t* packed;
  const uint16_t* scales;  // fp16 bits [T, G, 16]
  const uint16_t* mins;    // fp16 bits [T, G, 16] or nullptr
  int bits;
  int offset;  // without mins: w = d * (u - offset)
  int64_t M, K, G, N;
  const QuantizedRows* x;
  float* out;  // [M, N] fp32 (converted by the caller), or written per tile by store()
};

inline int64_t tile_bytes_per_group(int bits) { return bits == 4 ? 4 * 64 : 8 * 64; }

// Reference path, any CPU: the same arithmetic as the vector one (integer sums per group, then float).
void tile_scalar(const Problem& p, int64_t t, float* acc /* [M, 16] */) {
  const int64_t gb = tile_bytes_per_group(p.bits);
  for (int64_t m = 0; m < p.M; ++m)
    for (int r = 0; r < TILE; ++r) acc[m * TILE + r] = 0.f;
  for (int64_t g = 0; g < p.G; ++g) {
    const uint8_t* w = p.packed + (t * p.G + g) * gb;
    const uint16_t* d16 = p.scales + (t * p.G + g) * TILE;
    const uint16_t* m16 = p.mins ? p.mins + (t * p.G + g) * TILE : nullptr;
    for (int r = 0; r < TILE; ++r) {
      uint8_t u[GROUP];
      for (int c = 0; c < 8; ++c)
        for (int e = 0; e < 4; ++e) {
          if (p.bits == 8) {
            u[4 * c + e] = w[c * 64 + r * 4 + e];
          } else {
            uint8_t b = w[(c / 2) * 64 + r * 4 + e];
            u[4 * c + e] = (c % 2 == 0) ? (b & 0x0F) : (b >> 4);
          }
        }
      const float d = half_to_float(d16[r]);
      const float mn = m16 ? half_to_float(m16[r]) : -static_cast<float>(p.offset) * d;
      for (int64_t m = 0; m < p.M; ++m) {
        const int8_t* q = p.x->q.data() + m * p.K + g * GROUP;
        int32_t s = 0;
        for (int i = 0; i < GROUP; ++i) s += static_cast<int32_t>(u[i]) * q[i];
        acc[m * TILE + r] += d * p.x->dx[m * p.G + g] * static_cast<float>(s) + mn * p.x->sx[m * p.G + g];
      }
    }
  }
}

#ifdef FERRY_X86
#define FERRY_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") &&
                          __builtin_cpu_supports("fma");
  return has;
}
FERRY_AVX512 inline __m512i bcast4(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm512_set1_epi32(v);
}

// Rows m0..m0+MB-1 of the activations against tile t; acc [MB][16].
template <int BITS, bool MINS, int MB>
FERRY_AVX512 void tile_vnni(const Problem& p, int64_t t, int64_t m0, float* acc) {
  constexpr int64_t gb = BITS == 4 ? 4 * 64 : 8 * 64;
  __m512 f[MB];
  for (int m = 0; m < MB; ++m) f[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512 neg_offset = _mm512_set1_ps(-static_cast<float>(p.offset));
  for (int64_t g = 0; g < p.G; ++g) {
    const uint8_t* w = p.packed + (t * p.G + g) * gb;
    __m512i u[8];
    if (BITS == 4) {
      for (int c = 0; c < 4; ++c) {
        __m512i v = _mm512_loadu_si512(w + c * 64);
        u[2 * c] = _mm512_and_si512(v, low);
        u[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      for (int c = 0; c < 8; ++c) u[c] = _mm512_loadu_si512(w + c * 64);
    }
    if (g + 2 < p.G) _mm_prefetch(reinterpret_cast<const char*>(w + 2 * gb), _MM_HINT_T0);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scales + (t * p.G + g) * TILE)));
    const __m512 mn = MINS ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.mins + (t * p.G + g) * TILE)))
                           : _mm512_mul_ps(d, neg_offset);
    for (int m = 0; m < MB; ++m) {
      const int64_t row = m0 + m;
      const int8_t* q = p.x->q.data() + row * p.K + g * GROUP;
      __m512i a0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[0], bcast4(q + 0));
      __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[1], bcast4(q + 4));
      a0 = _mm512_dpbusd_epi32(a0, u[2], bcast4(q + 8));
      a1 = _mm512_dpbusd_epi32(a1, u[3], bcast4(q + 12));
      a0 = _mm512_dpbusd_epi32(a0, u[4], bcast4(q + 16));
      a1 = _mm512_dpbusd_epi32(a1, u[5], bcast4(q + 20));
      a0 = _mm512_dpbusd_epi32(a0, u[6], bcast4(q + 24));
      a1 = _mm512_dpbusd_epi32(a1, u[7], bcast4(q + 28));
      const __m512 s = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
      const float dx = p.x->dx[row * p.G + g], sx = p.x->sx[row * p.G + g];
      f[m] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_set1_ps(dx)), f[m]);
      f[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx), f[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(acc + m * TILE, f[m]);
}

template <int BITS, bool MINS>
FERRY_AVX512 void tile_vnni_rows(const Problem& p, int64_t t, float* acc) {
  int64_t m = 0;
  for (; m + MBLOCK <= p.M; m += MBLOCK) tile_vnni<BITS, MINS, MBLOCK>(p, t, m, acc + m * TILE);
  for (; m < p.M; ++m) tile_vnni<BITS, MINS, 1>(p, t, m, acc + m * TILE);
}


// Per group of 32 of each row: what quantize_group does, 16 lanes at a time (the same float operations and the
// same rounding, so both paths give the same int8 values).
FERRY_AVX512 void quantize_row_vnni(const void* src, bool bf16, int64_t K, int8_t* q, float* dx, int32_t* qsum) {
  for (int64_t g = 0; g < K / GROUP; ++g) {
    __m512 v[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t at = g * GROUP + h * 16;
      if (bf16) {
        __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(src) + at));
        v[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      } else {
        v[h] = _mm512_loadu_ps(static_cast<const float*>(src) + at);
      }
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    const float d = amax / 127.f;
    const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i i0 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(v[0], id))));
    __m512i i1 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(v[1], id))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * GROUP), _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * GROUP + 16), _mm512_cvtepi32_epi8(i1));
    dx[g] = d;
    qsum[g] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
  }
}
#else
bool cpu_has_vnni() { return false; }
#endif

void quantize_row_scalar(const void* src, bool bf16, int64_t K, int8_t* q, float* dx, int32_t* qsum) {
  float row[GROUP];
  for (int64_t g = 0; g < K / GROUP; ++g) {
    for (int i = 0; i < GROUP; ++i)
      row[i] = bf16 ? bf16_to_float(static_cast<const uint16_t*>(src)[g * GROUP + i])
                    : static_cast<const float*>(src)[g * GROUP + i];
    quantize_group(row, q + g * GROUP, dx + g, qsum + g);
  }
}

// Buffers reused from call to call (a decode step makes ~120 calls of a few microseconds each).
QuantizedRows& quantize_rows(const at::Tensor& x2d, bool vector) {
  thread_local QuantizedRows r;
  const int64_t M = x2d.size(0), K = x2d.size(1), G = K / GROUP;
  r.q.resize(M * K);
  r.dx.resize(M * G);
  r.sx.resize(M * G);
  r.qsum.resize(M * G);
  const bool bf16 = x2d.scalar_type() == at::kBFloat16;
  const size_t width = bf16 ? 2 : 4;
#ifdef FERRY_X86
  auto row_fn = vector && cpu_has_vnni() ? quantize_row_vnni : quantize_row_scalar;
#else
  auto row_fn = quantize_row_scalar;
#endif
  for (int64_t m = 0; m < M; ++m) {
    row_fn(static_cast<const char*>(x2d.data_ptr()) + m * K * width, bf16, K, r.q.data() + m * K, r.dx.data() + m * G,
           r.qsum.data() + m * G);
    for (int64_t g = 0; g < G; ++g) r.sx[m * G + g] = r.dx[m * G + g] * static_cast<float>(r.qsum[m * G + g]);
  }
  return r;
}

using TileFn = void (*)(const Problem&, int64_t, float*);

TileFn pick(int bits, bool mins, bool vector) {
#ifdef FERRY_X86
  if (vector && cpu_has_vnni()) {
    if (bits == 4) return mins ? tile_vnni_rows<4, true> : tile_vnni_rows<4, false>;
    return mins ? tile_vnni_rows<8, true> : tile_vnni_rows<8, false>;
  }
#endif
  return tile_scalar;
}

}  // namespace

// x [..., K] (bf16 or fp32), packed [T, G * bytes], scales (and mins) fp16 [T, G, 16] -> [..., N] in x's dtype.
at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& mins, int64_t bits, int64_t offset, int64_t out_features,
                   bool vector) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmatmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "qmatmul: x must be bf16 or fp32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous());
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous());
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % GROUP == 0, "qmatmul: inputs must be a multiple of 32, got ", K);
  const int64_t G = K / GROUP, T = packed.size(0);
  TORCH_CHECK(packed.size(1) == G * tile_bytes_per_group(bits), "qmatmul: packed weight does not match ", K, " inputs");
  TORCH_CHECK(T * TILE >= out_features && scales.numel() == T * G * TILE);
  const bool has_mins = mins.has_value() && mins->defined() && mins->numel() > 0;
  if (has_mins) TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->numel() == T * G * TILE);

  at::Tensor x2d = x.reshape({-1, K}).contiguous();
  const int64_t M = x2d.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0 || out_features == 0) return out;
  const QuantizedRows& q = quantize_rows(x2d, vector);
  Problem p{packed.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
            has_mins ? reinterpret_cast<const uint16_t*>(mins->data_ptr<at::Half>()) : nullptr,
            static_cast<int>(bits), static_cast<int>(offset), M, K, G, out_features, &q, nullptr};
  TileFn fn = pick(static_cast<int>(bits), has_mins, vector);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  void* dst = out.data_ptr();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> acc;
    acc.resize(M * TILE);
    for (int64_t t = begin; t < end; ++t) {
      fn(p, t, acc.data());
      const int64_t n0 = t * TILE, width = std::min<int64_t>(TILE, out_features - n0);
      for (int64_t m = 0; m < M; ++m) {
        const float* a = acc.data() + m * TILE;
        if (bf16) {
          uint16_t* o = static_cast<uint16_t*>(dst) + m * out_features + n0;
          for (int64_t r = 0; r < width; ++r) o[r] = float_to_bf16(a[r]);
        } else {
          std::memcpy(static_cast<float*>(dst) + m * out_features + n0, a, width * sizeof(float));
        }
      }
    }
  });
  return out;
}

std::string qmatmul_isa() {
  return cpu_has_vnni() ? "avx512-vnni" : "scalar";
}

TORCH_LIBRARY(ferry_cpu, m) {
  m.def("qmatmul(Tensor x, Tensor packed, Tensor scales, Tensor? mins, int bits, int offset, int out_features, "
        "bool vector=True) -> Tensor");
  m.impl("qmatmul", c10::DispatchKey::CPU, TORCH_FN(qmatmul));
  m.def("isa() -> str", &qmatmul_isa);  // the instruction set qmatmul's vector path uses on this CPU
}
