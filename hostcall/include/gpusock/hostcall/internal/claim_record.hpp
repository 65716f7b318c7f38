// Host-only: what the cpu device records per slot so that the runtime can take back what
// an aborted launch held (docs/architecture.md, section 18.3). Its own header because the
// runtime's core, which is also compiled as CUDA, keeps the table.
#pragma once

#include <cstdint>

namespace gpusock::internal {

// Per slot, the launch that holds it and the staging run the call took with it: what the
// runtime takes back when that launch is aborted. The leader that claimed the slot writes
// it (relaxed atomics, host memory); release_slot() clears `launch` before the slot's
// bitmap bit, so a record naming a launch means that launch still holds the slot.
struct ClaimRecord {
  uint32_t launch;  // 0: no record
  uint32_t staging_first;
  uint32_t staging_count;
  uint32_t reserved;
};
static_assert(sizeof(ClaimRecord) == 16);

}  // namespace gpusock::internal
