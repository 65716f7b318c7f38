// The per-slot record that lets the runtime take back what an aborted launch held
// (docs/architecture.md, section 18.3). Its own header because both the slot protocol
// (protocol.hpp, for device code) and the cpu device's lane context (cpu_exec.hpp) use it.
#pragma once

#include <cstdint>

namespace gpusock::hostcall {

// Per slot, the launch that holds it and the staging run its call took: what the runtime
// takes back when that launch is aborted (docs/architecture.md, section 18.3). The leader
// writes it (client.hpp: note_claim(), note_published()); release_slot() clears `launch`
// before the slot's bitmap bit, so once a launch has ended, a record naming it means it
// still holds the slot.
struct ClaimRecord {
  uint32_t launch;  // 0: no record
  uint32_t staging_first;
  uint32_t staging_count;
  uint32_t reserved;
};
static_assert(sizeof(ClaimRecord) == 16);

}  // namespace gpusock::hostcall

namespace gpusock::internal {
using ClaimRecord = hostcall::ClaimRecord;
}  // namespace gpusock::internal
