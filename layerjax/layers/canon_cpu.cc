// One-pass CPU kernels for the canon layer's causal depthwise convolution (layerjax/layers/canon.py),
// called from JAX through XLA's FFI (layerjax/layers/cpu_kernels.py builds and registers them, canon_kernel.py calls them).
//
// Why a kernel: written in JAX, the backward pass of a canon layer is an input gradient plus K
// weight-gradient reductions over batch and length, and XLA:CPU cannot fuse a reduction with the
// elementwise work beside it, so the gradient and the input are read from memory many times per
// layer. Here one pass over the rows reads the incoming gradient and the input once each, writes
// the input gradient, and accumulates the weight gradient in a per-chunk buffer that stays in cache.
//
// Layout: h, y, g, dh are [rows, C] with rows = every leading dim flattened (row r = n * L + t);
// w and dw are [K, C]; seg is [rows] int32 segment ids (document of each token), or one dummy
// element when has_seg == 0. Tap i of row r reads row r - i when t >= i and (without segments, or)
// seg[r - i] == seg[r]:
//     y[r] = (residual ? h[r] : 0) + sum_i w[i] * h[r - i]
//     dh[s] = (residual ? g[s] : 0) + sum_i w[i] * g[s + i]      (taps of the later rows s + i)
//     dw[i] = sum_r g[r] * h[r - i]
// Work is split into a fixed number of row chunks that depends only on the shape, and the weight
// gradient's per-chunk partial sums are added in chunk order, so results do not depend on how many
// threads ran or which chunk ran where (resumed runs stay bit-identical).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxTaps = 64;
// Rows per chunk: enough work per chunk (>= ~0.5 MB of input at typical widths) that scheduling
// costs nothing, few enough chunks that the weight-gradient partials stay small.
constexpr int64_t kMinRowsPerChunk = 64;
constexpr int64_t kMaxChunks = 16;

struct Shape {
  int64_t rows, length, channels;
};

// The caller (canon_kernel.py) passes rank >= 2.
Shape RowShape(ffi::Buffer<ffi::F32>& h) {
  auto dims = h.dimensions();
  Shape s{1, dims[dims.size() - 2], dims[dims.size() - 1]};
  for (size_t d = 0; d + 1 < dims.size(); ++d) s.rows *= dims[d];
  return s;
}

int64_t NumChunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, rows / kMinRowsPerChunk));
}

// Which taps of row r are live: tap i needs t - i >= 0 and (segments) the same document.
inline int LiveTaps(int64_t r, int64_t t, int64_t taps, const int32_t* seg, int sign,
                    int64_t length, int64_t* tap_index) {
  int live = 0;
  for (int64_t i = 0; i < taps; ++i) {
    const int64_t other = t + sign * i;
    if (other < 0 || other >= length) continue;
    if (seg != nullptr && seg[r + sign * i] != seg[r]) continue;
    tap_index[live++] = i;
  }
  return live;
}

// out[c] = (residual ? own[c] : 0) + sum_j weight[j][c] * src[j][c], for n taps. The sum starts
// at zero and adds the taps in order, as the JAX form does. Specialised for small tap counts so
// the taps unroll into one vectorised loop over channels (each row read once from cache).
template <int N>
void MixRow(const float* const* weight, const float* const* src, const float* own, float* out,
            int64_t channels, bool residual) {
#pragma GCC ivdep
  for (int64_t c = 0; c < channels; ++c) {
    float acc = 0.0f;
    for (int j = 0; j < N; ++j) acc += weight[j][c] * src[j][c];
    out[c] = residual ? own[c] + acc : acc;
  }
}

void MixRowAnyTaps(int n, const float* const* weight, const float* const* src, const float* own,
                   float* out, int64_t channels, bool residual) {
  switch (n) {
    case 0: return MixRow<0>(weight, src, own, out, channels, residual);
    case 1: return MixRow<1>(weight, src, own, out, channels, residual);
    case 2: return MixRow<2>(weight, src, own, out, channels, residual);
    case 3: return MixRow<3>(weight, src, own, out, channels, residual);
    case 4: return MixRow<4>(weight, src, own, out, channels, residual);
    case 5: return MixRow<5>(weight, src, own, out, channels, residual);
    case 6: return MixRow<6>(weight, src, own, out, channels, residual);
    case 7: return MixRow<7>(weight, src, own, out, channels, residual);
    case 8: return MixRow<8>(weight, src, own, out, channels, residual);
  }
  for (int64_t c = 0; c < channels; ++c) out[c] = residual ? own[c] : 0.0f;
  std::vector<float> acc(channels, 0.0f);
  for (int j = 0; j < n; ++j)
    for (int64_t c = 0; c < channels; ++c) acc[c] += weight[j][c] * src[j][c];
  for (int64_t c = 0; c < channels; ++c) out[c] += acc[c];
}

// dw[j][c] += grad[c] * src[j][c] for n taps, in one pass over the channels.
template <int N>
void AccumulateRow(float* const* dw, const float* const* src, const float* grad, int64_t channels) {
#pragma GCC ivdep
  for (int64_t c = 0; c < channels; ++c) {
    const float g = grad[c];
    for (int j = 0; j < N; ++j) dw[j][c] += g * src[j][c];
  }
}

void AccumulateRowAnyTaps(int n, float* const* dw, const float* const* src, const float* grad,
                          int64_t channels) {
  switch (n) {
    case 0: return;
    case 1: return AccumulateRow<1>(dw, src, grad, channels);
    case 2: return AccumulateRow<2>(dw, src, grad, channels);
    case 3: return AccumulateRow<3>(dw, src, grad, channels);
    case 4: return AccumulateRow<4>(dw, src, grad, channels);
    case 5: return AccumulateRow<5>(dw, src, grad, channels);
    case 6: return AccumulateRow<6>(dw, src, grad, channels);
    case 7: return AccumulateRow<7>(dw, src, grad, channels);
    case 8: return AccumulateRow<8>(dw, src, grad, channels);
  }
  for (int j = 0; j < n; ++j)
    for (int64_t c = 0; c < channels; ++c) dw[j][c] += grad[c] * src[j][c];
}

ffi::Error CanonForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> y,
                        int32_t residual, int32_t has_seg) {
  const auto [rows, length, channels] = RowShape(h);
  const int64_t taps = w.dimensions()[0];
  if (taps > kMaxTaps) return ffi::Error::InvalidArgument("canon kernel: more than 64 taps");
  const float* hp = h.typed_data();
  const float* wp = w.typed_data();
  const int32_t* sp = has_seg ? seg.typed_data() : nullptr;
  float* yp = y->typed_data();
  const int64_t chunks = NumChunks(rows);
  layerjax::ParallelTasks(pool, chunks, [&](int64_t chunk) {
    const int64_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
    int64_t live_taps[kMaxTaps];
    const float* weight[kMaxTaps];
    const float* src[kMaxTaps];
    for (int64_t r = r0; r < r1; ++r) {
      const int live = LiveTaps(r, r % length, taps, sp, -1, length, live_taps);
      for (int j = 0; j < live; ++j) {
        weight[j] = wp + live_taps[j] * channels;
        src[j] = hp + (r - live_taps[j]) * channels;
      }
      MixRowAnyTaps(live, weight, src, hp + r * channels, yp + r * channels, channels, residual);
    }
  });
  return ffi::Error::Success();
}

ffi::Error CanonBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> h,
                         ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> seg,
                         ffi::ResultBuffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> dw,
                         int32_t residual, int32_t has_seg) {
  const auto [rows, length, channels] = RowShape(h);
  const int64_t taps = w.dimensions()[0];
  if (taps > kMaxTaps) return ffi::Error::InvalidArgument("canon kernel: more than 64 taps");
  const float* gp = g.typed_data();
  const float* hp = h.typed_data();
  const float* wp = w.typed_data();
  const int32_t* sp = has_seg ? seg.typed_data() : nullptr;
  float* dhp = dh->typed_data();
  const int64_t chunks = NumChunks(rows);
  std::vector<float> partial(chunks * taps * channels, 0.0f);
  layerjax::ParallelTasks(pool, chunks, [&](int64_t chunk) {
    const int64_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
    float* dw_chunk = partial.data() + chunk * taps * channels;
    int64_t live_taps[kMaxTaps];
    const float* weight[kMaxTaps];
    const float* src[kMaxTaps];
    float* dw_tap[kMaxTaps];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % length;
      const float* grad = gp + r * channels;
      // Input gradient of row r: the taps of rows r + i that read row r.
      int live = LiveTaps(r, t, taps, sp, +1, length, live_taps);
      for (int j = 0; j < live; ++j) {
        weight[j] = wp + live_taps[j] * channels;
        src[j] = gp + (r + live_taps[j]) * channels;
      }
      MixRowAnyTaps(live, weight, src, grad, dhp + r * channels, channels, residual);
      // Weight gradient: row r's gradient times the rows its taps read.
      live = LiveTaps(r, t, taps, sp, -1, length, live_taps);
      for (int j = 0; j < live; ++j) {
        dw_tap[j] = dw_chunk + live_taps[j] * channels;
        src[j] = hp + (r - live_taps[j]) * channels;
      }
      AccumulateRowAnyTaps(live, dw_tap, src, grad, channels);
    }
  });
  float* dwp = dw->typed_data();
  std::memcpy(dwp, partial.data(), taps * channels * sizeof(float));
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const float* part = partial.data() + chunk * taps * channels;
    for (int64_t k = 0; k < taps * channels; ++k) dwp[k] += part[k];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerjaxCanonForward, CanonForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w
                                  .Arg<ffi::Buffer<ffi::S32>>()   // seg
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Attr<int32_t>("residual")
                                  .Attr<int32_t>("has_seg"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerjaxCanonBackward, CanonBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w
                                  .Arg<ffi::Buffer<ffi::S32>>()   // seg
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dh
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw
                                  .Attr<int32_t>("residual")
                                  .Attr<int32_t>("has_seg"));
