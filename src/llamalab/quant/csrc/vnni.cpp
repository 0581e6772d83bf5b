// Matrix-vector products on weights kept at 4 or 8 bits, with AVX-512 VNNI.
//
// Built and loaded by llamalab/quant/native.py the first time a model needs it; registers
// torch.ops.llamalab.vnni_linear.
//
// Weights: every GGUF type llamalab packs this way is, per group of G weights of one
// output row, value = q * scale + zero with q unsigned (4 bits, or up to 8). Rows are
// tiled by 16. For one tile and one group the buffer holds the quants, then the 16
// scales and the 16 zeros as float16 (64 bytes), so a tile is one contiguous stream:
//
//   4 bits (G = 32): 4 chunks of 64 bytes; in chunk c, bytes 4j..4j+3 are row j's
//       weights 8c..8c+3 in their low nibbles and 8c+4..8c+7 in their high nibbles.
//   8 bits (G = 16 or 32): G / 4 chunks of 64 bytes; in chunk c, bytes 4j..4j+3 are
//       row j's weights 4c..4c+3.
//
// So one vpdpbusd multiplies four weights of each of 16 rows by the same four
// activations and adds them into that row's 32-bit lane: no horizontal sums.
//
// Activations are quantized to int8 per block of 16 (x ~= d * xq), half llama.cpp's 32,
// which keeps an outlier from coarsening twice as many neighbours:
//   sum_k w_k x_k ~= scale * sum_blocks d * sum_k q_k xq_k + zero * sum_k d xq_k  (per group)
// Outputs are float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
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
};

// x (M, K) float32 -> int8 per block of 16, its scales and per-group sums of d * xq.
void quantize(const float* x, int64_t M, int64_t K, int64_t G, int8_t* q, float* d, float* s) {
  const int64_t nb = K / kXBlock, ng = K / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 v = _mm512_loadu_ps(x + m * K + b * kXBlock);
      const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
      const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const __m512i xq = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
      _mm_storeu_si128((__m128i*)(q + m * K + b * kXBlock), _mm512_cvtsepi32_epi8(xq));
      d[m * nb + b] = amax / 127.0f;
    }
    for (int64_t g = 0; g < ng; ++g) {
      float total = 0.0f;
      for (int64_t b = g * G / kXBlock; b < (g + 1) * G / kXBlock; ++b) {
        int32_t block = 0;
        for (int64_t k = b * kXBlock; k < (b + 1) * kXBlock; ++k) block += q[m * K + k];
        total += d[m * nb + b] * static_cast<float>(block);
      }
      s[m * ng + g] = total;
    }
  }
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// RB consecutive row tiles against MC activation rows starting at m0.
template <int BITS, int G, int MC, int RB>
void tiles(const uint8_t* w, const Activations& a, int64_t K, int64_t N, int64_t t0, int64_t m0,
           float* y) {
  constexpr int kQuantBytes = 16 * G * BITS / 8;
  constexpr int kGroupBytes = kQuantBytes + 64;
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
      if (g + kPrefetch < ng) {
        const char* ahead = (const char*)(w + (t0 + r) * tile_bytes + (g + kPrefetch) * kGroupBytes);
        for (int p = 0; p < kGroupBytes; p += 64) _mm_prefetch(ahead + p, _MM_HINT_T0);
      }
    }
    if constexpr (BITS == 4) {
      for (int c = 0; c < G / 8; ++c) {
        __m512i lo_x[MC], hi_x[MC];
        for (int m = 0; m < MC; ++m) {
          const int8_t* xp = a.q + (m0 + m) * K + g * G + c * 8;
          lo_x[m] = broadcast4(xp);
          hi_x[m] = broadcast4(xp + 4);
        }
        for (int r = 0; r < RB; ++r) {
          const __m512i v = _mm512_loadu_si512(w + (t0 + r) * tile_bytes + g * kGroupBytes + c * 64);
          const __m512i lo = _mm512_and_si512(v, nibble);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
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
      const __m512 zero = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sz + 32)));
      for (int m = 0; m < MC; ++m) {
        for (int h = 0; h < kBlocks; ++h) {
          const __m512 dq = _mm512_cvtepi32_ps(dot[r][m][h]);
          acc[r][m] = _mm512_fmadd_ps(dq, _mm512_mul_ps(scale, _mm512_set1_ps(d[m][h])), acc[r][m]);
        }
        acc[r][m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(sum[m]), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MC; ++m) _mm512_storeu_ps(y + (m0 + m) * N + (t0 + r) * 16, acc[r][m]);
}

// Tiles [begin, end) against activation rows m0..m0+MC. One row reads four tiles at a
// time (four independent chains of vpdpbusd), more rows fewer.
template <int BITS, int G, int MC>
void tile_range(const uint8_t* w, const Activations& a, int64_t K, int64_t N, int64_t begin,
                int64_t end, int64_t m0, float* y) {
  constexpr int RB = MC == 1 ? 4 : (MC == 2 ? 2 : 1);
  int64_t t = begin;
  for (; t + RB <= end; t += RB) tiles<BITS, G, MC, RB>(w, a, K, N, t, m0, y);
  for (; t < end; ++t) tiles<BITS, G, MC, 1>(w, a, K, N, t, m0, y);
}

template <int BITS, int G>
void product(const uint8_t* w, const Activations& a, int64_t M, int64_t K, int64_t N, float* y) {
  at::parallel_for(0, N / 16, 4, [&](int64_t begin, int64_t end) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) tile_range<BITS, G, 4>(w, a, K, N, begin, end, m0, y);
    switch (M - m0) {
      case 3: tile_range<BITS, G, 3>(w, a, K, N, begin, end, m0, y); break;
      case 2: tile_range<BITS, G, 2>(w, a, K, N, begin, end, m0, y); break;
      case 1: tile_range<BITS, G, 1>(w, a, K, N, begin, end, m0, y); break;
      default: break;
    }
  });
}

at::Tensor vnni_linear(const at::Tensor& x, const at::Tensor& w, int64_t out_features,
                       int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "vnni_linear: x must be a contiguous (M, K) float32 tensor");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "vnni_linear: w must be uint8");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0 && K % group == 0, "vnni_linear: shape");
  const bool known = (bits == 4 && group == 32) || (bits == 8 && (group == 16 || group == 32));
  TORCH_CHECK(known, "vnni_linear: bits/group");
  TORCH_CHECK(w.numel() == N * K * bits / 8 + N * (K / group) * 4, "vnni_linear: weight bytes");
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto xd = at::empty({M, K / kXBlock}, x.options());
  auto xs = at::empty({M, K / group}, x.options());
  quantize(x.data_ptr<float>(), M, K, group, xq.data_ptr<int8_t>(), xd.data_ptr<float>(),
           xs.data_ptr<float>());
  const Activations a{xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>()};
  auto y = at::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  if (bits == 4)
    product<4, 32>(wp, a, M, K, N, y.data_ptr<float>());
  else if (group == 32)
    product<8, 32>(wp, a, M, K, N, y.data_ptr<float>());
  else
    product<8, 16>(wp, a, M, K, N, y.data_ptr<float>());
  return y;
}

// ---------------------------------------------------------------------------------------
// Attention of one new token over a float32 KV cache, for every query head of a group at
// once, so that each cached key and value is read once (torch's fused kernel reads them
// once per query head). q (B, H, 1, D); k, v (B, KVH, S, D) with unit stride along D.

// e^x for x <= 0 (softmax after subtracting the maximum): 2^(x log2 e) split into an
// integer power (scalef) and a degree-6 polynomial on [-0.5, 0.5]; relative error < 2e-7.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
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
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + s), vtop));
      _mm512_storeu_ps(row + s, e);
      total = _mm512_add_ps(total, e);
    }
    if (s < S) {
      const __mmask16 m = (__mmask16)((1u << (S - s)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + s), vtop));
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
  const int64_t group = H / KVH;
  // Query heads are taken up to 4 at a time with their key/value head.
  const int64_t per_task = group <= 4 ? group : 4;
  const int64_t chunks = (group + per_task - 1) / per_task;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * KVH * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(4 * S);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (KVH * chunks), h = (task / chunks) % KVH, c = task % chunks;
      const int64_t first = h * group + c * per_task;
      const int nq = static_cast<int>(std::min<int64_t>(per_task, h * group + group - first));
      const float* qs[4];
      float* os[4];
      for (int j = 0; j < nq; ++j) {
        qs[j] = qp + (b * H + first + j) * D;
        os[j] = op + (b * H + first + j) * D;
      }
      const float* kh = kp + b * k.stride(0) + h * k.stride(1);
      const float* vh = vp + b * v.stride(0) + h * v.stride(1);
      if (D == 64)
        attend<64>(qs, nq, kh, vh, S, k.stride(2), scale, scores.data(), os);
      else
        attend<128>(qs, nq, kh, vh, S, k.stride(2), scale, scores.data(), os);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(llamalab, m) {
  m.def("vnni_linear(Tensor x, Tensor w, int out_features, int bits, int group) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab, CPU, m) {
  m.impl("vnni_linear", vnni_linear);
  m.impl("decode_attention", decode_attention);
}
