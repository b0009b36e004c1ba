// Work splitting shared by layerjax's CPU kernels (canon_cpu.cc, attention_cpu.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace layerjax {

// Runs body(task) for task in [0, tasks) on the caller and on XLA's intra-op threads. The caller
// claims tasks too and only waits for tasks that another thread has claimed and is running, so it
// never waits on a helper that XLA has not started (no deadlock when every pool thread is busy
// with other work); a helper that starts late finds nothing left and returns. The caller waits
// blocked, not spinning: with several processes on few cores (parallel test workers) a spinning
// waiter takes the core from the very thread it waits for. Which thread runs a task never changes
// what the task computes, so results do not depend on the thread count.
template <typename Body>
void ParallelTasks(xla::ffi::ThreadPool& pool, int64_t tasks, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t finished = 0;  // guarded by mutex
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  auto work = [state, tasks, &body]() {
    for (int64_t task; (task = state->next.fetch_add(1)) < tasks;) {
      body(task);
      std::lock_guard<std::mutex> lock(state->mutex);
      if (++state->finished == tasks) state->all_done.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    // A helper owns a reference to the shared state only; it touches the buffers (through body)
    // only for a task it claimed, and the caller waits for every claimed task before returning.
    pool.Schedule([state, tasks, work]() mutable {
      if (state->next.load() < tasks) work();
    });
  }
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->finished == tasks; });
}

}  // namespace layerjax
