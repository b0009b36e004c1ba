// Attention on the CPU, softmax(scale * q k^T) v over the keys a mask shows, forward and backward,
// called from JAX through XLA's FFI (cpu_kernels.py builds and registers it, attention_cpu.py
// calls it; model.attention_impl=cpu_kernel).
//
// Why: XLA:CPU runs attention's small batched matmuls ([heads, 256, 64] x [heads, 64, 256] at
// bench_cpu) at 16-50 GFLOP/s, about half of its rate on the weight matmuls, and materialises the
// whole score matrix. Here each (batch, head) walks its queries four rows at a time: the rows'
// scores against every key they may see (register-tiled AVX2 or AVX-512 FMAs against a transposed copy of
// K), a masked softmax in registers, and the rows' output, so scores never leave the cache and
// keys past a row's last visible one are never touched (the causal upper triangle is skipped).
// The forward keeps each row's log-sum-exp; the backward recomputes the probabilities from it and
// accumulates dK and dV per kv head, one kv head per task (no two threads write the same rows).
//
// Layouts, token-major as the projections write them, so XLA copies nothing in or out:
// qkv and dqkv [B, L, H + 2N, D], the H query heads, then the N key heads, then the N value heads
// of each token (the q, k, v projection's output as is); o and dout [B, L, H, D] (the output
// projection's input); H a multiple of N (grouped queries); mask uint8 [B, L, L16], nonzero where
// a query sees a key, L16 = L rounded up to 16 with zero padding; lse [B, H, L]. D a multiple of
// 16. Every query row must see at least one key (true of self-attention: a token sees itself).
// logit_cap > 0: scaled logits become cap * tanh(logits / cap) before the mask, as in the JAX forms.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

constexpr int kRows = 4;   // query rows per tile
constexpr int kCols = 16;  // keys per score tile, channels per output tile

inline __m256 Exp256(__m256 x) {  // x <= 0
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float Sum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline float Max256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// 8 mask bytes -> all-ones lanes where nonzero
inline __m256 MaskLanes(const uint8_t* m) {
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()));
}

#if defined(__AVX512F__)
// AVX-512: one 16-float vector per row of a 16-wide tile, two tiles side by side where they fit, so
// that eight accumulators hide the FMA latency as the AVX2 form's do. Each output is the same
// sequence of FMAs as in the AVX2 form, so both give the same bits.

// o[r][16n + c] = sum_k a[r * a_stride + k] * b[k * b_stride + 16n + c], r < 4, k < inner, for N
// tiles of 16 columns: the micro-kernel of both ScoresTile (a: q rows, b: K transposed) and MixTile
// (a: probability rows, b: V).
template <int N>
inline void RowsTimesColumns(const float* a, int64_t a_stride, int64_t inner, const float* b, int64_t b_stride,
                             float* o, int64_t o_stride) {
  __m512 c[kRows][N];
  for (int r = 0; r < kRows; ++r)
    for (int n = 0; n < N; ++n) c[r][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < inner; ++k, b += b_stride) {
    __m512 bv[N];
    for (int n = 0; n < N; ++n) bv[n] = _mm512_loadu_ps(b + 16 * n);
    for (int r = 0; r < kRows; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * a_stride + k]);
      for (int n = 0; n < N; ++n) c[r][n] = _mm512_fmadd_ps(x, bv[n], c[r][n]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int n = 0; n < N; ++n) _mm512_storeu_ps(o + r * o_stride + 16 * n, c[r][n]);
}

// out[r][j] = sum_d a[r][d] * bt[d][j]; r < 4, j < cols (multiple of 16, bt zero-padded).
void ScoresTile(const float* a, int64_t dim, const float* bt, int64_t bt_stride, int64_t cols, float* out,
                int64_t out_stride) {
  int64_t j0 = 0;
  for (; j0 + 2 * kCols <= cols; j0 += 2 * kCols)
    RowsTimesColumns<2>(a, dim, dim, bt + j0, bt_stride, out + j0, out_stride);
  for (; j0 < cols; j0 += kCols) RowsTimesColumns<1>(a, dim, dim, bt + j0, bt_stride, out + j0, out_stride);
}

// out[r][d] = sum_j p[r][j] * v[j][d]; r < 4, d < dim (multiple of 16); v's rows v_stride apart.
void MixTile(const float* p, int64_t p_stride, int64_t keys, const float* v, int64_t v_stride, int64_t dim,
             float* out) {
  int64_t d0 = 0;
  for (; d0 + 2 * kCols <= dim; d0 += 2 * kCols)
    RowsTimesColumns<2>(p, p_stride, keys, v + d0, v_stride, out + d0, dim);
  for (; d0 < dim; d0 += kCols) RowsTimesColumns<1>(p, p_stride, keys, v + d0, v_stride, out + d0, dim);
}

// R rows at a time: each accumulator is read and written once per R rows (with 4, the dK and dV
// accumulators' loads and stores bounded the backward pass); R=8 keeps x's 8 x N vectors, N
// accumulators and the broadcast in the 32 registers.
template <int N, int R>
inline void OuterBlock(const float* p, int64_t p_stride, int64_t keys, const float* x, int64_t dim, float* a,
                       int64_t acc_stride) {
  __m512 xv[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) xv[r][n] = _mm512_loadu_ps(x + r * dim + 16 * n);
  for (int64_t j = 0; j < keys; ++j, a += acc_stride) {
    __m512 acc[N];
    for (int n = 0; n < N; ++n) acc[n] = _mm512_loadu_ps(a + 16 * n);
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(p[r * p_stride + j]);
      for (int n = 0; n < N; ++n) acc[n] = _mm512_fmadd_ps(w, xv[r][n], acc[n]);
    }
    for (int n = 0; n < N; ++n) _mm512_storeu_ps(a + 16 * n, acc[n]);
  }
}

// acc[j][d] += sum_r p[r][j] * x[r][d]; r < 2 * kRows (two tiles' rows); acc's rows acc_stride
// apart. The same FMAs in the same order as two 4-row passes, so the same bits as the AVX2 form.
void OuterTiles(const float* p, int64_t p_stride, int64_t keys, const float* x, int64_t dim, float* acc,
                int64_t acc_stride) {
  int64_t d0 = 0;
  for (; d0 + 2 * kCols <= dim; d0 += 2 * kCols)
    OuterBlock<2, 2 * kRows>(p, p_stride, keys, x + d0, dim, acc + d0, acc_stride);
  for (; d0 < dim; d0 += kCols) OuterBlock<1, 2 * kRows>(p, p_stride, keys, x + d0, dim, acc + d0, acc_stride);
}

#else  // AVX2: two 8-float vectors per row of a 16-wide tile

// out[r][j] = sum_d a[r][d] * bt[d][j]; r < 4, j < cols (multiple of 16, bt zero-padded).
void ScoresTile(const float* a, int64_t dim, const float* bt, int64_t bt_stride, int64_t cols, float* out,
                int64_t out_stride) {
  for (int64_t j0 = 0; j0 < cols; j0 += kCols) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    const float* b = bt + j0;
    for (int64_t d = 0; d < dim; ++d, b += bt_stride) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
      __m256 x = _mm256_broadcast_ss(a + d);
      c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
      x = _mm256_broadcast_ss(a + dim + d);
      c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
      x = _mm256_broadcast_ss(a + 2 * dim + d);
      c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
      x = _mm256_broadcast_ss(a + 3 * dim + d);
      c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
    }
    float* o = out + j0;
    _mm256_storeu_ps(o, c00); _mm256_storeu_ps(o + 8, c01); o += out_stride;
    _mm256_storeu_ps(o, c10); _mm256_storeu_ps(o + 8, c11); o += out_stride;
    _mm256_storeu_ps(o, c20); _mm256_storeu_ps(o + 8, c21); o += out_stride;
    _mm256_storeu_ps(o, c30); _mm256_storeu_ps(o + 8, c31);
  }
}

// out[r][d] = sum_j p[r][j] * v[j][d]; r < 4, d < dim (multiple of 16); v's rows v_stride apart.
void MixTile(const float* p, int64_t p_stride, int64_t keys, const float* v, int64_t v_stride, int64_t dim,
             float* out) {
  for (int64_t d0 = 0; d0 < dim; d0 += kCols) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    const float* vj = v + d0;
    for (int64_t j = 0; j < keys; ++j, vj += v_stride) {
      const __m256 b0 = _mm256_loadu_ps(vj), b1 = _mm256_loadu_ps(vj + 8);
      __m256 x = _mm256_broadcast_ss(p + j);
      c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
      x = _mm256_broadcast_ss(p + p_stride + j);
      c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
      x = _mm256_broadcast_ss(p + 2 * p_stride + j);
      c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
      x = _mm256_broadcast_ss(p + 3 * p_stride + j);
      c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
    }
    float* o = out + d0;
    _mm256_storeu_ps(o, c00); _mm256_storeu_ps(o + 8, c01); o += dim;
    _mm256_storeu_ps(o, c10); _mm256_storeu_ps(o + 8, c11); o += dim;
    _mm256_storeu_ps(o, c20); _mm256_storeu_ps(o + 8, c21); o += dim;
    _mm256_storeu_ps(o, c30); _mm256_storeu_ps(o + 8, c31);
  }
}

// acc[j][d] += sum_r p[r][j] * x[r][d]; r < 4; acc's rows acc_stride apart.
void OuterTile(const float* p, int64_t p_stride, int64_t keys, const float* x, int64_t dim, float* acc,
               int64_t acc_stride) {
  for (int64_t d0 = 0; d0 < dim; d0 += kCols) {
    const __m256 x00 = _mm256_loadu_ps(x + d0), x01 = _mm256_loadu_ps(x + d0 + 8);
    const __m256 x10 = _mm256_loadu_ps(x + dim + d0), x11 = _mm256_loadu_ps(x + dim + d0 + 8);
    const __m256 x20 = _mm256_loadu_ps(x + 2 * dim + d0), x21 = _mm256_loadu_ps(x + 2 * dim + d0 + 8);
    const __m256 x30 = _mm256_loadu_ps(x + 3 * dim + d0), x31 = _mm256_loadu_ps(x + 3 * dim + d0 + 8);
    float* a = acc + d0;
    for (int64_t j = 0; j < keys; ++j, a += acc_stride) {
      __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
      __m256 w = _mm256_broadcast_ss(p + j);
      a0 = _mm256_fmadd_ps(w, x00, a0); a1 = _mm256_fmadd_ps(w, x01, a1);
      w = _mm256_broadcast_ss(p + p_stride + j);
      a0 = _mm256_fmadd_ps(w, x10, a0); a1 = _mm256_fmadd_ps(w, x11, a1);
      w = _mm256_broadcast_ss(p + 2 * p_stride + j);
      a0 = _mm256_fmadd_ps(w, x20, a0); a1 = _mm256_fmadd_ps(w, x21, a1);
      w = _mm256_broadcast_ss(p + 3 * p_stride + j);
      a0 = _mm256_fmadd_ps(w, x30, a0); a1 = _mm256_fmadd_ps(w, x31, a1);
      _mm256_storeu_ps(a, a0); _mm256_storeu_ps(a + 8, a1);
    }
  }
}

// Two tiles' rows, one after the other (16 registers hold one 4-row tile's x).
void OuterTiles(const float* p, int64_t p_stride, int64_t keys, const float* x, int64_t dim, float* acc,
                int64_t acc_stride) {
  OuterTile(p, p_stride, keys, x, dim, acc, acc_stride);
  OuterTile(p + kRows * p_stride, p_stride, keys, x + kRows * dim, dim, acc, acc_stride);
}

#endif  // __AVX512F__

// batch, query heads, tokens (queries = keys), head dim, kv heads, query heads per kv head, keys
// rounded up to 16 (the mask's and the score rows' stride), floats per token in qkv (row) and in o
// (orow).
struct Dims {
  int64_t batch, heads, length, dim, kv_heads, group, stride, row, orow;
};

// The dims of qkv [B, L, H + 2N, D] and o (or dout) [B, L, H, D], checked against the mask's and
// each other: anything the kernels do not index by is refused before a byte is read.
ffi::Error ReadDims(ffi::Span<const int64_t> qkv, ffi::Span<const int64_t> o, ffi::Span<const int64_t> mask,
                    Dims& s) {
  const bool ranks = qkv.size() == 4 && o.size() == 4 && mask.size() == 3;
  if (ranks) {
    const int64_t heads = o[2], kv_heads = (qkv[2] - heads) / 2;
    s = Dims{qkv[0], heads, qkv[1], qkv[3], kv_heads, kv_heads > 0 ? heads / kv_heads : 0,
             (qkv[1] + kCols - 1) / kCols * kCols, qkv[2] * qkv[3], heads * qkv[3]};
  }
  const bool ok = ranks && s.kv_heads > 0 && s.heads + 2 * s.kv_heads == qkv[2] && s.heads % s.kv_heads == 0 &&
                  s.dim % kCols == 0 && o[0] == s.batch && o[1] == s.length && o[3] == s.dim &&
                  mask[0] == s.batch && mask[1] == s.length && mask[2] == s.stride;
  return ok ? ffi::Error::Success()
            : ffi::Error::InvalidArgument("layerjax attention kernel: qkv [B,L,H+2N,D], o [B,L,H,D] with N "
                                          "dividing H and D a multiple of 16, mask uint8 [B,L,L rounded to 16]");
}

bool SameDims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// rows x dim floats, the source's rows src_stride apart, into a dense tile (zeros past `rows`).
void LoadRows(const float* src, int64_t src_stride, int rows, int64_t dim, float* tile) {
  std::fill(tile, tile + kRows * dim, 0.0f);
  for (int r = 0; r < rows; ++r) std::memcpy(tile + r * dim, src + r * src_stride, dim * sizeof(float));
}

void StoreRows(const float* tile, int rows, int64_t dim, float* dst, int64_t dst_stride) {
  for (int r = 0; r < rows; ++r) std::memcpy(dst + r * dst_stride, tile + r * dim, dim * sizeof(float));
}

// Visible keys of a tile: [0, end) covers every visible key of its rows. A causal row ends in up
// to L zero bytes, so they are skipped eight at a time (rows are a multiple of 16 bytes long):
// byte by byte this scan was a sixth of the forward kernel's own time.
int64_t TileEnd(const uint8_t* mask, int64_t i0, int rows, int64_t keys) {
  int64_t end = 0;
  for (int r = 0; r < rows; ++r) {
    const uint8_t* m = mask + (i0 + r) * keys;
    int64_t last = keys;
    for (uint64_t word; last - 8 >= end; last -= 8) {
      std::memcpy(&word, m + last - 8, sizeof(word));
      if (word != 0) break;
    }
    while (last > end && !m[last - 1]) --last;
    end = std::max(end, last);
  }
  return end;
}

// dst[c][r] = src[r][c] for an 8x8 block (AVX2 unpacks and shuffles, the standard sequence).
inline void Transpose8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// xt[d][j] = x[j][d] (x's rows x_stride apart), xt's rows `stride` long and zero past `keys`. In
// 8x8 blocks: element by element, the strided writes made this copy nearly half of the forward
// kernel's own time.
void Transpose(const float* x, int64_t x_stride, int64_t keys, int64_t dim, int64_t stride, float* xt) {
  std::fill(xt, xt + dim * stride, 0.0f);
  const int64_t whole = keys / 8 * 8;
  for (int64_t j = 0; j < whole; j += 8)
    for (int64_t d = 0; d < dim; d += 8) Transpose8x8(x + j * x_stride + d, x_stride, xt + d * stride + j, stride);
  for (int64_t j = whole; j < keys; ++j)
    for (int64_t d = 0; d < dim; ++d) xt[d * stride + j] = x[j * x_stride + d];
}

// Probabilities of one row in place: s holds raw q.k for [0, end_pad); returns lse (forward) or
// uses the given lse (backward, normalise=false).
float SoftmaxRow(float* s, const uint8_t* m, int64_t end, int64_t end_pad, float scale, float cap, bool forward,
                 float lse) {
  const __m256 vscale = _mm256_set1_ps(scale), neg = _mm256_set1_ps(-INFINITY);
  if (cap > 0) {
    for (int64_t j = 0; j < end; ++j) s[j] = cap * std::tanh(s[j] * scale / cap);
  } else {
    for (int64_t j = 0; j < end_pad; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), vscale));
  }
  // mask bytes beyond `end` are read only up to end_pad <= keys rounded; caller pads mask rows.
  float mx;
  if (forward) {
    __m256 vmax = neg;
    for (int64_t j = 0; j < end_pad; j += 8)
      vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg, _mm256_loadu_ps(s + j), MaskLanes(m + j)));
    mx = Max256(vmax);
    if (mx == -INFINITY) mx = 0.0f;
  } else {
    mx = lse;
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t j = 0; j < end_pad; j += 8) {
    const __m256 x = _mm256_min_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx), _mm256_setzero_ps());
    const __m256 e = _mm256_and_ps(Exp256(x), MaskLanes(m + j));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  if (!forward) return lse;
  const float sum = Sum256(vsum);
  const __m256 inv = _mm256_set1_ps(sum > 0 ? 1.0f / sum : 0.0f);
  for (int64_t j = 0; j < end_pad; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
  return mx + std::log(sum);
}

ffi::Error AttnForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::U8> mask,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, float scale, float cap) {
  Dims s;
  if (ffi::Error error = ReadDims(qkv.dimensions(), out->dimensions(), mask.dimensions(), s); error.failure())
    return error;
  const int64_t mstride = s.stride;
  layerjax::ParallelTasks(pool, s.batch * s.heads, [&](int64_t task) {
    const int64_t b = task / s.heads, h = task % s.heads, n = h / s.group;
    const float* tokens = qkv.typed_data() + b * s.length * s.row;
    const float* qh = tokens + h * s.dim;
    const float* kh = tokens + (s.heads + n) * s.dim;
    const float* vh = tokens + (s.heads + s.kv_heads + n) * s.dim;
    const uint8_t* mb = mask.typed_data() + b * s.length * mstride;
    float* oh = out->typed_data() + b * s.length * s.orow + h * s.dim;
    float* lh = lse->typed_data() + task * s.length;
    std::vector<float> kt(s.dim * s.stride), scores(kRows * s.stride), qtile(kRows * s.dim), otile(kRows * s.dim);
    Transpose(kh, s.row, s.length, s.dim, s.stride, kt.data());
    for (int64_t i0 = 0; i0 < s.length; i0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, s.length - i0));
      const int64_t end = TileEnd(mb, i0, rows, mstride);
      const int64_t end_pad = (end + kCols - 1) / kCols * kCols;
      LoadRows(qh + i0 * s.row, s.row, rows, s.dim, qtile.data());
      ScoresTile(qtile.data(), s.dim, kt.data(), s.stride, end_pad, scores.data(), s.stride);
      for (int r = 0; r < kRows; ++r) {
        float* row = scores.data() + r * s.stride;
        if (r >= rows) { std::fill(row, row + end_pad, 0.0f); continue; }
        lh[i0 + r] = SoftmaxRow(row, mb + (i0 + r) * mstride, end, end_pad, scale, cap, true, 0.0f);
      }
      MixTile(scores.data(), s.stride, end, vh, s.row, s.dim, otile.data());
      StoreRows(otile.data(), rows, s.dim, oh + i0 * s.orow, s.orow);
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttnBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::U8> mask,
                        ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                        ffi::ResultBuffer<ffi::F32> dqkv, float scale, float cap) {
  Dims s;
  if (ffi::Error error = ReadDims(qkv.dimensions(), o.dimensions(), mask.dimensions(), s); error.failure())
    return error;
  if (!SameDims(dout.dimensions(), o.dimensions()) || !SameDims(dqkv->dimensions(), qkv.dimensions()))
    return ffi::Error::InvalidArgument("layerjax attention kernel: dout must match o, dqkv qkv");
  const int64_t mstride = s.stride;
  // One task per (batch row, kv head): it owns that head's dK and dV columns and its query
  // heads' dQ columns, so no two tasks write the same floats.
  layerjax::ParallelTasks(pool, s.batch * s.kv_heads, [&](int64_t task) {
    const int64_t b = task / s.kv_heads, n = task % s.kv_heads;
    const float* tokens = qkv.typed_data() + b * s.length * s.row;
    float* dtokens = dqkv->typed_data() + b * s.length * s.row;
    const float* kh = tokens + (s.heads + n) * s.dim;
    const float* vh = tokens + (s.heads + s.kv_heads + n) * s.dim;
    float* dkh = dtokens + (s.heads + n) * s.dim;
    float* dvh = dtokens + (s.heads + s.kv_heads + n) * s.dim;
    for (int64_t j = 0; j < s.length; ++j) {
      std::fill(dkh + j * s.row, dkh + j * s.row + s.dim, 0.0f);
      std::fill(dvh + j * s.row, dvh + j * s.row + s.dim, 0.0f);
    }
    const uint8_t* mb = mask.typed_data() + b * s.length * mstride;
    // Two 4-row tiles per block: P and dS of both, then one dK / dV update over all 8 rows.
    constexpr int kBlock = 2 * kRows;
    std::vector<float> kt(s.dim * s.stride), vt(s.dim * s.stride), p(kBlock * s.stride), ds(kBlock * s.stride),
        qtile(kBlock * s.dim), dotile(kBlock * s.dim), otile(kRows * s.dim), dqtile(kRows * s.dim);
    Transpose(kh, s.row, s.length, s.dim, s.stride, kt.data());
    Transpose(vh, s.row, s.length, s.dim, s.stride, vt.data());
    for (int64_t g = 0; g < s.group; ++g) {
      const int64_t h = n * s.group + g;
      const float* qh = tokens + h * s.dim;
      const float* oh = o.typed_data() + b * s.length * s.orow + h * s.dim;
      const float* doh = dout.typed_data() + b * s.length * s.orow + h * s.dim;
      const float* lh = lse.typed_data() + (b * s.heads + h) * s.length;
      float* dqh = dtokens + h * s.dim;
      for (int64_t b0 = 0; b0 < s.length; b0 += kBlock) {
        // Keys up to the block's last visible one: a row's keys past its own are masked to zero
        // probability, so they add nothing to dQ, dK or dV.
        const int64_t end = TileEnd(mb, b0, static_cast<int>(std::min<int64_t>(kBlock, s.length - b0)), mstride);
        const int64_t end_pad = (end + kCols - 1) / kCols * kCols;
        for (int tile = 0; tile < 2; ++tile) {
          const int64_t i0 = b0 + tile * kRows;
          const int rows = static_cast<int>(std::clamp<int64_t>(s.length - i0, 0, kRows));
          float* pt = p.data() + tile * kRows * s.stride;
          float* dst = ds.data() + tile * kRows * s.stride;
          float* qt = qtile.data() + tile * kRows * s.dim;
          float* dot = dotile.data() + tile * kRows * s.dim;
          LoadRows(qh + i0 * s.row, s.row, rows, s.dim, qt);
          LoadRows(doh + i0 * s.orow, s.orow, rows, s.dim, dot);
          LoadRows(oh + i0 * s.orow, s.orow, rows, s.dim, otile.data());
          ScoresTile(qt, s.dim, kt.data(), s.stride, end_pad, pt, s.stride);
          ScoresTile(dot, s.dim, vt.data(), s.stride, end_pad, dst, s.stride);
          for (int r = 0; r < kRows; ++r) {
            float* prow = pt + r * s.stride;
            float* drow = dst + r * s.stride;
            if (r >= rows) { std::fill(prow, prow + end_pad, 0.0f); std::fill(drow, drow + end_pad, 0.0f); continue; }
            const uint8_t* m = mb + (i0 + r) * mstride;
            std::vector<float> capped;
            if (cap > 0) {
              capped.resize(end);
              for (int64_t j = 0; j < end; ++j) capped[j] = cap * std::tanh(prow[j] * scale / cap);
            }
            SoftmaxRow(prow, m, end, end_pad, scale, cap, false, lh[i0 + r]);
            float delta = 0.0f;
            for (int64_t d = 0; d < s.dim; ++d) delta += dot[r * s.dim + d] * otile[r * s.dim + d];
            const __m256 vdelta = _mm256_set1_ps(delta), vscale = _mm256_set1_ps(scale);
            if (cap > 0) {
              for (int64_t j = 0; j < end; ++j) {
                const float t = capped[j] / cap;
                drow[j] = prow[j] * (drow[j] - delta) * (1.0f - t * t) * scale;
              }
              for (int64_t j = end; j < end_pad; ++j) drow[j] = 0.0f;
            } else {
              for (int64_t j = 0; j < end_pad; j += 8) {
                const __m256 pv = _mm256_loadu_ps(prow + j);
                _mm256_storeu_ps(drow + j, _mm256_mul_ps(_mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(drow + j), vdelta)), vscale));
              }
            }
          }
          if (rows > 0) {
            MixTile(dst, s.stride, end, kh, s.row, s.dim, dqtile.data());
            StoreRows(dqtile.data(), rows, s.dim, dqh + i0 * s.row, s.row);
          }
        }
        OuterTiles(p.data(), s.stride, end, dotile.data(), s.dim, dvh, s.row);
        OuterTiles(ds.data(), s.stride, end, qtile.data(), s.dim, dkh, s.row);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int LayerjaxAttentionCompiled() { return 1; }

#else  // no AVX2: the handlers exist (the library registers every target) but refuse to run

namespace {

ffi::Error AttnForward(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::U8>, ffi::ResultBuffer<ffi::F32>,
                       ffi::ResultBuffer<ffi::F32>, float, float) {
  return ffi::Error::Internal("layerjax attention kernel built without AVX2/FMA");
}

ffi::Error AttnBackward(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::U8>, ffi::Buffer<ffi::F32>,
                        ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>, float, float) {
  return ffi::Error::Internal("layerjax attention kernel built without AVX2/FMA");
}

}  // namespace

extern "C" int LayerjaxAttentionCompiled() { return 0; }

#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerjaxAttentionForward, AttnForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv
                                  .Arg<ffi::Buffer<ffi::U8>>()    // mask
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse
                                  .Attr<float>("scale")
                                  .Attr<float>("logit_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerjaxAttentionBackward, AttnBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv
                                  .Arg<ffi::Buffer<ffi::U8>>()    // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // o
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dqkv
                                  .Attr<float>("scale")
                                  .Attr<float>("logit_cap"));
