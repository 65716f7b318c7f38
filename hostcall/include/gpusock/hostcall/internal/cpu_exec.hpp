// Host-only: the cpu device's emulation of the CUDA execution model. Each lane of a
// warp is a real host thread; a warp's lanes meet in CpuWarp to converge, shuffle,
// vote and synchronize. Included by warp.hpp for the host pass only.
#pragma once

#include <cstdint>

#include "gpusock/hostcall/internal/claim_record.hpp"

namespace gpusock {
struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};
}  // namespace gpusock

namespace gpusock::hostcall {
struct DeviceContext;
}

namespace gpusock::internal {

class CpuWarp;
class CpuBlock;
struct CpuLaunch;


// What a lane thread knows about itself; set by the cpu device before the kernel body
// runs and cleared after.
struct LaneContext {
  CpuWarp* warp = nullptr;
  CpuBlock* block = nullptr;
  const hostcall::DeviceContext* ctx = nullptr;
  uint32_t lane = 0;
  Dim3 thread_idx, block_idx, block_dim, grid_dim;
  CpuLaunch* launch = nullptr;    // the launch this lane belongs to
  uint32_t launch_id = 0;         // non-zero, unique in the process
  ClaimRecord* claims = nullptr;  // the runtime's table, one record per slot
};

// Slot bookkeeping for aborted launches (see ClaimRecord); no-ops off a lane.
void cpu_note_claim(uint32_t slot, uint32_t staging_first, uint32_t staging_count);
void cpu_clear_claim(uint32_t slot);

LaneContext* current_lane();  // nullptr on a thread that is not a cpu-device lane

// Warp operations, with CUDA's contracts; each is called by every lane in `mask`.
uint32_t cpu_active_mask(uint64_t site);
uint32_t cpu_converge_match(uint64_t site, uint64_t key);
void cpu_sync_warp(uint32_t mask);
uint64_t cpu_shfl(uint32_t mask, uint64_t value, uint32_t src_lane);
uint32_t cpu_ballot(uint32_t mask, bool pred);
uint32_t cpu_match_any(uint32_t mask, uint64_t value);
void cpu_sync_block();
// Every lane in mask publishes `value`; out[l] receives lane l's value for l in mask.
void cpu_all_gather(uint32_t mask, uint64_t value, uint64_t* out);

}  // namespace gpusock::internal
