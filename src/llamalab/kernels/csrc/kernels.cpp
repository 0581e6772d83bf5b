// Matrix-vector products on weights kept at 4, 6 or 8 bits, with AVX-512 VNNI.
//
// Built and loaded by llamalab/quant/native.py the first time a model needs it; registers
// torch.ops.llamalab.vnni_linear.
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
// So one vpdpbusd multiplies four weights of each of 16 rows by the same four
// activations and adds them into that row's 32-bit lane: no horizontal sums.
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

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
      const __m512 v = _mm512_loadu_ps(x + m * K + b * kXBlock);
      const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
      const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const __m512i xq = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
      _mm_storeu_si128((__m128i*)(q + m * K + b * kXBlock), _mm512_cvtsepi32_epi8(xq));
      d[m * nb + b] = amax / 127.0f;
      block_sums[b * kXBlock / G] += d[m * nb + b] * static_cast<float>(_mm512_reduce_add_epi32(xq));
    }
  }
}

// Four activations in every lane, loaded straight into the vector unit (a broadcast
// from memory, which can fold into vpdpbusd, not a move through a general register).
inline __m512i broadcast4(const int8_t* p) { return _mm512_broadcastd_epi32(_mm_loadu_si32(p)); }

// RB consecutive row tiles against MC activation rows starting at m0.
// Bytes of one tile's group: quants, then float16 scales and (unless symmetric) zeros.
template <int BITS, int G, bool SYM>
constexpr int group_bytes() {
  return 16 * G * BITS / 8 + (SYM ? 32 : 64);
}

template <int BITS, int G, bool SYM, int MC, int RB>
void tiles(const uint8_t* w, const Activations& a, int64_t K, int64_t ldy, int64_t t0, int64_t m0,
           float* y, int64_t next, int64_t next_count) {
  constexpr int kQuantBytes = 16 * G * BITS / 8;
  constexpr int kGroupBytes = group_bytes<BITS, G, SYM>();
  const int64_t ng = K / G;
  const int64_t tile_bytes = ng * kGroupBytes;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[RB][MC];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();

  constexpr int kBlocks = G / kXBlock;  // activation scales per group
  for (int64_t g = 0; g < ng; ++g) {
    __m512i dot[RB][MC][kBlocks];
    for (int r = 0; r < RB; ++r) {
      for (int m = 0; m < MC; ++m)
        for (int h = 0; h < kBlocks; ++h) dot[r][m][h] = _mm512_setzero_si512();
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
    if constexpr (BITS == 4 || BITS == 6) {
      const __m512i three = _mm512_set1_epi8(0x03);
      for (int c = 0; c < G / 8; ++c) {
        __m512i lo_x[MC], hi_x[MC];
        for (int m = 0; m < MC; ++m) {
          const int8_t* xp = a.q + (m0 + m) * K + g * G + c * 8;
          lo_x[m] = broadcast4(xp);
          hi_x[m] = broadcast4(xp + 4);
        }
        for (int r = 0; r < RB; ++r) {
          const uint8_t* quants = w + (t0 + r) * tile_bytes + g * kGroupBytes;
          const __m512i v = _mm512_loadu_si512(quants + c * 64);
          __m512i lo = _mm512_and_si512(v, nibble);
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          if constexpr (BITS == 6) {  // bits 4 and 5 from the high chunk
            const __m512i high = _mm512_loadu_si512(quants + G / 8 * 64 + c / 2 * 64);
            const int f = 2 * (c % 2);  // the fields of this chunk's low and high halves
            const __m512i top_lo = _mm512_and_si512(_mm512_srl_epi16(high, _mm_cvtsi32_si128(2 * f)), three);
            const __m512i top_hi = _mm512_and_si512(_mm512_srl_epi16(high, _mm_cvtsi32_si128(2 * f + 2)), three);
            lo = _mm512_or_si512(lo, _mm512_slli_epi16(top_lo, 4));
            hi = _mm512_or_si512(hi, _mm512_slli_epi16(top_hi, 4));
          }
          for (int m = 0; m < MC; ++m) {  // chunk c holds weights 8c..8c+7: block c / 2
            dot[r][m][c / 2] = _mm512_dpbusd_epi32(dot[r][m][c / 2], lo, lo_x[m]);
            dot[r][m][c / 2] = _mm512_dpbusd_epi32(dot[r][m][c / 2], hi, hi_x[m]);
          }
        }
      }
    } else {
      for (int c = 0; c < G / 4; ++c) {
        __m512i xs[MC];
        for (int m = 0; m < MC; ++m) xs[m] = broadcast4(a.q + (m0 + m) * K + g * G + c * 4);
        for (int r = 0; r < RB; ++r) {
          const __m512i v = _mm512_loadu_si512(w + (t0 + r) * tile_bytes + g * kGroupBytes + c * 64);
          for (int m = 0; m < MC; ++m)  // chunk c holds weights 4c..4c+3: block c / 4
            dot[r][m][c / 4] = _mm512_dpbusd_epi32(dot[r][m][c / 4], v, xs[m]);
        }
      }
    }
    float d[MC][kBlocks], sum[MC];
    for (int m = 0; m < MC; ++m) {
      for (int h = 0; h < kBlocks; ++h) d[m][h] = a.d[(m0 + m) * (K / kXBlock) + g * kBlocks + h];
      sum[m] = a.s[(m0 + m) * ng + g];
    }
    for (int r = 0; r < RB; ++r) {
      const uint8_t* sz = w + (t0 + r) * tile_bytes + g * kGroupBytes + kQuantBytes;
      const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sz));
      for (int m = 0; m < MC; ++m) {
        // The group's blocks weighted by their activation scales, then by the weights'.
        __m512 group = SYM ? _mm512_set1_ps(-a.offset * sum[m]) : _mm512_setzero_ps();
        for (int h = 0; h < kBlocks; ++h)
          group = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][m][h]), _mm512_set1_ps(d[m][h]), group);
        acc[r][m] = _mm512_fmadd_ps(group, scale, acc[r][m]);
        if constexpr (!SYM) {
          const __m512 zero = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sz + 32)));
          acc[r][m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(sum[m]), acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MC; ++m) _mm512_storeu_ps(y + (m0 + m) * ldy + (t0 + r) * 16, acc[r][m]);
}

// Tiles [begin, end) against activation rows m0..m0+MC. One row reads four tiles at a
// time (four independent chains of vpdpbusd), more rows fewer.
template <int BITS, int G, bool SYM, int MC>
void tile_range(const uint8_t* w, const Activations& a, int64_t K, int64_t ldy, int64_t begin,
                int64_t end, int64_t m0, float* y) {
  constexpr int RB = MC == 1 ? 4 : (MC == 2 ? 2 : 1);
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

// y (M, N; row stride ldy) = x (M, K) W^T for a tiled weight; shapes checked by the caller.
void linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, int64_t bits,
            int64_t group, int64_t offset, float* y, int64_t ldy) {
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xd, xs;
  xq.resize(M * K);
  xd.resize(M * K / kXBlock);
  xs.resize(M * K / group);
  quantize(x, M, K, group, xq.data(), xd.data(), xs.data());
  const Activations a{xq.data(), xd.data(), xs.data(), static_cast<float>(offset)};
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
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

template <int D>
void attend(const float* const* qs, int nq, const float* k, const float* v, int64_t S,
            int64_t kv_stride, float scale, float* scores, float* const* outs) {
  constexpr int V = D / 16;
  // Scores, one key at a time for every query of the group.
  __m512 qv[4][V];
  for (int j = 0; j < nq; ++j)
    for (int c = 0; c < V; ++c) qv[j][c] = _mm512_mul_ps(_mm512_loadu_ps(qs[j] + 16 * c), _mm512_set1_ps(scale));
  for (int64_t s = 0; s < S; ++s) {
    const float* ks = k + s * kv_stride;
    __m512 kc[V];
    for (int c = 0; c < V; ++c) kc[c] = _mm512_loadu_ps(ks + 16 * c);
    for (int j = 0; j < nq; ++j) {
      __m512 acc = _mm512_mul_ps(qv[j][0], kc[0]);
      for (int c = 1; c < V; ++c) acc = _mm512_fmadd_ps(qv[j][c], kc[c], acc);
      scores[j * S + s] = _mm512_reduce_add_ps(acc);
    }
  }
  // Softmax per query.
  float inv[4];
  for (int j = 0; j < nq; ++j) {
    float* row = scores + j * S;
    float top = -INFINITY;
    for (int64_t s = 0; s < S; ++s) top = row[s] > top ? row[s] : top;
    const __m512 vtop = _mm512_set1_ps(top);
    __m512 total = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 16 <= S; s += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + s), vtop));
      _mm512_storeu_ps(row + s, e);
      total = _mm512_add_ps(total, e);
    }
    if (s < S) {
      const __mmask16 m = (__mmask16)((1u << (S - s)) - 1);
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + s), vtop));
      _mm512_mask_storeu_ps(row + s, m, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
    }
    inv[j] = 1.0f / _mm512_reduce_add_ps(total);
  }
  // Weighted sum of the values, one value row at a time for every query.
  __m512 acc[4][V];
  for (int j = 0; j < nq; ++j)
    for (int c = 0; c < V; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const float* vs = v + s * kv_stride;
    __m512 vc[V];
    for (int c = 0; c < V; ++c) vc[c] = _mm512_loadu_ps(vs + 16 * c);
    for (int j = 0; j < nq; ++j) {
      const __m512 p = _mm512_set1_ps(scores[j * S + s]);
      for (int c = 0; c < V; ++c) acc[j][c] = _mm512_fmadd_ps(p, vc[c], acc[j][c]);
    }
  }
  for (int j = 0; j < nq; ++j)
    for (int c = 0; c < V; ++c) _mm512_storeu_ps(outs[j] + 16 * c, _mm512_mul_ps(acc[j][c], _mm512_set1_ps(inv[j])));
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
    __m512 squares = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16) {
      const __m512 v = _mm512_loadu_ps(row + i);
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    float total = _mm512_reduce_add_ps(squares);
    for (; i < dim; ++i) total += row[i] * row[i];
    const float inv = 1.0f / std::sqrt(total / static_cast<float>(dim) + eps);
    for (i = 0; i < dim; ++i) out[m * dim + i] = row[i] * inv * weight[i];
  }
}

// silu(gate) * up over n values: gate / (1 + e^-gate) * up.
void swiglu(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
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

}  // namespace

TORCH_LIBRARY(llamalab, m) {
  m.def("vnni_linear(Tensor x, Tensor w, int out_features, int bits, int group, int offset) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v) -> Tensor");
  m.def("decode_step(Tensor x, Tensor rows, Tensor positions, Tensor rope, Tensor[] norms, Tensor[] weights, "
        "int[] layout, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int n_heads, int n_kv_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab, CPU, m) {
  m.impl("vnni_linear", vnni_linear);
  m.impl("decode_attention", decode_attention);
  m.impl("decode_step", decode_step);
}
