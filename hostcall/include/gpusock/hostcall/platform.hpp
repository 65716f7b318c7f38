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
// Unrolls the next loop fully in device code; a host compiler (and nvcc's host pass of a
// __host__ __device__ function) decides itself.
#if defined(__CUDA_ARCH__)
#define GPUSOCK_UNROLL _Pragma("unroll")
#else
#define GPUSOCK_UNROLL
#endif

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

#if GPUSOCK_IS_GPU || defined(__CUDACC__)
namespace internal {
// The launch a GPU kernel runs as. launch() (launch.hpp) sets these in thread 0 of each
// block before the kernel body runs; each translation unit compiled by nvcc has its own
// copy, as for hostcall::context(). A kernel started with <<<>>> rather than launch()
// finds whatever the block's shared memory held, so code that may run there
// (backoff(), trap()) trusts them only when gpusock_launch_grid matches %gridid, which
// is unique to each launch.
static __shared__ uint32_t gpusock_launch_id;         // 1..kLaunchIds-1 (protocol.hpp)
static __shared__ uint32_t* gpusock_launch_abort;     // device memory: non-zero once aborted
static __shared__ uint32_t* gpusock_launch_cause;     // mapped host memory: where it trapped
static __shared__ unsigned long long gpusock_launch_grid;
// Per warp of the block, the lanes that hold a LaneStopHold (bit = lane).
static __shared__ uint32_t gpusock_stop_holds[32];
}  // namespace internal
#endif

namespace internal {
#if GPUSOCK_IS_GPU || defined(__CUDACC__)
__device__ GPUSOCK_ALWAYS_INLINE unsigned long long grid_id() {
  unsigned long long g;
  asm volatile("mov.u64 %0, %%gridid;" : "=l"(g));
  return g;
}
// Whether this kernel was started by launch(): only then do the variables above hold.
__device__ GPUSOCK_ALWAYS_INLINE bool in_gpusock_launch() { return gpusock_launch_grid == grid_id(); }
// Whether a lane of this launch called trap(). Relaxed, device scope: the word carries no
// data, only "stop"; an L2 read. Callers are inside a gpusock launch.
__device__ GPUSOCK_ALWAYS_INLINE bool launch_aborted() {
  const uint32_t* a = gpusock_launch_abort;
  return a != nullptr && AtomicRef<const uint32_t, Scope::kDevice>(*a).load(Order::kRelaxed) != 0;
}
__device__ GPUSOCK_ALWAYS_INLINE uint32_t& stop_holds_of_warp() {
  const uint32_t t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return gpusock_stop_holds[t / 32];
}
__device__ GPUSOCK_ALWAYS_INLINE uint32_t lane_bit() {
  uint32_t lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return 1u << lane;
}
// Whether the calling lane holds a LaneStopHold.
__device__ GPUSOCK_ALWAYS_INLINE bool lane_holds_stop() {
  return (AtomicRef<uint32_t, Scope::kBlock>(stop_holds_of_warp()).load(Order::kRelaxed) & lane_bit()) != 0;
}
// Ends the calling thread at once, as a trap would, but alone: no destructor runs, the
// rest of the grid goes on. Only where no warp-mate waits for it in a collective.
[[noreturn]] __device__ GPUSOCK_ALWAYS_INLINE void exit_lane() {
  asm volatile("exit;" ::: "memory");
  __builtin_unreachable();
}
#endif

// Whether the calling lane's hostcall waits must end because its launch was aborted: on
// the cpu device cpu_lane_waits_end(); on a GPU, whether a lane of this launch called
// trap(). The waits then return -ECANCELED, and the lane stops at its next stop point.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE bool lane_waits_end() {
#if GPUSOCK_IS_GPU
  return launch_aborted() && !lane_holds_stop();
#else
  return cpu_lane_waits_end();
#endif
}
// Stops the calling lane if its launch was aborted (cpu_lane_stop()); true means "aborted,
// but the lane may not be stopped here (it unwinds already, or holds a LaneStopHold)".
// Always false on a GPU, where the hostcall client stops a lane at the start of its next
// call instead (submit_raw(): the leader reads the word with the call's first atomics).
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE bool lane_stop() {
#if GPUSOCK_IS_GPU
  return false;
#else
  return cpu_lane_stop();
#endif
}
}  // namespace internal

// While one of these lives, a lane of an aborted launch is not stopped at its stop
// points: its hostcalls are made and waited for as usual, as while the stop already
// unwinds the lane (cpu device). A destructor that makes hostcalls (closing a socket)
// holds one: on the cpu device the stop is an exception and a destructor must not throw;
// on either device the lane that returns normally from a call the abort ended
// (-ECANCELED) still closes what it opened on its way out. On a GPU the hold is a bit per
// lane in shared memory; the outermost hold clears it.
class LaneStopHold {
 public:
  GPUSOCK_HD LaneStopHold() {
#if GPUSOCK_IS_GPU
    outer_ = (AtomicRef<uint32_t, Scope::kBlock>(internal::stop_holds_of_warp())
                  .fetch_or(internal::lane_bit(), Order::kRelaxed) &
              internal::lane_bit()) == 0;
#else
    internal::cpu_hold_lane_stop(+1);
#endif
  }
  GPUSOCK_HD ~LaneStopHold() {
#if GPUSOCK_IS_GPU
    if (outer_) {
      AtomicRef<uint32_t, Scope::kBlock>(internal::stop_holds_of_warp()).fetch_and(~internal::lane_bit(), Order::kRelaxed);
    }
#else
    (void)outer_;
    internal::cpu_hold_lane_stop(-1);
#endif
  }
  LaneStopHold(const LaneStopHold&) = delete;
  LaneStopHold& operator=(const LaneStopHold&) = delete;

 private:
  bool outer_ = true;  // GPU: this hold set the lane's bit
};

// Politeness inside a spin loop: iteration `i` of a wait. The GPU spins hard for a few
// iterations and then sleeps with __nanosleep so that a waiting warp leaves issue slots
// to others; a CPU lane yields its core, since on the cpu device many more lanes than
// cores wait at once and the thread it waits for may need that very core.
//
// backoff() is also a stop point: a lane of an aborted launch (gpusock::trap()) stops in
// it (cpu device: once it yields; GPU: it reads the launch's abort word every 8th call
// once it sleeps), so a kernel's own spin loops end with the launch. The hostcall client's
// and the localdevice calls' own waits use spin_pause() and return -ECANCELED instead:
// they must finish the steps a warp group takes together and release what they hold.
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
#if GPUSOCK_IS_GPU
  // Every 8th wait once the loop sleeps: a shared-memory compare and an L2 read.
  if (i >= 8 && (i & 7) == 7 && internal::in_gpusock_launch() && internal::launch_aborted()) {
    internal::exit_lane();
  }
#else
  if (i >= 4) internal::cpu_lane_stop();
#endif
  spin_pause(i);
}

// Aborts the calling kernel's launch. The calling lane stops at once; every other lane of
// the launch stops at its next stop point: the start of a hostcall, a backoff() in a
// spin, a blocked hostcall or localdevice wait (which first returns -ECANCELED), or, on
// the cpu device, a warp convergence. Blocks that start after it never run the kernel.
// When the last lane has stopped, the runtime answers the launch's calls still in flight
// with -ECANCELED, takes back the slots and staging pages it held, and Launch::wait()
// returns EIO naming the block and thread that trapped. Other launches and the runtime
// go on (docs/architecture.md, section 18.3).
//
// On a GPU a stopped lane runs no destructor (a socket it held stays open until the
// runtime is destroyed, or until another lane closes it), and a lane must not trap while
// warp-mates wait for it in a collective (__syncwarp, a shuffle). Called from a kernel
// not started by launch(), it is a plain __trap(): a fault, which loses the CUDA context.
#if GPUSOCK_IS_GPU
[[noreturn]] __device__ inline void trap() {
  using namespace internal;
  if (!in_gpusock_launch() || gpusock_launch_abort == nullptr) __trap();
  // The first trap of the launch (it turns the word from 0 to 1) records where it
  // happened, in mapped memory that the host reads once the launch has ended.
  uint32_t expect = 0;
  if (AtomicRef<uint32_t, Scope::kDevice>(*gpusock_launch_abort).compare_exchange(expect, 1, Order::kRelaxed)) {
    if (uint32_t* cause = gpusock_launch_cause) {
      cause[1] = blockIdx.x;
      cause[2] = blockIdx.y;
      cause[3] = blockIdx.z;
      cause[4] = threadIdx.x;
      cause[5] = threadIdx.y;
      cause[6] = threadIdx.z;
      AtomicRef<uint32_t, Scope::kSystem>(cause[0]).store(1, Order::kRelease);
    }
  }
  exit_lane();
}
#else
[[noreturn]] inline void trap() { internal::cpu_trap(); }
#endif

}  // namespace gpusock
