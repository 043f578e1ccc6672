// Work sharing over XLA's intra-op threads for perceiver_jax's CPU kernels.
// Every sgemm runs on the thread that calls it: OpenBLAS's own threads would
// compete with XLA's for the cores.

#ifndef PERCEIVER_JAX_KERNELS_PARALLEL_H_
#define PERCEIVER_JAX_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace perceiver_jax {

// Set when the library loads (one variable for all its sources).
inline const bool kSingleThreadedBlas = [] {
  scipy_openblas_set_num_threads(1);
  return true;
}();

// Runs work(item) for every item in [0, items) on the calling thread and on
// up to pool.num_threads() - 1 of XLA's intra-op threads; returns when all
// are done. The caller takes items too and waits only for items a helper has
// started, so it cannot deadlock when the pool is busy (it then does all the
// work itself).
template <typename Work>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Work work) {
  if (items <= 0) return;
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto progress = std::make_shared<Progress>();
  // Helpers may start only after every item is taken (even after this call
  // has returned): then they touch nothing but `progress`, which they share.
  auto run = [progress, items, work] {
    for (int64_t item; (item = progress->next.fetch_add(1)) < items;) {
      work(item);
      progress->done.fetch_add(1);
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min(threads - 1, items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run] { run(); });
  run();
  while (progress->done.load() < items) std::this_thread::yield();
}

// The number of threads ParallelFor can use.
inline int64_t NumThreads(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

}  // namespace perceiver_jax

#endif  // PERCEIVER_JAX_KERNELS_PARALLEL_H_
