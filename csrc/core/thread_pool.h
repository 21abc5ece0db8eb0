// A small fixed pool of std::threads. gradclip links no OpenMP runtime: torch's
// CPU wheel ships its own, and two in one process fight over the cores.
#pragma once

#include <cstdint>
#include <functional>

namespace gradclip {

// One step of a spin-wait loop: tells the core it may yield to its sibling.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class ThreadPool {
 public:
  // The process-wide pool. After fork() the child gets a fresh one (the parent's
  // worker threads do not exist there).
  static ThreadPool& instance();

  // The threads a run() started from the calling thread may use: the pool's
  // count, capped by that thread's own limit, if it set one.
  int num_threads() const;
  // n <= 0 means "all hardware threads". Takes effect for the next run().
  void set_num_threads(int n);
  // Caps the runs the calling thread starts at n threads (0: no cap) and returns
  // the previous cap. Other threads are unaffected: a cap set inside an autograd
  // hook does not reach a clip that another thread runs meanwhile.
  static int limit_calling_thread(int n);

  // Calls task(i) for every i in [0, n_tasks), spread over the pool and the
  // calling thread; returns when all are done. Which thread runs which task is
  // not fixed, so callers must write results to per-task slots.
  void run(int64_t n_tasks, const std::function<void(int64_t)>& task);

  // run() in two halves, for a caller with work of its own in between: start()
  // wakes the workers on `task` and returns at once; finish() (on the same
  // thread, always, once start() returned true) runs the tasks no worker has
  // claimed and waits for the workers. `task` must live until finish()
  // returns. start() returns false, and runs nothing, when no worker would
  // help (one thread, one task, or the pool busy with another caller's run):
  // the caller then does all the work itself and does not call finish().
  bool start(int64_t n_tasks, const std::function<void(int64_t)>& task);
  void finish();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

 private:
  ThreadPool();
  struct State;
  State* state_;  // never freed: worker threads may outlive static destruction
  int num_threads_;
};

}  // namespace gradclip
