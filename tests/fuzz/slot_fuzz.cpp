// libFuzzer target for everything a kernel can write that the host decodes: the slot
// header, the argument words and payload descriptors (hostcall/src/decode.hpp, the checks
// of docs section 6), the doorbell ring entry, and the socket opcodes' argument words
// (net/src/decode.hpp, section 12.3), against a staging arena the target makes up.
//
// Input: 64 bytes of SlotHeader as the kernel wrote them; one byte for the arena's size
// (1..80 pages); one byte picking a socket opcode (0x0100 + b % 16; 15 is the core's
// descriptor write); a ring entry (8), the ring head (4), nslots (4), a slot state word
// (8), an arbitrary arena size (8); then argument words, lane by lane for the lanes in
// the mask, word by word up to nargs. Missing bytes read as zero.
//
// Checked, each against a model written here from the docs rather than the code:
//  - check_header: -EINVAL exactly for mask 0, nargs > 8 or flags != 0, else -ENOSYS
//    exactly for opcode >= 0x10000, else 0; no other header field changes the answer;
//  - check_payload with any arena size: 0 exactly when [off, off + len) lies inside the
//    call's pages and the arena (computed in 128 bits), else -EFAULT;
//  - every descriptor pair of every lane, as Call::payload resolves it: a view it hands
//    out lies inside the call's staging pages; the first and last byte are read (ASan
//    sees a read past the arena, which is allocated at its exact size);
//  - decode_ring_entry: an entry written for position p decodes, at head p, to its slot
//    and seq (or a filler); an older lap's never does; a later lap's says where to jump;
//  - classify_doorbell: the seq distance rules of section 4.4; make_state round-trips;
//  - decode_request for the chosen socket opcode, every lane: the result is 0, 1 (a
//    send lane riding along) or the documented -EINVAL / -EFAULT, equal to the model;
//    fields land where protocol.hpp says; req.data, when set, lies inside the call's
//    pages and has the documented size (sockaddr <= 128, option <= 32, poll nfds x 8);
//    a poll array is written back (revents) in place, inside the arena.
#include <sys/socket.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>

#include "hostcall/src/decode.hpp"
#include "fuzz_util.hpp"
#include "gpusock/hostcall/opcodes.hpp"
#include "gpusock/hostcall/protocol.hpp"
#include "gpusock/net/protocol.hpp"
#include "net/src/decode.hpp"

namespace {

namespace hc = gpusock::hostcall;
namespace net = gpusock::net;
using gpusock::internal::check_header;
using gpusock::internal::check_payload;
using u128 = unsigned __int128;

constexpr uint32_t kPage = 4096;
constexpr uint32_t kMaxArenaPages = 80;

// The arena of `pages` pages, allocated at exactly that size, kept between runs.
uint8_t* arena(uint32_t pages) {
  static std::unique_ptr<uint8_t[]> arenas[kMaxArenaPages + 1];
  if (!arenas[pages]) {
    arenas[pages].reset(new uint8_t[size_t{pages} * kPage]);
    std::memset(arenas[pages].get(), 0x5a, size_t{pages} * kPage);
  }
  return arenas[pages].get();
}

int model_header(const hc::SlotHeader& h) {
  if (h.lane_mask == 0 || h.nargs > 8 || h.flags != 0) return -EINVAL;
  if (h.opcode >= 0x10000) return -ENOSYS;
  return 0;
}

int model_payload(uint64_t off, uint64_t len, uint32_t first, uint32_t count, uint64_t arena_bytes) {
  const u128 lo = u128{first} * kPage;
  u128 hi = (u128{first} + count) * kPage;
  if (hi > arena_bytes) hi = arena_bytes;
  const u128 end = u128{off} + len;
  return off >= lo && end <= hi ? 0 : -EFAULT;
}

void check_header_fields(const hc::SlotHeader& hdr) {
  const int r = check_header(hdr);
  FUZZ_CHECK(r == model_header(hdr));
  // Only opcode, lane_mask, nargs and flags matter.
  hc::SlotHeader other = hdr;
  other.state = ~hdr.state;
  other.nresults = ~hdr.nresults;
  other.reserved0 = ~hdr.reserved0;
  other.seq = ~hdr.seq;  // checked against the state by check_tags, not here
  other.origin = ~hdr.origin;
  other.staging_first = ~hdr.staging_first;
  other.staging_count = ~hdr.staging_count;
  for (auto& b : other.reserved) b = static_cast<uint8_t>(~b);
  FUZZ_CHECK(check_header(other) == r);
}

// One lane of a call, built the way Core builds a Call: argument words copied out of the
// slot, payload() resolved against the header's staging pages in the arena.
struct FakeLane {
  const uint64_t* words;  // this lane's words, [0, nargs)
  uint32_t nargs;
  uint32_t first, count;
  uint8_t* base;
  uint64_t arena_bytes;

  uint64_t arg(uint32_t k) const { return k < nargs ? words[k] : 0; }
  int payload(uint32_t k, std::span<const uint8_t>* out) const {
    if (k + 1 >= nargs) return -EINVAL;  // Call::payload's contract
    const uint64_t off = words[k], len = words[k + 1];
    if (int e = check_payload(off, len, first, count, arena_bytes); e != 0) return e;
    *out = std::span<const uint8_t>(base + off, len);
    return 0;
  }
  int model_payload_at(uint32_t k, uint64_t* len) const {
    if (k + 1 >= nargs) return -EINVAL;
    *len = words[k + 1];
    return model_payload(words[k], words[k + 1], first, count, arena_bytes);
  }
  // A view handed out must lie in the call's own pages.
  void check_inside(std::span<const uint8_t> v) const {
    const uint8_t* lo = base + uint64_t{first} * kPage;
    const uint64_t held = uint64_t{count} * kPage;
    const uint64_t room = arena_bytes - uint64_t{first} * kPage;
    const uint8_t* hi = lo + (held < room ? held : room);
    FUZZ_CHECK(v.data() >= lo && v.data() + v.size() <= hi);
    if (!v.empty()) {
      volatile uint8_t sink = v.front();
      sink = v.back();
      (void)sink;
    }
  }
};

// The model of section 12.3 for one lane. Returns the expected result and the payload's
// length when one is expected to be handed over.
int model_request(const FakeLane& l, net::Op op, bool descriptor_write) {
  uint64_t len = 0;
  if (descriptor_write) return l.model_payload_at(1, &len);
  switch (op) {
    case net::Op::kBind:
    case net::Op::kConnect: {
      if (int e = l.model_payload_at(1, &len); e != 0) return e;
      return len <= sizeof(sockaddr_storage) ? 0 : -EINVAL;
    }
    case net::Op::kSend: {
      const uint32_t addr_len = static_cast<uint32_t>(l.arg(1) >> 32);
      if (addr_len == 0xffff) return 1;
      if (addr_len == 0xfffe) return l.arg(2) != 0 && l.arg(3) != 0 && l.arg(3) <= (64ull << 20) ? 0 : -EINVAL;
      if (addr_len > 32) return -EINVAL;
      return l.model_payload_at(6, &len);
    }
    case net::Op::kSetsockopt: {
      if (int e = l.model_payload_at(3, &len); e != 0) return e;
      return len <= 32 ? 0 : -EINVAL;
    }
    case net::Op::kPoll: {
      const uint64_t nfds = l.arg(0);
      if (nfds > 4096) return -EINVAL;
      if (int e = l.model_payload_at(2, &len); e != 0) return e;
      return len == nfds * 8 ? 0 : -EINVAL;
    }
    default:
      return 0;  // no payload, no size to check: the backend judges the values
  }
}

void check_request(const FakeLane& l, uint32_t opcode, bool descriptor_write) {
  const net::OpInfo info = net::op_info(opcode);
  FUZZ_CHECK(info.results >= 1 && info.results <= hc::kMaxArgs);
  net::Request req;
  const int r = net::decode_request(l, info.op, descriptor_write, req);
  FUZZ_CHECK(r == 0 || r == 1 || r == -EINVAL || r == -EFAULT);
  FUZZ_CHECK(r == model_request(l, info.op, descriptor_write));
  if (r != 0) return;
  const auto arg32 = [&](uint32_t k) { return static_cast<int32_t>(l.arg(k)); };
  if (descriptor_write) {
    FUZZ_CHECK(req.op == net::Op::kSend && req.fd == arg32(0));
    FUZZ_CHECK(req.data.size() == l.arg(2));
    l.check_inside(req.data);
    return;
  }
  FUZZ_CHECK(req.op == info.op);
  switch (info.op) {
    case net::Op::kSocket:
      FUZZ_CHECK(req.a[0] == arg32(0) && req.a[1] == arg32(1) && req.a[2] == arg32(2));
      break;
    case net::Op::kBind:
    case net::Op::kConnect:
      FUZZ_CHECK(req.fd == arg32(0) && req.data.size() <= sizeof(sockaddr_storage));
      l.check_inside(req.data);
      break;
    case net::Op::kSend: {
      FUZZ_CHECK(req.fd == arg32(0) && req.a[0] == static_cast<int32_t>(static_cast<uint32_t>(l.arg(1))));
      if ((l.arg(1) >> 32) == net::kPullSource) {
        // Bytes left in device memory: only their address and length travel.
        FUZZ_CHECK(req.src == l.arg(2) && req.a[1] == static_cast<int64_t>(l.arg(3)));
        FUZZ_CHECK(req.addr_len == 0 && req.data.empty());
        break;
      }
      FUZZ_CHECK(req.src == 0);
      FUZZ_CHECK(req.addr_len == (l.arg(1) >> 32) && req.addr_len <= net::kMaxAddrBytes);
      for (uint32_t k = 0; k < 4; ++k) {
        uint64_t w;
        std::memcpy(&w, req.addr + 8 * k, 8);
        FUZZ_CHECK(w == l.arg(2 + k));
      }
      FUZZ_CHECK(req.data.size() == l.arg(7));
      l.check_inside(req.data);
      break;
    }
    case net::Op::kSetsockopt:
      FUZZ_CHECK(req.fd == arg32(0) && req.a[0] == arg32(1) && req.a[1] == arg32(2));
      FUZZ_CHECK(req.data.size() <= net::kMaxOptBytes);
      l.check_inside(req.data);
      break;
    case net::Op::kPoll: {
      FUZZ_CHECK(req.a[0] == static_cast<int64_t>(l.arg(0)) && req.a[1] == arg32(1));
      FUZZ_CHECK(req.data.size() == l.arg(0) * 8);
      l.check_inside(req.data);
      // The backend answers revents in place, in the call's own pages.
      for (size_t i = 6; i + 2 <= req.data.size(); i += 8) req.data[i] = req.data[i + 1] = 0;
      break;
    }
    case net::Op::kRecv:
      FUZZ_CHECK(req.fd == arg32(0) && req.a[0] == arg32(1) && req.a[1] == static_cast<uint32_t>(l.arg(2)));
      FUZZ_CHECK(req.data.empty());
      break;
    case net::Op::kGetsockopt:
      FUZZ_CHECK(req.fd == arg32(0) && req.a[0] == arg32(1) && req.a[1] == arg32(2) &&
                 req.a[2] == static_cast<uint32_t>(l.arg(3)));
      break;
    case net::Op::kListen:
    case net::Op::kAccept:
    case net::Op::kShutdown:
      FUZZ_CHECK(req.fd == arg32(0) && req.a[0] == arg32(1));
      break;
    case net::Op::kFcntl:
      FUZZ_CHECK(req.fd == arg32(0) && req.a[0] == arg32(1) && req.a[1] == arg32(2));
      break;
    case net::Op::kClose:
    case net::Op::kGetsockname:
    case net::Op::kGetpeername:
      FUZZ_CHECK(req.fd == arg32(0));
      break;
  }
}

void check_ring(uint64_t entry, uint32_t head, uint32_t slot, uint32_t seq) {
  using gpusock::internal::decode_ring_entry;
  using gpusock::internal::RingEntryKind;
  const auto r = decode_ring_entry(entry, head);
  const uint32_t tag = hc::ring_entry_tag(entry);
  const uint32_t ahead = tag - (head + 1);  // how many positions past head it was written
  if (ahead == 0) {
    const uint32_t s = static_cast<uint32_t>(entry >> 12) & 0xfffffu;
    FUZZ_CHECK(r.kind == (s == hc::kFillerSlot ? RingEntryKind::kFiller : RingEntryKind::kDoorbell));
    if (r.kind == RingEntryKind::kDoorbell) FUZZ_CHECK(r.slot == s && r.slot < hc::kFillerSlot && r.seq_low == (entry & 0xfff));
  } else if (ahead < 0x80000000u && tag != 0) {
    FUZZ_CHECK(r.kind == RingEntryKind::kLapped && r.new_head == tag - 1 && r.new_head != head);
  } else {
    FUZZ_CHECK(r.kind == RingEntryKind::kNotWritten);
  }
  // Round trip: the entry the device writes for position `head`.
  slot &= 0xfffffu;
  const auto mine = decode_ring_entry(hc::make_ring_entry(head, slot, seq), head);
  if (slot == hc::kFillerSlot) {
    FUZZ_CHECK(mine.kind == RingEntryKind::kFiller);
  } else {
    FUZZ_CHECK(mine.kind == RingEntryKind::kDoorbell && mine.slot == slot && mine.seq_low == (seq & 0xfff));
  }
  // An entry from an older position (any lap behind, up to half the tag space) is never
  // taken for this position's doorbell.
  const uint32_t back = 1 + (seq & 0x7ffffffe);
  FUZZ_CHECK(decode_ring_entry(hc::make_ring_entry(head - back, slot, seq), head).kind == RingEntryKind::kNotWritten);
}

void check_doorbell(uint32_t slot, uint32_t seq_low, uint32_t nslots, uint64_t state) {
  using gpusock::internal::classify_doorbell;
  using gpusock::internal::DoorbellAction;
  seq_low &= hc::kRingSeqMask;  // what a ring entry can carry
  const auto a = classify_doorbell(slot, seq_low, nslots, state);
  const uint32_t state_low = hc::state_seq(state) & hc::kRingSeqMask;
  const uint32_t lead = (seq_low - state_low) & hc::kRingSeqMask;  // doorbell ahead of state by
  if (slot >= nslots) {
    FUZZ_CHECK(a == DoorbellAction::kReject);
  } else if (lead == 0) {
    FUZZ_CHECK(a == (hc::state_phase(state) == hc::kRequest ? DoorbellAction::kClaim : DoorbellAction::kIgnore));
  } else {
    FUZZ_CHECK(a == (lead < 2048 ? DoorbellAction::kEarly : DoorbellAction::kIgnore));
  }
  // A request's own doorbell claims it.
  const uint32_t seq = hc::state_seq(state);
  if (slot < nslots) {
    FUZZ_CHECK(classify_doorbell(slot, seq & hc::kRingSeqMask, nslots, hc::make_state(seq, hc::kRequest)) ==
               DoorbellAction::kClaim);
  }
  // State word round trip.
  const auto phase = static_cast<hc::Phase>(state & 7u);
  const int32_t inl = static_cast<int32_t>(state >> 32);
  const uint64_t made = hc::make_state(seq, phase, inl);
  FUZZ_CHECK(hc::state_seq(made) == (seq & hc::kSeqMask) && hc::state_phase(made) == phase &&
             hc::state_inline(made) == inl);
  FUZZ_CHECK(made == state);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 4096) return 0;
  gpusock::fuzz::Reader in(data, size);
  hc::SlotHeader hdr;
  in.bytes(&hdr, sizeof hdr);
  const uint32_t pages = 1 + in.u8() % kMaxArenaPages;
  const uint8_t op_pick = in.u8() % 16;
  const uint64_t entry = in.u64();
  const uint32_t head = in.u32();
  const uint32_t nslots = in.u32();
  const uint64_t state = in.u64();
  const uint64_t any_arena = in.u64();

  check_header_fields(hdr);
  check_ring(entry, head, static_cast<uint32_t>(entry >> 12), static_cast<uint32_t>(state));
  check_doorbell(static_cast<uint32_t>(entry >> 12) & 0xfffffu, static_cast<uint32_t>(entry), nslots, state);

  // The host reads arguments only for a header that passes.
  if (check_header(hdr) != 0) return 0;
  const uint64_t arena_bytes = uint64_t{pages} * kPage;
  uint8_t* base = arena(pages);
  const bool descriptor_write = op_pick == 15;
  const uint32_t opcode = descriptor_write ? hc::op::kDescriptorWrite : net::op::kFirst + op_pick;
  for (uint32_t m = hdr.lane_mask; m != 0; m &= m - 1) {
    uint64_t words[hc::kMaxArgs] = {};
    for (uint32_t k = 0; k < hdr.nargs; ++k) words[k] = in.u64();
    const FakeLane lane{words, hdr.nargs, hdr.staging_first, hdr.staging_count, base, arena_bytes};
    for (uint32_t k = 0; k < hc::kMaxArgs; ++k) {
      std::span<const uint8_t> v;
      const int r = lane.payload(k, &v);
      uint64_t len = 0;
      FUZZ_CHECK(r == lane.model_payload_at(k, &len));
      if (r == 0) lane.check_inside(v);
      if (k + 1 < hdr.nargs) {
        // The same descriptor against any arena size at all.
        FUZZ_CHECK(check_payload(words[k], words[k + 1], hdr.staging_first, hdr.staging_count, any_arena) ==
                   model_payload(words[k], words[k + 1], hdr.staging_first, hdr.staging_count, any_arena));
      }
    }
    check_request(lane, opcode, descriptor_write);
  }
  return 0;
}
