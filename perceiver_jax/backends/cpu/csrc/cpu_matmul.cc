// Batched float32 matrix products for XLA:CPU through OpenBLAS, as an XLA FFI
// custom call (target "perceiver_jax_cpu_matmul"; see cpu_matmul.py).
//
//   c[i] = op(a[i]) op(b[i]),  op(x) = x or x^T  (attributes transpose_a/_b)
//
// a [..., M, K] (or [..., K, M] transposed), b [..., K, N] (or [..., N, K]),
// c [..., M, N], row-major, the same leading (batch) axes on all three.
//
// Why: XLA:CPU runs batched products of small matrices (attention's
// [B, H, N, N] logits at N = 128-256) on about one core at 40-90 GFLOP/s;
// OpenBLAS's single-threaded sgemm runs each at 80-100, and this handler
// spreads the products (or, for few products, tiles of their rows) over
// XLA's intra-op threads.

#include <algorithm>
#include <cstdint>
#include <string>

#include "cblas.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error InvalidArgument(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "perceiver_jax_cpu_matmul: " + message);
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                  ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                  bool transpose_a, bool transpose_b) {
  auto a_dims = a.dimensions(), b_dims = b.dimensions();
  auto c_dims = c->dimensions();
  const size_t rank = a_dims.size();
  if (rank < 2 || b_dims.size() != rank || c_dims.size() != rank) {
    return InvalidArgument("a, b and c need the same rank, at least 2.");
  }
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (b_dims[i] != a_dims[i] || c_dims[i] != a_dims[i]) {
      return InvalidArgument("a, b and c need the same batch axes.");
    }
    batch *= a_dims[i];
  }
  const int64_t a_rows = a_dims[rank - 2], a_cols = a_dims[rank - 1];
  const int64_t b_rows = b_dims[rank - 2], b_cols = b_dims[rank - 1];
  const int64_t m = transpose_a ? a_cols : a_rows;
  const int64_t k = transpose_a ? a_rows : a_cols;
  const int64_t n = transpose_b ? b_rows : b_cols;
  if ((transpose_b ? b_cols : b_rows) != k || c_dims[rank - 2] != m ||
      c_dims[rank - 1] != n) {
    return InvalidArgument("the matrix shapes do not match.");
  }
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* c_data = c->typed_data();
  const auto a_op = transpose_a ? CblasTrans : CblasNoTrans;
  const auto b_op = transpose_b ? CblasTrans : CblasNoTrans;

  // Work items: whole products when there are enough to share out, else
  // tiles of at least 32 rows of c (at most two per thread).
  const int64_t threads = perceiver_jax::NumThreads(pool);
  const int64_t tiles =
      batch >= 2 * threads
          ? 1
          : std::clamp<int64_t>(m / 32, 1, 2 * threads);
  const int64_t tile_rows = (m + tiles - 1) / tiles;
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // BLAS rejects a leading dimension of 0.
    std::fill(c_data, c_data + batch * m * n, 0.0f);
    return ffi::Error::Success();
  }

  perceiver_jax::ParallelFor(pool, batch * tiles, [=](int64_t item) {
    const int64_t product = item / tiles;
    const int64_t row = (item % tiles) * tile_rows;
    const int64_t rows = std::min(tile_rows, m - row);
    if (rows <= 0) return;
    const float* a_tile = a_data + product * a_rows * a_cols +
                          (transpose_a ? row : row * a_cols);
    scipy_cblas_sgemm(CblasRowMajor, a_op, b_op, rows, n, k, 1.0f, a_tile,
                      a_cols, b_data + product * b_rows * b_cols, b_cols,
                      0.0f, c_data + product * m * n + row * n, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverJaxCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
