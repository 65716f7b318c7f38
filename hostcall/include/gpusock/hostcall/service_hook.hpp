// gpusock/hostcall/service_hook.hpp — lets a module run its own event loop on the
// hostcall service threads, so a call and the I/O that fulfils it are handled by one
// thread with no hand-off between threads.
//
//   class MyLoop : public gpusock::hostcall::ServiceHook {
//     uint32_t poll(uint32_t thread) override { return reap_completions(thread); }
//     void park(uint32_t thread, std::chrono::nanoseconds max) override { wait_events(thread, max); }
//     void thread_stop(uint32_t thread) override { cancel_and_free(thread); }
//   };
//   runtime.set_service_hook(std::make_shared<MyLoop>());
//
// net/'s io_uring backend is such a hook: each service thread owns one ring, reaps it in
// poll(), and parks inside io_uring_enter so a completion wakes it at once.
#pragma once

#include <chrono>
#include <cstdint>

namespace gpusock::hostcall {

class ServiceHook {
 public:
  virtual ~ServiceHook() = default;

  // Called on service thread `thread` once per pass of its loop, after the thread has
  // looked for calls. Returns how many events it handled; non-zero keeps the thread
  // spinning instead of parking.
  virtual uint32_t poll(uint32_t thread) = 0;

  // Called when the thread found nothing to do for the runtime's spin_time. Blocks at most
  // `max` (the runtime's park_interval: the device cannot wake a host thread, so calls are
  // only noticed when this returns), returning early when the hook has work of its own.
  virtual void park(uint32_t thread, std::chrono::nanoseconds max) = 0;

  // Called on service thread `thread` as it leaves its loop at shutdown, after every
  // pending call was failed. Cancels and frees what the thread owns. Must not block long:
  // shutdown waits at most about two seconds for a service thread.
  virtual void thread_stop(uint32_t thread) = 0;
};

// Index of the calling service thread (0 .. service_threads-1), or -1 when the caller is
// not a service thread. Handlers use it to find per-thread state.
int service_thread_index();

}  // namespace gpusock::hostcall
