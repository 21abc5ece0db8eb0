#include "core/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace gradclip {
namespace {

// After a run, workers poll for the next one this long before they sleep: a
// clip call is a norm pass followed at once by a scale pass, and waking a
// sleeping thread costs tens of microseconds on a VM.
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(100);

}  // namespace

struct ThreadPool::State {
  // Workers that join a run count themselves in `run_state`; the caller closes
  // the run once every task is claimed and then waits only for those workers.
  // A worker that wakes late (descheduled on a busy machine) finds its run
  // closed, or already replaced by the next one, and stays out, so the caller
  // never waits for a thread that did nothing. The run's number is part of the
  // word: a stale worker's compare-and-swap fails instead of counting itself
  // into a later run.
  //   run_state = run number << 32 | kClosed | number of joined workers
  static constexpr uint64_t kClosed = uint64_t(1) << 31;
  static constexpr uint64_t kCountMask = kClosed - 1;

  std::mutex run_mu;  // one run at a time (start() to finish()); a concurrent caller works alone
  std::mutex mu;
  std::condition_variable work_cv;
  std::condition_variable done_cv;
  std::atomic<uint64_t> generation{0};  // bumped once per run(); workers wake on a change
  std::atomic<uint64_t> run_state{0};
  int helpers_wanted = 0;  // how many workers may join the current run
  const std::function<void(int64_t)>* task = nullptr;
  int64_t n_tasks = 0;
  std::atomic<int64_t> next{0};
  std::vector<std::thread> workers;

  static uint64_t run_tag(uint64_t gen) { return gen << 32; }

  void drain() {
    for (int64_t i = next.fetch_add(1); i < n_tasks; i = next.fetch_add(1)) (*task)(i);
  }

  // Counts this worker into run `gen` unless that run is closed or over.
  bool join(uint64_t gen) {
    uint64_t v = run_state.load(std::memory_order_acquire);
    while ((v & ~(kClosed | kCountMask)) == run_tag(gen) && !(v & kClosed)) {
      if (run_state.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) return true;
    }
    return false;
  }

  void leave() {
    const uint64_t after = run_state.fetch_sub(1, std::memory_order_acq_rel) - 1;
    if ((after & kClosed) && (after & kCountMask) == 0) {
      std::lock_guard<std::mutex> lock(mu);  // pairs with the caller's wait
      done_cv.notify_one();
    }
  }

  void worker_loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kSpinBeforeSleep;
      while (generation.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until)
        cpu_relax();
      {
        std::unique_lock<std::mutex> lock(mu);
        work_cv.wait(lock, [&] { return generation.load() != seen; });
        seen = generation.load();
        if (id >= helpers_wanted) continue;
      }
      if (!join(seen)) continue;  // the caller already finished every task
      drain();
      leave();
    }
  }
};

namespace {

std::atomic<ThreadPool*> g_pool{nullptr};

int default_threads() {
  if (const char* env = std::getenv("GRADCLIP_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

void forget_pool_in_child() { g_pool.store(nullptr); }  // the parent's threads are gone here

}  // namespace

ThreadPool::ThreadPool() : state_(new State), num_threads_(default_threads()) {}

ThreadPool& ThreadPool::instance() {
  static std::once_flag atfork_once;
  std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
  ThreadPool* pool = g_pool.load(std::memory_order_acquire);
  if (pool) return *pool;
  static std::mutex create_mu;
  std::lock_guard<std::mutex> lock(create_mu);
  pool = g_pool.load();
  if (!pool) {
    pool = new ThreadPool();  // leaked on purpose, like State
    g_pool.store(pool, std::memory_order_release);
  }
  return *pool;
}

void ThreadPool::set_num_threads(int n) { num_threads_ = n > 0 ? n : default_threads(); }

namespace {
thread_local int t_thread_cap = 0;  // limit_calling_thread(); 0: none
}  // namespace

int ThreadPool::num_threads() const {
  return t_thread_cap > 0 ? std::min(num_threads_, t_thread_cap) : num_threads_;
}

int ThreadPool::limit_calling_thread(int n) {
  const int previous = t_thread_cap;
  t_thread_cap = n > 0 ? n : 0;
  return previous;
}

void ThreadPool::run(int64_t n_tasks, const std::function<void(int64_t)>& task) {
  if (!start(n_tasks, task)) {
    for (int64_t i = 0; i < n_tasks; ++i) task(i);
    return;
  }
  finish();
}

bool ThreadPool::start(int64_t n_tasks, const std::function<void(int64_t)>& task) {
  const int helpers = static_cast<int>(std::min<int64_t>(num_threads(), n_tasks)) - 1;
  if (helpers <= 0) return false;
  State& s = *state_;
  if (!s.run_mu.try_lock()) return false;  // another caller's run: this one works alone
  {
    std::lock_guard<std::mutex> lock(s.mu);
    while (static_cast<int>(s.workers.size()) < helpers) {
      const int id = static_cast<int>(s.workers.size());
      s.workers.emplace_back([&s, id] { s.worker_loop(id); });
    }
    s.task = &task;
    s.n_tasks = n_tasks;
    s.next.store(0);
    s.helpers_wanted = helpers;
    const uint64_t gen = s.generation.load() + 1;
    s.run_state.store(State::run_tag(gen));  // no worker is counted in the previous run any more
    s.generation.store(gen, std::memory_order_release);
  }
  s.work_cv.notify_all();
  return true;
}

void ThreadPool::finish() {
  State& s = *state_;
  s.drain();
  s.run_state.fetch_or(State::kClosed, std::memory_order_acq_rel);
  auto all_left = [&] { return (s.run_state.load(std::memory_order_acquire) & State::kCountMask) == 0; };
  const auto spin_until = std::chrono::steady_clock::now() + kSpinBeforeSleep;
  while (!all_left() && std::chrono::steady_clock::now() < spin_until) cpu_relax();
  {
    std::unique_lock<std::mutex> lock(s.mu);
    s.done_cv.wait(lock, all_left);
  }
  s.run_mu.unlock();  // locked by start()
}

}  // namespace gradclip
