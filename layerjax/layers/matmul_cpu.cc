// Weight matmuls on CPU through MKL's sgemm (model.matmul_impl=mkl): C = op(A) op(B) in float32,
// row-major, op a transpose or not, called from layerjax/layers/matmul_cpu.py for a dense layer's
// forward and both halves of its backward pass.
//
// Why: XLA:CPU's own matmuls (YNNPACK, Eigen for the weight gradients) run bench_cpu's shapes at
// 270-345 GFLOP/s on two cores where MKL runs them at 360-430 (README "Performance on CPU").
//
// MKL is not linked: matmul_cpu.py loads MKL's runtime library from the `mkl` wheel (the
// `layerjax[mkl]` extra) and hands its cblas_sgemm here (LayerjaxSetSgemm) before any call. Each
// call splits C into one block per XLA intra-op thread along its longer side, and each block is one
// single-threaded sgemm, so MKL starts no threads of its own to compete with XLA's.
#include <algorithm>
#include <cstdint>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm of MKL's LP64 interface (32-bit integers); the enums are CBLAS's values.
using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                       int lda, const float* b, int ldb, float beta, float* c, int ldc);
using SetThreadsLocal = int (*)(int threads);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

Sgemm g_sgemm = nullptr;
SetThreadsLocal g_set_threads_local = nullptr;

// One single-threaded sgemm on the calling thread. MKL_Set_Num_Threads_Local holds per thread, so
// it is set once on each thread that runs a block; the process-wide setting stays as it was.
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
          int64_t ldb, float* c, int64_t ldc) {
  static thread_local bool single_threaded = false;
  if (!single_threaded) {
    g_set_threads_local(1);
    single_threaded = true;
  }
  g_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f, a, lda, b, ldb, 0.0f,
          c, ldc);
}

// C [m, n] = op(A) op(B), A [m, k] or (trans_a) [k, m], B [k, n] or (trans_b) [n, k].
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (g_sgemm == nullptr || g_set_threads_local == nullptr) {
    return ffi::Error::Internal("layerjax_matmul: no sgemm (layerjax/layers/matmul_cpu.py sets MKL's first)");
  }
  const auto a_dims = a.dimensions(), b_dims = b.dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2) return ffi::Error::InvalidArgument("layerjax_matmul: 2-D operands");
  const int64_t m = trans_a ? a_dims[1] : a_dims[0], k = trans_a ? a_dims[0] : a_dims[1];
  const int64_t n = trans_b ? b_dims[0] : b_dims[1];
  if ((trans_b ? b_dims[1] : b_dims[0]) != k) return ffi::Error::InvalidArgument("layerjax_matmul: shapes differ in k");
  const int64_t lda = a_dims[1], ldb = b_dims[1], ldc = n;
  const int64_t limit = static_cast<int64_t>(INT32_MAX);
  if (std::max({m, n, k, lda, ldb}) > limit) {
    return ffi::Error::InvalidArgument("layerjax_matmul: dimensions beyond MKL's 32-bit interface");
  }
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  // One block per intra-op thread (the calling thread runs one): with a block more than threads,
  // one core would run two blocks while the other idles (a [2048x384]x[384x1536] matmul ran at 309
  // against 397 GFLOP/s with 3 blocks on 2 cores). Blocks are multiples of 16 rows or columns.
  const bool split_rows = m >= n;
  const int64_t extent = split_rows ? m : n;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t block = std::max<int64_t>(16, ((extent + threads - 1) / threads + 15) / 16 * 16);
  const int64_t blocks = (extent + block - 1) / block;
  layerjax::ParallelTasks(pool, blocks, [&](int64_t task) {
    const int64_t start = task * block, size = std::min(block, extent - start);
    if (split_rows) {  // rows [start, start + size) of C: the same rows of op(A)
      Gemm(trans_a, trans_b, size, n, k, trans_a ? A + start : A + start * lda, lda, B, ldb, C + start * ldc, ldc);
    } else {  // columns [start, start + size) of C: the same columns of op(B)
      Gemm(trans_a, trans_b, m, size, k, A, lda, trans_b ? B + start * ldb : B + start, ldb, C + start, ldc);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Called once from Python with MKL's cblas_sgemm and MKL_Set_Num_Threads_Local.
extern "C" void LayerjaxSetSgemm(void* sgemm, void* set_threads_local) {
  g_sgemm = reinterpret_cast<Sgemm>(sgemm);
  g_set_threads_local = reinterpret_cast<SetThreadsLocal>(set_threads_local);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerjaxMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
