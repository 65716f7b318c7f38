// hostcall/src/decode.hpp — the host's checks on what a kernel wrote: a slot header, a
// payload descriptor, a doorbell ring entry. Pure functions of their arguments, so Core
// calls them on its copies of the kernel's words and tests/fuzz drives them with arbitrary
// bytes. docs/architecture.md, section 6, has the table of checks and answers.
//
//   hostcall::SlotHeader hdr;                      // copied once, after the claim CAS
//   std::memcpy(&hdr, &slot.hdr, sizeof hdr);
//   if (int e = check_header(hdr); e == -EINVAL) fail_every_lane(e);
#pragma once

#include <cstdint>

#include "gpusock/hostcall/protocol.hpp"

namespace gpusock::internal {

// Returns 0 when the header names at least one lane, at most kMaxArgs argument words and
// no flags, and an opcode below kOpcodeLimit; -EINVAL for a bad mask, nargs or flags (this
// wins over the opcode); -ENOSYS for an opcode out of range. Whether a handler is
// registered for an in-range opcode is the caller's to look up (also -ENOSYS). No other
// field changes the answer.
int check_header(const hostcall::SlotHeader& hdr);

// A payload descriptor (arena offset `off`, length `len`, both written by the kernel)
// against the staging pages the header says the call holds: [first x 4096,
// (first + count) x 4096), clipped to an arena of `arena_bytes`. Returns 0 when
// [off, off + len) lies inside, -EFAULT otherwise. Overflow-safe for every input.
int check_payload(uint64_t off, uint64_t len, uint32_t staging_first, uint32_t staging_count,
                  uint64_t arena_bytes);

// What the entry at ring position `head` (the position the host consumes next) means.
enum class RingEntryKind {
  kNotWritten,  // wrong tag, not ahead of head: no doorbell here yet (or an older lap's)
  kDoorbell,    // tag head + 1: a request's doorbell; slot and seq are valid
  kFiller,      // tag head + 1, slot kFillerSlot: a position the device gave back
  kLapped,      // a later lap's tag: the device lapped the host; jump to new_head
};
struct RingEntry {
  RingEntryKind kind = RingEntryKind::kNotWritten;
  uint32_t slot = 0;      // with kDoorbell
  uint32_t seq_low = 0;   // with kDoorbell: the request's seq & kRingSeqMask
  uint32_t new_head = 0;  // with kLapped: tag - 1, the position the entry was written for
};
RingEntry decode_ring_entry(uint64_t entry, uint32_t head);

// What to do with a doorbell for `slot` carrying `seq_low`, given the slot's state word.
enum class DoorbellAction {
  kReject,  // slot >= nslots: ignore it, count it as rejected
  kClaim,   // seqs match and the slot holds a request: claim it
  kIgnore,  // seqs match but the request was already taken, or the doorbell is stale
  kEarly,   // the state is older than the doorbell (its store has not landed): retry
};
DoorbellAction classify_doorbell(uint32_t slot, uint32_t seq_low, uint32_t nslots, uint64_t state);

}  // namespace gpusock::internal
