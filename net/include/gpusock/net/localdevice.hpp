// gpusock/net/localdevice.hpp — the localdevice family: sockets between warps of one GPU
// whose bytes move through device memory. connect, accept, send, recv, poll and close of
// a localdevice socket make no hostcall.
//
//   // server warp                                  // client warp
//   int l = gpusock::socket(AF_LOCALDEVICE,         int c = gpusock::socket(AF_LOCALDEVICE,
//                           SOCK_STREAM, 0);                                SOCK_STREAM, 0);
//   gpusock::sockaddr_ld a{AF_LOCALDEVICE, 42};     gpusock::sockaddr_ld a{AF_LOCALDEVICE, 42};
//   gpusock::bind(l, (sockaddr*)&a, sizeof a);      gpusock::connect(c, (sockaddr*)&a, sizeof a);
//   gpusock::listen(l, 64);                         gpusock::send(c, "ping", 4, 0);
//   int s = gpusock::accept(l, nullptr, nullptr);
//   gpusock::recv(s, buf, sizeof buf, 0);
//
// The host enables the family with net::enable_localdevice() (localdevice_host.hpp);
// without it socket(AF_LOCALDEVICE, ...) answers -EAFNOSUPPORT. socket.hpp routes every
// call on a localdevice descriptor here, so kernels use the ordinary POSIX names.
//
// Layout (device global memory, one Table per runtime):
//   - a socket array; a socket is named by a descriptor kFdBase | generation << 16 | index,
//     so a stale descriptor (closed, slot reused) is told apart and answers EBADF;
//   - one receive ring per socket (ring_bytes, a power of two): its peers write into it
//     and its owner reads from it. head (consumed) and tail (committed) are byte counts;
//     a writer takes the ring's producer lock, a reader its consumer lock, so concurrent
//     sends on one stream never interleave inside a call and datagrams never tear;
//   - a listener's ring holds its accept queue instead: 8-byte entries (index, generation)
//     of connections that connect() made and accept() has not taken yet;
//   - a port table per type (stream, datagram): port -> socket index + 1.
// A socket's life word (generation << 32 | references) keeps it alive while any lane
// works on it: the descriptor holds one reference, every call in progress one more; a
// slot is freed (and its generation moves on) when the count reaches zero. A sender pins
// its peer by (index, generation) for the duration of a write, so a peer that closed and
// whose slot was reused is never written into.
//
// Memory order: a writer copies bytes into the ring, then stores tail with release at
// device scope; a reader loads tail with acquire, copies with L1-bypassing loads, then
// stores head with release, which is what lets the writer reuse that space.
// The lanes of a warp that are in the copy step together copy together
// (hostcall::internal::group_copy: coalesced 16-byte steps when both buffers are global
// memory); on the cpu device each lane copies its own.
//
// Blocking waits spin with backoff and end with -EBADF when another lane closes the
// descriptor, with -ESHUTDOWN when the runtime shuts down, and with -ECANCELED when the
// lane's launch is aborted (gpusock::trap()).
#pragma once

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdint>

#include "gpusock/hostcall/client.hpp"
#include "gpusock/net/protocol.hpp"

// The address family. Linux families are below 64; this value stays clear of them.
#ifndef AF_LOCALDEVICE
#define AF_LOCALDEVICE 0x4c44
#endif
#ifndef PF_LOCALDEVICE
#define PF_LOCALDEVICE AF_LOCALDEVICE
#endif

namespace gpusock {

// A localdevice address: `localdevice:42` is {AF_LOCALDEVICE, 42}. Ports 1..65535 name
// sockets; 0 in bind() asks for an ephemeral port (49152..65535).
struct sockaddr_ld {
  sa_family_t sld_family;
  uint32_t sld_port;
};

// "localdevice:N" -> *out. Returns 1, or 0 when the text is not that form (N decimal,
// 0..65535, no sign, no spaces, no leading zeros except "0"). The dst is untouched on 0.
GPUSOCK_HD inline int ld_pton(const char* text, sockaddr_ld* out) {
  if (text == nullptr || out == nullptr) return 0;
  const char prefix[] = "localdevice:";
  uint32_t i = 0;
  for (; prefix[i] != '\0'; ++i) {
    if (text[i] != prefix[i]) return 0;
  }
  const char* d = text + i;
  if (d[0] < '0' || d[0] > '9') return 0;
  if (d[0] == '0' && d[1] != '\0') return 0;
  uint32_t v = 0;
  uint32_t k = 0;
  for (; d[k] >= '0' && d[k] <= '9'; ++k) {
    if (k >= 5) return 0;
    v = v * 10 + static_cast<uint32_t>(d[k] - '0');
  }
  if (d[k] != '\0' || v > 65535) return 0;
  out->sld_family = AF_LOCALDEVICE;
  out->sld_port = v;
  return 1;
}

// Longest text ld_ntop writes, with its terminating NUL: "localdevice:4294967295".
inline constexpr uint32_t kLdAddrStrLen = 23;

// *a -> "localdevice:N" in dst (size bytes with the NUL). Returns dst, or nullptr with
// *err = EAFNOSUPPORT (not a localdevice address) or ENOSPC (too small).
GPUSOCK_HD inline const char* ld_ntop(const sockaddr_ld* a, char* dst, uint32_t size, int* err = nullptr) {
  if (a == nullptr || dst == nullptr || a->sld_family != AF_LOCALDEVICE) {
    if (err != nullptr) *err = EAFNOSUPPORT;
    return nullptr;
  }
  char digits[10];
  uint32_t n = 0;
  uint32_t v = a->sld_port;
  do {
    digits[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v != 0);
  const char prefix[] = "localdevice:";
  const uint32_t plen = sizeof prefix - 1;
  if (size < plen + n + 1) {
    if (err != nullptr) *err = ENOSPC;
    return nullptr;
  }
  for (uint32_t i = 0; i < plen; ++i) dst[i] = prefix[i];
  for (uint32_t i = 0; i < n; ++i) dst[plen + i] = digits[n - 1 - i];
  dst[plen + n] = '\0';
  return dst;
}

namespace net::local {

// Descriptors from kFdBase up are localdevice sockets (protocol.hpp: kDeviceFdFirst).
inline constexpr int kFdBase = kDeviceFdFirst;
inline constexpr uint32_t kIndexBits = 16;
inline constexpr uint32_t kMaxSockets = 1u << kIndexBits;
inline constexpr uint32_t kGenMask = 0x3fff;  // generation bits a descriptor carries
inline constexpr uint32_t kPorts = 65536;
inline constexpr uint32_t kEphemeralFirst = 49152;
inline constexpr uint32_t kModuleIndex = 0;   // DeviceContext::modules[0]
inline constexpr uint32_t kTableMagic = 0x6c646576;  // "ldev"
// Each datagram in a ring: an 8-byte header {length, source port}, then its bytes padded
// to 8.
inline constexpr uint32_t kDgramHeader = 8;

enum State : uint32_t { kFree = 0, kOpen = 1, kListening = 2, kConnected = 3 };
enum FdState : uint32_t { kNoFd = 0, kFdOpen = 1, kFdClosed = 2 };
enum Shut : uint32_t { kShutRd = 1, kShutWr = 2 };
// Socket::post: a state in the low kPostBits bits, a byte count above them. One offer at a
// time, either way (section 13.4):
// - A recv that would wait on an empty ring offers its buffer (kPosted); a sender that
//   finds the ring empty claims it (kClaimed), copies into it and hands it back (kFilled
//   and the count). Only the recv, under its consumer lock, moves it on from kFilled or
//   withdraws it.
// - A blocking send that finds the ring full offers its own bytes (kOffered); a recv that
//   finds the ring empty takes them (kTaking), copies them out and says how many
//   (kTaken and the count). Only the send, under the producer lock, moves it on from
//   kTaken or withdraws it.
// Each side first reserves the word (kReserved, from kPostNone) to write the buffer's
// address and length, so the two never write those fields at once.
enum Post : uint32_t {
  kPostNone = 0, kPosted = 1, kClaimed = 2, kFilled = 3, kOffered = 4, kTaking = 5, kTaken = 6, kReserved = 7
};
inline constexpr uint32_t kPostBits = 3, kPostState = (1u << kPostBits) - 1;
inline constexpr uint32_t kPostMaxBytes = 1u << 28;  // an offer's length is capped here
// How long a sender's offer stays out with the ring empty before the sender takes it back
// and writes into the ring itself. Every stream recv (peek and MSG_TRUNC too) takes
// offers and poll() reports them as POLLIN, so this is only a net under readers that
// never come back to the socket.
inline constexpr uint64_t kOfferPatienceNs = 1000000;

// One socket. Fields other than the atomics are written by the lane that owns the socket
// at that moment (creation, bind, connect, accept) before they are published.
struct alignas(128) Socket {
  uint64_t life;          // generation << 32 | references
  uint32_t fd_state;      // FdState
  uint32_t type;          // SOCK_STREAM or SOCK_DGRAM (0 while free)
  uint32_t state;         // State
  uint32_t nonblock;      // O_NONBLOCK
  uint32_t port;          // bound port, 0 = unbound
  uint32_t owns_port;     // 1 when port's table entry names this socket
  uint32_t peer_port;     // stream: the peer's port; datagram: connect()ed destination
  uint32_t peer;          // stream: the peer's index
  uint32_t peer_gen;      // stream: the peer's generation
  uint32_t backlog;       // listener: most queued connections
  uint32_t producer_lock;
  uint32_t reserved;
  uint32_t eof;           // the peer sends no more (its close or SHUT_WR)
  uint32_t reset;         // the connection was reset (its listener closed before accept)
  uint32_t shut;          // Shut bits of this side
  uint32_t options;       // bit per settable option (SO_REUSEADDR, ...), for getsockopt
  // Bytes (listener: entries) the owner consumed, << 1, and in bit 0 the consumer lock
  // (kHeadHeld): one word, so a recv lets go and publishes what it read with one release
  // (section 13.3). Read it through consumed().
  uint64_t head;
  uint64_t tail;          // bytes (entries) writers committed
  uint64_t bytes_in;      // bytes this socket received (consumed)
  uint64_t bytes_out;     // bytes this socket sent
  // The one offer between this socket's reader and its sender (section 13.4, "handed
  // straight"): a blocked recv's buffer or a blocked send's bytes. post is Post | (bytes
  // moved) << kPostBits.
  uint32_t post;
  uint32_t post_len;      // how many bytes the offer holds or takes
  uint64_t post_buf;      // where (global memory)
  uint64_t bytes_direct;  // of bytes_in, those that went straight from a send's buffer to a recv's
};
static_assert(sizeof(Socket) == 128, "a socket is one 128-byte line");

// What allocation and ephemeral ports move on (the table's only fields that change).
struct Cursors {
  uint32_t alloc;      // where the next allocation starts looking
  uint32_t ephemeral;  // the next ephemeral port to try
};

// The family's state in device memory; net::enable_localdevice() builds it. The table
// never changes while kernels run: it is also module 0's head (hostcall::module_head),
// which a GPU block reads from its shared copy of the context, so finding a socket costs
// no trip to L2 (section 13.2).
struct Table {
  uint32_t magic;
  uint32_t max_sockets;
  uint32_t ring_bytes;    // per socket, a power of two
  uint32_t hand_off;      // LocalDeviceOptions::hand_off: a waiting recv offers its buffer
  Socket* sockets;
  uint8_t* rings;         // max_sockets * ring_bytes
  uint32_t* ports;        // [2][kPorts]: stream, datagram; socket index + 1, 0 = free
  Cursors* cursors;       // in the table's block of device memory
};
static_assert(sizeof(Table) <= hostcall::kModuleHeadBytes, "the table is a module head");

GPUSOCK_HD constexpr bool is_local_fd(int fd) { return fd >= kFdBase; }
GPUSOCK_HD constexpr int make_fd(uint32_t index, uint32_t gen) {
  return static_cast<int>(static_cast<uint32_t>(kFdBase) | ((gen & kGenMask) << kIndexBits) | index);
}
GPUSOCK_HD constexpr uint32_t fd_index(int fd) { return static_cast<uint32_t>(fd) & (kMaxSockets - 1); }
GPUSOCK_HD constexpr uint32_t fd_gen(int fd) { return (static_cast<uint32_t>(fd) >> kIndexBits) & kGenMask; }
GPUSOCK_HD constexpr uint64_t round8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

namespace detail {

using A32 = AtomicRef<uint32_t, Scope::kDevice>;
using A64 = AtomicRef<uint64_t, Scope::kDevice>;

GPUSOCK_HD inline const Table* table() {
  const auto* t = static_cast<const Table*>(hostcall::module_head(kModuleIndex));
  return t->magic == kTableMagic ? t : nullptr;
}
GPUSOCK_HD inline uint32_t index_of(const Table* t, const Socket* s) { return static_cast<uint32_t>(s - t->sockets); }
GPUSOCK_HD inline uint8_t* ring(const Table* t, uint32_t index) { return t->rings + uint64_t{index} * t->ring_bytes; }
GPUSOCK_HD inline uint32_t* port_slot(const Table* t, uint32_t type, uint32_t port) {
  return t->ports + (type == SOCK_DGRAM ? kPorts : 0) + port;
}
GPUSOCK_HD inline bool shutting_down() { return hostcall::internal::shutting_down(hostcall::context()); }
GPUSOCK_HD inline uint32_t ld32(uint32_t& x) { return A32(x).load(Order::kAcquire); }
// Socket fields that other lanes may read while the owner writes them (a stale
// descriptor's lane, a connector finding a listener) go through these. Loads are relaxed:
// the pin or lock taken before them is what orders them; relaxed loads at device scope
// are still coherent (never a stale L1 line) and, unlike acquire loads, overlap.
GPUSOCK_HD inline uint32_t get(uint32_t& x) { return A32(x).load(Order::kRelaxed); }
GPUSOCK_HD inline void put(uint32_t& x, uint32_t v) { A32(x).store(v, Order::kRelease); }

// The lanes that copy together: on a GPU those executing here now (warp::active_mask(),
// which ptxas may not take for warp-uniform: docs/architecture.md 18.2); on the cpu device
// each lane alone (converging threads costs more than it saves there).
GPUSOCK_HD inline uint32_t copy_group() {
#if GPUSOCK_IS_GPU
  return warp::active_mask();
#else
  return 1u << warp::lane_id();
#endif
}

// Takes a reference on socket `index` if it is alive and (unless any_gen) of generation
// `gen` (low kGenMask bits when `fd_bits`). Returns it, or nullptr.
GPUSOCK_HD inline Socket* pin(const Table* t, uint32_t index, uint32_t gen, bool any_gen, bool fd_bits) {
  if (index >= t->max_sockets) return nullptr;
  Socket* s = &t->sockets[index];
  A64 life(s->life);
  uint64_t w = life.load(Order::kRelaxed);  // the compare-exchange below synchronizes
  for (;;) {
    const uint32_t refs = static_cast<uint32_t>(w);
    const uint32_t g = static_cast<uint32_t>(w >> 32);
    if (refs == 0) return nullptr;
    if (!any_gen && (fd_bits ? (g & kGenMask) != (gen & kGenMask) : g != gen)) return nullptr;
    if (life.compare_exchange(w, w + 1, Order::kAcqRel)) return s;
  }
}
GPUSOCK_HD inline uint32_t generation(Socket* s) { return static_cast<uint32_t>(A64(s->life).load(Order::kAcquire) >> 32); }

GPUSOCK_HD inline void unpin(const Table* t, Socket* s);

// The descriptor's socket, pinned, or nullptr (EBADF): wrong range, stale, or closed.
GPUSOCK_HD inline Socket* pin_fd(const Table* t, int fd) {
  if (t == nullptr || !is_local_fd(fd)) return nullptr;
  Socket* s = pin(t, fd_index(fd), fd_gen(fd), false, true);
  if (s != nullptr && ld32(s->fd_state) != kFdOpen) {
    unpin(t, s);
    return nullptr;
  }
  return s;
}

GPUSOCK_HD inline void lock(uint32_t& l) {
  A32 a(l);
  for (uint32_t i = 0;; ++i) {
    uint32_t expect = 0;
    if (a.compare_exchange(expect, 1, Order::kAcquire)) return;  // uncontended: one atomic
    spin_pause(i);
  }
}
GPUSOCK_HD inline void unlock(uint32_t& l) { A32(l).store(0, Order::kRelease); }

// The consumer side's lock is bit 0 of the head word (Socket::head).
inline constexpr uint64_t kHeadHeld = 1;
GPUSOCK_HD constexpr uint64_t consumed(uint64_t head_word) { return head_word >> 1; }
GPUSOCK_HD inline uint64_t load_head(Socket* s, Order o) { return consumed(A64(s->head).load(o)); }
// Takes s's consumer lock; returns what the owner has consumed (the head), which only a
// holder changes.
GPUSOCK_HD inline uint64_t lock_consumer(Socket* s) {
  A64 h(s->head);
  for (uint32_t i = 0;; ++i) {
    const uint64_t w = h.fetch_or(kHeadHeld, Order::kAcquire);  // uncontended: one atomic
    if ((w & kHeadHeld) == 0) return consumed(w);
    spin_pause(i);
  }
}
// Publishes `head` (release: the ring's bytes before it were read) and lets go.
GPUSOCK_HD inline void unlock_consumer(Socket* s, uint64_t head) { A64(s->head).store(head << 1, Order::kRelease); }
// Publishes `head` and keeps the lock (a recv that waits for more).
GPUSOCK_HD inline void publish_head(Socket* s, uint64_t head) {
  A64(s->head).store(head << 1 | kHeadHeld, Order::kRelease);
}

// Frees a socket whose last reference went: its port goes back, its generation moves on
// at the next allocation, and it is free for socket() again.
GPUSOCK_HD inline void free_slot(const Table* t, Socket* s) {
  const uint32_t index = index_of(t, s);
  // send and recv lock instead of pinning (one atomic instead of two): a writer holding the
  // producer lock, or a reader holding the consumer lock, relies on the slot staying this
  // socket until it lets go. Wait for both.
  lock(s->producer_lock);
  lock_consumer(s);
  if (detail::get(s->owns_port) != 0) {
    uint32_t expect = index + 1;
    A32(*port_slot(t, detail::get(s->type), detail::get(s->port))).compare_exchange(expect, 0, Order::kAcqRel);
  }
  detail::put(s->type, 0);
  detail::put(s->nonblock, 0);
  detail::put(s->port, 0);
  detail::put(s->owns_port, 0);
  detail::put(s->peer_port, 0);
  detail::put(s->peer, 0);
  detail::put(s->peer_gen, 0);
  s->backlog = 0;
  s->options = 0;
  A32(s->fd_state).store(kNoFd, Order::kRelaxed);
  A32(s->eof).store(0, Order::kRelaxed);
  A32(s->reset).store(0, Order::kRelaxed);
  A32(s->shut).store(0, Order::kRelaxed);
  A64(s->tail).store(0, Order::kRelaxed);
  A64(s->bytes_in).store(0, Order::kRelaxed);
  A64(s->bytes_out).store(0, Order::kRelaxed);
  A64(s->bytes_direct).store(0, Order::kRelaxed);
  // A recv leaves its offer kPostNone; only a recv that gave up on a claimed offer at
  // shutdown (unpost) can leave a late kFilled behind.
  A32(s->post).store(kPostNone, Order::kRelaxed);
  unlock_consumer(s, 0);
  unlock(s->producer_lock);
  A32(s->state).store(kFree, Order::kRelease);
}

GPUSOCK_HD inline void unpin(const Table* t, Socket* s) {
  const uint64_t w = A64(s->life).fetch_sub(1, Order::kAcqRel);
  if (static_cast<uint32_t>(w) == 1) free_slot(t, s);
}

// A free socket with one reference (its descriptor's, or a pending connection's), or
// nullptr when all max_sockets are in use.
GPUSOCK_HD inline Socket* alloc(const Table* t, uint32_t type) {
  const uint32_t n = t->max_sockets;
  const uint32_t start = A32(t->cursors->alloc).fetch_add(1, Order::kRelaxed);
  for (uint32_t k = 0; k < n; ++k) {
    Socket* s = &t->sockets[(start + k) % n];
    if (A32(s->state).load(Order::kAcquire) != kFree) continue;
    A64 life(s->life);
    uint64_t w = life.load(Order::kAcquire);
    if (static_cast<uint32_t>(w) != 0) continue;
    const uint64_t next = (((w >> 32) + 1) << 32) | 1u;
    if (!life.compare_exchange(w, next, Order::kAcqRel)) continue;
    detail::put(s->type, type);
    A32(s->state).store(kOpen, Order::kRelease);
    return s;
  }
  return nullptr;
}

// Claims `port` (0: an ephemeral one) of s's type for s. Returns 0, -EADDRINUSE, or
// -EADDRNOTAVAIL (no ephemeral port left).
GPUSOCK_HD inline int claim_port(const Table* t, Socket* s, uint32_t port) {
  const uint32_t me = index_of(t, s) + 1;
  if (port != 0) {
    uint32_t expect = 0;
    if (!A32(*port_slot(t, detail::get(s->type), port)).compare_exchange(expect, me, Order::kAcqRel)) return -EADDRINUSE;
    detail::put(s->port, port);
    detail::put(s->owns_port, 1);
    return 0;
  }
  constexpr uint32_t range = kPorts - kEphemeralFirst;
  for (uint32_t k = 0; k < range; ++k) {
    const uint32_t p = kEphemeralFirst + A32(t->cursors->ephemeral).fetch_add(1, Order::kRelaxed) % range;
    uint32_t expect = 0;
    if (A32(*port_slot(t, detail::get(s->type), p)).compare_exchange(expect, me, Order::kAcqRel)) {
      detail::put(s->port, p);
      detail::put(s->owns_port, 1);
      return 0;
    }
  }
  return -EADDRNOTAVAIL;
}

// The socket bound to (type, port), pinned, or nullptr.
GPUSOCK_HD inline Socket* pin_port(const Table* t, uint32_t type, uint32_t port) {
  const uint32_t v = A32(*port_slot(t, type, port)).load(Order::kAcquire);
  if (v == 0) return nullptr;
  Socket* s = pin(t, v - 1, 0, true, false);
  if (s == nullptr) return nullptr;
  if (detail::get(s->type) != type || detail::get(s->port) != port || detail::get(s->owns_port) == 0 || ld32(s->fd_state) != kFdOpen) {
    unpin(t, s);
    return nullptr;
  }
  return s;
}

// The exits of a wait loop, checked sparingly: the descriptor's state and the launch's
// abort word (device memory) every 64th pass, the runtime's shutdown flag every 4096th.
// Waits sleep with spin_pause(), not backoff(): a lane of an aborted launch must leave
// the call through here, releasing the locks it holds, rather than stop inside it. The flag lives in mapped host
// memory: every read is a PCIe round trip, and a thousand waiting warps reading it every
// 64 passes (tens of millions of reads a second) slowed every warp on the GPU. With the
// backoff's sleeps, 4096 passes are about a millisecond: how long shutdown takes to reach a
// waiting call.
GPUSOCK_HD inline bool names(Socket* s, int fd);
GPUSOCK_HD inline int wait_check(Socket* s, int fd, uint32_t pass) {
  if ((pass & 4095) == 4095 && shutting_down()) return -ESHUTDOWN;
  // The launch was aborted (gpusock::trap()): the call gives up, its locks are released
  // on the way out, and the lane stops at its next stop point.
  if ((pass & 63) == 63 && gpusock::internal::lane_waits_end()) return -ECANCELED;
  // Not just "closed": a sender holds no reference on its own socket, so a close by another
  // lane may already have freed the slot (and reset its state) under it.
  if ((pass & 63) == 63 && !names(s, fd)) return -EBADF;
  return 0;
}

// Whether a socket whose life word and fd_state read `life` and `fd_state` is alive in
// generation `gen` (all its bits), or is what descriptor fd names (open, the generation
// bits the descriptor carries).
GPUSOCK_HD constexpr bool alive_as(uint64_t life, uint32_t gen) {
  return static_cast<uint32_t>(life) != 0 && static_cast<uint32_t>(life >> 32) == gen;
}
GPUSOCK_HD constexpr bool fd_names(uint64_t life, uint32_t fd_state, int fd) {
  return static_cast<uint32_t>(life) != 0 && ((life >> 32) & kGenMask) == fd_gen(fd) && fd_state == kFdOpen;
}

// Whether descriptor fd still names socket s.
GPUSOCK_HD inline bool names(Socket* s, int fd) {
  return fd_names(A64(s->life).load(Order::kRelaxed), A32(s->fd_state).load(Order::kRelaxed), fd);
}

// The slot descriptor fd points at (nullptr when fd cannot name one), not yet validated.
GPUSOCK_HD inline Socket* slot_of(const Table* t, int fd) {
  if (t == nullptr || !is_local_fd(fd) || fd_index(fd) >= t->max_sockets) return nullptr;
  return &t->sockets[fd_index(fd)];
}

// The descriptor's socket with its consumer lock held (free_slot takes that lock, so the
// slot stays this socket while it is held) and its head in *head, or nullptr (EBADF).
GPUSOCK_HD inline Socket* lock_own(const Table* t, int fd, uint64_t* head) {
  Socket* s = slot_of(t, fd);
  if (s == nullptr) return nullptr;
  *head = lock_consumer(s);
  if (!names(s, fd)) {
    unlock_consumer(s, *head);
    return nullptr;
  }
  return s;
}

// The descriptor's socket, unpinned, for a send to validate again once it holds its peer's
// lock; nullptr (EBADF) when it does not name one now.
GPUSOCK_HD inline Socket* peek_fd(const Table* t, int fd) {
  Socket* s = slot_of(t, fd);
  return s != nullptr && names(s, fd) ? s : nullptr;
}

GPUSOCK_HD inline int parse_addr(const sockaddr* addr, socklen_t len, uint32_t* port) {
  if (addr == nullptr) return -EFAULT;
  if (len < sizeof(sockaddr_ld)) return -EINVAL;
  const auto* a = reinterpret_cast<const sockaddr_ld*>(addr);
  if (a->sld_family != AF_LOCALDEVICE) return -EAFNOSUPPORT;
  if (a->sld_port >= kPorts) return -EINVAL;
  *port = a->sld_port;
  return 0;
}

// POSIX-style address out: at most *len bytes, *len becomes the full length.
GPUSOCK_HD inline void addr_out(uint32_t port, sockaddr* addr, socklen_t* len) {
  if (addr == nullptr || len == nullptr) return;
  sockaddr_ld a{};
  a.sld_family = AF_LOCALDEVICE;
  a.sld_port = port;
  const uint8_t* src = reinterpret_cast<const uint8_t*>(&a);
  uint8_t* dst = reinterpret_cast<uint8_t*>(addr);
  for (uint32_t i = 0; i < sizeof a && i < *len; ++i) dst[i] = src[i];
  *len = sizeof a;
}

// Copies n bytes into ring r (capacity cap) at position pos, wrapping; the lanes of the
// copy group copy together. Every lane of the group calls it (n may be 0).
GPUSOCK_HD inline void ring_write(uint8_t* r, uint32_t cap, uint64_t pos, const uint8_t* src, uint32_t n,
                                  uint32_t mask = copy_group()) {
  const uint32_t at = static_cast<uint32_t>(pos & (cap - 1));
  const uint32_t first = n < cap - at ? n : cap - at;
  hostcall::internal::group_copy(mask, r + at, src, first, false);
  hostcall::internal::group_copy(mask, r, src + first, n - first, false);
}
GPUSOCK_HD inline void ring_read(uint8_t* dst, const uint8_t* r, uint32_t cap, uint64_t pos, uint32_t n,
                                 uint32_t mask = copy_group()) {
  const uint32_t at = static_cast<uint32_t>(pos & (cap - 1));
  const uint32_t first = n < cap - at ? n : cap - at;
  hostcall::internal::group_copy(mask, dst, r + at, first, true);
  hostcall::internal::group_copy(mask, dst + first, r, n - first, true);
}

// ---- a small send's bytes, loaded early ----
// A stream send of at most kEarlyBytes, whole 8-byte words from an 8-byte aligned buffer,
// loads them in the round of its socket's fields instead of after its peer's lock: on a
// GPU the lock's acquire empties the SM's L1, so loading the caller's buffer after it is
// one more trip to L2 (section 13.10).
inline constexpr uint32_t kEarlyBytes = 64;
struct Early {
  uint64_t w[kEarlyBytes / 8];
  uint32_t n = 0;  // bytes held: 0 (none) or the whole send
};
GPUSOCK_HD inline void load_early(Early* e, const uint8_t* src, uint64_t len) {
  if (len == 0 || len > kEarlyBytes || ((reinterpret_cast<uintptr_t>(src) | len) & 7) != 0) return;
  const auto* p = reinterpret_cast<const uint64_t*>(src);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (uint32_t i = 0; i < kEarlyBytes / 8; ++i) {
    if (i * 8 < len) e->w[i] = p[i];
  }
  e->n = static_cast<uint32_t>(len);
}
// Stores e's bytes at dst, if they are the n bytes to go there and dst takes 8-byte words;
// false: the caller copies from the buffer instead.
GPUSOCK_HD inline bool store_early(const Early* e, uint8_t* dst, uint32_t n) {
  if (e == nullptr || e->n == 0 || e->n != n || (reinterpret_cast<uintptr_t>(dst) & 7) != 0) return false;
  auto* q = reinterpret_cast<uint64_t*>(dst);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (uint32_t i = 0; i < kEarlyBytes / 8; ++i) {
    if (i * 8 < n) q[i] = e->w[i];
  }
  return true;
}

// Locks the producer side of s's stream peer and checks it is still that peer (the slot
// cannot be freed or reused while the lock is held: free_slot takes it). Returns the
// peer, locked, or nullptr (the peer is gone).
GPUSOCK_HD inline Socket* lock_peer(const Table* t, uint32_t index, uint32_t gen) {
  if (index >= t->max_sockets) return nullptr;
  Socket* p = &t->sockets[index];
  lock(p->producer_lock);
  if (!alive_as(A64(p->life).load(Order::kRelaxed), gen)) {  // ordered by the lock's acquire
    unlock(p->producer_lock);
    return nullptr;
  }
  return p;
}

// ---- a waiting recv's buffer handed straight to the sender ----
// A stream recv that finds its ring empty and would block offers its buffer; a sender
// that then finds the ring empty (under the producer lock, so no byte can be ahead of
// its own) copies straight into it: one copy per byte instead of two (section 13.4).

// Whether a recv may offer buf: a blocking, consuming call with a buffer in global
// memory (a lane's stack is not another warp's to write).
GPUSOCK_HD inline bool can_post(const Table* t, const void* buf, uint64_t want) {
  if (t->hand_off == 0 || buf == nullptr || want == 0) return false;
#if GPUSOCK_IS_GPU
  return __isGlobal(buf);
#else
  return true;
#endif
}
// Puts an offer of `bytes` at buf (kPosted by a recv, kOffered by a send) on s's word, if
// it is free (false: the other side's offer is there).
GPUSOCK_HD inline bool put_offer(Socket* s, uint32_t kind, const void* buf, uint64_t bytes) {
  uint32_t w = kPostNone;
  if (!A32(s->post).compare_exchange(w, kReserved, Order::kRelaxed)) return false;
  A64(s->post_buf).store(reinterpret_cast<uint64_t>(buf), Order::kRelaxed);
  A32(s->post_len).store(static_cast<uint32_t>(bytes < kPostMaxBytes ? bytes : kPostMaxBytes), Order::kRelaxed);
  A32(s->post).store(kind, Order::kRelease);
  return true;
}
// Receiver, consumer lock held: offers want bytes at buf (false: a sender's offer is there).
GPUSOCK_HD inline bool post(Socket* s, uint8_t* buf, uint64_t want) { return put_offer(s, kPosted, buf, want); }
// Receiver, after seeing `word` (acquire) with kFilled: takes the offer back; the bytes.
GPUSOCK_HD inline uint32_t take_filled(Socket* s, uint32_t word) {
  A32(s->post).store(kPostNone, Order::kRelaxed);
  const uint32_t n = word >> kPostBits;
  A64(s->bytes_direct).fetch_add(n, Order::kRelaxed);
  return n;
}
// Receiver: withdraws its offer; returns the bytes a sender put there (0: none). A sender
// that has claimed it is copying and fills it without waiting on anything, so this waits
// only for that copy (and gives up only when the runtime shuts down, the copy's bytes
// then being lost with everything else in flight).
GPUSOCK_HD inline uint32_t unpost(Socket* s) {
  uint32_t w = kPosted;
  if (A32(s->post).compare_exchange(w, kPostNone, Order::kAcquire)) return 0;
  for (uint32_t i = 0;; ++i) {
    if ((w & kPostState) == kFilled) return take_filled(s, w);
    if ((i & 4095) == 4095 && shutting_down()) {
      A32(s->post).store(kPostNone, Order::kRelaxed);
      return 0;
    }
    spin_pause(i);
    w = A32(s->post).load(Order::kAcquire);
  }
}
// Sender, holding p's producer lock with p's ring empty and `word` (a relaxed load of
// p->post) kPosted: claims the offer. Returns the buffer's length (0: not claimed; the
// recv withdrew it) and its address in *dst.
GPUSOCK_HD inline uint32_t claim(Socket* p, uint32_t word, uint8_t** dst) {
  if (word != kPosted || !A32(p->post).compare_exchange(word, kClaimed, Order::kAcquire)) return 0;
  *dst = reinterpret_cast<uint8_t*>(A64(p->post_buf).load(Order::kRelaxed));
  return A32(p->post_len).load(Order::kRelaxed);
}
// Sender, after copying n bytes into a claimed buffer (every copying lane synchronized).
GPUSOCK_HD inline void fill(Socket* p, uint32_t n) { A32(p->post).store(kFilled | n << kPostBits, Order::kRelease); }
// A scalar sender's whole hand-off (claim, copy, fill): the bytes it put straight into
// the reader's buffer, 0 if the reader withdrew.
GPUSOCK_HD inline uint32_t send_straight(Socket* p, uint32_t word, const uint8_t* src, uint64_t left,
                                         const Early* early = nullptr) {
  uint8_t* dst = nullptr;
  uint32_t take = claim(p, word, &dst);
  if (take == 0) return 0;
  if (take > left) take = static_cast<uint32_t>(left);
  if (!store_early(early, dst, take)) hostcall::internal::group_copy(copy_group(), dst, src, take, false);
  fill(p, take);
  return take;
}

// ---- a blocked sender's bytes taken straight by the reader ----
// The other way: a blocking send that finds the ring full (a reader slower than it, as in
// a stream) offers its own bytes; a recv that finds the ring empty (every byte before
// them read) copies them straight into its buffer.

// Sender, producer lock held, ring full: offers `left` bytes at src (false: the word is busy).
GPUSOCK_HD inline bool offer_bytes(Socket* p, const uint8_t* src, uint64_t left) {
  return put_offer(p, kOffered, src, left);
}
// Sender, after seeing `word` with kTaken (an acquire load): frees the word; the bytes the
// reader took.
GPUSOCK_HD inline uint32_t offer_taken(Socket* p, uint32_t word) {
  A32(p->post).store(kPostNone, Order::kRelaxed);
  return word >> kPostBits;
}
// Sender: takes its offer back; the bytes a reader took meanwhile (0: none). A reader
// taking it is copying and says so without waiting on anything (kTaken; a peek puts
// kOffered back, and the compare-and-swap is tried again), so this waits only for that
// copy (giving up only when the runtime shuts down).
GPUSOCK_HD inline uint32_t withdraw_offer(Socket* p) {
  uint32_t w = kOffered;
  for (uint32_t i = 0;; ++i) {
    if (w == kOffered && A32(p->post).compare_exchange(w, kPostNone, Order::kAcquire)) return 0;
    if ((w & kPostState) == kTaken) return offer_taken(p, w);
    if ((i & 4095) == 4095 && shutting_down()) return 0;
    spin_pause(i);
    w = A32(p->post).load(Order::kAcquire);
  }
}
// Sender, its offer out, given this pass's relaxed load of p->post (`word`) and whether
// the ring is empty: the bytes the reader took. *out turns false once the offer is no
// longer out: taken (kTaken), or taken back after the ring stayed empty kOfferPatienceNs
// (*empty_since: when this sender first saw it empty; 0: not empty).
GPUSOCK_HD inline uint32_t offer_progress(Socket* p, uint32_t word, bool ring_empty, uint64_t* empty_since, bool* out) {
  const bool taken = (word & kPostState) == kTaken;
  if (!taken) {
    if (!ring_empty) {
      *empty_since = 0;
      return 0;
    }
    const uint64_t now = globaltimer_ns();
    if (*empty_since == 0) *empty_since = now;
    if (now - *empty_since <= kOfferPatienceNs) return 0;
  }
  // Taken: acquire (the word stays kTaken until this sender moves it), so the reader's copy
  // out of the buffer comes before the caller may write it again. Else a reader that no
  // longer comes: the ring it is.
  const uint32_t n = taken ? offer_taken(p, A32(p->post).load(Order::kAcquire)) : withdraw_offer(p);
  *out = false;
  *empty_since = 0;
  return n;
}
// Receiver, consumer lock held, having seen its ring empty at `head`, `word` (a load of
// s->post) kOffered: takes the sender's offer. Returns how many bytes it holds (0: none to
// take) and where in *src.
GPUSOCK_HD inline uint32_t take_offer(Socket* s, uint32_t word, uint64_t head, const uint8_t** src) {
  if (word != kOffered || !A32(s->post).compare_exchange(word, kTaking, Order::kAcquire)) return 0;
  // The ring may have filled since this reader saw it empty, under an offer that is not
  // the one it saw: that sender took it back after kOfferPatienceNs and wrote the rest into
  // the ring, and a later send filled the ring and offered anew. Those bytes come first:
  // put the offer back (the acquire above sees every byte put in before it was made).
  if (A64(s->tail).load(Order::kAcquire) != head) {
    A32(s->post).store(kOffered, Order::kRelease);
    return 0;
  }
  *src = reinterpret_cast<const uint8_t*>(A64(s->post_buf).load(Order::kRelaxed));
  return A32(s->post_len).load(Order::kRelaxed);
}
// Receiver, after copying n of them (every copying lane synchronized): hands the offer
// back to its sender.
GPUSOCK_HD inline void took(Socket* s, uint32_t n) {
  A64(s->bytes_direct).fetch_add(n, Order::kRelaxed);
  A32(s->post).store(kTaken | n << kPostBits, Order::kRelease);
}
// Receiver, after a MSG_PEEK copied from the offer: puts it back as it was.
GPUSOCK_HD inline void keep_offer(Socket* s) { A32(s->post).store(kOffered, Order::kRelease); }
// A scalar recv's whole take (take, copy unless MSG_TRUNC, say; a peek puts the offer
// back): the bytes it took, at most room, 0 if there was no offer to take.
GPUSOCK_HD inline uint32_t recv_straight(Socket* s, uint64_t head, uint8_t* dst, uint64_t room, bool copy, bool peek) {
  const uint32_t w = A32(s->post).load(Order::kRelaxed);
  const uint8_t* src = nullptr;
  uint32_t n = take_offer(s, w, head, &src);
  if (n == 0) return 0;
  if (n > room) n = static_cast<uint32_t>(room);
  if (copy) hostcall::internal::group_copy(copy_group(), dst, src, n, true);
  if (peek) {
    keep_offer(s);
  } else {
    took(s, n);
  }
  return n;
}

// Tells the stream peer of s that no more bytes come (close or SHUT_WR).
GPUSOCK_HD inline void signal_eof(const Table* t, Socket* s) {
  if (A32(s->state).load(Order::kAcquire) != kConnected) return;
  Socket* p = pin(t, detail::get(s->peer), detail::get(s->peer_gen), false, false);
  if (p == nullptr) return;
  A32(p->eof).store(1, Order::kRelease);
  unpin(t, p);
}

GPUSOCK_HD constexpr bool nonblocking(int flags, uint32_t nonblock) { return (flags & MSG_DONTWAIT) != 0 || nonblock != 0; }
GPUSOCK_HD inline bool nonblocking(Socket* s, int flags) {
  return nonblocking(flags, A32(s->nonblock).load(Order::kRelaxed));
}

// Stream send into the ring of s's peer (index, generation gen), under the peer's producer
// lock (free_slot takes it too, so the slot stays that socket while it is held).
GPUSOCK_HD inline int64_t stream_send(const Table* t, Socket* s, int fd, uint32_t index, uint32_t gen, const uint8_t* buf,
                                      uint64_t len, bool nb, const Early* early = nullptr) {
  if (index >= t->max_sockets) return -EPIPE;
  Socket* p = &t->sockets[index];
  const uint32_t cap = t->ring_bytes;
  uint8_t* r = ring(t, index);
  uint64_t done = 0;
  int64_t err = 0;
  lock(p->producer_lock);
  // Each pass loads what it needs in one round: relaxed loads first, the acquire load of
  // head last, so they are all in flight together (an acquire holds back only what
  // follows it).
  const uint64_t life = A64(p->life).load(Order::kRelaxed);  // ordered by the lock's acquire
  uint64_t tail = A64(p->tail).load(Order::kRelaxed);
  // This call's bytes offered to the reader (offer_bytes), and since when the ring has
  // been empty with the offer out (0: not empty).
  bool offered = false;
  uint64_t empty_since = 0;
  for (uint32_t i = 0;; ++i) {
    const uint32_t fds = get(p->fd_state), shut = get(p->shut), offer = get(p->post);
    const uint64_t head = load_head(p, Order::kAcquire);
    if (i == 0 && !alive_as(life, gen)) {
      err = -EPIPE;  // the peer is gone (its slot freed, perhaps reused)
      break;
    }
    if (fds == kFdClosed || (shut & kShutRd) != 0) {
      err = -EPIPE;
      break;
    }
    if (offered) {
      // No byte goes into the ring while the offer is out: the reader takes it after
      // every byte before it.
      const uint32_t n = offer_progress(p, offer, tail == head, &empty_since, &offered);
      if (!offered) {
        done += n;
        i = 0;
        if (done == len) break;
        continue;
      }
      if ((err = wait_check(s, fd, i)) != 0) break;
      spin_pause(i);
      continue;
    }
    if (offer == kPosted && tail == head && len > done) {
      // The reader waits on an empty ring: straight into its buffer.
      if (const uint32_t take = send_straight(p, offer, buf + done, len - done, done == 0 ? early : nullptr); take > 0) {
        done += take;
        i = 0;
        if (done == len) break;
        continue;
      }
    }
    const uint64_t room = cap - (tail - head);
    const uint64_t left = len - done;
    const uint32_t n = static_cast<uint32_t>(left < room ? left : room);
    if (n > 0) {
      i = 0;
      const uint32_t at = static_cast<uint32_t>(tail & (cap - 1));
      if (done != 0 || at + n > cap || !store_early(early, r + at, n)) ring_write(r, cap, tail, buf + done, n);
      tail += n;
      A64(p->tail).store(tail, Order::kRelease);
      done += n;
      if (done == len) break;
      continue;
    }
    if (len == 0) break;
    if (nb) {
      err = -EAGAIN;
      break;
    }
    // The ring is full: offer the rest to the reader, to take straight once it has read
    // the ring.
    if (offer == kPostNone && can_post(t, buf, len - done) && offer_bytes(p, buf + done, len - done)) {
      offered = true;
      continue;
    }
    if ((err = wait_check(s, fd, i)) != 0) break;
    spin_pause(i);
  }
  if (offered) done += withdraw_offer(p);  // leaving (error, shutdown): what was taken counts
  unlock(p->producer_lock);
  if (done > 0) A64(s->bytes_out).fetch_add(done, Order::kRelaxed);
  return done > 0 ? static_cast<int64_t>(done) : err;
}

// One datagram into d's ring (all of it or nothing).
GPUSOCK_HD inline int64_t dgram_send(const Table* t, Socket* s, int fd, Socket* d, const uint8_t* buf, uint64_t len, bool nb) {
  const uint32_t cap = t->ring_bytes;
  if (len > cap - kDgramHeader) return -EMSGSIZE;
  const uint64_t need = kDgramHeader + round8(len);
  uint8_t* r = ring(t, index_of(t, d));
  int64_t err = 0;
  lock(d->producer_lock);
  const uint64_t tail = A64(d->tail).load(Order::kRelaxed);
  for (uint32_t i = 0;; ++i) {
    if (ld32(d->fd_state) != kFdOpen) {
      err = -ECONNREFUSED;
      break;
    }
    if (cap - (tail - load_head(d, Order::kAcquire)) >= need) break;
    if (nb) {
      err = -EAGAIN;
      break;
    }
    if ((err = wait_check(s, fd, i)) != 0) break;
    spin_pause(i);
  }
  if (err == 0) {
    // The header never wraps: positions stay multiples of 8 and cap is a power of two.
    A64(*reinterpret_cast<uint64_t*>(r + (tail & (cap - 1)))).store(len | (uint64_t{detail::get(s->port)} << 32), Order::kRelaxed);
    ring_write(r, cap, tail + kDgramHeader, buf, static_cast<uint32_t>(len));
    A64(d->tail).store(tail + need, Order::kRelease);
    A64(s->bytes_out).fetch_add(len, Order::kRelaxed);
  }
  unlock(d->producer_lock);
  return err != 0 ? err : static_cast<int64_t>(len);
}

}  // namespace detail

// ---- the calls (raw convention: -errno) ---------------------------------------------------

GPUSOCK_HD inline int socket(int type_flags) {
  const Table* t = detail::table();
  if (t == nullptr) return -EAFNOSUPPORT;
  const int type = type_flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (type != SOCK_STREAM && type != SOCK_DGRAM) return -EPROTONOSUPPORT;
  Socket* s = detail::alloc(t, static_cast<uint32_t>(type));
  if (s == nullptr) return -EMFILE;
  detail::put(s->nonblock, (type_flags & SOCK_NONBLOCK) != 0 ? 1 : 0);
  detail::A32(s->fd_state).store(kFdOpen, Order::kRelease);
  return make_fd(detail::index_of(t, s), detail::generation(s));
}

GPUSOCK_HD inline int bind(int fd, const sockaddr* addr, socklen_t len) {
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  uint32_t port = 0;
  int r = detail::parse_addr(addr, len, &port);
  if (r == 0) r = detail::get(s->port) != 0 ? -EINVAL : detail::claim_port(t, s, port);
  detail::unpin(t, s);
  return r;
}

GPUSOCK_HD inline int listen(int fd, int backlog) {
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  int r = 0;
  const uint32_t cap = t->ring_bytes / 8;
  if (detail::get(s->type) != SOCK_STREAM) {
    r = -EOPNOTSUPP;
  } else if (detail::ld32(s->state) == kConnected) {
    r = -EINVAL;
  } else if (detail::get(s->port) == 0) {
    r = detail::claim_port(t, s, 0);  // as on Linux: listen() binds an unbound socket
  }
  if (r == 0) {
    detail::A32(s->backlog).store(backlog < 1 ? 1u : (static_cast<uint32_t>(backlog) < cap ? static_cast<uint32_t>(backlog) : cap), Order::kRelaxed);
    detail::A32(s->state).store(kListening, Order::kRelease);
  }
  detail::unpin(t, s);
  return r;
}

// Blocking connect returns once the connection sits in the listener's accept queue (as
// TCP's does once the handshake is done): the client may send before accept(). A full
// queue makes a blocking connect wait and a non-blocking one answer -EAGAIN (as Unix
// sockets do). -ECONNREFUSED when nothing listens on the port.
GPUSOCK_HD inline int connect(int fd, const sockaddr* addr, socklen_t len) {
  const Table* t = detail::table();
  Socket* c = detail::pin_fd(t, fd);
  if (c == nullptr) return -EBADF;
  uint32_t port = 0;
  int r = detail::parse_addr(addr, len, &port);
  const uint32_t st = detail::ld32(c->state);
  if (r == 0 && detail::get(c->type) == SOCK_DGRAM) {
    // A datagram socket's connect only sets the default destination.
    Socket* d = port != 0 ? detail::pin_port(t, SOCK_DGRAM, port) : nullptr;
    if (d == nullptr) {
      r = -ECONNREFUSED;
    } else {
      detail::unpin(t, d);
      detail::A32(c->peer_port).store(port, Order::kRelease);
    }
  } else if (r == 0) {
    if (st == kConnected) r = -EISCONN;
    else if (st == kListening) r = -EINVAL;
  }
  if (r != 0 || detail::get(c->type) == SOCK_DGRAM) {
    detail::unpin(t, c);
    return r;
  }
  Socket* l = port != 0 ? detail::pin_port(t, SOCK_STREAM, port) : nullptr;
  if (l == nullptr || detail::ld32(l->state) != kListening) r = -ECONNREFUSED;
  if (r == 0 && detail::get(c->port) == 0) r = detail::claim_port(t, c, 0);
  Socket* s = nullptr;
  if (r == 0 && (s = detail::alloc(t, SOCK_STREAM)) == nullptr) r = -ENOBUFS;
  if (r == 0) {
    // The server side: connected, no descriptor until accept() gives it one.
    detail::put(s->port, port);
    detail::put(s->peer_port, detail::get(c->port));
    detail::put(s->peer, detail::index_of(t, c));
    detail::put(s->peer_gen, detail::generation(c));
    detail::put(c->peer, detail::index_of(t, s));
    detail::put(c->peer_gen, detail::generation(s));
    detail::put(c->peer_port, port);
    detail::A32(s->state).store(kConnected, Order::kRelease);
    detail::A32(c->state).store(kConnected, Order::kRelease);
    const bool nb = detail::nonblocking(c, 0);
    const uint32_t cap = t->ring_bytes / 8;
    auto* q = reinterpret_cast<uint64_t*>(detail::ring(t, detail::index_of(t, l)));
    detail::lock(l->producer_lock);
    for (uint32_t i = 0;; ++i) {
      // Checked under the lock: close() takes it after marking the listener closed, so a
      // connection queued here is one close() will find and reset.
      if (detail::ld32(l->fd_state) != kFdOpen || detail::ld32(l->state) != kListening) {
        r = -ECONNREFUSED;
        break;
      }
      const uint64_t tail = detail::A64(l->tail).load(Order::kRelaxed);
      const uint32_t room = detail::A32(l->backlog).load(Order::kRelaxed);
      if (tail - detail::load_head(l, Order::kAcquire) < (room < cap ? room : cap)) {
        // Entry = the server socket: index in the low word, generation in the high.
        detail::A64(q[tail & (cap - 1)]).store((uint64_t{detail::generation(s)} << 32) | detail::index_of(t, s), Order::kRelaxed);
        detail::A64(l->tail).store(tail + 1, Order::kRelease);
        break;
      }
      if (nb) {
        r = -EAGAIN;
        break;
      }
      detail::unlock(l->producer_lock);
      if ((r = detail::wait_check(c, fd, i)) != 0) {
        detail::lock(l->producer_lock);
        break;
      }
      spin_pause(i);
      detail::lock(l->producer_lock);
    }
    detail::unlock(l->producer_lock);
    if (r != 0) {
      detail::A32(c->state).store(kOpen, Order::kRelease);
      detail::unpin(t, s);  // its only reference: it is freed
    }
  }
  if (l != nullptr) detail::unpin(t, l);
  detail::unpin(t, c);
  return r;
}

GPUSOCK_HD inline int accept4(int fd, sockaddr* addr, socklen_t* len, int flags) {
  const Table* t = detail::table();
  Socket* l = detail::pin_fd(t, fd);
  if (l == nullptr) return -EBADF;
  if (detail::ld32(l->state) != kListening) {
    detail::unpin(t, l);
    return -EINVAL;
  }
  const uint32_t cap = t->ring_bytes / 8;
  auto* q = reinterpret_cast<uint64_t*>(detail::ring(t, detail::index_of(t, l)));
  const bool nb = detail::nonblocking(l, 0);
  int r = 0;
  uint64_t e = 0;
  for (uint32_t i = 0;; ++i) {
    if (detail::A64(l->tail).load(Order::kAcquire) != detail::load_head(l, Order::kRelaxed)) {
      const uint64_t head = detail::lock_consumer(l);
      const bool got = detail::A64(l->tail).load(Order::kAcquire) != head;
      if (got) e = detail::A64(q[head & (cap - 1)]).load(Order::kRelaxed);
      detail::unlock_consumer(l, got ? head + 1 : head);
      if (got) break;
    }
    if (nb) {
      r = -EAGAIN;
      break;
    }
    if ((r = detail::wait_check(l, fd, i)) != 0) break;
    spin_pause(i);
  }
  detail::unpin(t, l);
  if (r != 0) return r;
  // The queue's reference becomes the descriptor's.
  Socket* s = &t->sockets[static_cast<uint32_t>(e)];
  detail::put(s->nonblock, (flags & SOCK_NONBLOCK) != 0 ? 1 : 0);
  detail::A32(s->fd_state).store(kFdOpen, Order::kRelease);
  detail::addr_out(detail::get(s->peer_port), addr, len);
  return make_fd(static_cast<uint32_t>(e), static_cast<uint32_t>(e >> 32));
}

GPUSOCK_HD inline int64_t sendto(int fd, const void* buf, uint64_t len, int flags, const sockaddr* dest, socklen_t dest_len) {
  if (len > 0 && buf == nullptr) return -EFAULT;
  const Table* t = detail::table();
  const auto* p = static_cast<const uint8_t*>(buf);
  // Streams, the hot path: no pin. The peer's producer lock keeps the peer's slot, and
  // the check after it that fd still names s keeps the call honest about s.
  Socket* s = detail::slot_of(t, fd);
  if (s == nullptr) return -EBADF;
  // Every field the call needs, and a small send's bytes, in one round of loads.
  detail::Early early;
  detail::load_early(&early, p, len);
  const uint64_t life = detail::A64(s->life).load(Order::kRelaxed);
  const uint32_t fds = detail::get(s->fd_state), type = detail::get(s->type), st = detail::get(s->state);
  const uint32_t shut = detail::get(s->shut), nbk = detail::get(s->nonblock);
  const uint32_t peer_index = detail::get(s->peer), peer_gen = detail::get(s->peer_gen);
  if (!detail::fd_names(life, fds, fd)) return -EBADF;
  if (type == SOCK_STREAM) {
    // A close of fd racing this send is ordered either way, as with two threads in POSIX.
    if (dest != nullptr && st != kConnected) return -EOPNOTSUPP;  // no connect-on-send for streams
    if ((shut & kShutWr) != 0) return -EPIPE;
    if (st != kConnected) return -ENOTCONN;
    return detail::stream_send(t, s, fd, peer_index, peer_gen, p, len, detail::nonblocking(flags, nbk), &early);
  }
  s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  const bool nb = detail::nonblocking(s, flags);
  int64_t r = 0;
  uint32_t port = detail::A32(s->peer_port).load(Order::kAcquire);
  if (dest != nullptr) r = detail::parse_addr(dest, dest_len, &port);
  if (r == 0 && port == 0) r = dest != nullptr ? -EINVAL : -EDESTADDRREQ;
  if (r == 0 && (detail::ld32(s->shut) & kShutWr) != 0) r = -EPIPE;
  if (r == 0 && detail::get(s->port) == 0) r = detail::claim_port(t, s, 0);  // as UDP: bind on first send
  if (r == 0) {
    Socket* d = detail::pin_port(t, SOCK_DGRAM, port);
    if (d == nullptr) {
      r = -ECONNREFUSED;
    } else {
      r = detail::dgram_send(t, s, fd, d, p, len, nb);
      detail::unpin(t, d);
    }
  }
  detail::unpin(t, s);
  return r;
}

// Flags: MSG_DONTWAIT, MSG_PEEK, MSG_WAITALL (streams), MSG_TRUNC (streams: discard the
// bytes; datagrams: return the datagram's full length).
GPUSOCK_HD inline int64_t recvfrom(int fd, void* buf, uint64_t len, int flags, sockaddr* src, socklen_t* src_len) {
  if (len > 0 && buf == nullptr && (flags & MSG_TRUNC) == 0) return -EFAULT;
  const Table* t = detail::table();
  Socket* s = detail::slot_of(t, fd);
  if (s == nullptr) return -EBADF;
  // The consumer lock (free_slot takes it too: the slot stays s while held) and the head.
  uint64_t head = detail::lock_consumer(s);
  // Every field the call needs, in one round of loads.
  const uint64_t life = detail::A64(s->life).load(Order::kRelaxed);
  const uint32_t fds = detail::get(s->fd_state), type = detail::get(s->type), st = detail::get(s->state);
  const uint32_t nbk = detail::get(s->nonblock);
  if (!detail::fd_names(life, fds, fd)) {
    detail::unlock_consumer(s, head);
    return -EBADF;
  }
  if (type == SOCK_STREAM && st != kConnected) {
    detail::unlock_consumer(s, head);
    return -ENOTCONN;
  }
  const bool nb = detail::nonblocking(flags, nbk);
  const bool peek = (flags & MSG_PEEK) != 0;
  const uint32_t cap = t->ring_bytes;
  uint8_t* r = detail::ring(t, detail::index_of(t, s));
  auto* out = static_cast<uint8_t*>(buf);
  int64_t result = 0;
  if (type == SOCK_STREAM) {
    uint64_t done = 0;
    bool posted = false;  // this call's buffer is offered to the sender (detail::post)
    // Decided once: the wait loop below stays what it was without hand-off (a buffer that
    // cannot be offered costs no load per pass).
    const bool offer = !nb && !peek && (flags & MSG_TRUNC) == 0 && detail::can_post(t, out, len);
    const bool waitall = (flags & MSG_WAITALL) != 0;
    // A blocked sender's offered bytes: looked for on the first empty pass after any
    // progress and every 16th pass after that.
    bool look = true;
    for (uint32_t i = 0;; ++i) {
      // The three reasons to stop waiting, relaxed, in the round of the loads below (an
      // acquire holds back only what follows it), so a waiting pass is one trip to L2.
      const uint32_t shut = detail::get(s->shut), eof = detail::get(s->eof), reset = detail::get(s->reset);
      // Acquire loads (a relaxed one with a device-scope fence once filled measured slower
      // on an H100). A filled offer is taken without waiting for the tail's load after it.
      uint32_t direct = 0;  // bytes a sender put straight into out + done
      uint64_t avail = 0;
      if (posted) {
        const uint32_t w = detail::A32(s->post).load(Order::kAcquire);
        if ((w & kPostState) == kFilled) {
          posted = false;
          direct = detail::take_filled(s, w);
        }
      }
      if (direct == 0) {
        avail = detail::A64(s->tail).load(Order::kAcquire) - head;
        if (avail > 0 && posted) {
          // Bytes came through the ring after all (sent before the offer was seen): take
          // the offer back; what a sender put there first comes first.
          posted = false;
          direct = detail::unpost(s);
        }
      }
      if (direct > 0) {
        done += direct;
        i = 0;
        if (done == len || !waitall) break;
        continue;
      }
      if (avail > 0 && done < len) {
        i = 0;
        const uint64_t want = len - done;
        const uint32_t n = static_cast<uint32_t>(want < avail ? want : avail);
        if ((flags & MSG_TRUNC) == 0) detail::ring_read(out + done, r, cap, head + (peek ? done : 0), n);
        done += n;
        if (!peek) head += n;
        // Published with the unlock below, or now if the call waits for more (room for
        // the sender meanwhile).
        if (done == len || (flags & MSG_WAITALL) == 0 || peek) break;
        detail::publish_head(s, head);
        look = true;
        continue;
      }
      if (!posted && done < len && (look || (i & 15) == 15)) {
        look = false;
        if (const uint32_t m = detail::recv_straight(s, head, out + done, len - done, (flags & MSG_TRUNC) == 0, peek); m > 0) {
          done += m;
          i = 0;
          look = true;
          if (done == len || !waitall || peek) break;
          continue;
        }
      }
      // Nothing to read: the three reasons to stop waiting, loaded at the top of the pass.
      if (len == 0 || (shut & kShutRd) != 0) break;
      if (eof != 0) {
        // eof is stored (release) after the peer's last tail: after an acquire fence, one
        // more look at tail sees everything the peer sent.
        fence<Scope::kDevice>(Order::kAcquire);
        if (detail::A64(s->tail).load(Order::kAcquire) != head) continue;
        break;
      }
      if (reset != 0) {
        result = -ECONNRESET;
        break;
      }
      if (nb) {
        result = -EAGAIN;
        break;
      }
      if (!posted && offer) {
        if (detail::post(s, out + done, len - done)) {
          posted = true;
          continue;  // look at the ring once more: a send may have gone in before the offer
        }
        look = true;  // a sender's offer is there (or on its way): take it next pass
      }
      if ((result = detail::wait_check(s, fd, i)) != 0) break;
      spin_pause(i);
    }
    if (posted) done += detail::unpost(s);  // leaving (end of stream, error): bytes first
    if (done > 0) {
      result = static_cast<int64_t>(done);
      if (!peek) detail::A64(s->bytes_in).fetch_add(done, Order::kRelaxed);
    }
    if (result >= 0) detail::addr_out(detail::get(s->peer_port), src, src_len);
  } else {
    for (uint32_t i = 0;; ++i) {
      if (detail::A64(s->tail).load(Order::kAcquire) != head) {
        const uint64_t h = detail::A64(*reinterpret_cast<uint64_t*>(r + (head & (cap - 1)))).load(Order::kRelaxed);
        const uint32_t mlen = static_cast<uint32_t>(h);
        const uint32_t n = mlen < len ? mlen : static_cast<uint32_t>(len);
        detail::ring_read(out, r, cap, head + kDgramHeader, n);
        if (!peek) {
          head += kDgramHeader + round8(mlen);  // published with the unlock below
          detail::A64(s->bytes_in).fetch_add(mlen, Order::kRelaxed);
        }
        detail::addr_out(static_cast<uint32_t>(h >> 32), src, src_len);
        result = (flags & MSG_TRUNC) != 0 ? mlen : n;
        break;
      }
      if ((detail::get(s->shut) & kShutRd) != 0) break;
      if (nb) {
        result = -EAGAIN;
        break;
      }
      if ((result = detail::wait_check(s, fd, i)) != 0) break;
      spin_pause(i);
    }
  }
  detail::unlock_consumer(s, head);
  return result;
}

GPUSOCK_HD inline int shutdown(int fd, int how) {
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  int r = 0;
  if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR) {
    r = -EINVAL;
  } else if (detail::get(s->type) == SOCK_STREAM && detail::ld32(s->state) != kConnected) {
    r = -ENOTCONN;
  } else {
    const uint32_t bits = how == SHUT_RD ? kShutRd : how == SHUT_WR ? kShutWr : (kShutRd | kShutWr);
    const uint32_t before = detail::A32(s->shut).fetch_or(bits, Order::kAcqRel);
    if ((bits & kShutWr) != 0 && (before & kShutWr) == 0 && detail::get(s->type) == SOCK_STREAM) detail::signal_eof(t, s);
  }
  detail::unpin(t, s);
  return r;
}

// The descriptor goes at once; calls other lanes are blocked in on it end with -EBADF.
// A stream's peer reads the bytes already sent, then end of stream; its sends fail with
// -EPIPE. A listener's queued, unaccepted connections are reset (their clients' recv
// answers -ECONNRESET).
GPUSOCK_HD inline int close(int fd) {
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  uint32_t expect = kFdOpen;
  if (!detail::A32(s->fd_state).compare_exchange(expect, kFdClosed, Order::kAcqRel)) {
    detail::unpin(t, s);
    return -EBADF;  // another lane closed it first
  }
  const uint32_t st = detail::ld32(s->state);
  if (st == kListening) {
    // Connectors check fd_state under the producer lock: once this lock/unlock pair is
    // done, nothing more is queued.
    detail::lock(s->producer_lock);
    detail::unlock(s->producer_lock);
    const uint32_t cap = t->ring_bytes / 8;
    auto* q = reinterpret_cast<uint64_t*>(detail::ring(t, detail::index_of(t, s)));
    const uint64_t head = detail::lock_consumer(s);
    const uint64_t tail = detail::A64(s->tail).load(Order::kAcquire);
    for (uint64_t h = head; h != tail; ++h) {
      const uint64_t e = detail::A64(q[h & (cap - 1)]).load(Order::kRelaxed);
      Socket* pending = &t->sockets[static_cast<uint32_t>(e)];
      Socket* client = detail::pin(t, detail::get(pending->peer), detail::get(pending->peer_gen), false, false);
      if (client != nullptr) {
        detail::A32(client->reset).store(1, Order::kRelease);
        detail::unpin(t, client);
      }
      detail::A32(pending->fd_state).store(kFdClosed, Order::kRelease);  // its client's sends: EPIPE
      detail::unpin(t, pending);  // the queue's reference
    }
    detail::unlock_consumer(s, tail);
  } else if (detail::get(s->type) == SOCK_STREAM) {
    detail::signal_eof(t, s);
  }
  detail::unpin(t, s);  // this call's
  detail::unpin(t, s);  // the descriptor's
  return 0;
}

GPUSOCK_HD inline int getsockname(int fd, sockaddr* addr, socklen_t* len) {
  if (addr == nullptr || len == nullptr) return -EFAULT;
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  detail::addr_out(detail::get(s->port), addr, len);
  detail::unpin(t, s);
  return 0;
}

GPUSOCK_HD inline int getpeername(int fd, sockaddr* addr, socklen_t* len) {
  if (addr == nullptr || len == nullptr) return -EFAULT;
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  const uint32_t peer = detail::A32(s->peer_port).load(Order::kAcquire);
  const bool connected = detail::get(s->type) == SOCK_STREAM ? detail::ld32(s->state) == kConnected : peer != 0;
  if (connected) detail::addr_out(peer, addr, len);
  detail::unpin(t, s);
  return connected ? 0 : -ENOTCONN;
}

// Options a localdevice socket keeps (and reports back): SO_REUSEADDR, SO_REUSEPORT,
// SO_KEEPALIVE (accepted, no effect: ports are exclusive, peers cannot vanish unseen),
// TCP_NODELAY (always on in effect: bytes are visible to the reader when send returns).
// Read-only: SO_ERROR (0), SO_TYPE, SO_DOMAIN, SO_ACCEPTCONN, SO_RCVBUF/SO_SNDBUF (the
// ring size). Others: -ENOPROTOOPT.
GPUSOCK_HD inline int option_bit(int level, int name) {
  if (level == SOL_SOCKET && name == SO_REUSEADDR) return 1;
  if (level == SOL_SOCKET && name == SO_REUSEPORT) return 2;
  if (level == SOL_SOCKET && name == SO_KEEPALIVE) return 4;
  if (level == IPPROTO_TCP && name == TCP_NODELAY) return 8;
  return 0;
}

GPUSOCK_HD inline int setsockopt(int fd, int level, int name, const void* value, socklen_t len) {
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  int r = 0;
  const int bit = option_bit(level, name);
  if (value == nullptr) {
    r = -EFAULT;
  } else if (len < sizeof(int)) {
    r = -EINVAL;
  } else if (bit == 0) {
    r = (level == SOL_SOCKET && (name == SO_RCVBUF || name == SO_SNDBUF)) ? 0 : -ENOPROTOOPT;
  } else if (*static_cast<const int*>(value) != 0) {
    detail::A32(s->options).fetch_or(static_cast<uint32_t>(bit), Order::kRelaxed);
  } else {
    detail::A32(s->options).fetch_and(~static_cast<uint32_t>(bit), Order::kRelaxed);
  }
  detail::unpin(t, s);
  return r;
}

GPUSOCK_HD inline int getsockopt(int fd, int level, int name, void* value, socklen_t* len) {
  if (value == nullptr || len == nullptr) return -EFAULT;
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  int v = 0;
  int r = 0;
  const int bit = option_bit(level, name);
  if (bit != 0) {
    v = (detail::A32(s->options).load(Order::kRelaxed) & static_cast<uint32_t>(bit)) != 0 ? 1 : 0;
    if (bit == 8) v = 1;
  } else if (level == SOL_SOCKET && name == SO_ERROR) {
    v = 0;
  } else if (level == SOL_SOCKET && name == SO_TYPE) {
    v = static_cast<int>(detail::get(s->type));
  } else if (level == SOL_SOCKET && name == SO_DOMAIN) {
    v = AF_LOCALDEVICE;
  } else if (level == SOL_SOCKET && name == SO_ACCEPTCONN) {
    v = detail::ld32(s->state) == kListening ? 1 : 0;
  } else if (level == SOL_SOCKET && (name == SO_RCVBUF || name == SO_SNDBUF)) {
    v = static_cast<int>(t->ring_bytes);
  } else {
    r = -ENOPROTOOPT;
  }
  if (r == 0) {
    const uint32_t n = *len < sizeof v ? *len : static_cast<uint32_t>(sizeof v);
    const auto* b = reinterpret_cast<const uint8_t*>(&v);
    for (uint32_t i = 0; i < n; ++i) static_cast<uint8_t*>(value)[i] = b[i];
    *len = n;
  }
  detail::unpin(t, s);
  return r;
}

GPUSOCK_HD inline int fcntl(int fd, int cmd, int arg) {
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return -EBADF;
  int r = 0;
  if (cmd == F_GETFL) {
    r = O_RDWR | (detail::A32(s->nonblock).load(Order::kRelaxed) != 0 ? O_NONBLOCK : 0);
  } else if (cmd == F_SETFL) {
    detail::A32(s->nonblock).store((arg & O_NONBLOCK) != 0 ? 1 : 0, Order::kRelaxed);
  } else {
    r = -EINVAL;
  }
  detail::unpin(t, s);
  return r;
}

// The events of one localdevice descriptor that are ready now (POLLNVAL for a bad one).
GPUSOCK_HD inline short poll_events(int fd, short events) {
  const Table* t = detail::table();
  Socket* s = detail::pin_fd(t, fd);
  if (s == nullptr) return POLLNVAL;
  short ready = 0;
  const uint32_t st = detail::ld32(s->state);
  // A stream's data: bytes in the ring, or a blocked sender's offer to take.
  const bool data = detail::A64(s->tail).load(Order::kAcquire) != detail::load_head(s, Order::kAcquire) ||
                    (detail::ld32(s->post) & kPostState) == kOffered;
  if (st == kListening) {
    if (data) ready |= POLLIN;
  } else if (detail::get(s->type) == SOCK_DGRAM) {
    if (data || (detail::ld32(s->shut) & kShutRd) != 0) ready |= POLLIN;
    ready |= POLLOUT;
  } else if (st != kConnected) {
    ready |= POLLOUT | POLLHUP;
  } else {
    const bool eof = detail::ld32(s->eof) != 0 || (detail::ld32(s->shut) & kShutRd) != 0;
    if (data || eof || detail::ld32(s->reset) != 0) ready |= POLLIN;
    if (eof) ready |= POLLRDHUP;
    if (detail::ld32(s->reset) != 0) ready |= POLLERR;
    Socket* p = detail::pin(t, detail::get(s->peer), detail::get(s->peer_gen), false, false);
    if (p == nullptr || detail::ld32(p->fd_state) == kFdClosed) {
      ready |= POLLHUP;
    } else if (t->ring_bytes - (detail::A64(p->tail).load(Order::kRelaxed) - detail::load_head(p, Order::kAcquire)) > 0) {
      ready |= POLLOUT;
    }
    if (p != nullptr) detail::unpin(t, p);
  }
  detail::unpin(t, s);
  // POLLERR, POLLHUP and POLLNVAL are reported whether asked for or not, as in poll(2).
  return static_cast<short>(ready & (events | POLLERR | POLLHUP | POLLNVAL));
}

// Warp-collective stream send/recv (socket.hpp's raw::warp_send/warp_recv for localdevice
// descriptors): the leader of `mask` owns the call (locks, waits, the decision of how
// much fits) and every lane of mask copies each piece with it. On the cpu device the
// leader makes the ordinary call alone (its lanes are threads; copying is not where its
// time goes) and shares the result.
GPUSOCK_HD inline int64_t warp_send(uint32_t mask, int fd, const void* buf, uint64_t len, int flags) {
  const uint32_t leader = warp::leader(mask);
  const bool lead = warp::lane_id() == leader;
  if constexpr (!is_gpu()) {
    int64_t r = lead ? sendto(fd, buf, len, flags, nullptr, 0) : 0;
    return warp::shfl(mask, r, leader);
  }
  if (len > 0 && buf == nullptr) return -EFAULT;
  const Table* t = detail::table();
  Socket* s = nullptr;
  Socket* p = nullptr;
  int64_t err = 0;
  if (lead) {
    s = detail::peek_fd(t, fd);
    if (s == nullptr) err = -EBADF;
    else if (detail::get(s->type) != SOCK_STREAM) err = -EOPNOTSUPP;
    else if ((detail::get(s->shut) & kShutWr) != 0) err = -EPIPE;
    else if (detail::get(s->state) != kConnected) err = -ENOTCONN;
    else if ((p = detail::lock_peer(t, detail::get(s->peer), detail::get(s->peer_gen))) == nullptr) err = -EPIPE;
  }
  err = warp::shfl(mask, err, leader);
  const uint32_t cap = t->ring_bytes;
  const bool nb = lead && s != nullptr && detail::nonblocking(s, flags);
  uint8_t* r = lead && p != nullptr ? detail::ring(t, detail::index_of(t, p)) : nullptr;
  uint64_t tail = lead && p != nullptr ? detail::A64(p->tail).load(Order::kRelaxed) : 0;
  uint64_t done = 0;
  // The leader's offer of the warp's bytes to the reader (detail::offer_bytes), and since
  // when the ring has been empty with it out. The lanes' stores into buf before this call
  // are ordered before the leader's offer by this barrier.
  bool offered = false;
  uint64_t empty_since = 0;
  const bool may_offer = lead && !nb && detail::can_post(t, buf, len);
  warp::sync(mask);
  for (uint32_t i = 0; err == 0;) {
    // The leader decides: n bytes now (n > 0) into the ring, or into the reader's own
    // buffer (dst, when the reader waits on an empty ring), wait (0), or stop (err); or
    // that the reader took `taken` of the bytes it offered.
    uint32_t n = 0, taken = 0;
    int64_t stop = 0;
    uint8_t* dst = nullptr;
    if (lead) {
      const uint32_t fds = detail::get(p->fd_state), shut = detail::get(p->shut), offer = detail::get(p->post);
      const uint64_t head = detail::load_head(p, Order::kAcquire);
      if (fds == kFdClosed || (shut & kShutRd) != 0) {
        stop = -EPIPE;
      } else if (offered) {
        // Nothing into the ring while the offer is out (the reader takes it after every
        // byte before it): wait until it is taken, or take it back from a reader that
        // does not take offers.
        taken = detail::offer_progress(p, offer, tail == head, &empty_since, &offered);
        if (offered) stop = detail::wait_check(s, fd, i);
      } else {
        const uint64_t left = len - done;
        if (tail == head && left > 0 && (n = detail::claim(p, offer, &dst)) > 0) {
          if (n > left) n = static_cast<uint32_t>(left);
        } else {
          const uint64_t room = cap - (tail - head);
          n = static_cast<uint32_t>(left < room ? left : room);
          if (n == 0 && len > 0) {
            if (nb) {
              stop = -EAGAIN;
            } else if (may_offer && offer == kPostNone &&
                       detail::offer_bytes(p, static_cast<const uint8_t*>(buf) + done, left)) {
              offered = true;  // the ring is full: the reader may take the rest straight
            } else {
              stop = detail::wait_check(s, fd, i);
            }
          }
        }
      }
      if (stop != 0 && offered) {
        taken = detail::withdraw_offer(p);  // leaving: what the reader took counts
        offered = false;
      }
    }
    taken = warp::shfl(mask, taken, leader);
    stop = warp::shfl(mask, stop, leader);
    if (taken > 0) {
      warp::sync(mask);  // after the leader's acquire: no lane writes buf before the reader's copy ended
      done += taken;
      i = 0;
      if (done == len || stop != 0) break;
      continue;
    }
    n = warp::shfl(mask, n, leader);
    if (n > 0) {
      dst = reinterpret_cast<uint8_t*>(warp::shfl(mask, reinterpret_cast<uintptr_t>(dst), leader));
      const uint8_t* src = static_cast<const uint8_t*>(buf) + done;
      // Every lane copies the leader's piece: only the leader names a length.
      if (dst != nullptr) {
        hostcall::internal::group_copy(mask, dst, src, lead ? n : 0, false);
        if (lead) detail::fill(p, n);
      } else {
        const uint64_t pos = warp::shfl(mask, tail, leader);
        uint8_t* rr = reinterpret_cast<uint8_t*>(warp::shfl(mask, reinterpret_cast<uintptr_t>(r), leader));
        detail::ring_write(rr, cap, pos, src, lead ? n : 0, mask);
        if (lead) {
          tail += n;
          detail::A64(p->tail).store(tail, Order::kRelease);
        }
      }
      done += n;
      i = 0;
      if (done == len) break;
      continue;
    }
    if (stop != 0) {
      err = stop;
      break;
    }
    if (len == 0) break;
    spin_pause(i++);
  }
  if (lead && p != nullptr) {
    if (done > 0) detail::A64(s->bytes_out).fetch_add(done, Order::kRelaxed);
    detail::unlock(p->producer_lock);
  }
  return done > 0 ? static_cast<int64_t>(done) : err;
}

// One receive of up to len bytes (MSG_WAITALL is ignored, as for host sockets).
GPUSOCK_HD inline int64_t warp_recv(uint32_t mask, int fd, void* buf, uint64_t len, int flags) {
  const uint32_t leader = warp::leader(mask);
  const bool lead = warp::lane_id() == leader;
  if constexpr (!is_gpu()) {
    int64_t r = lead ? recvfrom(fd, buf, len, flags & ~MSG_WAITALL, nullptr, nullptr) : 0;
    return warp::shfl(mask, r, leader);
  }
  if (len > 0 && buf == nullptr) return -EFAULT;
  const Table* t = detail::table();
  Socket* s = nullptr;
  int64_t err = 0;
  uint64_t head = 0;  // the leader's: what the socket's owner has consumed
  if (lead) {
    s = detail::lock_own(t, fd, &head);
    if (s == nullptr) err = -EBADF;
    else if (detail::get(s->type) != SOCK_STREAM) err = -EOPNOTSUPP;
    else if (detail::get(s->state) != kConnected) err = -ENOTCONN;
    if (err != 0 && s != nullptr) {
      detail::unlock_consumer(s, head);
      s = nullptr;
    }
  }
  err = warp::shfl(mask, err, leader);
  const uint32_t cap = t->ring_bytes;
  const bool nb = lead && s != nullptr && detail::nonblocking(s, flags);
  const bool peek = (flags & MSG_PEEK) != 0;
  int64_t result = err;
  bool posted = false;  // the leader offered buf to the sender (detail::post)
  const bool offer = lead && !nb && !peek && (flags & MSG_TRUNC) == 0 && detail::can_post(t, buf, len);
  // A blocked sender's offered bytes: looked for on the first empty pass and every 16th
  // pass after that.
  const bool take = lead && len > 0;
  bool look = true;
  for (uint32_t i = 0; err == 0;) {
    uint32_t n = 0;
    uint32_t direct = 0;  // bytes a sender wrote straight into buf
    uint32_t got = 0;     // bytes of a sender's offer (at from) to copy into buf
    const uint8_t* from = nullptr;
    int64_t stop = 0;     // 1: end of stream (result 0)
    if (lead) {
      // The reasons to stop waiting first, relaxed: one round with the acquire loads.
      const uint32_t shut = detail::get(s->shut), eof = detail::get(s->eof), reset = detail::get(s->reset);
      const uint32_t w = posted ? detail::A32(s->post).load(Order::kAcquire) : 0;
      const uint64_t avail = detail::A64(s->tail).load(Order::kAcquire) - head;
      if ((w & kPostState) == kFilled) {
        posted = false;
        direct = detail::take_filled(s, w);
      } else if (avail > 0 && posted) {
        posted = false;  // bytes came through the ring after all: take the offer back
        direct = detail::unpost(s);
      }
      n = direct > 0 ? 0 : static_cast<uint32_t>(len < avail ? len : avail);
      if (n == 0 && direct == 0 && take && !posted && (look || (i & 15) == 15)) {
        look = false;
        if ((got = detail::take_offer(s, detail::A32(s->post).load(Order::kRelaxed), head, &from)) > len) {
          got = static_cast<uint32_t>(len);
        }
      }
      if (n == 0 && direct == 0 && got == 0) {
        if (len == 0 || (shut & kShutRd) != 0) {
          stop = 1;
        } else if (eof != 0) {
          fence<Scope::kDevice>(Order::kAcquire);
          if (detail::A64(s->tail).load(Order::kAcquire) == head) stop = 1;
        } else if (reset != 0) {
          stop = -ECONNRESET;
        } else if (nb) {
          stop = -EAGAIN;
        } else if (!posted && offer && detail::post(s, static_cast<uint8_t*>(buf), len)) {
          posted = true;  // and look at the ring once more: a send may have gone in first
          i = 0;
        } else {
          look = look || (!posted && offer);  // the post failed: a sender's offer is there
          stop = detail::wait_check(s, fd, i);
        }
        if (stop != 0 && posted) {
          posted = false;  // leaving: what a sender put there is the answer
          if ((direct = detail::unpost(s)) > 0) stop = 0;
        }
      }
      if (direct > 0) detail::A64(s->bytes_in).fetch_add(direct, Order::kRelaxed);
    }
    got = warp::shfl(mask, got, leader);
    if (got > 0) {
      // A sender's bytes, taken straight: every lane copies (loads that skip L1: another
      // warp wrote them), then the leader hands the offer back.
      from = reinterpret_cast<const uint8_t*>(warp::shfl(mask, reinterpret_cast<uintptr_t>(from), leader));
      warp::sync(mask);  // every lane's loads after the leader's acquire of the offer
      if ((flags & MSG_TRUNC) == 0) {
        hostcall::internal::group_copy(mask, static_cast<uint8_t*>(buf), from, lead ? got : 0, true);
      }
      if (lead && peek) {
        detail::keep_offer(s);
      } else if (lead) {
        detail::took(s, got);
        detail::A64(s->bytes_in).fetch_add(got, Order::kRelaxed);
      }
      result = got;
      break;
    }
    direct = warp::shfl(mask, direct, leader);
    if (direct > 0) {
      // Another warp's stores: every lane that reads buf next must see them, not a line
      // its SM's L1 kept from before.
      fence<Scope::kDevice>(Order::kAcquire);
      result = direct;
      break;
    }
    n = warp::shfl(mask, n, leader);
    stop = warp::shfl(mask, stop, leader);
    if (n > 0) {
      const uint64_t pos = warp::shfl(mask, head, leader);
      const uint8_t* rr = detail::ring(t, fd_index(fd));
      detail::ring_read(static_cast<uint8_t*>(buf), rr, cap, pos, lead ? n : 0, mask);
      if (lead && !peek) {
        head += n;  // published with the unlock below
        detail::A64(s->bytes_in).fetch_add(n, Order::kRelaxed);
      }
      result = n;
      break;
    }
    if (stop != 0) {
      result = stop == 1 ? 0 : stop;
      break;
    }
    spin_pause(i++);
  }
  if (lead && s != nullptr) detail::unlock_consumer(s, head);
  return result;
}

}  // namespace net::local
}  // namespace gpusock
