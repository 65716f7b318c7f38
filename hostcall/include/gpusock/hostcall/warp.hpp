// gpusock/hostcall/warp.hpp — thread indices and warp primitives that mean the same on
// a GPU and on the cpu device.
//
// Kernels written against gpusock use these instead of threadIdx/__shfl_sync so that
// one source runs on both devices:
//
//   GPUSOCK_HD void kernel_body(uint32_t* out) {
//     uint32_t mask = gpusock::warp::active_mask();
//     uint32_t leader = gpusock::warp::leader(mask);
//     uint32_t v = gpusock::warp::lane_id() == leader ? 42 : 0;
//     v = gpusock::warp::shfl(mask, v, leader);       // every lane in mask sees 42
//     out[gpusock::global_thread_id()] = v;
//   }
//
// On the cpu device a warp's lanes are real threads. active_mask() converges the lanes
// that reach it: it returns once every live lane of the warp is waiting in a warp
// operation (or after a short bound, so a lane busy elsewhere cannot stall the others),
// and groups the waiting lanes by call site. That is how divergent branches behave on
// a GPU: lanes in different branches get different masks.
#pragma once

#include <cstdint>

#include "gpusock/hostcall/platform.hpp"

#if !GPUSOCK_IS_GPU
#include "gpusock/hostcall/internal/cpu_exec.hpp"
#else
namespace gpusock {
struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};
}  // namespace gpusock
#endif

namespace gpusock {

inline constexpr uint32_t kWarpSize = 32;
inline constexpr uint32_t kFullMask = 0xffffffffu;

GPUSOCK_HD inline Dim3 thread_idx() {
#if GPUSOCK_IS_GPU
  return {threadIdx.x, threadIdx.y, threadIdx.z};
#else
  return internal::current_lane()->thread_idx;
#endif
}
GPUSOCK_HD inline Dim3 block_idx() {
#if GPUSOCK_IS_GPU
  return {blockIdx.x, blockIdx.y, blockIdx.z};
#else
  return internal::current_lane()->block_idx;
#endif
}
GPUSOCK_HD inline Dim3 block_dim() {
#if GPUSOCK_IS_GPU
  return {blockDim.x, blockDim.y, blockDim.z};
#else
  return internal::current_lane()->block_dim;
#endif
}
GPUSOCK_HD inline Dim3 grid_dim() {
#if GPUSOCK_IS_GPU
  return {gridDim.x, gridDim.y, gridDim.z};
#else
  return internal::current_lane()->grid_dim;
#endif
}

// Linear index of this thread within its block, and within the whole grid.
GPUSOCK_HD inline uint32_t block_thread_id() {
  Dim3 t = thread_idx(), d = block_dim();
  return t.x + d.x * (t.y + d.y * t.z);
}
GPUSOCK_HD inline uint32_t block_threads() {
  Dim3 d = block_dim();
  return d.x * d.y * d.z;
}
GPUSOCK_HD inline uint64_t global_block_id() {
  Dim3 b = block_idx(), g = grid_dim();
  return b.x + static_cast<uint64_t>(g.x) * (b.y + static_cast<uint64_t>(g.y) * b.z);
}
GPUSOCK_HD inline uint64_t global_thread_id() {
  return global_block_id() * block_threads() + block_thread_id();
}
// Global warp index: unique per warp across the grid.
GPUSOCK_HD inline uint64_t global_warp_id() {
  uint32_t warps_per_block = (block_threads() + kWarpSize - 1) / kWarpSize;
  return global_block_id() * warps_per_block + block_thread_id() / kWarpSize;
}

// Barrier across the whole block (__syncthreads).
GPUSOCK_HD inline void sync_block() {
#if GPUSOCK_IS_GPU
  __syncthreads();
#else
  internal::cpu_sync_block();
#endif
}

namespace warp {

GPUSOCK_HD inline uint32_t lane_id() {
#if GPUSOCK_IS_GPU
  uint32_t l;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(l));
  return l;
#else
  return internal::current_lane()->lane;
#endif
}

#if GPUSOCK_IS_GPU
namespace gpu {
// Returns a group mask unchanged, in a form ptxas cannot prove warp-uniform.
//
// ptxas treats __activemask(), and __match_any_sync() over it with a key it can prove
// warp-uniform, as a value every active lane shares, and lasts it through later code: a
// shuffle, vote or __syncwarp on that mask is then guarded by one lane's copy of it (R2UR
// + BRA.DIV: "are all lanes of this mask here?") instead of every lane's. Lanes of two
// groups of one warp can reach one call site at different times, and a convergence
// barrier can later release them together; the one-lane check then passes for a shuffle
// whose source lane is still elsewhere, and the lanes of the other group read garbage
// (docs/architecture.md, section 18.2, has the trace). A select on a condition that is
// always true but depends on %laneid (a lane that exists is below its block's thread
// count) leaves the value as it was and makes ptxas check every lane's mask (MATCH +
// REDUX) before each collective: a few instructions, no memory access.
__device__ GPUSOCK_ALWAYS_INLINE uint32_t nonuniform_mask(uint32_t mask) {
  uint32_t lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane < blockDim.x * blockDim.y * blockDim.z ? mask : 0u;
}
}  // namespace gpu
#endif

// The lanes that execute this call together. `fn`/`line` name the call site; they are
// filled in by the compiler and only the cpu device looks at them.
GPUSOCK_HD inline uint32_t active_mask(const char* fn = __builtin_FUNCTION(),
                                       unsigned line = __builtin_LINE()) {
#if GPUSOCK_IS_GPU
  (void)fn;
  (void)line;
  return gpu::nonuniform_mask(__activemask());
#else
  // A call site is (function name literal, line): distinct sites in one function
  // differ by line, distinct functions by the literal's address.
  return internal::cpu_active_mask(reinterpret_cast<uintptr_t>(fn) ^ (uint64_t{line} << 48));
#endif
}

// Every lane this warp has (all 32 unless the block size is not a multiple of 32),
// whether or not they are converged right now. Warp-wide reductions over all lanes use
// this with shfl/sync, which wait for every lane in the mask.
GPUSOCK_HD inline uint32_t existing_mask() {
  uint32_t first = block_thread_id() / kWarpSize * kWarpSize;
  uint32_t n = block_threads() - first;
  return n >= kWarpSize ? kFullMask : ((1u << n) - 1);
}

// active_mask() narrowed to the lanes whose `key` equals this lane's: the lanes that
// arrive here together and agree on key. One step on the cpu device instead of two.
GPUSOCK_HD inline uint32_t converge_match(uint64_t key, const char* fn = __builtin_FUNCTION(),
                                          unsigned line = __builtin_LINE()) {
#if GPUSOCK_IS_GPU
  (void)fn;
  (void)line;
  return gpu::nonuniform_mask(__match_any_sync(__activemask(), static_cast<unsigned long long>(key)));
#else
  return internal::cpu_converge_match(reinterpret_cast<uintptr_t>(fn) ^ (uint64_t{line} << 48), key);
#endif
}

// Lowest lane of a non-empty mask: the group's leader by convention everywhere.
GPUSOCK_HD inline uint32_t leader(uint32_t mask) { return lowest_bit(mask); }

GPUSOCK_HD inline void sync(uint32_t mask) {
#if GPUSOCK_IS_GPU
  __syncwarp(mask);
#else
  internal::cpu_sync_warp(mask);
#endif
}

// Every lane in `mask` receives `src_lane`'s value (src_lane must be in mask).
template <typename T>
GPUSOCK_HD inline T shfl(uint32_t mask, T value, uint32_t src_lane) {
  static_assert(sizeof(T) <= 8, "shfl moves at most 8 bytes");
#if GPUSOCK_IS_GPU
  return __shfl_sync(mask, value, src_lane);
#else
  uint64_t bits = 0;
  __builtin_memcpy(&bits, &value, sizeof(T));
  bits = internal::cpu_shfl(mask, bits, src_lane);
  T out;
  __builtin_memcpy(&out, &bits, sizeof(T));
  return out;
#endif
}

GPUSOCK_HD inline uint32_t ballot(uint32_t mask, bool pred) {
#if GPUSOCK_IS_GPU
  return __ballot_sync(mask, pred);
#else
  return internal::cpu_ballot(mask, pred);
#endif
}

// The lanes of `mask` whose `value` equals this lane's.
GPUSOCK_HD inline uint32_t match_any(uint32_t mask, uint64_t value) {
#if GPUSOCK_IS_GPU
  return __match_any_sync(mask, static_cast<unsigned long long>(value));
#else
  return internal::cpu_match_any(mask, value);
#endif
}

// Exclusive prefix sum of `value` over the lanes of `mask` below this one; `total`
// receives the sum over all of mask. Used to lay out variable-sized per-lane payloads
// back to back.
GPUSOCK_HD inline uint32_t exclusive_sum(uint32_t mask, uint32_t value, uint32_t& total) {
  uint32_t me = lane_id();
  uint32_t before = 0;
  total = 0;
#if GPUSOCK_IS_GPU
  // One shuffle per lane of the mask: a log-step scan would need every lane of what
  // may be a partial mask, and this runs once per variable-sized call.
  for (uint32_t m = mask; m != 0; m &= m - 1) {
    uint32_t src = lowest_bit(m);
    uint32_t v = shfl(mask, value, src);
    if (src < me) before += v;
    total += v;
  }
#else
  // One exchange instead of 32 shuffles: each cpu-device shuffle is a rendezvous of
  // threads, so the cpu device gathers all values at once.
  uint64_t all[kWarpSize];
  internal::cpu_all_gather(mask, value, all);
  for (uint32_t m = mask; m != 0; m &= m - 1) {
    uint32_t src = lowest_bit(m);
    if (src < me) before += static_cast<uint32_t>(all[src]);
    total += static_cast<uint32_t>(all[src]);
  }
#endif
  return before;
}

}  // namespace warp
}  // namespace gpusock
