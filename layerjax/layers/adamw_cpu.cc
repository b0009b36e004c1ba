// AdamW's update of one parameter tensor on the CPU in two passes over memory, called from JAX
// through XLA's FFI (layerjax/layers/cpu_kernels.py builds and registers it, layerjax/train/
// adamw_kernel.py calls it).
//
// Why a kernel: the train step only applies an update whose norm is finite, so it must know the
// update's norm before it may write the new parameters and moments. Written in JAX, XLA:CPU keeps
// every intermediate (clipped gradient, moments, bias-corrected ratio, update, the selected new
// values) as its own pass over memory: 26 reads and writes of each parameter's size per step. Here
// the norm pass reads the gradient, the parameter and both moments once and writes nothing; the
// apply pass reads them again and writes the parameter and both moments in place: 11.
//
// The arithmetic is optax's chain, element by element, in its order:
//   g  = clip ? (grad / grad_norm) * max_norm : grad     (clip_by_global_norm, when triggered)
//   mu = (1 - b1) * g + b1 * mu;   nu = (1 - b2) * g * g + b2 * nu
//   u  = -lr * ((mu / bc1) / (sqrt(nu / bc2) + eps) + weight_decay * param)
//   param = param + u
// step = [grad_norm, max_norm (0: no clipping), bc1, bc2, lr, finite (0 or 1)], computed in JAX.
// Work is split into fixed chunks, and the squared norm's per-chunk partial sums (in double) are
// added in chunk order, so results do not depend on the thread count.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task: 256 KiB of each operand

struct Coefficients {
  float grad_norm, max_norm, bc1, bc2, lr, finite;
  bool clip() const { return max_norm > 0.0f && !(grad_norm < max_norm); }
};

Coefficients ReadStep(ffi::Buffer<ffi::F32>& step) {
  const float* s = step.typed_data();
  return {s[0], s[1], s[2], s[3], s[4], s[5]};
}

struct Rates {
  float b1, b2, eps, weight_decay;
};

inline float Update(float grad, float param, float mu, float nu, float* m_out, float* v_out, bool clip,
                    const Coefficients& c, const Rates& r) {
  const float g = clip ? (grad / c.grad_norm) * c.max_norm : grad;
  const float m = (1.0f - r.b1) * g + r.b1 * mu;
  const float v = (1.0f - r.b2) * (g * g) + r.b2 * nu;
  *m_out = m;
  *v_out = v;
  return -c.lr * ((m / c.bc1) / (std::sqrt(v / c.bc2) + r.eps) + r.weight_decay * param);
}

// One chunk [begin, end): the new parameter and moments, written (the apply pass). Each element is
// read before it is written, and outputs alias their inputs exactly or not at all: no dependence
// between iterations, which the simd pragma tells the compiler.
template <bool kClip>
void WriteChunk(int64_t begin, int64_t end, const float* grad, const float* param, const float* mu,
                const float* nu, float* param_out, float* mu_out, float* nu_out, const Coefficients& c,
                const Rates& r) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float m, v;
    param_out[i] = param[i] + Update(grad[i], param[i], mu[i], nu[i], &m, &v, kClip, c, r);
    mu_out[i] = m;
    nu_out[i] = v;
  }
}

// One chunk's sum of the update's squares, in double (the norm pass). The simd reduction lets
// the compiler vectorise the sum: its order then depends on the build's vector width, never on
// the threads.
template <bool kClip>
double SquaresChunk(int64_t begin, int64_t end, const float* grad, const float* param, const float* mu,
                    const float* nu, const Coefficients& c, const Rates& r) {
  double squares = 0.0;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = begin; i < end; ++i) {
    float m, v;
    const double u = Update(grad[i], param[i], mu[i], nu[i], &m, &v, kClip, c, r);
    squares += u * u;
  }
  return squares;
}

// Runs chunk(begin, end) -> double over fixed chunks of n elements on XLA's threads; returns the
// chunks' results added in chunk order.
template <typename Body>
double RunChunks(ffi::ThreadPool& pool, int64_t n, Body chunk_body) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  layerjax::ParallelTasks(pool, chunks, [&](int64_t chunk) {
    partial[chunk] = chunk_body(chunk * kChunk, std::min(n, (chunk + 1) * kChunk));
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

ffi::Error AdamwNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> grad, ffi::Buffer<ffi::F32> param,
                     ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> step,
                     ffi::ResultBuffer<ffi::F32> squares, float b1, float b2, float eps,
                     float weight_decay) {
  const Coefficients c = ReadStep(step);
  const Rates r{b1, b2, eps, weight_decay};
  const float *g = grad.typed_data(), *p = param.typed_data(), *m = mu.typed_data(), *v = nu.typed_data();
  const double total = RunChunks(pool, grad.element_count(), [&](int64_t begin, int64_t end) {
    return c.clip() ? SquaresChunk<true>(begin, end, g, p, m, v, c, r)
                    : SquaresChunk<false>(begin, end, g, p, m, v, c, r);
  });
  squares->typed_data()[0] = static_cast<float>(total);
  return ffi::Error::Success();
}

// The outputs alias the parameter and moment inputs (jax.ffi.ffi_call's input_output_aliases), so a
// step that is not finite writes nothing; XLA hands in copies where the inputs are still needed.
ffi::Error AdamwApply(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> grad, ffi::Buffer<ffi::F32> param,
                      ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> step,
                      ffi::ResultBuffer<ffi::F32> param_out, ffi::ResultBuffer<ffi::F32> mu_out,
                      ffi::ResultBuffer<ffi::F32> nu_out, float b1, float b2, float eps, float weight_decay) {
  const Coefficients c = ReadStep(step);
  const int64_t n = grad.element_count();
  if (c.finite == 0.0f) {
    const std::pair<const float*, float*> copies[] = {{param.typed_data(), param_out->typed_data()},
                                                      {mu.typed_data(), mu_out->typed_data()},
                                                      {nu.typed_data(), nu_out->typed_data()}};
    for (auto [from, to] : copies)
      if (from != to) std::memcpy(to, from, n * sizeof(float));
    return ffi::Error::Success();
  }
  const Rates r{b1, b2, eps, weight_decay};
  const float *g = grad.typed_data(), *p = param.typed_data(), *m = mu.typed_data(), *v = nu.typed_data();
  float *p_out = param_out->typed_data(), *m_out = mu_out->typed_data(), *v_out = nu_out->typed_data();
  RunChunks(pool, n, [&](int64_t begin, int64_t end) {
    if (c.clip()) WriteChunk<true>(begin, end, g, p, m, v, p_out, m_out, v_out, c, r);
    else WriteChunk<false>(begin, end, g, p, m, v, p_out, m_out, v_out, c, r);
    return 0.0;
  });
  return ffi::Error::Success();
}

}  // namespace

namespace {

// Both passes take the same inputs: the thread pool, grad, param, mu, nu and the step's coefficients.
auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()    // grad
      .Arg<ffi::Buffer<ffi::F32>>()    // param
      .Arg<ffi::Buffer<ffi::F32>>()    // mu
      .Arg<ffi::Buffer<ffi::F32>>()    // nu
      .Arg<ffi::Buffer<ffi::F32>>();   // step coefficients
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerjaxAdamwNorm, AdamwNorm,
                              BindInputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()   // the update's sum of squares
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerjaxAdamwApply, AdamwApply,
                              BindInputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()   // param (aliases the input)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mu (aliases the input)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // nu (aliases the input)
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay"));
