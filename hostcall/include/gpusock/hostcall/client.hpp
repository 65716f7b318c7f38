// gpusock/hostcall/client.hpp — the device side of a hostcall: submit a call, wait for
// its reply. Portable: the same code runs on a GPU and on the cpu device.
//
//   // A whole warp asks the host one question each; one slot carries all 32.
//   int64_t r = gpusock::hostcall::call(kMyOpcode, key);          // synchronous
//
//   auto t = gpusock::hostcall::submit(kMyOpcode, key);           // asynchronous
//   ... other work, other submissions ...
//   int64_t r2 = gpusock::hostcall::wait(t);
//
// Contract: the lanes that submit together share one slot (the ticket's mask). Every one
// of them must call wait() on its ticket exactly once; they may do so at different
// points of their code, since wait() re-synchronizes exactly those lanes.
#pragma once

#include <cerrno>
#include <cstdint>

#include "gpusock/hostcall/platform.hpp"
#include "gpusock/hostcall/protocol.hpp"
#include "gpusock/hostcall/warp.hpp"

namespace gpusock::hostcall {

#if GPUSOCK_IS_GPU || defined(__CUDACC__)
// Each translation unit compiled by nvcc has its own copy; launch() (instantiated in
// that unit) copies the runtime's context here before the kernel body runs.
static __shared__ DeviceContext gpusock_kernel_context;
#endif

// The runtime this kernel was launched on (GPU: the block's copy in shared memory).
GPUSOCK_HD inline const DeviceContext* context() {
#if GPUSOCK_IS_GPU
  return &gpusock_kernel_context;
#else
  return gpusock::internal::current_lane()->ctx;
#endif
}

// A module's device state (Runtime::set_module_state), or null.
GPUSOCK_HD inline void* module_state(uint32_t index) { return context()->modules[index]; }
// The head given with that state: kModuleHeadBytes, zero where none was given.
GPUSOCK_HD inline const void* module_head(uint32_t index) { return context()->module_heads[index]; }

// Per-thread errno of the POSIX-shaped layers. Lanes never share it: on a GPU it lives
// in a device array indexed by the hardware thread slot (SM, warp slot, lane), which no
// two resident threads share; on the cpu device it is thread_local.
GPUSOCK_HD inline int32_t& errno_ref() {
#if GPUSOCK_IS_GPU
  uint32_t smid, warpid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  asm volatile("mov.u32 %0, %%warpid;" : "=r"(warpid));
  const DeviceContext* c = context();
  // %smid is below %nsmid, which the runtime measured; the modulo only guards against a
  // GPU that numbers SMs past what it reported.
  return c->state.errno_slots[(smid % c->errno_sms) * c->threads_per_sm + warpid * kWarpSize + warp::lane_id()];
#else
  static thread_local int32_t value = 0;
  return value;
#endif
}

inline constexpr uint32_t kNoSlot = 0xffffffffu;

// One lane's handle on a submitted call.
struct Ticket {
  uint32_t slot = kNoSlot;   // kNoSlot: the submission failed and `error` says why
  uint32_t seq = 0;
  uint32_t mask = 0;         // lanes that share the slot
  int32_t error = 0;         // -errno when slot == kNoSlot
  uint32_t staging_page = 0; // first staging page held by the call
  uint32_t staging_pages = 0;
  uint32_t payload_offset = 0; // this lane's payload: byte offset in the staging arena
};

namespace internal {

// Sleeps about `ns` (at most `cap`) on a GPU; on the cpu device, backs off by iteration.
GPUSOCK_HD inline void sleep_ns(uint64_t ns, uint32_t cap, uint32_t iter) {
#if GPUSOCK_IS_GPU
  __nanosleep(ns > cap ? cap : static_cast<uint32_t>(ns));
#else
  (void)ns;
  (void)cap;
  spin_pause(iter);
#endif
}

GPUSOCK_HD inline bool shutting_down(const DeviceContext* c) {
  // System scope: the host sets this flag in mapped memory while the kernel runs; a
  // relaxed load suffices because no data is published with it, only "stop".
  AtomicRef<uint32_t, Scope::kSystem> f(c->control->shutdown);
  return f.load(Order::kRelaxed) != 0;
}

// Why a wait inside the client must end now: -ESHUTDOWN when the runtime shuts down,
// -ECANCELED when the lane's launch was aborted (gpusock::trap()). 0: wait on. Only the
// slow paths call it.
GPUSOCK_HD inline int32_t stop_code(const DeviceContext* c) {
  if (shutting_down(c)) return -ESHUTDOWN;
  if (gpusock::internal::lane_waits_end()) return -ECANCELED;
  return 0;
}

// Per slot, which launch holds it and the staging run taken with it (ClaimRecord), so
// that the runtime can take both back when that launch is aborted (section 18.3 of
// docs/architecture.md). Leader only.
//  - cpu device: note_claim() as the slot (and then the staging run) is taken; the table
//    is on the host, reached through the lane. A cpu lane can be stopped while it waits
//    for staging with the slot in hand, so the record must exist from the start.
//  - GPU: note_published(), once the request is published: the table is in device memory
//    (DeviceState::claims), and writing it earlier would put its atomic under the
//    publishing release, which waits for it (about 0.2 us a call on an H100). A GPU lane
//    stops only at the start of a call or in a wait, never between taking a slot and
//    publishing into it (a wait for staging that ends gives the slot back itself), so the
//    launch has written every record of the slots it holds by the time it has ended.
//    The id is stored with a relaxed (strong) store and cleared with a compare-exchange
//    from the owner's id: operations on one word are ordered, so a late clear never wipes
//    the next owner's id.
#if GPUSOCK_IS_GPU
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE void note_claim(const DeviceContext*, uint32_t, uint32_t, uint32_t) {}
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE void note_published(const DeviceContext* c, uint32_t slot, uint32_t staging_first,
                                                     uint32_t staging_count) {
  ClaimRecord& r = c->state.claims[slot];
  r.staging_first = staging_first;
  r.staging_count = staging_count;
  AtomicRef<uint32_t, Scope::kDevice>(r.launch).store(gpusock::internal::gpusock_launch_id, Order::kRelaxed);
}
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE void clear_claim(const DeviceContext* c, uint32_t slot) {
  // Only if it still names us: the slot's next owner may have written its id already.
  uint32_t mine = gpusock::internal::gpusock_launch_id;
  AtomicRef<uint32_t, Scope::kDevice>(c->state.claims[slot].launch).compare_exchange(mine, 0, Order::kRelaxed);
}
#else
inline void note_claim(const DeviceContext*, uint32_t slot, uint32_t staging_first, uint32_t staging_count) {
  gpusock::internal::cpu_note_claim(slot, staging_first, staging_count);
}
inline void note_published(const DeviceContext*, uint32_t, uint32_t, uint32_t) {}
inline void clear_claim(const DeviceContext*, uint32_t slot) { gpusock::internal::cpu_clear_claim(slot); }
#endif

// Takes a free slot for the calling warp's group; leader lane only.
// Returns 0 and sets *slot. With `wait` false, one pass: -EAGAIN when every slot is taken.
// Otherwise it waits: -EBUSY once DeviceContext::slot_wait_ns has passed without a free
// slot (when non-zero), -ESHUTDOWN if the runtime shuts down, -ECANCELED if the launch
// is aborted. The clock is read only after a full pass found nothing.
GPUSOCK_HD inline int32_t acquire_slot(const DeviceContext* c, uint64_t hint, uint32_t* slot, bool wait = true) {
  const uint32_t nwords = (c->nslots + 31) / 32;
  // Start at the word holding this warp's home slot: with slots_per_warp slots per
  // warp, most acquisitions find a free bit in the first word they look at.
  const uint32_t start = static_cast<uint32_t>((hint * c->slots_per_warp % c->nslots) / 32);
  uint64_t since = 0;  // when the first full pass found every slot taken
  for (uint32_t iter = 0;; ++iter) {
    for (uint32_t i = 0; i < nwords; ++i) {
      uint32_t w = start + i;
      if (w >= nwords) w -= nwords;
      // Device scope: slots are handed between warps of this device only. Acquire pairs
      // with the release in release_slot(), so the previous owner's last read of the slot
      // happens before our first write to it.
      AtomicRef<uint32_t, Scope::kDevice> word(c->state.slot_bitmap[w]);
      uint32_t cur = word.load(Order::kRelaxed);
      while (cur != 0xffffffffu) {
        uint32_t bit = lowest_bit(~cur);
        uint32_t prev = word.fetch_or(1u << bit, Order::kAcquire);
        if ((prev & (1u << bit)) == 0) {
          *slot = w * 32 + bit;
          note_claim(c, *slot, 0, 0);
          return 0;
        }
        cur = prev | (1u << bit);
      }
    }
    if (!wait) return -EAGAIN;
    if (int32_t e = stop_code(c)) return e;
    if (c->slot_wait_ns != 0) {
      const uint64_t now = globaltimer_ns();
      if (since == 0) {
        since = now;
      } else if (now - since >= c->slot_wait_ns) {
        return -EBUSY;
      }
    }
    spin_pause(iter);
  }
}

// One attempt at the calling warp's home slot: a single atomic, no scan. Leader only.
GPUSOCK_HD inline bool try_home_slot(const DeviceContext* c, uint64_t warp, uint32_t* slot) {
  const uint32_t home = static_cast<uint32_t>((warp * c->slots_per_warp) % c->nslots);
  // Acquire, device scope: as in acquire_slot().
  AtomicRef<uint32_t, Scope::kDevice> word(c->state.slot_bitmap[home / 32]);
  uint32_t bit = 1u << (home % 32);
  if ((word.fetch_or(bit, Order::kAcquire) & bit) != 0) return false;
  *slot = home;
  note_claim(c, home, 0, 0);
  return true;
}

GPUSOCK_HD inline uint32_t take_ring_position(const DeviceContext* c) {
  // Relaxed, device scope: positions only need to be unique; the entry written at a
  // position is validated by its tag, not by ordering with this counter.
  return AtomicRef<uint32_t, Scope::kDevice>(*c->state.ring_pos).fetch_add(1, Order::kRelaxed);
}

GPUSOCK_HD inline void ring_doorbell(const DeviceContext* c, uint32_t pos, uint32_t slot, uint32_t seq) {
  // Relaxed, system scope: a doorbell is a hint; the host validates the slot's state
  // (published with release before this) and re-checks if the doorbell overtook it.
  AtomicRef<uint64_t, Scope::kSystem>(c->ring[pos & c->ring_mask])
      .store(make_ring_entry(pos, slot, seq), Order::kRelaxed);
}

// Order of the releases below. What they protect is write-after-read: the next owner's
// writes (and the host's answers to its call) must not reach a slot or staging page
// before our reads of it have returned their values. Issuing a load is not enough: on a
// GPU a load of mapped host memory may still be in flight (a microsecond or more over
// PCIe) when the warp reaches the barrier and the release, and PCIe lets a later write
// from another SM pass an earlier read. A load whose value has been consumed (the
// leader's read of the state word, used to decide to release) is complete. So:
//  - where the last reads of the slot were such a consumed load (an inline reply, a
//    failed submission), the release may be relaxed on a GPU: fire-and-forget, no
//    MEMBAR (free_order());
//  - where the lanes read result words or staging (a reply in the slot, poll's revents),
//    the leader issues one release fence after the warp barrier and before giving the
//    slot and pages back (release_after_reads()): the barrier orders every lane's loads
//    before the fence, and the fence waits for them to be performed.
// The cpu device keeps release order everywhere so ThreadSanitizer sees the hand-over.
GPUSOCK_HD constexpr Order free_order() { return is_gpu() ? Order::kRelaxed : Order::kRelease; }

GPUSOCK_HD inline void release_slot(const DeviceContext* c, uint32_t slot) {
  clear_claim(c, slot);  // before the bit: a later owner's record must not be wiped
  AtomicRef<uint32_t, Scope::kDevice> word(c->state.slot_bitmap[slot / 32]);
  word.fetch_and(~(1u << (slot % 32)), free_order());
}

// Leader only, after a warp barrier that follows every lane's reads of the slot or staging
// (see above): makes those reads complete before the releases that follow it.
GPUSOCK_HD inline void release_after_reads() {
  if (is_gpu()) fence<Scope::kDevice>(Order::kAcqRel);
}

// Claims `npages` (1..kStagingMaxRun) contiguous staging pages; leader lane only.
// Returns 0 and sets *first. Waits while no run fits: that is the backpressure the design
// asks for, never a dropped payload; -ESHUTDOWN or -ECANCELED (aborted launch) end the
// wait. With `wait` false, one pass: -EAGAIN when no run fits now.
GPUSOCK_HD inline int32_t acquire_staging(const DeviceContext* c, uint64_t hint, uint32_t npages,
                                          uint32_t* first, bool wait = true) {
  const uint32_t nwords = (c->staging_pages + 63) / 64;
  const uint64_t run = staging_run_bits(npages);
  const uint32_t start = static_cast<uint32_t>(hint % nwords);
  for (uint32_t iter = 0;; ++iter) {
    for (uint32_t i = 0; i < nwords; ++i) {
      uint32_t w = start + i;
      if (w >= nwords) w -= nwords;
      AtomicRef<uint64_t, Scope::kDevice> word(c->state.staging_bitmap[w]);
      uint64_t cur = word.load(Order::kRelaxed);
      for (uint32_t p = 0; p + npages <= 64;) {
        uint64_t want = run << p;
        if ((cur & want) != 0) {
          ++p;
          continue;
        }
        // Acquire: pairs with release_staging(), as for slots.
        if (word.compare_exchange(cur, cur | want, Order::kAcquire)) {
          *first = w * 64 + p;
          return 0;
        }
        p = 0;  // cur was refreshed by the failed exchange; look again from the start
      }
    }
    if (!wait) return -EAGAIN;
    if (int32_t e = stop_code(c)) return e;
    spin_pause(iter);
  }
}

GPUSOCK_HD inline void release_staging(const DeviceContext* c, uint32_t first, uint32_t npages) {
  if (npages == 0) return;
  const uint64_t run = staging_run_bits(npages);
  AtomicRef<uint64_t, Scope::kDevice> word(c->state.staging_bitmap[first / 64]);
  word.fetch_and(~(run << (first % 64)), free_order());
}

struct alignas(16) Chunk16 {
  uint64_t lo, hi;
};

// Whether both ends of a copy allow 16-byte units.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE bool aligned16(const void* dst, const void* src) {
  return ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0;
}

// Copies n bytes into mapped staging memory, 16 bytes at a time when both sides allow.
GPUSOCK_HD inline void copy_bytes(uint8_t* dst, const uint8_t* src, uint32_t n) {
  uint32_t i = 0;
  if (aligned16(dst, src)) {
    for (; i + 16 <= n; i += 16) {
      *reinterpret_cast<Chunk16*>(dst + i) = *reinterpret_cast<const Chunk16*>(src + i);
    }
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// A 16-byte load that bypasses this SM's L1 (ld.global.cv): the bytes may have been
// written by the host (or by a NIC) since this SM last cached the line.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE Chunk16 load_fresh16(const Chunk16* p) {
#if GPUSOCK_IS_GPU
  uint4 v = __ldcv(reinterpret_cast<const uint4*>(p));
  return Chunk16{(static_cast<uint64_t>(v.y) << 32) | v.x, (static_cast<uint64_t>(v.w) << 32) | v.z};
#else
  return *p;
#endif
}

GPUSOCK_HD GPUSOCK_ALWAYS_INLINE uint8_t load_fresh8(const uint8_t* p) {
#if GPUSOCK_IS_GPU
  return static_cast<uint8_t>(__ldcv(reinterpret_cast<const unsigned char*>(p)));
#else
  return *p;
#endif
}

// Loads each lane keeps in flight before its first store, in group_copy(): a copy out of
// host memory (a lent receive buffer) waits about one bus round trip per batch of loads,
// so a lane alone copying 1 KiB (64 units of 16 bytes) waits 64 / kCopyUnroll round trips.
// Each unit held costs four registers. A build may set GPUSOCK_COPY_UNROLL to try others.
#ifndef GPUSOCK_COPY_UNROLL
#define GPUSOCK_COPY_UNROLL 8
#endif
inline constexpr uint32_t kCopyUnroll = GPUSOCK_COPY_UNROLL;
static_assert(kCopyUnroll >= 1 && kCopyUnroll <= 64, "GPUSOCK_COPY_UNROLL: 1..64");
// Single bytes each lane keeps in flight per batch where 16-byte units don't apply
// (unaligned buffers, and the bytes after the last whole unit).
inline constexpr uint32_t kCopyBytes = 4;

// The pieces of group_copy() on a GPU (below). They compile for the host too, so that
// tests run them there: copy_share() for every lane of a split, against copy_rounds().
template <bool kFresh>
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE Chunk16 load16_as(const uint8_t* p) {
  const Chunk16* c = reinterpret_cast<const Chunk16*>(p);
  if constexpr (kFresh) return load_fresh16(c);
  else return *c;
}
template <bool kFresh>
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE uint8_t load8_as(const uint8_t* p) {
  if constexpr (kFresh) return load_fresh8(p);
  else return *p;
}

GPUSOCK_HD GPUSOCK_ALWAYS_INLINE uint32_t div_up(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

// Batches of loads (each one round of memory latency) one lane spends on its share of an
// n-byte copy split across `step` lanes: what copy_share() below does, counted. The
// lane that is `first` 0 has the most of both kinds, so this is the split's longest lane.
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE uint32_t copy_rounds(const uint8_t* d, const uint8_t* s, uint32_t n, uint32_t step) {
  // Bytes the byte loop handles, and the units before them.
  const uint32_t units = aligned16(d, s) ? n / 16 : 0;
  const uint32_t bytes = n - units * 16;
  return div_up(div_up(units, step), kCopyUnroll) + div_up(div_up(bytes, step), kCopyBytes);
}

// This lane's share of an n-byte copy split across `step` lanes, the lane being `first` of
// them: 16-byte units first, first + step, ... where both pointers are 16-byte aligned,
// then the bytes after the last whole unit (or every byte, unaligned) the same way. Each
// batch issues all its loads before its first store, and a batch's last units are
// predicated rather than left to a loop, so a short tail costs one round, not one per unit.
// `batches`, where given, counts the batches (tests; group_copy passes none).
template <bool kFresh>
GPUSOCK_HD GPUSOCK_ALWAYS_INLINE void copy_share(uint8_t* d, const uint8_t* s, uint32_t n, uint32_t first, uint32_t step,
                                                 uint32_t* batches = nullptr) {
  // Offsets stay 32-bit: `left` (bytes from i to the end) never overflows, and a batch
  // stops where the next would start past the end.
  uint32_t head = 0;
  if (aligned16(d, s)) {
    head = n & ~15u;
    const uint32_t stride = step * 16, batch = kCopyUnroll * stride;
    for (uint32_t i = first * 16; i < head; i += batch) {
      const uint32_t left = head - i;
      if (batches != nullptr) ++*batches;
      Chunk16 v[kCopyUnroll];
      GPUSOCK_UNROLL
      for (uint32_t u = 0; u < kCopyUnroll; ++u) {
        v[u] = Chunk16{0, 0};
        if (u * stride < left) v[u] = load16_as<kFresh>(s + i + u * stride);
      }
      GPUSOCK_UNROLL
      for (uint32_t u = 0; u < kCopyUnroll; ++u) {
        if (u * stride < left) *reinterpret_cast<Chunk16*>(d + i + u * stride) = v[u];
      }
      if (left <= batch) break;
    }
  }
  for (uint32_t i = head + first; i < n; i += kCopyBytes * step) {
    const uint32_t left = n - i;
    if (batches != nullptr) ++*batches;
    uint8_t v[kCopyBytes];
    GPUSOCK_UNROLL
    for (uint32_t u = 0; u < kCopyBytes; ++u) {
      v[u] = 0;
      if (u * step < left) v[u] = load8_as<kFresh>(s + i + u * step);
    }
    GPUSOCK_UNROLL
    for (uint32_t u = 0; u < kCopyBytes; ++u) {
      if (u * step < left) d[i + u * step] = v[u];
    }
    if (left <= kCopyBytes * step) break;
  }
}

#if GPUSOCK_IS_GPU
template <bool kFresh>
__device__ inline void group_copy_gpu(uint32_t mask, uint8_t* dst, const uint8_t* src, uint32_t n) {
  const uint32_t me = warp::lane_id();
  const uint32_t rank = popcount(mask & ((1u << me) - 1));
  const uint32_t width = popcount(mask);
  // Two ways to copy: each lane its own bytes, or the lanes together, one lane's bytes
  // after another's. Together, stores leave as coalesced lines, but the group waits out
  // every lane's bytes in turn; alone, the lanes' rounds overlap. Count both (a buffer on
  // a lane's stack is copied by that lane alone either way) and take the one with fewer
  // rounds: together for one lane's bulk bytes, alone for many lanes' short messages.
  const bool global = n != 0 && __isGlobal(dst) && __isGlobal(src);
  const uint32_t alone = copy_rounds(dst, src, n, 1);
  const uint32_t shared = global ? copy_rounds(dst, src, n, width) : alone;
  if (__reduce_max_sync(mask, alone) < __reduce_add_sync(mask, shared)) {
    copy_share<kFresh>(dst, src, n, 0, 1);
    warp::sync(mask);
    return;
  }
  for (uint32_t m = mask; m != 0; m &= m - 1) {
    const uint32_t owner = lowest_bit(m);
    uint8_t* d = reinterpret_cast<uint8_t*>(warp::shfl(mask, reinterpret_cast<uintptr_t>(dst), owner));
    const uint8_t* s = reinterpret_cast<const uint8_t*>(warp::shfl(mask, reinterpret_cast<uintptr_t>(src), owner));
    const uint32_t len = warp::shfl(mask, n, owner);
    if (len == 0) continue;
    // Every lane sees the same pointers, so every lane makes the same choice.
    const bool together = __isGlobal(d) && __isGlobal(s);
    if (!together && me != owner) continue;
    copy_share<kFresh>(d, s, len, together ? rank : 0, together ? width : 1);
  }
  warp::sync(mask);
}
#endif

// Copies each lane's n bytes from src to dst; all lanes of mask must call. On a GPU the
// lanes either copy their own bytes each or, where a lane's buffers are both in global
// memory, copy that lane's bytes together, 16 bytes per lane per unit, so stores to mapped
// memory go out as full, coalesced lines; whichever takes fewer rounds of loads (above). A
// buffer in a lane's local memory (its stack) is private to that lane, so the lane copies
// it alone. On the cpu device each lane copies its own (its lanes are threads: a warp step
// there is a barrier, not a cycle). `fresh` loads bypass this SM's L1 (ld.global.cv): for
// bytes the host wrote, such as a receive buffer the host lent.
GPUSOCK_HD inline void group_copy(uint32_t mask, uint8_t* dst, const uint8_t* src, uint32_t n, bool fresh = false) {
  if constexpr (!is_gpu()) {
    copy_bytes(dst, src, n);
  } else {
#if GPUSOCK_IS_GPU
    if (fresh) group_copy_gpu<true>(mask, dst, src, n);
    else group_copy_gpu<false>(mask, dst, src, n);
#endif
  }
}

// Writes a request's header fields (not the state) as two 16-byte stores; the layout is
// SlotHeader's, little-endian; flags are 0; `seq` is the request's, as in its state word.
GPUSOCK_HD inline void write_request(SlotHeader& h, uint32_t opcode, uint32_t mask, uint32_t nargs,
                                     uint32_t staging_first, uint32_t staging_count, uint32_t seq,
                                     uint64_t origin) {
  store16(&h.opcode, (static_cast<uint64_t>(mask) << 32) | opcode,
          (static_cast<uint64_t>(staging_first) << 32) | (nargs & 0xffffu));
  store16(&h.staging_count, (static_cast<uint64_t>(seq) << 32) | staging_count, origin);
}

// The core of every submission. Lanes that arrive together and ask for the same opcode
// form one group and share one slot. Each lane contributes `nargs` words and, if
// `payload_len` > 0, that many bytes copied into staging; the payload's (offset, length)
// within the staging arena are appended as two more argument words.
//
// `group` is what lanes must agree on to share the call: the opcode, unless the caller
// keeps some calls of one opcode apart (a recv that asks again after a partial or refused
// answer must not share a call with other lanes' first recvs, which may block on peers
// that wait for this very lane; lanes that call together are answered together).
//
// `wait` false (try_submit): a submission that finds no free slot, or no staging run that
// fits, fails with -EAGAIN instead of waiting. The fast path is the same either way.
// One attempt; submit_raw() below repeats it for the lanes that hold a LaneStopHold when
// the launch was aborted (GPU).
GPUSOCK_HD inline Ticket submit_once(uint32_t opcode, const uint64_t* args, uint32_t nargs,
                                     const void* payload, uint32_t payload_len, bool has_payload,
                                     uint64_t group, bool wait) {
  Ticket t;
  // A lane of an aborted launch stops here, unless it holds a LaneStopHold (a destructor
  // cleaning up, closing a socket: its call is made and waited for, so that what it gives
  // back is given back), or, on the cpu device, unwinds already. cpu device: at once. GPU:
  // the leader reads the launch's abort word beside its first atomics, and the group's
  // lanes stop together below (submit_raw()).
  (void)gpusock::internal::lane_stop();
  const DeviceContext* c = context();
  const uint32_t me = warp::lane_id();
  // Lanes that arrive together and agree on `group` share one slot.
  uint32_t mask = warp::converge_match(group);

  // Lay the group's payloads out back to back, each 16-byte aligned. A group whose payloads
  // do not fit one staging run splits: the lanes whose payloads fit, in lane order, go
  // together, and the rest split again, each part a call of its own. A lane whose payload
  // alone is larger than a run gets -EMSGSIZE.
  uint32_t payload_off = 0, payload_total = 0;
  if (has_payload) {
    constexpr uint32_t kRunBytes = kStagingMaxRun * kStagingPageBytes;
    const uint64_t padded = (static_cast<uint64_t>(payload_len) + 15u) & ~15ull;
    const uint32_t too_big = warp::ballot(mask, padded > kRunBytes);
    if (too_big != 0) {
      if ((too_big >> me) & 1u) {
        t.error = -EMSGSIZE;
        return t;
      }
      mask &= ~too_big;
    }
    for (;;) {
      payload_off = warp::exclusive_sum(mask, static_cast<uint32_t>(padded), payload_total);
      if (payload_total <= kRunBytes) break;
      const uint32_t fits = warp::ballot(mask, payload_off + padded <= kRunBytes);
      mask = ((fits >> me) & 1u) ? fits : (mask & ~fits);
    }
  }
  const uint32_t lead = warp::leader(mask);
  t.mask = mask;
  const uint32_t npages = (payload_total + kStagingPageBytes - 1) / kStagingPageBytes;

  uint64_t a = 0, b = 0;
  uint32_t pos = 0;  // leader: the doorbell position; its low bits are the request's seq
  if (me == lead) {
    uint32_t slot = kNoSlot, page = 0;
    int32_t err = 0;
    // The ring position and the home slot come from independent atomics, so their round
    // trips to L2 overlap.
#if GPUSOCK_IS_GPU
    // Issued first; its answer is needed only after the two atomics below have issued.
    // Lanes that all hold a LaneStopHold go on (read only once the launch is aborted).
    const bool stopping = gpusock::internal::launch_aborted() &&
                          (mask & ~AtomicRef<uint32_t, Scope::kBlock>(gpusock::internal::stop_holds_of_warp())
                                      .load(Order::kRelaxed)) != 0;
#else
    constexpr bool stopping = false;
#endif
    pos = take_ring_position(c);
    const bool home = npages == 0 && try_home_slot(c, global_warp_id(), &slot);
    if (stopping) {
      // The launch was aborted: give back what we took, and stop the group below.
      if (home) release_slot(c, slot);
      ring_doorbell(c, pos, kFillerSlot, 0);
      slot = kNoSlot;
      err = -ECANCELED;
    } else if (home) {
      // fast path: one slot, no staging
    } else {
      // Slow path: we may wait here (for a slot or staging). Give the position back as
      // a filler first, so no later doorbell queues behind one we might not write soon.
      ring_doorbell(c, pos, kFillerSlot, 0);
      if (npages > kStagingMaxRun) {
        err = -EMSGSIZE;
      } else {
        err = acquire_slot(c, global_warp_id(), &slot, wait);
        if (err == 0 && npages > 0) {
          err = acquire_staging(c, global_warp_id() + slot, npages, &page, wait);
          if (err != 0) {
            release_slot(c, slot);
            slot = kNoSlot;
          } else {
            note_claim(c, slot, page, npages);
          }
        }
      }
      if (err == 0) pos = take_ring_position(c);
    }
    a = (static_cast<uint64_t>(pos & kSeqMask) << 32) | slot;
    b = (static_cast<uint64_t>(page) << 32) | static_cast<uint32_t>(err);
  }
  a = warp::shfl(mask, a, lead);
  b = warp::shfl(mask, b, lead);
  t.slot = static_cast<uint32_t>(a);
  t.seq = static_cast<uint32_t>(a >> 32);
  t.error = static_cast<int32_t>(static_cast<uint32_t>(b));
  if (t.error != 0) {
    t.slot = kNoSlot;
    return t;
  }
  t.staging_page = static_cast<uint32_t>(b >> 32);
  t.staging_pages = npages;

  Slot* s = c->slots + t.slot;
  for (uint32_t k = 0; k < nargs; ++k) s->data[k][me] = args[k];
  s->tag[me] = request_tag(t.seq);  // this lane takes part in this request (see Slot::tag)
  uint32_t total_args = nargs;
  if (has_payload) {
    uint64_t off = static_cast<uint64_t>(t.staging_page) * kStagingPageBytes + payload_off;
    t.payload_offset = static_cast<uint32_t>(off);
    group_copy(mask, c->staging + off, static_cast<const uint8_t*>(payload), payload_len);
    s->data[nargs][me] = off;
    s->data[nargs + 1][me] = payload_len;
    total_args += 2;
  }
  // Every lane's tag, argument and payload stores happen before the leader's release
  // below: the warp barrier orders them before the leader's next instruction, and the
  // release is cumulative, so the host that acquires `state` sees all of them.
  warp::sync(mask);
  if (me == lead) {
    write_request(s->hdr, opcode, mask, total_args, t.staging_page, t.staging_pages, t.seq, global_warp_id());
    // System scope release: publishes header, arguments and payload to host threads.
    AtomicRef<uint64_t, Scope::kSystem>(s->hdr.state).store(make_state(t.seq, kRequest), Order::kRelease);
    ring_doorbell(c, pos, t.slot, t.seq);
    note_published(c, t.slot, t.staging_page, t.staging_pages);
  }
  return t;
}

GPUSOCK_HD inline Ticket submit_raw(uint32_t opcode, const uint64_t* args, uint32_t nargs,
                                    const void* payload, uint32_t payload_len, bool has_payload,
                                    uint64_t group, bool wait = true) {
  for (;;) {
    Ticket t = submit_once(opcode, args, nargs, payload, payload_len, has_payload, group, wait);
#if GPUSOCK_IS_GPU
    // -ECANCELED: the launch was aborted, before this call or while it waited for a slot
    // or staging, and the group took nothing. Its lanes stop here; those that hold a
    // LaneStopHold try again among themselves, and then go on.
    if (t.error == -ECANCELED) {
      if (!gpusock::internal::lane_holds_stop()) gpusock::internal::exit_lane();
      continue;
    }
#endif
    return t;
  }
}

}  // namespace internal

// Submits a call with up to kMaxArgs argument words per lane. Never blocks on the host;
// may wait for a free slot, at most RuntimeOptions::slot_wait. Returns a ticket; a failed
// submission carries -errno: -EBUSY (no slot freed within slot_wait: more tickets are
// held than the pool has slots, see try_submit), -ESHUTDOWN, -ECANCELED (aborted launch).
template <typename... A>
GPUSOCK_HD inline Ticket submit(uint32_t opcode, A... args) {
  static_assert(sizeof...(A) <= kMaxArgs, "too many hostcall arguments");
  uint64_t words[sizeof...(A) + 1] = {static_cast<uint64_t>(args)...};
  return internal::submit_raw(opcode, words, sizeof...(A), nullptr, 0, false, opcode);
}

// As submit(), grouped by `group` instead of the opcode: lanes share a call only with
// lanes that pass the same group (submit_raw() says why one would).
template <typename... A>
GPUSOCK_HD inline Ticket submit_grouped(uint64_t group, uint32_t opcode, A... args) {
  static_assert(sizeof...(A) <= kMaxArgs, "too many hostcall arguments");
  uint64_t words[sizeof...(A) + 1] = {static_cast<uint64_t>(args)...};
  return internal::submit_raw(opcode, words, sizeof...(A), nullptr, 0, false, group);
}

// As submit(), plus `len` bytes at `data` copied into staging for the host to read. The
// host handler finds them through the two argument words after `args`. Waits while no
// staging run fits (backpressure, no time bound). -EMSGSIZE when one lane's `len` is
// larger than a staging run (kStagingMaxRun pages, 256 KiB).
template <typename... A>
GPUSOCK_HD inline Ticket submit_with_payload(uint32_t opcode, const void* data, uint32_t len, A... args) {
  static_assert(sizeof...(A) + 2 <= kMaxArgs, "too many hostcall arguments");
  uint64_t words[sizeof...(A) + 1] = {static_cast<uint64_t>(args)...};
  return internal::submit_raw(opcode, words, sizeof...(A), data, len, true, opcode);
}

// As submit(), but never waits for the pools: when no slot is free (and the warp's home
// slot is taken) the ticket carries -EAGAIN at once, and the caller decides (wait on a
// ticket it holds, do other work, try again). The path that finds a slot is submit()'s,
// at the same cost. For kernels that keep many tickets in flight.
template <typename... A>
GPUSOCK_HD inline Ticket try_submit(uint32_t opcode, A... args) {
  static_assert(sizeof...(A) <= kMaxArgs, "too many hostcall arguments");
  uint64_t words[sizeof...(A) + 1] = {static_cast<uint64_t>(args)...};
  return internal::submit_raw(opcode, words, sizeof...(A), nullptr, 0, false, opcode, false);
}

// As submit_with_payload(), but -EAGAIN at once when no slot or no staging run is free.
template <typename... A>
GPUSOCK_HD inline Ticket try_submit_with_payload(uint32_t opcode, const void* data, uint32_t len, A... args) {
  static_assert(sizeof...(A) + 2 <= kMaxArgs, "too many hostcall arguments");
  uint64_t words[sizeof...(A) + 1] = {static_cast<uint64_t>(args)...};
  return internal::submit_raw(opcode, words, sizeof...(A), data, len, true, opcode, false);
}

namespace internal {
// The body of wait() and wait_keep_staging(). With keep == false it gives the slot and
// staging back; with keep == true it leaves them to release(). On -ESHUTDOWN the host may
// still write the slot, so neither is ever given back: *abandoned is set.
GPUSOCK_HD inline int64_t wait_impl(const Ticket& t, uint64_t* out, uint32_t nout, bool keep, bool* abandoned) {
  for (uint32_t k = 0; k < nout; ++k) out[k] = 0;
  if (t.slot == kNoSlot) return t.error;
  const DeviceContext* c = context();
  const uint32_t me = warp::lane_id();
  const uint32_t lead = warp::leader(t.mask);
  Slot* s = c->slots + t.slot;
  uint64_t st = 0;
  int32_t stop = 0;  // leader: why it stopped waiting, when it did
  if (me == lead) {
    // Poll with relaxed system-scope loads: an inline reply carries its result in the
    // word itself, so nothing needs ordering after it; a reply with data in the slot
    // gets one acquire fence below, once, instead of one per poll.
    AtomicRef<uint64_t, Scope::kSystem> state(s->hdr.state);
    const uint64_t start = is_gpu() ? globaltimer_ns() : 0;
    // The cpu device polls with acquire loads instead: they cost nothing extra on x86, and
    // ThreadSanitizer does not model a relaxed load followed by a fence.
    constexpr Order kPoll = is_gpu() ? Order::kRelaxed : Order::kAcquire;
    for (uint32_t i = 0;; ++i) {
      st = state.load(kPoll);
      if (state_seq(st) == (t.seq & kSeqMask) && state_phase(st) >= kReply) break;
      // Each poll is a read across the bus (about a microsecond on a GPU), so checking
      // the shutdown flag every 64 polls bounds the exit delay without slowing replies.
      if ((i & 63) == 63 && (stop = internal::stop_code(c)) != 0) {
        st = 0;
        break;
      }
      // Poll back-to-back for the first few reads (a reply usually lands within them),
      // then sleep about an eighth of the time waited so far, up to 50 us: thousands of
      // waiting warps polling every microsecond would flood the bus with reads and slow
      // the very replies they wait for. The added delay stays below ~1/8 of the wait.
      // The cpu device backs off by iteration alone (sleep_ns): reading the clock on
      // every poll there is a system call where the clock source has no vDSO path (a
      // VM's HPET), and it took a third of a waiting lane's time in the RDMA VM.
      if (i >= 8) internal::sleep_ns(is_gpu() ? (globaltimer_ns() - start) / 8 : 0, 50000, i);
    }
    // Pairs with the host's release store of kReply: the result words it wrote before
    // are visible to the loads below. An inline reply needs no such fence.
    if (is_gpu() && state_phase(st) == kReply) fence<Scope::kSystem>(Order::kAcquire);
  }
  // The shuffle hands every lane the reply word. For a reply with data in the slot, the
  // barrier then orders the leader's acquire fence before every lane's result loads.
  st = warp::shfl(t.mask, st, lead);
  if (st == 0) {
    *abandoned = true;
    // The host may still write this slot: never reuse it. (After an abort the runtime
    // takes it back once the launch has ended.)
    return static_cast<int32_t>(warp::shfl(t.mask, static_cast<uint32_t>(stop), lead));
  }

  int64_t ret;
  const bool in_slot = state_phase(st) == kReply;
  if (!in_slot) {
    ret = state_inline(st);
  } else {
    warp::sync(t.mask);
    // System-scope loads: the lanes wrote arguments to these very words, and a plain
    // load could be served from a stale L1 line.
    using Sys64 = AtomicRef<uint64_t, Scope::kSystem>;
    ret = static_cast<int64_t>(Sys64(s->data[0][me]).load(Order::kRelaxed));
    if (nout > 0) {
      uint32_t nres = AtomicRef<uint32_t, Scope::kSystem>(s->hdr.nresults).load(Order::kRelaxed);
      for (uint32_t k = 1; k <= nout && k < nres && k < kMaxArgs; ++k) {
        out[k - 1] = Sys64(s->data[k][me]).load(Order::kRelaxed);
      }
    }
    // Every lane has issued its result loads before this barrier; the leader's
    // release_after_reads() below makes them complete before the slot goes back to the
    // pool. (An inline reply was read by the leader alone, before the shuffle.)
    if (!keep) warp::sync(t.mask);
  }
  if (!keep && me == lead) {
    if (in_slot) internal::release_after_reads();
    internal::release_staging(c, t.staging_page, t.staging_pages);
    internal::release_slot(c, t.slot);
  }
  return ret;
}
}  // namespace internal

// Waits for the reply to `t`. Returns this lane's result word 0 (by convention a value
// or -errno); copies result words 1..nout into out[0..nout-1] (zero where the host
// wrote fewer). Returns -ESHUTDOWN if the runtime shuts down first, -ECANCELED if the
// launch is aborted first; the slot is then left to the runtime.
GPUSOCK_HD inline int64_t wait(const Ticket& t, uint64_t* out = nullptr, uint32_t nout = 0) {
  bool abandoned = false;
  return internal::wait_impl(t, out, nout, false, &abandoned);
}

// As wait(), but the call keeps its slot and staging pages until release(t), so the lanes
// can read what the host wrote back into their payloads (poll's revents; see
// payload_view()). Every lane of the call must call release(t) after it, together. On
// -ESHUTDOWN the ticket is emptied, so release() then gives nothing back.
GPUSOCK_HD inline int64_t wait_keep_staging(Ticket& t, uint64_t* out = nullptr, uint32_t nout = 0) {
  bool abandoned = false;
  int64_t r = internal::wait_impl(t, out, nout, true, &abandoned);
  if (abandoned) t.slot = kNoSlot;
  return r;
}

// This lane's payload bytes of a call waited with wait_keep_staging(), as the host left
// them (device address; read them with fresh loads, as internal::group_copy() does).
GPUSOCK_HD inline uint8_t* payload_view(const Ticket& t) { return context()->staging + t.payload_offset; }

// Gives the slot and staging of a call waited with wait_keep_staging() back. Every lane of
// the call calls it together.
GPUSOCK_HD inline void release(const Ticket& t) {
  if (t.slot == kNoSlot) return;
  const DeviceContext* c = context();
  // Every lane has read its results and payload before they go back to the pools.
  warp::sync(t.mask);
  if (warp::lane_id() == warp::leader(t.mask)) {
    internal::release_after_reads();
    internal::release_staging(c, t.staging_page, t.staging_pages);
    internal::release_slot(c, t.slot);
  }
}

// submit() then wait(): the synchronous call.
template <typename... A>
GPUSOCK_HD inline int64_t call(uint32_t opcode, A... args) {
  return wait(submit(opcode, args...));
}

}  // namespace gpusock::hostcall
