#include "core/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace gradclip {

struct ThreadPool::State {
  std::mutex run_mu;  // one run() at a time; a concurrent caller works alone
  std::mutex mu;
  std::condition_variable work_cv;
  std::condition_variable done_cv;
  uint64_t generation = 0;  // bumped once per run(); workers wake on a change
  int helpers_wanted = 0;   // how many workers join the current run
  int helpers_left = 0;     // workers of the current run not yet finished
  const std::function<void(int64_t)>* task = nullptr;
  int64_t n_tasks = 0;
  std::atomic<int64_t> next{0};
  std::vector<std::thread> workers;

  void drain() {
    for (int64_t i = next.fetch_add(1); i < n_tasks; i = next.fetch_add(1)) (*task)(i);
  }

  void worker_loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu);
        work_cv.wait(lock, [&] { return generation != seen; });
        seen = generation;
        if (id >= helpers_wanted) continue;
      }
      drain();
      std::lock_guard<std::mutex> lock(mu);
      if (--helpers_left == 0) done_cv.notify_one();
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

void ThreadPool::run(int64_t n_tasks, const std::function<void(int64_t)>& task) {
  const int helpers = static_cast<int>(std::min<int64_t>(num_threads_, n_tasks)) - 1;
  State& s = *state_;
  std::unique_lock<std::mutex> run_lock(s.run_mu, std::try_to_lock);
  if (helpers <= 0 || !run_lock.owns_lock()) {
    for (int64_t i = 0; i < n_tasks; ++i) task(i);
    return;
  }
  std::unique_lock<std::mutex> lock(s.mu);
  while (static_cast<int>(s.workers.size()) < helpers) {
    const int id = static_cast<int>(s.workers.size());
    s.workers.emplace_back([&s, id] { s.worker_loop(id); });
  }
  s.task = &task;
  s.n_tasks = n_tasks;
  s.next.store(0);
  s.helpers_wanted = helpers;
  s.helpers_left = helpers;
  ++s.generation;
  lock.unlock();
  s.work_cv.notify_all();
  s.drain();
  lock.lock();
  s.done_cv.wait(lock, [&] { return s.helpers_left == 0; });
  s.task = nullptr;
}

}  // namespace gradclip
