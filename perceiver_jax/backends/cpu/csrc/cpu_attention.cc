// Softmax attention for XLA:CPU, fused: the [N, M] logits are never stored
// whole, only tiles of them small enough to stay in a core's L2 cache
// between the products that make and use them (as FlashAttention does on
// GPUs). Two XLA FFI custom calls (see cpu_attention.py), on arrays in the
// layout of attention.dot_product_attention, so no head transposes:
//
//   perceiver_jax_cpu_attention_fwd: q [B, N, H, K] (already scaled),
//     k [B, M, H, K], v [B, M, H, V] -> out [B, N, H, V] =
//     softmax(q k^T) v per example and head, and lse [B, H, N], the
//     log-sum-exp of every query's logits.
//   perceiver_jax_cpu_attention_bwd: q, k, v, g = dL/dout [B, N, H, V], lse
//     and d [B, H, N] = sum_v g * out -> dq, dk, dv (shaped as q, k, v; or
//     [0, 0, 0, 0], not computed, where attributes need_dq / need_dkv are
//     false).
//
// Why: the one-head cross-attention over a large input (bench_b: N = 256
// latents, M = 16,384 pixels, K = V = 133 channels) ran as separate batched
// products and softmax passes over [N, 4,096] chunks of logits, 4 MiB per
// example, written to memory and read back several times. Here every tile of
// 256 x 256 logits is made by sgemm, exponentiated, and consumed by the next
// sgemm while it is still in cache.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cblas.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Keys and queries per tile: a tile of logits (256 KiB), its gradient, and
// tiles of keys and values (133 KiB each at bench_b's widths) fit in the
// 1 MiB L2 of this project's machines. Measured at bench_b's shapes, 128-512
// keys and 128-256 queries per tile were equally fast.
constexpr int64_t kKeyTile = 256;
constexpr int64_t kQueryTile = 256;

ffi::Error InvalidArgument(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "perceiver_jax_cpu_attention: " + message);
}

// exp(x) for x <= 88, to within 2e-7 relative, written so that the compiler
// vectorizes loops over it (std::exp is a library call it does not). With
// x = n ln2 + r, |r| <= ln2 / 2: exp(r) from its Taylor polynomial to r^7
// (error < 1e-8 relative), times 2^n put into the exponent bits. Inputs below
// -87 give ~1e-38 instead of smaller numbers or 0: softmax weights that
// small are zeros to every float32 sum they join.
inline float FastExp(float x) {
  x = std::max(x, -87.0f);
  // Round to nearest by adding and subtracting 1.5 * 2^23 (|x log2 e| < 2^22).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) * (1 << 23);
  std::memcpy(&p, &bits, sizeof(p));
  return p;
}

// max(floor, max_j row[j]). Kept in 16 independent lanes, which the compiler
// turns into vector max instructions; a plain loop (or an OpenMP max
// reduction) stays scalar without -ffast-math and took 3x as long.
inline float RowMax(const float* row, int64_t size, float floor) {
  constexpr int64_t kLanes = 16;
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, floor);
  int64_t j = 0;
  for (; j + kLanes <= size; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] = std::max(lanes[l], row[j + l]);
    }
  }
  float row_max = *std::max_element(lanes, lanes + kLanes);
  for (; j < size; ++j) row_max = std::max(row_max, row[j]);
  return row_max;
}

// row[j] = exp(row[j] - max(floor, max_j row[j])) for j < size; returns that
// max and adds the sum of the new row to *sum.
inline float ExpShifted(float* row, int64_t size, float floor, float* sum) {
  const float row_max = RowMax(row, size, floor);
  float row_sum = 0.0f;
#pragma omp simd reduction(+ : row_sum)
  for (int64_t j = 0; j < size; ++j) {
    row[j] = FastExp(row[j] - row_max);
    row_sum += row[j];
  }
  *sum += row_sum;
  return row_max;
}

// A matrix in a row-major buffer: element (i, j) at data[i * stride + j].
struct Matrix {
  const float* data;
  int64_t stride;
  const float* Row(int64_t i) const { return data + i * stride; }
};

// c = a b^T for a [rows, depth], b [cols, depth], c [rows, cols] contiguous:
// a tile of logits q k^T or of their gradient g v^T. Zeros when depth is 0
// (BLAS rejects leading dimensions of 0).
void ProductTransposed(int64_t rows, int64_t cols, int64_t depth, Matrix a,
                       Matrix b, float* c) {
  if (depth == 0) {
    std::fill(c, c + rows * cols, 0.0f);
    return;
  }
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, depth,
                    1.0f, a.data, a.stride, b.data, b.stride, 0.0f, c, cols);
}

// c += op(a) b with op(a) [rows, depth]: a contiguous [rows, depth] or,
// transposed, [depth, rows]; b [depth, cols]; c [rows, cols].
void AddProduct(bool transpose_a, int64_t rows, int64_t cols, int64_t depth,
                const float* a, Matrix b, float* c, int64_t c_stride) {
  if (rows == 0 || cols == 0 || depth == 0) return;
  scipy_cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                    CblasNoTrans, rows, cols, depth, 1.0f, a,
                    transpose_a ? rows : depth, b.data, b.stride, 1.0f, c,
                    c_stride);
}

// Sizes of q [B, N, H, K], k [B, M, H, K] and v [B, M, H, V], and where
// head h of example b starts in each (rows are then H * K or H * V apart).
struct Layout {
  int64_t batch, n, m, heads, k, v;
  int64_t QueryOffset(int64_t b, int64_t h) const {
    return (b * n * heads + h) * k;
  }
  int64_t KeyOffset(int64_t b, int64_t h) const {
    return (b * m * heads + h) * k;
  }
  int64_t ValueOffset(int64_t b, int64_t h) const {
    return (b * m * heads + h) * v;
  }
  int64_t OutOffset(int64_t b, int64_t h) const {
    return (b * n * heads + h) * v;
  }
  // Of lse and d, [B, H, N].
  int64_t StatsOffset(int64_t b, int64_t h) const { return (b * heads + h) * n; }
};

// Into how many parts to split each (example, head) pair's work so that
// every thread gets about two items.
int64_t Splits(ffi::ThreadPool& pool, int64_t pairs) {
  const int64_t threads = perceiver_jax::NumThreads(pool);
  return pairs == 0 ? 1 : (2 * threads + pairs - 1) / pairs;
}

// Queries per work item for `splits` items over N queries: at most
// kQueryTile, and no fewer than 32.
int64_t QueryTileRows(int64_t n, int64_t splits) {
  return std::min(kQueryTile, std::max<int64_t>(32, (n + splits - 1) / splits));
}

ffi::ErrorOr<Layout> CheckShapes(const ffi::Buffer<ffi::F32>& q,
                                 const ffi::Buffer<ffi::F32>& k,
                                 const ffi::Buffer<ffi::F32>& v) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 ||
      kd[0] != qd[0] || vd[0] != qd[0] || kd[2] != qd[2] || vd[2] != qd[2] ||
      kd[3] != qd[3] || vd[1] != kd[1]) {
    return ffi::Unexpected(InvalidArgument(
        "expected q [B, N, H, K], k [B, M, H, K], v [B, M, H, V]."));
  }
  return Layout{qd[0], qd[1], kd[1], qd[2], qd[3], vd[3]};
}

// The forward pass over (example, head, tile of queries) work items, for any
// source of keys and values: `tiles(b, h, key, keys, scratch)` returns the
// (key, value) rows key .. key + keys - 1 of example b, head h, as matrices
// that may point into `scratch` (kKeyTile * max(K, V) floats per item).
template <typename KeyValueTiles>
void ForwardTiles(ffi::ThreadPool& pool, const Layout& at, const float* q_data,
                  KeyValueTiles tiles, float* out_data, float* lse_data) {
  const auto [batch, n, m, heads, kk, vv] = at;
  if (m == 0) {  // No keys: nothing to attend to.
    std::fill(out_data, out_data + batch * n * heads * vv, 0.0f);
    std::fill(lse_data, lse_data + batch * heads * n, -INFINITY);
    return;
  }
  // Work items: (example, head, tile of queries).
  const int64_t pairs = batch * heads;
  const int64_t tile_rows = QueryTileRows(n, Splits(pool, pairs));
  const int64_t query_tiles = (n + tile_rows - 1) / tile_rows;
  perceiver_jax::ParallelFor(pool, pairs * query_tiles, [=](int64_t item) {
    const int64_t b = item / query_tiles / heads;
    const int64_t h = item / query_tiles % heads;
    const int64_t row = (item % query_tiles) * tile_rows;
    const int64_t rows = std::min(tile_rows, n - row);
    const Matrix q_tile{q_data + at.QueryOffset(b, h) + row * heads * kk,
                        heads * kk};
    // The output rows hold the unnormalised sums until the end.
    float* acc = out_data + at.OutOffset(b, h) + row * heads * vv;
    const int64_t acc_stride = heads * vv;
    for (int64_t i = 0; i < rows; ++i) {
      std::fill(acc + i * acc_stride, acc + i * acc_stride + vv, 0.0f);
    }
    // The online softmax: running max and sum of exp(logit - max) per query.
    std::vector<float> weights(rows * kKeyTile), running_max(rows),
        denom(rows, 0.0f), scratch;
    for (int64_t key = 0; key < m; key += kKeyTile) {
      const int64_t keys = std::min(kKeyTile, m - key);
      const auto [k_tile, v_tile] = tiles(b, h, key, keys, scratch);
      ProductTransposed(rows, keys, kk, q_tile, k_tile, weights.data());
      for (int64_t i = 0; i < rows; ++i) {
        if (key == 0) {
          running_max[i] = ExpShifted(weights.data() + i * keys, keys,
                                      -INFINITY, &denom[i]);
          continue;
        }
        // Shifting by at least the old max keeps the old sums valid up to
        // the correction exp(old max - new max) <= 1.
        float tile_sum = 0.0f;
        const float new_max = ExpShifted(weights.data() + i * keys, keys,
                                         running_max[i], &tile_sum);
        const float correction = FastExp(running_max[i] - new_max);
        denom[i] = denom[i] * correction + tile_sum;
        running_max[i] = new_max;
        if (correction != 1.0f) {
          float* acc_i = acc + i * acc_stride;
          for (int64_t c = 0; c < vv; ++c) acc_i[c] *= correction;
        }
      }
      AddProduct(false, rows, vv, keys, weights.data(), v_tile, acc,
                 acc_stride);
    }
    float* lse_tile = lse_data + at.StatsOffset(b, h) + row;
    for (int64_t i = 0; i < rows; ++i) {
      const float inverse = 1.0f / denom[i];
      float* acc_i = acc + i * acc_stride;
      for (int64_t c = 0; c < vv; ++c) acc_i[c] *= inverse;
      lse_tile[i] = running_max[i] + std::log(denom[i]);
    }
  });
}

// Keys and values as given: k [B, M, H, K] and v [B, M, H, V].
struct DenseTiles {
  const float* k;
  const float* v;
  Layout at;

  std::pair<Matrix, Matrix> operator()(int64_t b, int64_t h, int64_t key,
                                       int64_t, std::vector<float>&) const {
    return {{k + at.KeyOffset(b, h) + key * at.heads * at.k, at.heads * at.k},
            {v + at.ValueOffset(b, h) + key * at.heads * at.v,
             at.heads * at.v}};
  }
};

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                   ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  auto layout = CheckShapes(q, k, v);
  if (layout.has_error()) return layout.error();
  const Layout at = *layout;
  const DenseTiles tiles{k.typed_data(), v.typed_data(), at};
  ForwardTiles(pool, at, q.typed_data(), tiles, out->typed_data(),
               lse->typed_data());
  return ffi::Error::Success();
}

// One head over a byte array held in two parts, standardised per row on the
// fly: the keys and values of input m of example b are both
//   x_bm = ([features_bm, shared_m] - mean_bm) * inv_std_bm,
// features [B, M, F] per example, shared [M, P] the same for every example
// (position features), mean and inv_std [B, M]. Each tile of 256 such rows
// is written to a per-item buffer (136 KiB at F + P = 133) just before the
// products that read it, so the [B, M, F + P] array is never held.
struct StandardizedRows {
  const float* features;
  const float* shared;
  const float* mean;
  const float* inv_std;
  int64_t m, f, p;

  std::pair<Matrix, Matrix> operator()(int64_t b, int64_t, int64_t key,
                                       int64_t keys,
                                       std::vector<float>& scratch) const {
    const int64_t c = f + p;
    scratch.resize(kKeyTile * c);
    for (int64_t j = 0; j < keys; ++j) {
      const int64_t row = b * m + key + j;
      const float mu = mean[row], s = inv_std[row];
      const float* x = features + row * f;
      const float* pos = shared + (key + j) * p;
      float* dst = scratch.data() + j * c;
#pragma omp simd
      for (int64_t i = 0; i < f; ++i) dst[i] = (x[i] - mu) * s;
#pragma omp simd
      for (int64_t i = 0; i < p; ++i) dst[f + i] = (pos[i] - mu) * s;
    }
    const Matrix tile{scratch.data(), c};
    return {tile, tile};
  }
};

// The standardised rows' source and the one-head layout, from q
// [B, N, 1, F + P], features [B, M, F], shared [M, P], mean and inv_std
// [B, M].
ffi::ErrorOr<std::pair<Layout, StandardizedRows>> CheckStandardized(
    const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& features,
    const ffi::Buffer<ffi::F32>& shared, const ffi::Buffer<ffi::F32>& mean,
    const ffi::Buffer<ffi::F32>& inv_std) {
  auto qd = q.dimensions(), fd = features.dimensions(),
       sd = shared.dimensions(), md = mean.dimensions(),
       id = inv_std.dimensions();
  if (qd.size() != 4 || qd[2] != 1 || fd.size() != 3 || sd.size() != 2 ||
      fd[0] != qd[0] || sd[0] != fd[1] || qd[3] != fd[2] + sd[1] ||
      md.size() != 2 || md[0] != fd[0] || md[1] != fd[1] || id.size() != 2 ||
      id[0] != md[0] || id[1] != md[1]) {
    return ffi::Unexpected(InvalidArgument(
        "expected q [B, N, 1, F + P], features [B, M, F], shared [M, P], "
        "mean and inv_std [B, M]."));
  }
  const int64_t c = fd[2] + sd[1];
  return std::pair<Layout, StandardizedRows>{
      Layout{qd[0], qd[1], fd[1], 1, c, c},
      StandardizedRows{features.typed_data(), shared.typed_data(),
                       mean.typed_data(), inv_std.typed_data(), fd[1], fd[2],
                       sd[1]}};
}

ffi::Error StandardizedForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> features,
                               ffi::Buffer<ffi::F32> shared,
                               ffi::Buffer<ffi::F32> mean,
                               ffi::Buffer<ffi::F32> inv_std,
                               ffi::ResultBuffer<ffi::F32> out,
                               ffi::ResultBuffer<ffi::F32> lse) {
  auto checked = CheckStandardized(q, features, shared, mean, inv_std);
  if (checked.has_error()) return checked.error();
  const auto& [at, rows] = *checked;
  ForwardTiles(pool, at, q.typed_data(), rows, out->typed_data(),
               lse->typed_data());
  return ffi::Error::Success();
}

// The backward pass for any source of keys and values (see ForwardTiles);
// dq, dk, dv are zero-filled here, and dk, dv are written only with need_dkv.
template <typename KeyValueTiles>
void BackwardTiles(ffi::ThreadPool& pool, const Layout& at,
                   const float* q_data, KeyValueTiles tiles,
                   const float* g_data, const float* lse_data,
                   const float* d_data, float* dq_data, int64_t dq_size,
                   float* dk_data, int64_t dk_size, float* dv_data,
                   int64_t dv_size, bool need_dq, bool need_dkv) {
  const auto [batch, n, m, heads, kk, vv] = at;
  std::fill(dq_data, dq_data + dq_size, 0.0f);
  std::fill(dk_data, dk_data + dk_size, 0.0f);
  std::fill(dv_data, dv_data + dv_size, 0.0f);
  if (m == 0 || n == 0 || !(need_dq || need_dkv)) return;

  // Work items: (example, head, a range of queries, a range of keys). With
  // dk and dv wanted, an item takes all queries and a part of the keys, and
  // owns that part's dk and dv; dq sums over all keys, so with several parts
  // every part adds into a partial dq [N, K] of its own, summed at the end.
  // With dq alone, an item takes a tile of queries and all keys.
  const int64_t pairs = batch * heads;
  const int64_t splits = Splits(pool, pairs);
  const int64_t key_tiles = (m + kKeyTile - 1) / kKeyTile;
  const int64_t parts = need_dkv ? std::min(key_tiles, splits) : 1;
  const int64_t part_keys = (key_tiles + parts - 1) / parts * kKeyTile;
  const int64_t tile_rows = need_dkv ? n : QueryTileRows(n, splits);
  const int64_t query_tiles = (n + tile_rows - 1) / tile_rows;
  const int64_t ranges = parts * query_tiles;  // Per example and head.
  std::vector<float> partial_dq(
      need_dq && parts > 1 ? pairs * parts * n * kk : 0, 0.0f);
  float* partial_data = partial_dq.data();
  perceiver_jax::ParallelFor(pool, pairs * ranges, [=](int64_t item) {
    const int64_t b = item / ranges / heads;
    const int64_t h = item / ranges % heads;
    const int64_t part = item % ranges / query_tiles;
    const int64_t first_row = item % query_tiles * tile_rows;
    const int64_t last_row = std::min(n, first_row + tile_rows);
    const int64_t first_key = part * part_keys;
    const int64_t last_key = std::min(m, first_key + part_keys);
    const Matrix q_bh{q_data + at.QueryOffset(b, h), heads * kk};
    const Matrix g_bh{g_data + at.OutOffset(b, h), heads * vv};
    const float* lse_bh = lse_data + at.StatsOffset(b, h);
    const float* d_bh = d_data + at.StatsOffset(b, h);
    const bool partial = need_dq && parts > 1;
    float* dq_bh = partial ? partial_data + (b * heads + h) * parts * n * kk +
                                 part * n * kk
                           : dq_data + at.QueryOffset(b, h);
    const int64_t dq_stride = partial ? kk : heads * kk;
    std::vector<float> weights(kQueryTile * kKeyTile),
        dlogits(kQueryTile * kKeyTile), scratch;
    for (int64_t key = first_key; key < last_key; key += kKeyTile) {
      const int64_t keys = std::min(kKeyTile, last_key - key);
      const auto [k_tile, v_tile] = tiles(b, h, key, keys, scratch);
      for (int64_t row = first_row; row < last_row; row += kQueryTile) {
        const int64_t rows = std::min(kQueryTile, last_row - row);
        const Matrix q_tile{q_bh.Row(row), q_bh.stride};
        const Matrix g_tile{g_bh.Row(row), g_bh.stride};
        // The weights p = exp(q k^T - lse) and dlogits = p (g v^T - d).
        ProductTransposed(rows, keys, kk, q_tile, k_tile, weights.data());
        ProductTransposed(rows, keys, vv, g_tile, v_tile, dlogits.data());
        for (int64_t i = 0; i < rows; ++i) {
          float* p = weights.data() + i * keys;
          float* ds = dlogits.data() + i * keys;
          const float shift = lse_bh[row + i], row_sum = d_bh[row + i];
#pragma omp simd
          for (int64_t j = 0; j < keys; ++j) {
            p[j] = FastExp(p[j] - shift);
            ds[j] = p[j] * (ds[j] - row_sum);
          }
        }
        // dv += p^T g, dk += dlogits^T q, dq += dlogits k.
        if (need_dkv) {
          AddProduct(true, keys, vv, rows, weights.data(), g_tile,
                     dv_data + at.ValueOffset(b, h) + key * heads * vv,
                     heads * vv);
          AddProduct(true, keys, kk, rows, dlogits.data(), q_tile,
                     dk_data + at.KeyOffset(b, h) + key * heads * kk,
                     heads * kk);
        }
        if (need_dq) {
          AddProduct(false, rows, kk, keys, dlogits.data(), k_tile,
                     dq_bh + row * dq_stride, dq_stride);
        }
      }
    }
  });
  for (int64_t pair = 0; need_dq && parts > 1 && pair < pairs; ++pair) {
    float* dq_bh = dq_data + at.QueryOffset(pair / heads, pair % heads);
    for (int64_t part = 0; part < parts; ++part) {
      const float* partial = partial_data + (pair * parts + part) * n * kk;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t c = 0; c < kk; ++c) {
          dq_bh[i * heads * kk + c] += partial[i * kk + c];
        }
      }
    }
  }
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                    ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> d, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, bool need_dq,
                    bool need_dkv) {
  auto layout = CheckShapes(q, k, v);
  if (layout.has_error()) return layout.error();
  const Layout at = *layout;
  // Gradients not needed are [0, 0, 0, 0] arrays, never touched.
  if (dq->element_count() != (need_dq ? q.element_count() : 0) ||
      dk->element_count() != (need_dkv ? k.element_count() : 0) ||
      dv->element_count() != (need_dkv ? v.element_count() : 0)) {
    return InvalidArgument("gradient buffers do not match need_dq/need_dkv.");
  }
  const DenseTiles tiles{k.typed_data(), v.typed_data(), at};
  BackwardTiles(pool, at, q.typed_data(), tiles, g.typed_data(),
                lse.typed_data(), d.typed_data(), dq->typed_data(),
                dq->element_count(), dk->typed_data(), dk->element_count(),
                dv->typed_data(), dv->element_count(), need_dq, need_dkv);
  return ffi::Error::Success();
}

// dq alone of the standardised attention (StandardizedForward): the rows
// are rebuilt tile by tile as in the forward pass.
ffi::Error StandardizedBackward(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
    ffi::Buffer<ffi::F32> features, ffi::Buffer<ffi::F32> shared,
    ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> inv_std,
    ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> lse,
    ffi::Buffer<ffi::F32> d, ffi::ResultBuffer<ffi::F32> dq) {
  auto checked = CheckStandardized(q, features, shared, mean, inv_std);
  if (checked.has_error()) return checked.error();
  const auto& [at, rows] = *checked;
  if (dq->element_count() != q.element_count()) {
    return InvalidArgument("dq must be shaped as q.");
  }
  BackwardTiles(pool, at, q.typed_data(), rows, g.typed_data(),
                lse.typed_data(), d.typed_data(), dq->typed_data(),
                dq->element_count(), nullptr, 0, nullptr, 0, true, false);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverJaxCpuAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverJaxCpuAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<bool>("need_dq")
                                  .Attr<bool>("need_dkv"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverJaxCpuAttentionStandardizedFwd,
                              StandardizedForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // features
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shared
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_std
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverJaxCpuAttentionStandardizedBwd,
                              StandardizedBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // features
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shared
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_std
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dq
