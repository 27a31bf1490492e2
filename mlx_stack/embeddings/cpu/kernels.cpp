// Vectorised encoder kernels for MLX's CPU backend: float32, row-major, in place.
// kernels.py builds this file on first use (its _FLAGS: -O3 -ffast-math -fopenmp-simd, plus
// -march=native where accepted, so the loops use glibc's vector expf/erff), loads it with ctypes
// and checks every kernel against an exact numpy reference; its docstring says why they exist.
#include <cfloat>
#include <cmath>
#include <cstdint>
// Register tiles of the attention kernel: QB queries x 16*NK keys for the scores, QB queries x
// 16*NV dims for the values. With AVX-512 (32 vector registers) 8 x 32 tiles; else 4 x 16.
#ifdef __AVX512F__
#define MLXS_QB 8
#define MLXS_NK 2
#else
#define MLXS_QB 4
#define MLXS_NK 1
#endif
// One block of QB queries (rows i0..i0+QB-1) of one (batch, head): scores against all keys
// (kt: K transposed, zero-padded to TP columns), softmax, weighted sum of the values (vc: V of
// this head packed [T, D], so the loop streams a compact buffer, not rows 3*H*D apart); the
// output overwrites the queries. Needs D % 16 == 0 (D % 32 == 0 for NV == 2).
template <int QB, int NK, int NV>
static void mlxs_attend_block(float* base, const float* __restrict__ kt,
                              const float* __restrict__ vc,
                              const float* __restrict__ m, int64_t T, int64_t TP,
                              int64_t H, int64_t D, int64_t h, int64_t i0, float scale,
                              float* __restrict__ s) {
  const int64_t row = 3 * H * D;
  float* q[QB];
  for (int r = 0; r < QB; ++r) q[r] = base + (i0 + r) * row + h * D;
  for (int64_t j0 = 0; j0 < TP; j0 += 16 * NK) {
    float acc[QB][16 * NK] = {};
    for (int64_t c = 0; c < D; ++c) {
      const float* __restrict__ kc = kt + c * TP + j0;
      for (int r = 0; r < QB; ++r) {
        const float a = q[r][c];
#pragma omp simd
        for (int jj = 0; jj < 16 * NK; ++jj) acc[r][jj] += a * kc[jj];
      }
    }
    for (int r = 0; r < QB; ++r)
#pragma omp simd
      for (int jj = 0; jj < 16 * NK; ++jj) s[r * TP + j0 + jj] = acc[r][jj] * scale;
  }
  for (int r = 0; r < QB; ++r) {
    float* __restrict__ sr = s + r * TP;
    if (m) {
#pragma omp simd
      for (int64_t j = 0; j < T; ++j) sr[j] += m[j];
    }
    float top = -FLT_MAX;
    for (int64_t j = 0; j < T; ++j) top = sr[j] > top ? sr[j] : top;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < T; ++j) {
      // exp of a large negative (a masked key) is zero; clamping first keeps every lane on
      // the vector expf's fast path (out-of-range lanes fall back to scalar code, ~3x slower)
      const float d = sr[j] - top;
      const float e = d < -80.0f ? 0.0f : expf(fmaxf(d, -80.0f));
      sr[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < T; ++j) sr[j] *= inv;
  }
  for (int64_t d0 = 0; d0 < D; d0 += 16 * NV) {
    float acc[QB][16 * NV] = {};
    for (int64_t j = 0; j < T; ++j) {
      const float* __restrict__ v = vc + j * D + d0;
      for (int r = 0; r < QB; ++r) {
        const float w = s[r * TP + j];
#pragma omp simd
        for (int jj = 0; jj < 16 * NV; ++jj) acc[r][jj] += w * v[jj];
      }
    }
    for (int r = 0; r < QB; ++r)
#pragma omp simd
      for (int jj = 0; jj < 16 * NV; ++jj) q[r][d0 + jj] = acc[r][jj];
  }
}
template <int NV>
static void mlxs_attend_pair(float* base, const float* kt, const float* vc, const float* m,
                             int64_t T, int64_t TP,
                             int64_t H, int64_t D, int64_t h, float scale, float* s) {
  int64_t i0 = 0;
  for (; i0 + MLXS_QB <= T; i0 += MLXS_QB)
    mlxs_attend_block<MLXS_QB, MLXS_NK, NV>(base, kt, vc, m, T, TP, H, D, h, i0, scale, s);
  for (; i0 < T; ++i0)
    mlxs_attend_block<1, MLXS_NK, NV>(base, kt, vc, m, T, TP, H, D, h, i0, scale, s);
}
extern "C" {
// x[r] = softmax(x[r] * scale + bias[r / bias_period]) for each row r; bias may be null
void mlxs_softmax(float* x, int64_t rows, int64_t cols, float scale,
                  const float* __restrict__ bias, int64_t bias_period) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict__ o = x + r * cols;
    const float* __restrict__ b = bias ? bias + (r / bias_period) * cols : nullptr;
    float top = -FLT_MAX;
    for (int64_t c = 0; c < cols; ++c) {
      float v = o[c] * scale + (b ? b[c] : 0.0f);
      o[c] = v;
      top = v > top ? v : top;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) {
      const float d = o[c] - top;
      const float e = d < -80.0f ? 0.0f : expf(fmaxf(d, -80.0f));
      o[c] = e;
      sum += e;
    }
    float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) o[c] *= inv;
  }
}
// x[r] = x[r] + bias
void mlxs_bias_add(float* x, const float* __restrict__ bias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict__ o = x + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) o[c] += bias[c];
  }
}
// x[r] = gelu(x[r] + bias), the exact (erf) GELU; bias may be null
void mlxs_bias_gelu(float* x, const float* __restrict__ bias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict__ o = x + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      float v = o[c] + (bias ? bias[c] : 0.0f);
      o[c] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
  }
}
// x[r] = layer_norm(x[r] + bias + residual[r]) * gamma + beta; bias may be null
void mlxs_add_layernorm(float* x, const float* __restrict__ bias,
                        const float* __restrict__ residual, const float* __restrict__ gamma,
                        const float* __restrict__ beta, int64_t rows, int64_t cols, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict__ o = x + r * cols;
    const float* __restrict__ res = residual + r * cols;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) {
      float v = o[c] + res[c] + (bias ? bias[c] : 0.0f);
      o[c] = v;
      sum += v;
    }
    float mean = sum / cols;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < cols; ++c) {
      float d = o[c] - mean;
      squares += d * d;
    }
    float inv = 1.0f / sqrtf(squares / cols + eps);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) o[c] = (o[c] - mean) * inv * gamma[c] + beta[c];
  }
}
// Self-attention of (batch, head) pairs [first, last) of qkv [B, T, 3, H, D] (row-major), with
// an additive mask [B, T] (or null). Each query's output overwrites its own q slot, so the
// context ends up in qkv[:, :, 0]. D % 16 == 0; scratch holds 2 * D * TP + 8 * TP floats,
// TP = T rounded up to 32.
void mlxs_attention(float* qkv, const float* __restrict__ mask, int64_t T, int64_t H,
                    int64_t D, float scale, int64_t first, int64_t last,
                    float* __restrict__ scratch) {
  const int64_t row = 3 * H * D;
  const int64_t TP = (T + 16 * MLXS_NK - 1) / (16 * MLXS_NK) * (16 * MLXS_NK);
  float* __restrict__ kt = scratch;
  float* __restrict__ vc = scratch + D * TP;
  float* __restrict__ s = vc + D * TP;
  for (int64_t i = 0; i < D * TP; ++i) kt[i] = 0.0f;
  for (int64_t pair = first; pair < last; ++pair) {
    const int64_t b = pair / H, h = pair % H;
    float* base = qkv + b * T * row;
    const float* m = mask ? mask + b * T : nullptr;
    for (int64_t j = 0; j < T; ++j) {
      const float* __restrict__ k = base + j * row + H * D + h * D;
      const float* __restrict__ v = k + H * D;
      for (int64_t c = 0; c < D; ++c) kt[c * TP + j] = k[c];
      for (int64_t c = 0; c < D; ++c) vc[j * D + c] = v[c];
    }
    if (D % 32 == 0) mlxs_attend_pair<2>(base, kt, vc, m, T, TP, H, D, h, scale, s);
    else mlxs_attend_pair<1>(base, kt, vc, m, T, TP, H, D, h, scale, s);
  }
}
// up = up * silu(gate)
void mlxs_swiglu(float* up, const float* __restrict__ gate, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) up[i] = up[i] * gate[i] / (1.0f + expf(-gate[i]));
}
}
