// gpusock/hostcall/platform.hpp — the one place where GPU and CPU code paths split.
//
// Every portable function in gpusock is marked GPUSOCK_HD and compiles twice: as CUDA
// device code (nvcc's device pass, where GPUSOCK_IS_GPU is 1) and as ordinary host C++
// (nvcc's host pass, or g++/clang for the cpu-only build). Only this header tests
// __CUDA_ARCH__; the rest of the code branches on GPUSOCK_IS_GPU (warp.hpp for the
// execution model, client.hpp for the runtime context, errno and sleeping) or asks
// `gpusock::is_gpu()`.
//
//   GPUSOCK_HD void spin_until_set(const uint32_t& flag) {
//     gpusock::AtomicRef<const uint32_t, gpusock::Scope::kSystem> f(flag);
//     for (uint32_t i = 0; f.load(gpusock::Order::kAcquire) == 0; ++i) gpusock::backoff(i);
//   }
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GPUSOCK_HD __host__ __device__
#define GPUSOCK_DEVICE_ONLY __device__
#else
#define GPUSOCK_HD
#define GPUSOCK_DEVICE_ONLY
#endif

#if defined(__CUDA_ARCH__)
#define GPUSOCK_IS_GPU 1
#include <cuda/atomic>
#else
#define GPUSOCK_IS_GPU 0
#include <atomic>
#include <ctime>
#include <sched.h>
#endif

#define GPUSOCK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace gpusock {

// True when this code runs on a GPU, false on the cpu device and in host code.
GPUSOCK_HD constexpr bool is_gpu() { return GPUSOCK_IS_GPU != 0; }

// Memory orders and scopes, mapped onto libcu++ on the GPU and std:: on the CPU.
// Scopes mean the same thing on both: kDevice orders accesses among threads of one
// device (all warps of all blocks), kSystem among the device and host threads.
enum class Order { kRelaxed, kAcquire, kRelease, kAcqRel, kSeqCst };
enum class Scope { kBlock, kDevice, kSystem };

namespace internal {
#if GPUSOCK_IS_GPU
template <Scope S>
struct CudaScope;
template <>
struct CudaScope<Scope::kBlock> {
  static constexpr cuda::thread_scope value = cuda::thread_scope_block;
};
template <>
struct CudaScope<Scope::kDevice> {
  static constexpr cuda::thread_scope value = cuda::thread_scope_device;
};
template <>
struct CudaScope<Scope::kSystem> {
  static constexpr cuda::thread_scope value = cuda::thread_scope_system;
};
__device__ GPUSOCK_ALWAYS_INLINE constexpr cuda::std::memory_order to_std(Order o) {
  switch (o) {
    case Order::kRelaxed: return cuda::std::memory_order_relaxed;
    case Order::kAcquire: return cuda::std::memory_order_acquire;
    case Order::kRelease: return cuda::std::memory_order_release;
    case Order::kAcqRel: return cuda::std::memory_order_acq_rel;
    default: return cuda::std::memory_order_seq_cst;
  }
}
#else
GPUSOCK_ALWAYS_INLINE constexpr std::memory_order to_std(Order o) {
  switch (o) {
    case Order::kRelaxed: return std::memory_order_relaxed;
    case Order::kAcquire: return std::memory_order_acquire;
    case Order::kRelease: return std::memory_order_release;
    case Order::kAcqRel: return std::memory_order_acq_rel;
    default: return std::memory_order_seq_cst;
  }
}
#endif
}  // namespace internal

// An atomic view of an ordinary object, at an explicit scope. The object must be
// naturally aligned. On the GPU this is cuda::atomic_ref (ld.acquire.sys and friends);
// on the CPU std::atomic_ref, which ThreadSanitizer understands.
template <typename T, Scope S>
class AtomicRef {
 public:
  GPUSOCK_HD explicit AtomicRef(T& obj) : ref_(obj) {}

  GPUSOCK_HD T load(Order o = Order::kSeqCst) const { return ref_.load(internal::to_std(o)); }
  GPUSOCK_HD void store(T v, Order o = Order::kSeqCst) const { ref_.store(v, internal::to_std(o)); }
  GPUSOCK_HD T exchange(T v, Order o = Order::kSeqCst) const {
    return ref_.exchange(v, internal::to_std(o));
  }
  GPUSOCK_HD T fetch_add(T v, Order o = Order::kSeqCst) const {
    return ref_.fetch_add(v, internal::to_std(o));
  }
  GPUSOCK_HD T fetch_sub(T v, Order o = Order::kSeqCst) const {
    return ref_.fetch_sub(v, internal::to_std(o));
  }
  GPUSOCK_HD T fetch_or(T v, Order o = Order::kSeqCst) const {
    return ref_.fetch_or(v, internal::to_std(o));
  }
  GPUSOCK_HD T fetch_and(T v, Order o = Order::kSeqCst) const {
    return ref_.fetch_and(v, internal::to_std(o));
  }
  // Strong compare-exchange; on failure `expected` receives the current value.
  GPUSOCK_HD bool compare_exchange(T& expected, T desired, Order o = Order::kSeqCst) const {
    return ref_.compare_exchange_strong(expected, desired, internal::to_std(o),
                                        failure_order(o));
  }

 private:
#if GPUSOCK_IS_GPU
  using Ref = cuda::atomic_ref<T, internal::CudaScope<S>::value>;
  __device__ static constexpr cuda::std::memory_order failure_order(Order o) {
    return (o == Order::kRelease || o == Order::kRelaxed) ? cuda::std::memory_order_relaxed
           : (o == Order::kSeqCst)                        ? cuda::std::memory_order_seq_cst
                                                          : cuda::std::memory_order_acquire;
  }
#else
  using Ref = std::atomic_ref<T>;
  static constexpr std::memory_order failure_order(Order o) {
    return (o == Order::kRelease || o == Order::kRelaxed) ? std::memory_order_relaxed
           : (o == Order::kSeqCst)                        ? std::memory_order_seq_cst
                                                          : std::memory_order_acquire;
  }
#endif
  Ref ref_;
};

// A fence at the given scope. On the CPU every scope is the same fence.
template <Scope S>
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE void fence(Order o) {
#if GPUSOCK_IS_GPU
  cuda::atomic_thread_fence(internal::to_std(o), internal::CudaScope<S>::value);
#else
  std::atomic_thread_fence(internal::to_std(o));
#endif
}

// Index of the lowest set bit of a non-zero word, and the number of set bits.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE uint32_t lowest_bit(uint32_t x) {
#if GPUSOCK_IS_GPU
  return static_cast<uint32_t>(__ffs(static_cast<int>(x)) - 1);
#else
  return static_cast<uint32_t>(__builtin_ctz(x));
#endif
}
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE uint32_t lowest_bit64(uint64_t x) {
#if GPUSOCK_IS_GPU
  return static_cast<uint32_t>(__ffsll(static_cast<long long>(x)) - 1);
#else
  return static_cast<uint32_t>(__builtin_ctzll(x));
#endif
}
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE uint32_t popcount(uint32_t x) {
#if GPUSOCK_IS_GPU
  return static_cast<uint32_t>(__popc(x));
#else
  return static_cast<uint32_t>(__builtin_popcount(x));
#endif
}

// Stores 16 bytes (lo at the lower address) to a 16-byte aligned address as one
// access: a vector store on the GPU (a byte-wise memcpy would become 16 stores there);
// memcpy on the CPU, which stays within C++'s aliasing rules.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE void store16(void* dst, uint64_t lo, uint64_t hi) {
#if GPUSOCK_IS_GPU
  *static_cast<ulonglong2*>(dst) = make_ulonglong2(lo, hi);
#else
  const uint64_t v[2] = {lo, hi};
  __builtin_memcpy(dst, v, sizeof v);
#endif
}

// A nanosecond clock. On the GPU it is %globaltimer (a device-wide clock that advances
// in 32 ns steps on Hopper); on the cpu device it is CLOCK_MONOTONIC. The two differ in
// epoch: gpusock::clock_gettime() adds the offsets the runtime measured at start.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE uint64_t globaltimer_ns() {
#if GPUSOCK_IS_GPU
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#else
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
#endif
}

#if !GPUSOCK_IS_GPU
namespace internal {
// cpu device (cpu_device.cpp). A lane whose launch was aborted (gpusock::trap(), or a lane
// that threw) stops here: it throws the lane-abort exception, which only the cpu device
// catches. While that exception is already unwinding the lane, or while the lane holds a
// LaneStopHold (a destructor making a call), it returns true instead and the caller goes
// on. Returns false when the launch runs on, and on any thread that is not a cpu-device
// lane.
bool cpu_lane_stop();
// Aborts the calling lane's launch: records why, stops the calling lane. Outside a lane
// it aborts the process, as a trap would.
[[noreturn]] void cpu_trap();
// Whether the calling lane's launch was aborted; never throws. False off a lane.
bool cpu_lane_aborted();
// Counts the calling thread's live LaneStopHold objects (+1 or -1).
void cpu_hold_lane_stop(int delta);
// Whether the calling lane's hostcall waits must end with -ECANCELED: its launch was
// aborted and the lane is not cleaning up (unwinding, or holding a LaneStopHold). A
// cleaning-up lane's calls (a destructor closing a socket) are waited for to their answer,
// so that they are not cancelled before the host has done them. False off a lane.
bool cpu_lane_waits_end();
}  // namespace internal
#endif

namespace internal {
// Whether the calling lane's hostcall waits must end because its launch was aborted
// (cpu_lane_waits_end()). Always false on a GPU: a trap there ends every thread of the
// grid at once, so no thread is left to ask.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE bool lane_waits_end() {
#if GPUSOCK_IS_GPU
  return false;
#else
  return cpu_lane_waits_end();
#endif
}
// Stops the calling lane if its launch was aborted (cpu_lane_stop()); true means "aborted,
// but the lane may not be stopped here (it unwinds already, or holds a LaneStopHold)".
// Always false on a GPU.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE bool lane_stop() {
#if GPUSOCK_IS_GPU
  return false;
#else
  return cpu_lane_stop();
#endif
}
}  // namespace internal

// While one of these lives, a lane of an aborted launch (cpu device) is not stopped at
// its stop points: its hostcalls are made and waited for as usual, as while the stop
// already unwinds the lane. A destructor that
// makes hostcalls (closing a socket) holds one, because the stop is an exception and a
// destructor must not throw: without it, a lane that leaves a scope normally after an
// abort would end the process there. Nothing on a GPU, where no lane outlives a trap.
class LaneStopHold {
 public:
  GPUSOCK_HD LaneStopHold() {
#if !GPUSOCK_IS_GPU
    internal::cpu_hold_lane_stop(+1);
#endif
  }
  GPUSOCK_HD ~LaneStopHold() {
#if !GPUSOCK_IS_GPU
    internal::cpu_hold_lane_stop(-1);
#endif
  }
  LaneStopHold(const LaneStopHold&) = delete;
  LaneStopHold& operator=(const LaneStopHold&) = delete;
};

// Politeness inside a spin loop: iteration `i` of a wait. The GPU spins hard for a few
// iterations and then sleeps with __nanosleep so that a waiting warp leaves issue slots
// to others; a CPU lane yields its core, since on the cpu device many more lanes than
// cores wait at once and the thread it waits for may need that very core.
//
// On the cpu device a lane of an aborted launch stops in here (once it yields), so a
// kernel's own spin loops end with the grid, as they would on a GPU where a trap kills
// every thread. The hostcall client's own waits use spin_pause() and return an error
// instead: they must finish the steps a warp group takes together.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE void spin_pause(uint32_t i) {
#if GPUSOCK_IS_GPU
  if (i >= 8) __nanosleep(i < 64 ? 64u : 256u);
#else
  if (i < 4) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  } else {
    sched_yield();
  }
#endif
}
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE void backoff(uint32_t i) {
#if !GPUSOCK_IS_GPU
  if (i >= 4) internal::cpu_lane_stop();
#endif
  spin_pause(i);
}

// Aborts the kernel, as a fault would: on a GPU `__trap()`, which ends every thread of
// the grid and leaves the CUDA context unusable (the runtime then reports itself failed,
// docs/architecture.md section 18.3). On the cpu device the calling lane stops at once
// and every other lane of the launch at its next hostcall, spin or warp convergence;
// blocks not started yet never start, the runtime takes back the slots and staging pages
// the launch held, and Launch::wait() returns EIO naming the abort. Other launches and
// the runtime go on.
GPUSOCK_HD inline void trap() {
#if GPUSOCK_IS_GPU
  __trap();
#else
  internal::cpu_trap();
#endif
}

}  // namespace gpusock
