#include "decode.hpp"

#include <cerrno>

#include "gpusock/hostcall/opcodes.hpp"

namespace gpusock::internal {

int check_header(const hostcall::SlotHeader& hdr) {
  if (hdr.lane_mask == 0 || hdr.nargs > hostcall::kMaxArgs || hdr.flags != 0) return -EINVAL;
  if (hdr.opcode >= hostcall::kOpcodeLimit) return -ENOSYS;
  return 0;
}

int check_payload(uint64_t off, uint64_t len, uint32_t staging_first, uint32_t staging_count,
                  uint64_t arena_bytes) {
  // Both page numbers are 32-bit, so lo and hi fit in 64 bits without wrapping.
  const uint64_t lo = uint64_t{staging_first} * hostcall::kStagingPageBytes;
  uint64_t hi = lo + uint64_t{staging_count} * hostcall::kStagingPageBytes;
  if (hi > arena_bytes) hi = arena_bytes;
  // off + len could wrap; compare against what is left instead.
  if (off < lo || off > hi || len > hi - off) return -EFAULT;
  return 0;
}

RingEntry decode_ring_entry(uint64_t entry, uint32_t head) {
  RingEntry r;
  const uint32_t tag = hostcall::ring_entry_tag(entry);
  if (tag == head + 1) {
    r.slot = hostcall::ring_entry_slot(entry);
    r.seq_low = hostcall::ring_entry_seq(entry);
    r.kind = r.slot == hostcall::kFillerSlot ? RingEntryKind::kFiller : RingEntryKind::kDoorbell;
    return r;
  }
  // Tags are positions + 1 mod 2^32: a tag ahead of head + 1 (by less than half the
  // range) was written on a later lap. Zero is a never-written entry, never a lap.
  if (static_cast<int32_t>(tag - (head + 1)) > 0 && tag != 0) {
    r.kind = RingEntryKind::kLapped;
    r.new_head = tag - 1;
  }
  return r;
}

DoorbellAction classify_doorbell(uint32_t slot, uint32_t seq_low, uint32_t nslots, uint64_t state) {
  if (slot >= nslots) return DoorbellAction::kReject;
  const uint32_t d = (seq_low - hostcall::state_seq(state)) & hostcall::kRingSeqMask;
  if (d == 0) {
    return hostcall::state_phase(state) == hostcall::kRequest ? DoorbellAction::kClaim : DoorbellAction::kIgnore;
  }
  // Older state: the doorbell overtook the state store it follows. Newer: the slot moved
  // on and this doorbell is stale.
  return d < (1u << (hostcall::kRingSeqBits - 1)) ? DoorbellAction::kEarly : DoorbellAction::kIgnore;
}

}  // namespace gpusock::internal
