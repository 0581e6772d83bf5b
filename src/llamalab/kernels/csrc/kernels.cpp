// Matrix-vector products on weights kept at 4, 6 or 8 bits, decode attention and the
// whole decode step, for one of three instruction sets chosen when it is compiled:
//
//   LLAMALAB_ISA_AVX512   512-bit vectors, vpdpbusd (AVX-512 F/BW/VL with VNNI);
//   LLAMALAB_ISA_AVXVNNI  256-bit vectors, vpdpbusd (AVX-VNNI's VEX form with -mavxvnni,
//                         else the EVEX form of AVX-512 VL + VNNI: the same operation);
//   LLAMALAB_ISA_AVX2     256-bit vectors, vpmaddubsw + vpmaddwd in place of vpdpbusd.
//
// Built and loaded by llamalab/kernels/native.py the first time a model needs it (one
// library per instruction set); registers its operators under LLAMALAB_NS
// (llamalab_avx512 ...), and under "llamalab" when llamalab_claim_default() is called.
//
// Weights: every GGUF type llamalab packs this way is, per group of G weights of one
// output row, value = q * scale + zero with q unsigned (4, 6 or 8 bits). Where the type
// is symmetric, zero = -offset * scale for a fixed offset (Q4_0: 8, Q6_K: 32 ...) and
// is not stored. Rows are tiled by 16. For one tile and one group the buffer holds the
// quants, then the 16 scales and (unless symmetric) the 16 zeros as float16, so a tile
// is one contiguous stream:
//
//   4 bits (G = 32): G / 8 chunks of 64 bytes; in chunk c, bytes 4j..4j+3 are row j's
//       weights 8c..8c+3 in their low nibbles and 8c+4..8c+7 in their high nibbles.
//   6 bits (G = 16 or 32): the low 4 bits as the 4-bit layout, then G / 16 chunks of
//       the high 2 bits: in chunk h, byte 4j+i holds in bits 2f..2f+1 the high bits of
//       row j's weight 16h + 4f + i.
//   8 bits (G = 16 or 32): G / 4 chunks of 64 bytes; in chunk c, bytes 4j..4j+3 are
//       row j's weights 4c..4c+3.
//
// So one 512-bit vpdpbusd multiplies four weights of each of 16 rows by the same four
// activations and adds them into that row's 32-bit lane: no horizontal sums. The
// 256-bit builds read each 64-byte chunk as two halves of 8 rows (bytes 0..31: rows
// 0..7), so the layout, and any packed weight, is the same for every build.
//
// Without VNNI, vpmaddubsw multiplies unsigned weight bytes by signed activation bytes
// and adds adjacent pairs into int16, saturating: safe while 2 * qmax * 127 < 32768.
// 4-bit (15) and 6-bit (63) quants fit, even two chunks' pairs added (4 * 63 * 127 =
// 32004); 8-bit ones (255) do not, so they are taken back to signed (q - 128, within
// -128..127) and multiplied as |q - 128| times the activation with q - 128's sign
// (vpsignb), at most 2 * 128 * 127 = 32512 a pair. vpmaddwd then adds pairs of pairs
// into the int32 lanes vpdpbusd would have filled.
//
// Activations are quantized to int8 per block of 16 (x ~= d * xq), half llama.cpp's 32,
// which keeps an outlier from coarsening twice as many neighbours:
//   sum_k w_k x_k ~= scale * sum_blocks d * sum_k q_k xq_k + zero * sum_k d xq_k  (per group)
// (symmetric: scale * (sum_blocks d * sum_k q_k xq_k - offset * sum_k d xq_k)).
// Outputs are float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if !defined(LLAMALAB_ISA_AVX512) && !defined(LLAMALAB_ISA_AVXVNNI) && !defined(LLAMALAB_ISA_AVX2)
#error "define one of LLAMALAB_ISA_AVX512, LLAMALAB_ISA_AVXVNNI, LLAMALAB_ISA_AVX2"
#endif
#ifndef LLAMALAB_NS
#error "define LLAMALAB_NS, the operators' namespace"
#endif

namespace {

// ---------------------------------------------------------------------------------------
// The vector operations the kernels use, for the build's width. kLanes float32 (or
// int32) lanes a vector.

#if defined(LLAMALAB_ISA_AVX512)
constexpr int kLanes = 16;
constexpr bool kVnni = true;
using VF = __m512;
using VI = __m512i;
inline VF f_zero() { return _mm512_setzero_ps(); }
inline VF f_load(const float* p) { return _mm512_loadu_ps(p); }
inline void f_store(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF f_set1(float x) { return _mm512_set1_ps(x); }
inline VF f_add(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF f_sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF f_mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF f_div(VF a, VF b) { return _mm512_div_ps(a, b); }
inline VF f_fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF f_min(VF a, VF b) { return _mm512_min_ps(a, b); }
inline VF f_max(VF a, VF b) { return _mm512_max_ps(a, b); }
inline float f_sum(VF v) { return _mm512_reduce_add_ps(v); }
inline float f_absmax(VF v) { return _mm512_reduce_max_ps(_mm512_abs_ps(v)); }
inline VF f_round(VF v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF f_scale2(VF p, VF n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
inline VF f_from_i(VI v) { return _mm512_cvtepi32_ps(v); }
inline VF f_half(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline VI i_load(const void* p) { return _mm512_loadu_si512(p); }
inline VI i_zero() { return _mm512_setzero_si512(); }
inline VI i_set1_8(char x) { return _mm512_set1_epi8(x); }
inline VI i_and(VI a, VI b) { return _mm512_and_si512(a, b); }
inline VI i_or(VI a, VI b) { return _mm512_or_si512(a, b); }
inline VI i_srl16(VI v, int n) { return _mm512_srl_epi16(v, _mm_cvtsi32_si128(n)); }
inline VI i_sll16(VI v, int n) { return _mm512_sll_epi16(v, _mm_cvtsi32_si128(n)); }
// Four activations in every lane, loaded straight into the vector unit (a broadcast
// from memory, which can fold into vpdpbusd, not a move through a general register).
inline VI i_bcast4(const int8_t* p) { return _mm512_broadcastd_epi32(_mm_loadu_si32(p)); }
inline VI i_dot(VI acc, VI u, VI s) { return _mm512_dpbusd_epi32(acc, u, s); }
// 16 activations as int8 (saturating) and their sum.
inline int quantize16(const float* x, float inv, int8_t* q) {
  const __m512i xq = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inv)));
  _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(xq));
  return _mm512_reduce_add_epi32(xq);
}
inline float absmax16(const float* x) { return f_absmax(f_load(x)); }
#else
constexpr int kLanes = 8;
using VF = __m256;
using VI = __m256i;
inline VF f_zero() { return _mm256_setzero_ps(); }
inline VF f_load(const float* p) { return _mm256_loadu_ps(p); }
inline void f_store(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF f_set1(float x) { return _mm256_set1_ps(x); }
inline VF f_add(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF f_sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF f_mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF f_div(VF a, VF b) { return _mm256_div_ps(a, b); }
inline VF f_fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF f_min(VF a, VF b) { return _mm256_min_ps(a, b); }
inline VF f_max(VF a, VF b) { return _mm256_max_ps(a, b); }
inline float f_sum(VF v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline VF f_abs(VF v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline float f_hmax(VF v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline float f_absmax(VF v) { return f_hmax(f_abs(v)); }
inline VF f_round(VF v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n for integral n in [-126, 127]: n put straight into the exponent field.
inline VF f_scale2(VF p, VF n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline VF f_from_i(VI v) { return _mm256_cvtepi32_ps(v); }
inline VF f_half(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline VI i_load(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline VI i_zero() { return _mm256_setzero_si256(); }
inline VI i_set1_8(char x) { return _mm256_set1_epi8(x); }
inline VI i_and(VI a, VI b) { return _mm256_and_si256(a, b); }
inline VI i_or(VI a, VI b) { return _mm256_or_si256(a, b); }
inline VI i_srl16(VI v, int n) { return _mm256_srl_epi16(v, _mm_cvtsi32_si128(n)); }
inline VI i_sll16(VI v, int n) { return _mm256_sll_epi16(v, _mm_cvtsi32_si128(n)); }
inline VI i_bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
#if defined(LLAMALAB_ISA_AVXVNNI)
constexpr bool kVnni = true;
#if defined(__AVXVNNI__)
inline VI i_dot(VI acc, VI u, VI s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#else  // the EVEX encoding (AVX-512 VL + VNNI) of the same operation
inline VI i_dot(VI acc, VI u, VI s) { return _mm256_dpbusd_epi32(acc, u, s); }
#endif
#else
constexpr bool kVnni = false;
// vpdpbusd's sums of four u8 * s8 products into int32 lanes, for |u| <= 63 (see the
// header: vpmaddubsw saturates beyond).
inline VI i_dot(VI acc, VI u, VI s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
// Two such products into one accumulator, their int16 pairs added first: for |u| <= 63
// the sum of four pairs stays within int16 (4 * 63 * 127 = 32004).
inline VI i_dot2(VI acc, VI u1, VI s1, VI u2, VI s2) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
// An 8-bit chunk's products, as (q - 128) * x: signed weights as |w| times x with w's
// sign, within int16 (see the header); the caller's offset is 128 less.
inline VI i_dot8(VI acc, VI u, VI s) {
  const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(s, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif
inline int i_sum(VI v) {
  __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
  return _mm_cvtsi128_si32(x);
}
inline int quantize16(const float* x, float inv, int8_t* q) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), vinv));
  const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), vinv));
  // packs works within 128-bit halves: a0-3 b0-3 | a4-7 b4-7, put back in order.
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
  _mm_storeu_si128((__m128i*)q, _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
  return i_sum(_mm256_add_epi32(a, b));
}
inline float absmax16(const float* x) { return f_hmax(f_max(f_abs(f_load(x)), f_abs(f_load(x + 8)))); }
#endif
#if defined(LLAMALAB_ISA_AVX512) || defined(LLAMALAB_ISA_AVXVNNI)
// Two chunks' products into one accumulator (sums of four u8 * s8 products a lane).
inline VI i_dot2(VI acc, VI u1, VI s1, VI u2, VI s2) { return i_dot(i_dot(acc, u1, s1), u2, s2); }
// An 8-bit chunk's products: q * x.
inline VI i_dot8(VI acc, VI u, VI s) { return i_dot(acc, u, s); }
#endif
constexpr int kParts = 16 / kLanes;  // vectors a tile of 16 rows takes

// Compile-time loop: f(std::integral_constant<int, 0>{}) ... f(<N - 1>).
template <int N, typename F>
inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f(std::integral_constant<int, I>{}), ...); }(
      std::make_integer_sequence<int, N>{});
}

constexpr int kXBlock = 16;  // activations per int8 scale
constexpr int kPrefetch = 4;  // groups ahead

struct Activations {
  const int8_t* q;  // (M, K)
  const float* d;   // (M, K / 16)
  const float* s;   // (M, K / G): d * sum of the group's q
  float offset;     // the weights' symmetric offset, or 0 where zeros are stored
};

// x (M, K) float32 -> int8 per block of 16, its scales and per-group sums of d * xq.
void quantize(const float* x, int64_t M, int64_t K, int64_t G, int8_t* q, float* d, float* s) {
  const int64_t nb = K / kXBlock, ng = K / G;
  for (int64_t m = 0; m < M; ++m) {
    float* block_sums = s + m * ng;  // each group's sum of d * xq, built block by block
    for (int64_t g = 0; g < ng; ++g) block_sums[g] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kXBlock;
      const float amax = absmax16(xb);
      const int total = quantize16(xb, amax > 0.0f ? 127.0f / amax : 0.0f, q + m * K + b * kXBlock);
      d[m * nb + b] = amax / 127.0f;
      block_sums[b * kXBlock / G] += d[m * nb + b] * static_cast<float>(total);
    }
  }
}

// Bytes of one tile's group: quants, then float16 scales and (unless symmetric) zeros.
template <int BITS, int G, bool SYM>
constexpr int group_bytes() {
  return 16 * G * BITS / 8 + (SYM ? 32 : 64);
}

// RB consecutive row tiles against MC activation rows starting at m0.
template <int BITS, int G, bool SYM, int MC, int RB>
void tiles(const uint8_t* w, const Activations& a, int64_t K, int64_t ldy, int64_t t0, int64_t m0,
           float* y, int64_t next, int64_t next_count) {
  constexpr int kQuantBytes = 16 * G * BITS / 8;
  constexpr int kGroupBytes = group_bytes<BITS, G, SYM>();
  constexpr int kBlocks = G / kXBlock;  // activation scales per group
  constexpr int kChunks = BITS == 8 ? G / 4 : G / 8;  // 64-byte chunks of (low) quants
  constexpr int kPerBlock = kChunks / kBlocks;
  constexpr int kPartBytes = 64 / kParts;  // of a chunk, per vector
  // An 8-bit dot without VNNI sums (q - 128) * x: its offset is then 128 less.
  const float offset = BITS == 8 && !kVnni ? a.offset - 128.0f : a.offset;
  const int64_t ng = K / G;
  const int64_t tile_bytes = ng * kGroupBytes;
  const VI nibble = i_set1_8(0x0F);
  const VI three = i_set1_8(0x03);
  VF acc[RB][kParts][MC];
  for (int r = 0; r < RB; ++r)
    for (int p = 0; p < kParts; ++p)
      for (int m = 0; m < MC; ++m) acc[r][p][m] = f_zero();

  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* base[RB];
    for (int r = 0; r < RB; ++r) {
      base[r] = w + (t0 + r) * tile_bytes + g * kGroupBytes;
      // kPrefetch groups ahead: in these tiles, or near the end in the tiles this
      // thread takes next, so that a short row of groups never starts cold.
      const char* ahead = nullptr;
      if (g + kPrefetch < ng)
        ahead = (const char*)(w + (t0 + r) * tile_bytes + (g + kPrefetch) * kGroupBytes);
      else if (r < next_count)
        ahead = (const char*)(w + (next + r) * tile_bytes + (g + kPrefetch - ng) * kGroupBytes);
      if (ahead != nullptr)
        for (int p = 0; p < kGroupBytes; p += 64) _mm_prefetch(ahead + p, _MM_HINT_T0);
    }
    float sum[MC];
    for (int m = 0; m < MC; ++m) sum[m] = a.s[(m0 + m) * ng + g];
    VF group[RB][kParts][MC];
    for (int r = 0; r < RB; ++r)
      for (int p = 0; p < kParts; ++p)
        for (int m = 0; m < MC; ++m) group[r][p][m] = SYM ? f_set1(-offset * sum[m]) : f_zero();
    // One block of 16 activations at a time: its int32 sums, then weighted by its scale.
    unroll<kBlocks>([&](auto H) {
      constexpr int h = H;
      VI dot[RB][kParts][MC];
      for (int r = 0; r < RB; ++r)
        for (int p = 0; p < kParts; ++p)
          for (int m = 0; m < MC; ++m) dot[r][p][m] = i_zero();
      unroll<kPerBlock>([&](auto I) {
        constexpr int c = h * kPerBlock + I;
        if constexpr (BITS == 8) {  // chunk c holds weights 4c..4c+3
          VI xs[MC];
          for (int m = 0; m < MC; ++m) xs[m] = i_bcast4(a.q + (m0 + m) * K + g * G + c * 4);
          for (int r = 0; r < RB; ++r)
            for (int p = 0; p < kParts; ++p) {
              const VI v = i_load(base[r] + c * 64 + p * kPartBytes);
              for (int m = 0; m < MC; ++m) dot[r][p][m] = i_dot8(dot[r][p][m], v, xs[m]);
            }
        } else {  // chunk c holds weights 8c..8c+7
          VI lo_x[MC], hi_x[MC];
          for (int m = 0; m < MC; ++m) {
            const int8_t* xp = a.q + (m0 + m) * K + g * G + c * 8;
            lo_x[m] = i_bcast4(xp);
            hi_x[m] = i_bcast4(xp + 4);
          }
          for (int r = 0; r < RB; ++r)
            for (int p = 0; p < kParts; ++p) {
              const VI v = i_load(base[r] + c * 64 + p * kPartBytes);
              VI lo = i_and(v, nibble);
              VI hi = i_and(i_srl16(v, 4), nibble);
              if constexpr (BITS == 6) {  // bits 4 and 5 from the high chunk
                const VI high = i_load(base[r] + G / 8 * 64 + c / 2 * 64 + p * kPartBytes);
                constexpr int f = 2 * (c % 2);  // the fields of this chunk's low and high halves
                lo = i_or(lo, i_sll16(i_and(i_srl16(high, 2 * f), three), 4));
                hi = i_or(hi, i_sll16(i_and(i_srl16(high, 2 * f + 2), three), 4));
              }
              for (int m = 0; m < MC; ++m) dot[r][p][m] = i_dot2(dot[r][p][m], lo, lo_x[m], hi, hi_x[m]);
            }
        }
      });
      for (int m = 0; m < MC; ++m) {
        const VF dm = f_set1(a.d[(m0 + m) * (K / kXBlock) + g * kBlocks + h]);
        for (int r = 0; r < RB; ++r)
          for (int p = 0; p < kParts; ++p) group[r][p][m] = f_fmadd(f_from_i(dot[r][p][m]), dm, group[r][p][m]);
      }
    });
    // The group's blocks weighted by the weights' scales, plus their zeros.
    for (int r = 0; r < RB; ++r)
      for (int p = 0; p < kParts; ++p) {
        const uint8_t* sz = base[r] + kQuantBytes + p * 2 * kLanes;
        const VF scale = f_half(sz);
        for (int m = 0; m < MC; ++m) {
          acc[r][p][m] = f_fmadd(group[r][p][m], scale, acc[r][p][m]);
          if constexpr (!SYM) acc[r][p][m] = f_fmadd(f_half(sz + 32), f_set1(sum[m]), acc[r][p][m]);
        }
      }
  }
  for (int r = 0; r < RB; ++r)
    for (int p = 0; p < kParts; ++p)
      for (int m = 0; m < MC; ++m) f_store(y + (m0 + m) * ldy + (t0 + r) * 16 + p * kLanes, acc[r][p][m]);
}

// Tiles [begin, end) against activation rows m0..m0+MC. One row reads four tiles at a
// time (four independent chains of vpdpbusd; two on 256-bit vectors), more rows fewer.
template <int BITS, int G, bool SYM, int MC>
void tile_range(const uint8_t* w, const Activations& a, int64_t K, int64_t ldy, int64_t begin,
                int64_t end, int64_t m0, float* y) {
  // 512-bit: 32 vector registers; 256-bit: 16, and a tile takes two of each.
  constexpr int RB = kParts == 1 ? (MC == 1 ? 4 : (MC == 2 ? 2 : 1)) : (MC == 1 ? 2 : 1);
  constexpr int kGroupBytes = group_bytes<BITS, G, SYM>();
  const int64_t tile_bytes = K / G * kGroupBytes;
  // The first groups of the first tiles: nothing before them prefetched them.
  for (int64_t t = begin; t < std::min<int64_t>(begin + RB, end); ++t)
    for (int64_t p = 0; p < std::min<int64_t>(kPrefetch * kGroupBytes, tile_bytes); p += 64)
      _mm_prefetch((const char*)(w + t * tile_bytes + p), _MM_HINT_T0);
  int64_t t = begin;
  for (; t + RB <= end; t += RB) {
    const int64_t next = t + RB;
    tiles<BITS, G, SYM, MC, RB>(w, a, K, ldy, t, m0, y, next, std::min<int64_t>(RB, end - next));
  }
  for (; t < end; ++t) tiles<BITS, G, SYM, MC, 1>(w, a, K, ldy, t, m0, y, t + 1, t + 1 < end ? 1 : 0);
}

// y (M, N) with row stride ldy = x (M, K) times the tiled weights. More than four rows
// go through a few tiles at a time, every block of four rows in turn, so that the
// weights are read from memory once and from cache after.
template <int BITS, int G, bool SYM>
void product(const uint8_t* w, const Activations& a, int64_t M, int64_t K, int64_t N, int64_t ldy,
             float* y) {
  at::parallel_for(0, N / 16, 4, [&](int64_t begin, int64_t end) {
    const int64_t step = M > 4 ? 8 : end - begin;
    for (int64_t c = begin; c < end; c += step) {
      const int64_t c_end = std::min(end, c + step);
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) tile_range<BITS, G, SYM, 4>(w, a, K, ldy, c, c_end, m0, y);
      switch (M - m0) {
        case 3: tile_range<BITS, G, SYM, 3>(w, a, K, ldy, c, c_end, m0, y); break;
        case 2: tile_range<BITS, G, SYM, 2>(w, a, K, ldy, c, c_end, m0, y); break;
        case 1: tile_range<BITS, G, SYM, 1>(w, a, K, ldy, c, c_end, m0, y); break;
        default: break;
      }
    }
  });
}

// The layouts quant/plan.py's VNNI_LAYOUTS uses, and only those (each is compiled for
// every row count): (bits, group, symmetric). offset 0 means zeros are stored;
// otherwise the layout is symmetric, zero = -offset * scale.
bool known_layout(int64_t bits, int64_t group, int64_t offset) {
  if (offset < 0 || offset > 255) return false;
  const bool sym = offset != 0;
  return (bits == 4 && group == 32) || (bits == 6 && group == 32) || (bits == 6 && group == 16 && sym) ||
         (bits == 8 && group == 32 && sym);
}

int64_t weight_bytes(int64_t N, int64_t K, int64_t bits, int64_t group, int64_t offset) {
  return N * K * bits / 8 + N * (K / group) * (offset ? 2 : 4);
}

// y (M, N; row stride ldy) = the quantized activations a times a tiled weight.
void product_of(const uint8_t* w, const Activations& a, int64_t M, int64_t K, int64_t N, int64_t bits,
                int64_t group, int64_t offset, float* y, int64_t ldy) {
  const bool sym = offset != 0;
  if (bits == 4 && sym)  // Q4_0
    product<4, 32, true>(w, a, M, K, N, ldy, y);
  else if (bits == 4)  // Q4_1, Q4_K
    product<4, 32, false>(w, a, M, K, N, ldy, y);
  else if (bits == 6 && group == 32 && sym)  // Q5_0
    product<6, 32, true>(w, a, M, K, N, ldy, y);
  else if (bits == 6 && group == 32)  // Q5_1, Q5_K
    product<6, 32, false>(w, a, M, K, N, ldy, y);
  else if (bits == 6)  // Q6_K
    product<6, 16, true>(w, a, M, K, N, ldy, y);
  else  // Q8_0
    product<8, 32, true>(w, a, M, K, N, ldy, y);
}

// How many int8 passes an activation row gets (llamalab_set_activation_passes). One: x ~= d * q,
// whose rounding moves a log-likelihood by up to ~0.1 on SmolLM2. Two: the residual
// x - d * q is quantized again and multiplied too, about 250 times finer, for twice the
// multiply work; evaluation uses it, where near ties must come out as float32 has them.
std::atomic<int> g_activation_passes{1};

// y (M, N; row stride ldy) = x (M, K) W^T for a tiled weight; shapes checked by the caller.
void linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, int64_t bits,
            int64_t group, int64_t offset, float* y, int64_t ldy) {
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xd, xs, residual, extra;
  xq.resize(M * K);
  xd.resize(M * K / kXBlock);
  xs.resize(M * K / group);
  quantize(x, M, K, group, xq.data(), xd.data(), xs.data());
  const Activations a{xq.data(), xd.data(), xs.data(), static_cast<float>(offset)};
  product_of(w, a, M, K, N, bits, group, offset, y, ldy);
  if (g_activation_passes.load(std::memory_order_relaxed) < 2) return;
  residual.resize(M * K);
  for (int64_t i = 0; i < M * K; ++i) residual[i] = x[i] - xd[i / kXBlock] * static_cast<float>(xq[i]);
  quantize(residual.data(), M, K, group, xq.data(), xd.data(), xs.data());
  extra.resize(M * N);
  product_of(w, a, M, K, N, bits, group, offset, extra.data(), N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) y[m * ldy + n] += extra[m * N + n];
}

at::Tensor vnni_linear(const at::Tensor& x, const at::Tensor& w, int64_t out_features,
                       int64_t bits, int64_t group, int64_t offset) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "vnni_linear: x must be a contiguous (M, K) float32 tensor");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "vnni_linear: w must be uint8");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0 && K % group == 0, "vnni_linear: shape");
  TORCH_CHECK(known_layout(bits, group, offset), "vnni_linear: bits/group/offset");
  TORCH_CHECK(w.numel() == weight_bytes(N, K, bits, group, offset), "vnni_linear: weight bytes");
  auto y = at::empty({M, N}, x.options());
  linear(x.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(), N, bits, group, offset, y.data_ptr<float>(), N);
  return y;
}

// ---------------------------------------------------------------------------------------
// Attention of one new token over a float32 KV cache, for every query head of a group at
// once, so that each cached key and value is read once (torch's fused kernel reads them
// once per query head). q (B, H, 1, D); k, v (B, KVH, S, D) with unit stride along D.

// e^x, for x clamped to [-87, 88]: 2^(x log2 e) split into an integer power (scalef)
// and a degree-6 polynomial on [-0.5, 0.5] (times ln 2); relative error < 2e-7.
inline VF exp_ps(VF x) {
  x = f_min(f_max(x, f_set1(-87.0f)), f_set1(88.0f));
  const VF t = f_mul(x, f_set1(1.44269504088896341f));
  const VF n = f_round(t);
  const VF f = f_mul(f_sub(t, n), f_set1(0.69314718055994531f));
  VF p = f_set1(1.0f / 720);
  p = f_fmadd(p, f, f_set1(1.0f / 120));
  p = f_fmadd(p, f, f_set1(1.0f / 24));
  p = f_fmadd(p, f, f_set1(1.0f / 6));
  p = f_fmadd(p, f, f_set1(0.5f));
  p = f_fmadd(p, f, f_set1(1.0f));
  p = f_fmadd(p, f, f_set1(1.0f));
  return f_scale2(p, n);
}

template <int D>
void attend(const float* const* qs, int nq, const float* k, const float* v, int64_t S,
            int64_t kv_stride, float scale, float* scores, float* const* outs) {
  constexpr int V = D / kLanes;
  // Scores, one key at a time for every query of the group.
  VF qv[4][V];
  for (int j = 0; j < nq; ++j)
    for (int c = 0; c < V; ++c) qv[j][c] = f_mul(f_load(qs[j] + kLanes * c), f_set1(scale));
  for (int64_t s = 0; s < S; ++s) {
    const float* ks = k + s * kv_stride;
    VF kc[V];
    for (int c = 0; c < V; ++c) kc[c] = f_load(ks + kLanes * c);
    for (int j = 0; j < nq; ++j) {
      VF acc = f_mul(qv[j][0], kc[0]);
      for (int c = 1; c < V; ++c) acc = f_fmadd(qv[j][c], kc[c], acc);
      scores[j * S + s] = f_sum(acc);
    }
  }
  // Softmax per query.
  float inv[4];
  for (int j = 0; j < nq; ++j) {
    float* row = scores + j * S;
    float top = -INFINITY;
    for (int64_t s = 0; s < S; ++s) top = row[s] > top ? row[s] : top;
    const VF vtop = f_set1(top);
    VF total = f_zero();
    int64_t s = 0;
    for (; s + kLanes <= S; s += kLanes) {
      const VF e = exp_ps(f_sub(f_load(row + s), vtop));
      f_store(row + s, e);
      total = f_add(total, e);
    }
    float rest = 0.0f;
    if (s < S) {  // the last few through a padded copy, only they counted
      alignas(64) float tail[kLanes] = {};
      std::memcpy(tail, row + s, (S - s) * sizeof(float));
      f_store(tail, exp_ps(f_sub(f_load(tail), vtop)));
      for (int64_t i = 0; i < S - s; ++i) {
        row[s + i] = tail[i];
        rest += tail[i];
      }
    }
    inv[j] = 1.0f / (f_sum(total) + rest);
  }
  // Weighted sum of the values, one value row at a time for every query.
  VF acc[4][V];
  for (int j = 0; j < nq; ++j)
    for (int c = 0; c < V; ++c) acc[j][c] = f_zero();
  for (int64_t s = 0; s < S; ++s) {
    const float* vs = v + s * kv_stride;
    VF vc[V];
    for (int c = 0; c < V; ++c) vc[c] = f_load(vs + kLanes * c);
    for (int j = 0; j < nq; ++j) {
      const VF p = f_set1(scores[j * S + s]);
      for (int c = 0; c < V; ++c) acc[j][c] = f_fmadd(p, vc[c], acc[j][c]);
    }
  }
  for (int j = 0; j < nq; ++j)
    for (int c = 0; c < V; ++c) f_store(outs[j] + kLanes * c, f_mul(acc[j][c], f_set1(inv[j])));
}

// Attention of B queries of one token each: q (B, H, D) contiguous, out likewise. Query b
// reads cache row rows[b], whose keys and values start at k + rows[b] * sb (heads sh,
// slots ss apart), and sees its first lengths[b] slots.
void attention_rows(const float* q, int64_t B, int64_t H, int64_t KVH, int64_t D, const float* k,
                    const float* v, int64_t sb, int64_t sh, int64_t ss, const int64_t* rows,
                    const int64_t* lengths, float* out) {
  const int64_t group = H / KVH;
  // Query heads are taken up to 4 at a time with their key/value head.
  const int64_t per_task = group <= 4 ? group : 4;
  const int64_t chunks = (group + per_task - 1) / per_task;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lengths[b]);
  at::parallel_for(0, B * KVH * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(4 * longest);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (KVH * chunks), h = (task / chunks) % KVH, c = task % chunks;
      const int64_t first = h * group + c * per_task;
      const int nq = static_cast<int>(std::min<int64_t>(per_task, h * group + group - first));
      const float* qs[4];
      float* os[4];
      for (int j = 0; j < nq; ++j) {
        qs[j] = q + (b * H + first + j) * D;
        os[j] = out + (b * H + first + j) * D;
      }
      const float* kh = k + rows[b] * sb + h * sh;
      const float* vh = v + rows[b] * sb + h * sh;
      if (D == 64)
        attend<64>(qs, nq, kh, vh, lengths[b], ss, scale, scores.data(), os);
      else
        attend<128>(qs, nq, kh, vh, lengths[b], ss, scale, scores.data(), os);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "decode_attention: shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: float32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), S = k.size(2);
  TORCH_CHECK(H % KVH == 0 && k.sizes() == v.sizes() && k.size(3) == D && S > 0, "decode_attention: heads");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == v.stride(2) && k.stride(1) == v.stride(1) &&
              k.stride(0) == v.stride(0), "decode_attention: K and V rows must be alike and unit-strided");
  TORCH_CHECK(D == 64 || D == 128, "decode_attention: head_dim 64 or 128");
  auto qc = q.contiguous();
  auto out = at::empty({B, H, 1, D}, q.options());
  const std::vector<int64_t> lengths(B, S);
  std::vector<int64_t> rows(B);
  for (int64_t b = 0; b < B; ++b) rows[b] = b;
  attention_rows(qc.data_ptr<float>(), B, H, KVH, D, k.data_ptr<float>(), v.data_ptr<float>(), k.stride(0),
                 k.stride(1), k.stride(2), rows.data(), lengths.data(), out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------------------------------
// A whole step through every transformer block in one call, for M new tokens: token m
// in cache row rows[m] at position positions[m]. Those are the rows of a decode batch,
// the tokens of a short prompt chunk, or both packed together. Every token's key and
// value are written, in token order, before any token attends; token m then sees slots
// 0..positions[m] of its row, so tokens of one row see each other causally. The maths
// is model.TransformerBlock's (RMSNorm in float32, rotary embedding on adjacent pairs,
// grouped-query attention over the KV cache, SwiGLU), with every matrix on the tiled
// weights above. Between the matrix products the work is a few thousand floats, so the
// per-operation dispatch of the Python model, not arithmetic, was most of a small
// model's step.

// x * rsqrt(mean(x^2) + eps) * weight per row, in float32 as torch's rms_norm.
void rms_norm(const float* x, const float* weight, int64_t M, int64_t dim, float eps, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * dim;
    VF squares = f_zero();
    int64_t i = 0;
    for (; i + kLanes <= dim; i += kLanes) {
      const VF v = f_load(row + i);
      squares = f_fmadd(v, v, squares);
    }
    float total = f_sum(squares);
    for (; i < dim; ++i) total += row[i] * row[i];
    const float inv = 1.0f / std::sqrt(total / static_cast<float>(dim) + eps);
    for (i = 0; i < dim; ++i) out[m * dim + i] = row[i] * inv * weight[i];
  }
}

// silu(gate) * up over n values: gate / (1 + e^-gate) * up.
void swiglu(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
  const VF one = f_set1(1.0f);
  for (; i + kLanes <= n; i += kLanes) {
    const VF g = f_load(gate + i);
    const VF e = exp_ps(f_sub(f_zero(), g));
    f_store(out + i, f_mul(f_div(g, f_add(one, e)), f_load(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// Rotate adjacent pairs of n heads of D channels by the table row (D/2 (cos, sin) pairs).
void rotate(float* heads, int64_t n, int64_t D, const float* rotation) {
  for (int64_t h = 0; h < n; ++h) {
    float* x = heads + h * D;
    for (int64_t j = 0; j < D / 2; ++j) {
      const float re = x[2 * j], im = x[2 * j + 1], c = rotation[2 * j], s = rotation[2 * j + 1];
      x[2 * j] = re * c - im * s;
      x[2 * j + 1] = re * s + im * c;
    }
  }
}

struct Matrix {
  const uint8_t* w;
  int64_t out, bits, group, offset;
};

// x (M, K) times each part, their outputs side by side in y (M, sum of outs).
void project(const float* x, int64_t M, int64_t K, const Matrix* parts, int64_t n, float* y, int64_t ldy) {
  int64_t column = 0;
  for (int64_t i = 0; i < n; ++i) {
    linear(x, M, K, parts[i].w, parts[i].out, parts[i].bits, parts[i].group, parts[i].offset, y + column, ldy);
    column += parts[i].out;
  }
}

// layout, per block: the number of parts of the q/k/v projection (1 fused, or 3) and of
// the gate/up projection (1 fused, or 2); then (out_features, bits, group, offset) of every
// matrix in order: q/k/v parts, wo, gate/up parts, w2. weights holds the matrices in the
// same order; norms the blocks' attention and FFN norm weights, two per block.
at::Tensor decode_step(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& positions,
                       const at::Tensor& rope, at::TensorList norms, at::TensorList weights,
                       at::IntArrayRef layout, at::TensorList k_caches, at::TensorList v_caches,
                       int64_t n_heads, int64_t n_kv_heads, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decode_step: x must be a contiguous (rows, dim) float32 tensor");
  const int64_t M = x.size(0), dim = x.size(1), L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(v_caches.size()) == L &&
                  static_cast<int64_t>(norms.size()) == 2 * L,
              "decode_step: one K cache, one V cache and two norms per block");
  for (const at::Tensor* t : {&rows, &positions})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == M && t->scalar_type() == at::kLong && t->is_contiguous() &&
                    t->device().is_cpu(),
                "decode_step: one int64 cache row and position per token");
  TORCH_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, "decode_step: heads");
  const at::Tensor& k0 = k_caches[0];
  TORCH_CHECK(k0.dim() == 4 && k0.size(1) == n_kv_heads, "decode_step: caches are (rows, kv_heads, slots, head_dim)");
  const int64_t D = k0.size(3), S = k0.size(2);
  TORCH_CHECK(D == 64 || D == 128, "decode_step: head_dim 64 or 128");
  TORCH_CHECK(n_heads * D == dim, "decode_step: n_heads * head_dim must equal dim");

  TORCH_CHECK(rope.dim() == 3 && rope.size(1) == D / 2 && rope.size(2) == 2 && rope.scalar_type() == at::kFloat &&
                  rope.is_contiguous(),
              "decode_step: rope is a contiguous (positions, head_dim / 2, 2) float32 table");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  std::vector<int64_t> lengths(M);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(row[m] >= 0 && row[m] < k0.size(0), "decode_step: cache row ", row[m], " does not exist");
    TORCH_CHECK(pos[m] >= 0 && pos[m] < S && pos[m] < rope.size(0), "decode_step: position ", pos[m],
                " is outside the cache or the rotary table");
    lengths[m] = pos[m] + 1;
  }
  for (int64_t l = 0; l < L; ++l) {
    for (const at::Tensor* c : {&k_caches[l], &v_caches[l]})
      TORCH_CHECK(c->scalar_type() == at::kFloat && c->sizes() == k0.sizes() && c->strides() == k0.strides() &&
                      c->stride(3) == 1,
                  "decode_step: every cache alike, float32, unit-strided along head_dim");
    for (const at::Tensor* n : {&norms[2 * l], &norms[2 * l + 1]})
      TORCH_CHECK(n->scalar_type() == at::kFloat && n->is_contiguous() && n->numel() == dim, "decode_step: norms");
  }
  // Read the layout: every block's matrices, checked against their shapes and bytes.
  const int64_t H = n_heads, KVH = n_kv_heads, qkv_width = (H + 2 * KVH) * D;
  std::vector<std::array<int64_t, 2>> counts;
  std::vector<Matrix> matrices;
  int64_t at_layout = 0, hidden = 0;
  auto next_int = [&]() {
    TORCH_CHECK(at_layout < static_cast<int64_t>(layout.size()), "decode_step: layout too short");
    return layout[at_layout++];
  };
  for (int64_t l = 0; l < L; ++l) {
    const int64_t n_qkv = next_int(), n_ffn = next_int();
    TORCH_CHECK((n_qkv == 1 || n_qkv == 3) && (n_ffn == 1 || n_ffn == 2), "decode_step: layout counts");
    counts.push_back({n_qkv, n_ffn});
    int64_t qkv = 0, ffn = 0;
    for (int64_t i = 0; i < n_qkv + 1 + n_ffn + 1; ++i) {
      const int64_t index = static_cast<int64_t>(matrices.size());
      TORCH_CHECK(index < static_cast<int64_t>(weights.size()), "decode_step: too few weights");
      const int64_t out = next_int(), bits = next_int(), group = next_int(), offset = next_int();
      const bool is_w2 = i == n_qkv + 1 + n_ffn;
      const int64_t in = is_w2 ? ffn / 2 : (i == n_qkv ? H * D : dim);
      const at::Tensor& w = weights[index];
      TORCH_CHECK(known_layout(bits, group, offset) && out % 16 == 0 && in % 32 == 0 && in % group == 0 &&
                      w.scalar_type() == at::kByte && w.is_contiguous() &&
                      w.numel() == weight_bytes(out, in, bits, group, offset),
                  "decode_step: weight ", index, " does not match its layout");
      if (i < n_qkv) qkv += out;
      else if (i > n_qkv && !is_w2) ffn += out;
      TORCH_CHECK(!(i == n_qkv || is_w2) || out == dim, "decode_step: wo and w2 give dim outputs");
      matrices.push_back({w.data_ptr<uint8_t>(), out, bits, group, offset});
    }
    TORCH_CHECK(qkv == qkv_width && ffn % 2 == 0 && ffn > 0, "decode_step: projection widths");
    TORCH_CHECK(l == 0 || ffn / 2 == hidden, "decode_step: every block's FFN alike");
    hidden = ffn / 2;
  }
  TORCH_CHECK(at_layout == static_cast<int64_t>(layout.size()) &&
                  matrices.size() == weights.size(), "decode_step: layout and weights disagree");

  auto h = x.clone();
  float* hp = h.data_ptr<float>();
  std::vector<float> normed(M * dim), qkv(M * qkv_width), attended(M * H * D), q(M * H * D),
      gate_up(M * 2 * hidden), act(M * hidden), add(M * dim);
  const int64_t sb = k0.stride(0), sh = k0.stride(1), ss = k0.stride(2);
  const float* table = rope.data_ptr<float>();
  const Matrix* next = matrices.data();
  for (int64_t l = 0; l < L; ++l) {
    const auto [n_qkv, n_ffn] = counts[l];
    float* kc = k_caches[l].data_ptr<float>();
    float* vc = v_caches[l].data_ptr<float>();
    // Attention.
    rms_norm(hp, norms[2 * l].data_ptr<float>(), M, dim, static_cast<float>(eps), normed.data());
    project(normed.data(), M, dim, next, n_qkv, qkv.data(), qkv_width);
    next += n_qkv;
    for (int64_t m = 0; m < M; ++m) {
      float* r = qkv.data() + m * qkv_width;
      rotate(r, H + KVH, D, table + pos[m] * D);  // queries and keys
      std::memcpy(q.data() + m * H * D, r, H * D * sizeof(float));
      for (int64_t g = 0; g < KVH; ++g) {  // this token's key and value into the cache
        std::memcpy(kc + row[m] * sb + g * sh + pos[m] * ss, r + (H + g) * D, D * sizeof(float));
        std::memcpy(vc + row[m] * sb + g * sh + pos[m] * ss, r + (H + KVH + g) * D, D * sizeof(float));
      }
    }
    attention_rows(q.data(), M, H, KVH, D, kc, vc, sb, sh, ss, row, lengths.data(), attended.data());
    project(attended.data(), M, H * D, next, 1, add.data(), dim);
    next += 1;
    for (int64_t i = 0; i < M * dim; ++i) hp[i] += add[i];
    // Feed-forward.
    rms_norm(hp, norms[2 * l + 1].data_ptr<float>(), M, dim, static_cast<float>(eps), normed.data());
    project(normed.data(), M, dim, next, n_ffn, gate_up.data(), 2 * hidden);
    next += n_ffn;
    for (int64_t m = 0; m < M; ++m) {
      const float* gate = gate_up.data() + m * 2 * hidden;
      const float* up = gate + hidden;
      swiglu(gate, up, hidden, act.data() + m * hidden);
    }
    project(act.data(), M, hidden, next, 1, add.data(), dim);
    next += 1;
    for (int64_t i = 0; i < M * dim; ++i) hp[i] += add[i];
  }
  return h;
}

void define_ops(torch::Library& m) {
  m.def("vnni_linear(Tensor x, Tensor w, int out_features, int bits, int group, int offset) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v) -> Tensor");
  m.def("decode_step(Tensor x, Tensor rows, Tensor positions, Tensor rope, Tensor[] norms, Tensor[] weights, "
        "int[] layout, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int n_heads, int n_kv_heads, float eps) -> Tensor");
}

void impl_ops(torch::Library& m) {
  m.impl("vnni_linear", vnni_linear);
  m.impl("decode_attention", decode_attention);
  m.impl("decode_step", decode_step);
}

}  // namespace

// The macros paste their namespace argument: expand LLAMALAB_NS before they see it.
#define LLAMALAB_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LLAMALAB_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

LLAMALAB_LIBRARY(LLAMALAB_NS, m) { define_ops(m); }

LLAMALAB_LIBRARY_IMPL(LLAMALAB_NS, CPU, m) { impl_ops(m); }

// The same operators under "llamalab" too, which the model's layers call: done by the one
// build a process runs on (kernels/native.py calls it once, and a second namespace
// "llamalab" from another build would be refused by torch's registry).
extern "C" __attribute__((visibility("default"))) int llamalab_claim_default() {
  // No C++ exception may cross into ctypes: torch refuses a namespace defined twice (say,
  // by another library), which is then a status, not a crash.
  try {
    static torch::Library* defs = [] {
      auto* lib = new torch::Library(torch::Library::DEF, "llamalab", std::nullopt, __FILE__, __LINE__);
      define_ops(*lib);
      return lib;
    }();
    static torch::Library* impls = [] {
      auto* lib = new torch::Library(torch::Library::IMPL, "llamalab", c10::DispatchKey::CPU, __FILE__, __LINE__);
      impl_ops(*lib);
      return lib;
    }();
    (void)defs;
    (void)impls;
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

// Sets how many int8 passes activations get (1 or 2, see linear) for every product and
// decode step of this build; returns the previous setting, or -1 (unchanged) for another value.
extern "C" __attribute__((visibility("default"))) int llamalab_set_activation_passes(int passes) {
  if (passes != 1 && passes != 2) return -1;
  return g_activation_passes.exchange(passes);
}
