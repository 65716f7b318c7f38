// gpusock/hostcall/protocol.hpp — the hostcall wire format, shared by the device-side
// client and the host dispatcher. Everything here is plain data; docs/architecture.md
// walks through the state machine and every fence.
//
// Memory map (one runtime):
//
//   mapped pinned host memory          device memory (host memory on the cpu device)
//   ---------------------------        ---------------------------------------------
//   ControlBlock   (host -> device)    DeviceContext (pointers and facts below)
//   Slot[nslots]   (both, see state)   DeviceState: slot bitmap, ring position,
//   ring[cap]      (device -> host)                 staging page bitmap, errno slots
//   staging arena  (both, payloads)
//
// The host only ever reads mapped memory; it never reads device memory on the hot path.
#pragma once

#include <cstddef>
#include <cstdint>

#include "gpusock/hostcall/internal/claim_record.hpp"
#include "gpusock/hostcall/warp.hpp"

namespace gpusock::hostcall {

// Arguments (and results) per lane in one call.
inline constexpr uint32_t kMaxArgs = 8;

// ---------------------------------------------------------------------------------
// Slot state word (SlotHeader::state), 64 bits, the only word both sides write:
//
//   bits 63..32  inline   with phase kReplyInline: every lane's result word 0 (int32);
//                         otherwise 0. A reply that fits here costs the device one read.
//   bits 31..3   seq      the request's sequence number (mod 2^29): the doorbell ring
//                         position the device took for it. The host echoes it in the
//                         reply, so a reply is never mistaken for an older request's.
//   bits  2..0   phase    who owns the slot body right now:
//
//     kEmpty        device  never used
//     kRequest      host    device published a request; body is complete
//     kClaimed      host    one host thread took it (CAS from kRequest): nobody else will
//     kCompleting   host    one host thread won the right to answer (CAS from kClaimed)
//     kReply        device  results are in data[][] (nresults words per lane)
//     kReplyInline  device  every lane's only result is `inline`
//
// Transitions and who makes them:
//   device: (phase it owns) --store, system release--> kRequest
//   host:   kRequest --CAS--> kClaimed --CAS--> kCompleting --store release--> kReply*
// The device never writes the state while the host owns it, and the host never touches
// a slot after storing kReply*, so every transition has exactly one writer.
// ---------------------------------------------------------------------------------
enum Phase : uint32_t {
  kEmpty = 0,
  kRequest = 1,
  kClaimed = 2,
  kCompleting = 3,
  kReply = 4,
  kReplyInline = 5,
};
inline constexpr uint32_t kPhaseBits = 3;
inline constexpr uint32_t kPhaseMask = (1u << kPhaseBits) - 1;
inline constexpr uint32_t kSeqMask = 0xffffffffu >> kPhaseBits;

GPUSOCK_HD constexpr uint64_t make_state(uint32_t seq, Phase p, int32_t inline_result = 0) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(inline_result)) << 32) |
         ((seq & kSeqMask) << kPhaseBits) | p;
}
GPUSOCK_HD constexpr uint32_t state_seq(uint64_t s) { return static_cast<uint32_t>(s) >> kPhaseBits; }
GPUSOCK_HD constexpr Phase state_phase(uint64_t s) { return static_cast<Phase>(s & kPhaseMask); }
GPUSOCK_HD constexpr int32_t state_inline(uint64_t s) { return static_cast<int32_t>(s >> 32); }
// The low half identifies (seq, phase); replies compare it, ignoring the inline result.
GPUSOCK_HD constexpr uint32_t state_tag(uint64_t s) { return static_cast<uint32_t>(s); }

// One cache line. The device writes the request fields, then `state`; the host writes
// the reply fields, then `state`. The two never write at the same time (see Phase).
// The device's request fields sit in two aligned 16-byte chunks (offsets 16 and 32) so
// the leader writes them with two vector stores instead of seven scalar ones: fewer
// posted writes for the system-scope release that follows to wait for.
struct alignas(64) SlotHeader {
  uint64_t state;           //  0 both: see above; written last by whoever publishes
  uint32_t nresults;        //  8 host: with kReply, result words per lane in data[][]
  uint32_t reserved0;       // 12
  uint32_t opcode;          // 16 device: which handler
  uint32_t lane_mask;       // 20 device: lanes that take part; bit i = lane i
  uint16_t nargs;           // 24 device: argument words per lane, 0..kMaxArgs
  uint16_t flags;           // 26 device: reserved, must be 0
  uint32_t staging_first;   // 28 device: first staging page this call holds (if count > 0)
  uint32_t staging_count;   // 32 device: staging pages held; payload descriptors must lie
                            //    inside them
  uint32_t seq;             // 36 device: the request's seq again, written with the fields
                            //    above: the host serves a header only if it matches state
  uint64_t origin;          // 40 device: global warp id of the caller (diagnostics)
  uint8_t reserved[16];     // 48
};
static_assert(sizeof(SlotHeader) == 64, "SlotHeader is one cache line");
static_assert(offsetof(SlotHeader, state) == 0, "state word first");
static_assert(offsetof(SlotHeader, opcode) == 16 && offsetof(SlotHeader, staging_count) == 32,
              "request fields are two aligned 16-byte chunks");

// A slot: header plus the per-lane argument/result words, transposed ([word][lane]) so a
// warp writing word k of all its lanes writes 256 contiguous bytes, one coalesced burst
// over PCIe instead of 32 scattered 8-byte writes. Results overwrite arguments in place.
//
// tag[lane]: every lane that takes part in a request writes request_tag(seq) here, with
// its arguments (seq + 1, so the zeroed memory of a never-used slot names no request).
// The host serves only the lanes of lane_mask whose tag matches: a lane named in the mask
// that did not write this request (a kernel's bad mask, or a lane whose stores went to
// another slot) is answered -EPROTO in its own column instead of having its stale column
// run as arguments (docs/architecture.md, section 18.2).
struct alignas(64) Slot {
  SlotHeader hdr;
  uint64_t data[kMaxArgs][kWarpSize];
  uint32_t tag[kWarpSize];
};
GPUSOCK_HD constexpr uint32_t request_tag(uint32_t seq) { return (seq & kSeqMask) + 1; }
static_assert(sizeof(Slot) == 64 + kMaxArgs * kWarpSize * 8 + kWarpSize * 4, "Slot layout is fixed");
static_assert(alignof(Slot) == 64, "Slots start on cache lines");

// ---------------------------------------------------------------------------------
// Doorbell ring: ring[capacity] 64-bit entries in mapped host memory, capacity a power
// of two. A device leader takes a position `pos` from DeviceState::ring_pos (device-scope
// atomic) after publishing a request, and stores into ring[pos & (capacity-1)]:
//
//   bits 63..32  tag   (pos + 1) mod 2^32; the host consuming position p expects p + 1,
//                      so an entry validates itself: an older lap's entry, or a never
//                      written zero, has the wrong tag.
//   bits 31..12  slot  index of the slot that was published (so at most 2^20 slots)
//   bits 11..0   seq   low 12 bits of the request's seq: tells the host whether the
//                      slot's state it reads is this request, an older one whose update
//                      has not landed yet, or a newer one (the doorbell is stale)
//
// Doorbells are hints. The host also sweeps every slot's state on a timer, so a
// doorbell lost to a lapped ring or a producer stalled between taking a position and
// writing it delays a call by at most two sweep intervals; it cannot lose one.
inline constexpr uint32_t kMaxSlots = (1u << 20) - 1;
// A doorbell naming this slot is a filler: a position the device took and then gave
// back (it had to wait for a slot); the host steps over it.
inline constexpr uint32_t kFillerSlot = (1u << 20) - 1;
inline constexpr uint32_t kRingSeqBits = 12;
inline constexpr uint32_t kRingSeqMask = (1u << kRingSeqBits) - 1;

GPUSOCK_HD constexpr uint64_t make_ring_entry(uint32_t pos, uint32_t slot, uint32_t seq) {
  return (static_cast<uint64_t>(pos + 1u) << 32) | (static_cast<uint64_t>(slot) << kRingSeqBits) |
         (seq & kRingSeqMask);
}
GPUSOCK_HD constexpr uint32_t ring_entry_tag(uint64_t e) { return static_cast<uint32_t>(e >> 32); }
GPUSOCK_HD constexpr uint32_t ring_entry_slot(uint64_t e) {
  return static_cast<uint32_t>(e & 0xffffffffu) >> kRingSeqBits;
}
GPUSOCK_HD constexpr uint32_t ring_entry_seq(uint64_t e) { return static_cast<uint32_t>(e) & kRingSeqMask; }

// Host-written, device-read flags, on its own cache line in mapped memory.
struct alignas(64) ControlBlock {
  uint32_t magic;           // kControlMagic once initialised
  uint32_t shutdown;        // host: non-zero once the runtime is shutting down; every
                            // device spin loop reads it and gives up with ESHUTDOWN
  uint8_t reserved[56];
};
static_assert(sizeof(ControlBlock) == 64, "ControlBlock is one cache line");
inline constexpr uint32_t kControlMagic = 0x67707363;  // "gpsc"

// Staging pages: the arena is split into pages of 1 << kStagingPageShift bytes; one call
// takes a contiguous run of at most kStagingMaxRun pages, all inside one 64-bit word of
// the page bitmap so that one compare-and-swap claims the whole run.
inline constexpr uint32_t kStagingPageShift = 12;  // 4 KiB
inline constexpr uint32_t kStagingPageBytes = 1u << kStagingPageShift;
inline constexpr uint32_t kStagingMaxRun = 64;     // 256 KiB per call
// The bits of a run of `npages` (1..kStagingMaxRun) pages, starting at bit 0 of its word.
GPUSOCK_HD constexpr uint64_t staging_run_bits(uint32_t npages) {
  return npages >= 64 ? ~0ull : ((1ull << npages) - 1);
}

// Per-runtime state in device memory. The device reads and writes it with device-scope
// atomics; the host reads it only at shutdown and in diagnostics, never on a hot path.
struct DeviceState {
  uint32_t* slot_bitmap;     // nslots bits: 1 = slot owned by a device warp
  uint32_t* ring_pos;        // next doorbell position
  uint64_t* staging_bitmap;  // staging_pages bits: 1 = page in use
  int32_t* errno_slots;      // per hardware thread slot: the POSIX layer's errno
  // cuda: per slot, the launch that holds it (ClaimRecord); null on the cpu device, whose
  // lanes keep the runtime's host-side table instead.
  ClaimRecord* claims;
};

// cuda: launches in flight at once carry ids 1..kLaunchIds-1 (0: none); an id is reused
// once its launch has ended and the runtime has taken back what it held. Per id the
// runtime keeps an abort word in device memory (non-zero once a lane called
// gpusock::trap(); lanes poll it at their stop points) and kLaunchCauseWords words of
// mapped host memory that the trapping lane fills: [0] 1 once written, [1..3] blockIdx,
// [4..6] threadIdx. launch() hands the kernel both addresses.
inline constexpr uint32_t kLaunchIds = 1024;
inline constexpr uint32_t kLaunchCauseWords = 8;

// Module state pointers a DeviceContext carries (see DeviceContext::modules), and the
// bytes of each module's head (DeviceContext::module_heads).
inline constexpr uint32_t kModuleStates = 4;
inline constexpr uint32_t kModuleHeadBytes = 64;

// Everything device code needs to reach the runtime, in device-visible memory. Kernels
// find it through gpusock::hostcall::context(). On a GPU launch() copies it into each
// block's shared memory when the block starts, so reading it costs no trip to L2 (an
// acquire anywhere in the kernel empties the SM's L1, so a device-memory copy would be
// fetched from L2 again and again); it does not change while kernels run.
struct DeviceContext {
  Slot* slots;                      // mapped host memory, device pointer
  uint64_t* ring;                   // mapped host memory, device pointer
  ControlBlock* control;            // mapped host memory, device pointer
  uint8_t* staging;                 // mapped host memory, device pointer
  DeviceState state;
  uint32_t nslots;
  uint32_t ring_mask;               // capacity - 1
  uint32_t staging_pages;
  uint32_t threads_per_sm;          // GPU: errno slot = smid * threads_per_sm + hw thread
  uint32_t errno_sms;               // GPU: SM ids (%nsmid) the errno array covers
  uint32_t slots_per_warp;          // home slot of warp w = w * slots_per_warp % nslots
  int64_t monotonic_offset_ns;      // CLOCK_MONOTONIC = globaltimer + this
  int64_t realtime_offset_ns;       // CLOCK_REALTIME  = globaltimer + this
  // Device memory of modules built on hostcall that keep state on the device (net/'s
  // localdevice family uses index 0). Set by Runtime::set_module_state before kernels use
  // it; null when the module is not enabled.
  void* modules[kModuleStates];
  // Per module, up to kModuleHeadBytes that never change while kernels run (sizes,
  // pointers), given to Runtime::set_module_state: read from the block's copy of this
  // context, where the module state itself is a trip to L2 (hostcall::module_head()).
  alignas(16) uint8_t module_heads[kModuleStates][kModuleHeadBytes];
  // How long a submission waits for a free slot before it fails with -EBUSY
  // (RuntimeOptions::slot_wait); 0 waits until shutdown.
  uint64_t slot_wait_ns;
};

}  // namespace gpusock::hostcall
