// The localdevice family: warp-to-warp sockets in device memory. Every test runs on the
// cpu device and on a GPU (skipped, with the reason, where there is none), and checks
// through the runtime's counters that the kernels made no hostcall.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/localdevice_host.hpp"
#include "gpusock/net/socket.hpp"
#include "kernel_test.hpp"

namespace {

using gpusock::DeviceBuffer;
using gpusock::DeviceKind;
using gpusock::Dim3;
using gpusock::Runtime;
using gpusock::sockaddr_ld;
namespace raw = gpusock::raw;
namespace warp = gpusock::warp;

using gpusock::testing::await_box;
using gpusock::testing::mix64;
using gpusock::testing::publish;

GPUSOCK_HD inline sockaddr_ld ld_addr(uint32_t port) {
  sockaddr_ld a{};
  a.sld_family = AF_LOCALDEVICE;
  a.sld_port = port;
  return a;
}
GPUSOCK_HD inline sockaddr* sa(sockaddr_ld& a) { return reinterpret_cast<sockaddr*>(&a); }


// A listener on `port` (0: ephemeral). Returns fd or -errno; *bound gets the port.
GPUSOCK_HD inline int ld_listen(uint32_t port, int backlog, uint32_t* bound = nullptr) {
  int fd = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
  if (fd < 0) return fd;
  sockaddr_ld a = ld_addr(port);
  int r = raw::bind(fd, sa(a), sizeof a);
  if (r == 0) r = raw::listen(fd, backlog);
  socklen_t len = sizeof a;
  if (r == 0) r = raw::getsockname(fd, sa(a), &len);
  if (r < 0) {
    raw::close(fd);
    return r;
  }
  if (bound != nullptr) *bound = a.sld_port;
  return fd;
}

// Connects to `port`, retrying while nothing listens yet (the listener is another warp
// that may not have started). Returns fd or -errno.
GPUSOCK_HD inline int ld_connect(uint32_t port, int type = SOCK_STREAM) {
  int fd = raw::socket(AF_LOCALDEVICE, type, 0);
  if (fd < 0) return fd;
  sockaddr_ld a = ld_addr(port);
  const uint64_t until = gpusock::globaltimer_ns() + 60'000'000'000ull;
  for (uint32_t i = 0;; ++i) {
    int r = raw::connect(fd, sa(a), sizeof a);
    if (r == 0) return fd;
    if (r != -ECONNREFUSED || gpusock::globaltimer_ns() > until) {
      raw::close(fd);
      return r;
    }
    gpusock::backoff(i);
  }
}

// A connection through a fresh listener on an ephemeral port: *l the listener, *c the
// client, *s the accepted side.
GPUSOCK_HD inline void ld_pair(int* l, int* c, int* s) {
  uint32_t port = 0;
  *l = ld_listen(0, 1, &port);
  sockaddr_ld a = ld_addr(port);
  *c = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
  raw::connect(*c, sa(a), sizeof a);
  *s = raw::accept(*l, nullptr, nullptr);
}

GPUSOCK_HD inline int64_t send_all(int fd, const void* p, uint64_t n) { return raw::send(fd, p, n, 0); }

// ---- fixture ------------------------------------------------------------------------

class LdTest : public gpusock::testing::KernelTest {
 protected:
  void Start(gpusock::net::LocalDeviceOptions ld = small(), bool tcp = false) {
    StartRuntime();
    if (HasFatalFailure()) return;
    auto l = gpusock::net::enable_localdevice(*rt_, ld);
    ASSERT_TRUE(l.ok()) << l.status().to_string();
    ld_ = *l;
    if (tcp) {
      gpusock::Status s = gpusock::iouring::enable(*rt_);
      ASSERT_TRUE(s.ok()) << s.to_string();
    }
    lanes_before_ = rt_->stats().lanes;
  }
  static gpusock::net::LocalDeviceOptions small() {
    gpusock::net::LocalDeviceOptions o;
    o.max_sockets = 256;
    o.ring_bytes = 16u << 10;
    return o;
  }
  // Hostcalls answered since Start(): localdevice calls must make none.
  uint64_t HostcallLanes() { return rt_->stats().lanes - lanes_before_; }

  std::shared_ptr<gpusock::net::LocalDevice> ld_;
  uint64_t lanes_before_ = 0;
};

INSTANTIATE_TEST_SUITE_P(BothDevices, LdTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

// ---- ping-pong ------------------------------------------------------------------------

// Warp `server_warp` (lane 0) serves localdevice:42; warp `client_warp` (lane 0) sends
// `rounds` messages of 64 bytes and checks each echo. out[0]: server result, out[1]:
// client result (0 = all good, else where it failed), out[2..5]: names seen.
struct PingPong {
  GPUSOCK_HD void operator()(uint64_t server_warp, uint64_t client_warp, int rounds, int64_t* out) const {
    if (warp::lane_id() != 0) return;
    const uint64_t w = gpusock::global_warp_id();
    if (w == server_warp) {
      int l = ld_listen(42, 4);
      if (l < 0) {
        out[0] = 1000 - l;
        return;
      }
      sockaddr_ld peer{};
      socklen_t plen = sizeof peer;
      int c = raw::accept(l, sa(peer), &plen);
      if (c < 0) {
        out[0] = 2000 - c;
        return;
      }
      out[2] = peer.sld_port;
      sockaddr_ld me{};
      socklen_t mlen = sizeof me;
      raw::getsockname(c, sa(me), &mlen);
      out[3] = me.sld_port;
      char buf[64];
      int64_t r = 0;
      for (int i = 0; i < rounds; ++i) {
        r = raw::recv(c, buf, sizeof buf, MSG_WAITALL);
        if (r != 64) break;
        r = send_all(c, buf, 64);
        if (r != 64) break;
      }
      const int64_t eof = raw::recv(c, buf, sizeof buf, 0);
      raw::close(c);
      raw::close(l);
      out[0] = (r == 64 && eof == 0) ? 0 : 3000 + r * 10 + eof;
    } else if (w == client_warp) {
      int c = ld_connect(42);
      if (c < 0) {
        out[1] = 1000 - c;
        return;
      }
      sockaddr_ld me{}, peer{};
      socklen_t mlen = sizeof me, plen = sizeof peer;
      raw::getsockname(c, sa(me), &mlen);
      raw::getpeername(c, sa(peer), &plen);
      out[4] = me.sld_port;
      out[5] = peer.sld_port;
      uint8_t msg[64], back[64];
      int64_t bad = 0;
      for (int i = 0; i < rounds && bad == 0; ++i) {
        for (int k = 0; k < 64; ++k) msg[k] = static_cast<uint8_t>(i * 7 + k);
        if (send_all(c, msg, 64) != 64) bad = 2000 + i;
        else if (raw::recv(c, back, 64, MSG_WAITALL) != 64) bad = 3000 + i;
        else
          for (int k = 0; k < 64; ++k) bad |= back[k] != msg[k] ? (4000 + i) : 0;
      }
      raw::close(c);
      out[1] = bad;
    }
  }
};

TEST_P(LdTest, PingPongBetweenTwoWarpsOfOneBlock) {
  Start();
  auto out = Buffer<int64_t>(8);
  auto k = Launch({1}, {64}, PingPong{}, uint64_t{0}, uint64_t{1}, 1000, out.data());
  Finish(k);
  auto o = out.to_host();
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], 0);
  EXPECT_EQ(o[3], 42) << "the accepted socket's name is the listener's";
  EXPECT_EQ(o[5], 42) << "the client's peer is localdevice:42";
  EXPECT_GE(o[4], 49152) << "an unbound client gets an ephemeral port";
  EXPECT_EQ(o[2], o[4]) << "the server sees the client's port";
  EXPECT_EQ(HostcallLanes(), 0u);
}

TEST_P(LdTest, PingPongBetweenWarpsOfDifferentBlocks) {
  Start();
  auto out = Buffer<int64_t>(8);
  // Block 0's warp serves, block 3's warp calls.
  auto k = Launch({4}, {32}, PingPong{}, uint64_t{0}, uint64_t{3}, 1000, out.data());
  Finish(k);
  auto o = out.to_host();
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], 0);
  EXPECT_EQ(HostcallLanes(), 0u);
}

// ---- small sends of whole words (loaded with the socket's fields) ----------------------

// Lane 0 of warp 1 sends `msgs` messages of the sizes below out of device memory (byte k
// of message i is i * 37 + k): whole 8-byte words from an aligned address, which a send
// loads early, mixed with odd sizes and an unaligned source, which it copies as before;
// the odd sizes leave the ring's position unaligned, and the 16 KiB ring wraps under all
// of them. Every 16th message it first waits until lane 0 of warp 0, receiving each
// message with recv(MSG_WAITALL) into device memory, has offered its buffer (up to 20 ms
// a message, so a hand-off that never comes fails the test instead of hanging it), and
// that message goes straight into the buffer. out[0]: sender result, out[1]: wrong
// bytes, out[2]: receiver result, out[3]: the receiving socket's bytes_direct.
struct SmallSends {
  GPUSOCK_HD static uint32_t size_of(int i) {
    const uint32_t sizes[13] = {8, 16, 24, 32, 40, 48, 56, 64, 5, 64, 13, 64, 8};
    return sizes[i % 13];
  }
  // Until the reader of c's peer offers its buffer, or 20 ms.
  GPUSOCK_HD static void await_offer(int c) {
    namespace ld = gpusock::net::local;
    const ld::Table* t = ld::detail::table();
    ld::Socket* me = ld::detail::slot_of(t, c);
    if (me == nullptr) return;
    ld::Socket* peer = &t->sockets[ld::detail::get(me->peer)];
    const uint64_t t0 = gpusock::globaltimer_ns();
    while ((ld::detail::A32(peer->post).load(gpusock::Order::kAcquire) & ld::kPostState) != ld::kPosted &&
           gpusock::globaltimer_ns() - t0 < 20000000) {
      gpusock::spin_pause(64);
    }
  }
  GPUSOCK_HD void operator()(int msgs, uint8_t* sbuf, uint8_t* rbuf, int64_t* out) const {
    if (warp::lane_id() != 0) return;
    if (gpusock::global_warp_id() == 1) {
      const int c = ld_connect(61);
      int64_t r = c < 0 ? c : 0;
      for (int i = 0; i < msgs && r == 0; ++i) {
        const uint32_t n = size_of(i);
        uint8_t* src = sbuf + (i % 7 == 3 ? 1 : 0);
        for (uint32_t k = 0; k < n; ++k) src[k] = static_cast<uint8_t>(i * 37 + k);
        if (i % 16 == 15) await_offer(c);
        const int64_t sent = raw::send(c, src, n, 0);
        if (sent != n) r = 1000000 + i * 10 + (sent < 0 ? 1 : 2);
      }
      if (c >= 0) raw::close(c);
      out[0] = r;
      return;
    }
    const int l = ld_listen(61, 4);
    const int c = l < 0 ? l : raw::accept(l, nullptr, nullptr);
    int64_t r = c < 0 ? c : 0, wrong = 0;
    for (int i = 0; i < msgs && r == 0; ++i) {
      const uint32_t n = size_of(i);
      const int64_t got = raw::recv(c, rbuf, n, MSG_WAITALL);
      if (got != n) {
        r = 1000000 + i;
        break;
      }
      for (uint32_t k = 0; k < n; ++k) wrong += rbuf[k] != static_cast<uint8_t>(i * 37 + k);
    }
    if (r == 0 && raw::recv(c, rbuf, 1, 0) != 0) r = 2;  // then end of stream
    if (c >= 0) {
      namespace ld = gpusock::net::local;
      ld::Socket* me = ld::detail::slot_of(ld::detail::table(), c);
      out[3] = me != nullptr ? static_cast<int64_t>(ld::detail::A64(me->bytes_direct).load(gpusock::Order::kRelaxed)) : -1;
      raw::close(c);
    }
    if (l >= 0) raw::close(l);
    out[1] = wrong;
    out[2] = r;
  }
};

TEST_P(LdTest, SmallSendsOfWholeWordsArriveIntactThroughTheRingAndStraight) {
  Start();  // 16 KiB rings
  constexpr int kMsgs = 4000;
  auto sbuf = Buffer<uint8_t>(128);
  auto rbuf = Buffer<uint8_t>(128);
  auto out = Buffer<int64_t>(4);
  auto k = Launch({2}, {32}, SmallSends{}, kMsgs, sbuf.data(), rbuf.data(), out.data());
  Finish(k);
  auto o = out.to_host();
  EXPECT_EQ(o[0], 0) << "sender";
  EXPECT_EQ(o[1], 0) << "wrong bytes";
  EXPECT_EQ(o[2], 0) << "receiver";
  EXPECT_GT(o[3], 0) << "no message went straight into the waiting receiver's buffer";
  EXPECT_EQ(HostcallLanes(), 0u);
}

// ---- one listener, many client warps ---------------------------------------------------

// Warp 0's lanes serve localdevice:7 together until `clients` connections are answered;
// every other warp's lane 0 is a client: sends its id, expects id * 3, expects EOF.
struct ManyClients {
  GPUSOCK_HD void operator()(int clients, uint32_t* served, int64_t* out) const {
    const uint64_t w = gpusock::global_warp_id();
    if (w == 0) {
      serve_all(clients, served, out);
      return;
    }
    if (warp::lane_id() != 0) return;
    int c = ld_connect(7);
    if (c < 0) {
      out[w] = 1000 - c;
      return;
    }
    uint64_t id = w, a = 0;
    int64_t s = send_all(c, &id, 8);
    int64_t r = raw::recv(c, &a, 8, MSG_WAITALL);
    char x;
    int64_t eof = raw::recv(c, &x, 1, 0);
    raw::close(c);
    out[w] = (s == 8 && r == 8 && a == id * 3 && eof == 0) ? 0 : 2000 + (s != 8) * 100 + (r != 8) * 10 + (eof != 0);
  }
  GPUSOCK_HD static void serve_all(int clients, uint32_t* served, int64_t* out) {
    // Lane 0 listens and shares the descriptor; every lane accepts.
    int l = warp::lane_id() == 0 ? ld_listen(7, 4096) : 0;
    l = warp::shfl(0xffffffffu, l, 0);
    if (l < 0) {
      out[0] = 1000 - l;
      return;
    }
    int64_t errors = 0;
    for (;;) {
      int c = raw::accept(l, nullptr, nullptr);
      if (c < 0) {
        if (c != -EBADF) ++errors;  // EBADF: the last one out closed the listener
        break;
      }
      uint64_t id = 0;
      if (raw::recv(c, &id, 8, MSG_WAITALL) != 8) ++errors;
      uint64_t a = id * 3;
      if (send_all(c, &a, 8) != 8) ++errors;
      raw::close(c);
      if (gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(*served).fetch_add(1, gpusock::Order::kAcqRel) + 1 ==
          static_cast<uint32_t>(clients)) {
        raw::close(l);
        break;
      }
    }
    gpusock::AtomicRef<int64_t, gpusock::Scope::kDevice>(out[0]).fetch_add(errors, gpusock::Order::kRelaxed);
  }
};

TEST_P(LdTest, OneListenerServesAThousandClientWarps) {
  constexpr int kClients = 1024;
  gpusock::net::LocalDeviceOptions o;
  o.max_sockets = 2 * kClients + 64;
  o.ring_bytes = 32u << 10;  // the accept queue holds ring_bytes / 8 = 4096
  opts_.cpu_resident_warps = 128;
  Start(o);
  auto out = Buffer<int64_t>(kClients + 1);
  auto served = Buffer<uint32_t>(1);
  auto k = Launch({kClients + 1}, {32}, ManyClients{}, kClients, served.data(), out.data());
  Finish(k);
  auto o2 = out.to_host();
  EXPECT_EQ(o2[0], 0) << "server errors";
  int bad = 0;
  int64_t first = 0;
  for (int i = 1; i <= kClients; ++i) {
    if (o2[i] != 0 && bad++ == 0) first = o2[i];
  }
  EXPECT_EQ(bad, 0) << "first bad client result: " << first;
  EXPECT_EQ(served.to_host()[0], static_cast<uint32_t>(kClients));
  EXPECT_EQ(HostcallLanes(), 0u);
  auto snap = ld_->snapshot();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(snap->sockets.empty()) << snap->sockets.size() << " sockets left in use";
}

// ---- a gigabyte, checked word by word ------------------------------------------------

// Lane 0 listens on localdevice:port and accepts one connection; every lane gets the
// listener in *l and the connection as the result (negative: what failed).
GPUSOCK_HD inline int warp_listen_accept(uint32_t port, int* l) {
  const uint32_t all = 0xffffffffu;
  *l = warp::shfl(all, warp::lane_id() == 0 ? ld_listen(port, 1) : 0, 0);
  const int c = warp::shfl(all, warp::lane_id() == 0 && *l >= 0 ? raw::accept(*l, nullptr, nullptr) : 0, 0);
  return *l < 0 ? *l : c;
}

// The warp sends `bytes` (a multiple of 8; word k is mix64(k)) on c with warp_send of
// `chunk`-byte pieces, each written into sbuf first. 0, or the first failure (-1: short).
GPUSOCK_HD inline int64_t send_words(int c, uint64_t bytes, uint32_t chunk, uint8_t* sbuf) {
  const uint32_t all = 0xffffffffu;
  int64_t r = 0;
  for (uint64_t off = 0; off < bytes && r >= 0; off += chunk) {
    auto* wds = reinterpret_cast<uint64_t*>(sbuf);
    for (uint32_t k = warp::lane_id(); k < chunk / 8; k += 32) wds[k] = mix64(off / 8 + k);
    warp::sync(all);
    r = raw::warp_send(all, c, sbuf, chunk, 0);
    if (r != static_cast<int64_t>(chunk)) r = r < 0 ? r : -1;
  }
  return r < 0 ? r : 0;
}

// Warp 0 streams `bytes` (a multiple of 8) to warp 1 with warp_send in `chunk`-byte
// pieces; word k of the stream is mix64(k). Warp 1 receives with warp_recv into
// chunk-sized windows and checks every word. out[0]: sender result, out[1]: bytes
// received, out[2]: wrong words, out[3]: receiver result.
struct Stream {
  GPUSOCK_HD void operator()(uint64_t bytes, uint32_t chunk, uint8_t* sbuf, uint8_t* rbuf, int64_t* out) const {
    const uint32_t all = 0xffffffffu;
    const uint32_t lane = warp::lane_id();
    if (gpusock::global_warp_id() == 0) {
      int l = 0;
      const int c = warp_listen_accept(9, &l);
      if (c < 0) {
        if (lane == 0) out[0] = c;
        return;
      }
      const int64_t r = send_words(c, bytes, chunk, sbuf);
      if (lane == 0) {
        raw::close(c);
        raw::close(l);
        out[0] = r;
      }
    } else {
      int c = lane == 0 ? ld_connect(9) : 0;
      c = warp::shfl(all, c, 0);
      if (c < 0) {
        if (lane == 0) out[3] = c;
        return;
      }
      uint64_t got = 0;
      uint64_t wrong = 0;
      int64_t r = 1;
      while (r > 0) {
        uint32_t fill = 0;
        while (fill < chunk) {
          r = raw::warp_recv(all, c, rbuf + fill, chunk - fill, 0);
          if (r <= 0) break;
          fill += static_cast<uint32_t>(r);
        }
        const auto* wds = reinterpret_cast<const uint64_t*>(rbuf);
        for (uint32_t k = lane; k < fill / 8; k += 32) wrong += wds[k] != mix64(got / 8 + k);
        got += fill;
        warp::sync(all);
      }
      for (uint32_t o = 16; o > 0; o /= 2) wrong += warp::shfl(all, wrong, (lane + o) % 32);
      if (lane == 0) {
        raw::close(c);
        out[1] = static_cast<int64_t>(got);
        out[2] = static_cast<int64_t>(wrong);
        out[3] = r;
      }
    }
  }
};

TEST_P(LdTest, GigabyteBetweenTwoWarpsArrivesWholeAndInOrder) {
  constexpr uint64_t kBytes = 1ull << 30;
  constexpr uint32_t kChunk = 64u << 10;
  gpusock::net::LocalDeviceOptions o;
  o.max_sockets = 16;
  o.ring_bytes = 256u << 10;
  Start(o);
  auto sbuf = Buffer<uint8_t>(kChunk);
  auto rbuf = Buffer<uint8_t>(kChunk);
  auto out = Buffer<int64_t>(4);
  auto t0 = std::chrono::steady_clock::now();
  auto k = Launch({2}, {32}, Stream{}, kBytes, kChunk, sbuf.data(), rbuf.data(), out.data());
  Finish(k);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto r = out.to_host();
  EXPECT_EQ(r[0], 0) << "sender";
  EXPECT_EQ(r[1], static_cast<int64_t>(kBytes)) << "bytes received";
  EXPECT_EQ(r[2], 0) << "words out of place";
  EXPECT_EQ(r[3], 0) << "receiver's last recv (0: end of stream)";
  EXPECT_EQ(HostcallLanes(), 0u);
  std::printf("1 GiB warp to warp in %.2f s (%.2f GB/s, %s device)\n", s, kBytes / s / 1e9,
              gpusock::to_string(GetParam()));
}

// ---- a waiting recv's buffer filled by the sender --------------------------------------

// Warp 1 streams `bytes` in pieces of uneven sizes (byte k of the stream is
// pattern(k)); its first send waits until warp 0's recv has offered its buffer (so at
// least that piece goes straight in). Warp 0 receives into a device buffer: with
// warp_recv (warp 1 then sends with warp_send), or with `scalar`, lane 0's
// recv(MSG_WAITALL) and send(). Once every byte is in, both warps hold their sockets
// open for the host's snapshot (box words 0 and 2 up, word 1 back); then the sender closes and
// the receiver's next recv (its offer out, as likely as not) must give end of stream.
// out[0]: sender result, out[1]: bytes received, out[2]: wrong bytes, out[3]: that last
// recv, out[4]: how long the sender waited for the offer (0: it came).
GPUSOCK_HD inline uint8_t pattern(uint64_t k) { return static_cast<uint8_t>(k * 131 + (k >> 9)); }

struct HandedStraight {
  GPUSOCK_HD void operator()(uint64_t bytes, bool scalar, uint8_t* sbuf, uint8_t* rbuf, uint32_t* box,
                             int64_t* out) const {
    namespace ld = gpusock::net::local;
    const uint32_t all = 0xffffffffu;
    const uint32_t lane = warp::lane_id();
    if (gpusock::global_warp_id() == 0) {
      int l = lane == 0 ? ld_listen(77, 1) : 0;
      int c = lane == 0 && l >= 0 ? raw::accept(l, nullptr, nullptr) : 0;
      c = warp::shfl(all, c, 0);
      uint64_t got = 0;
      int64_t r = 1, wrong = 0;
      while (c >= 0 && r > 0) {
        const uint64_t want = got == bytes ? 65536 : (bytes - got < 65536 ? bytes - got : 65536);
        if (got == bytes && lane == 0) {  // all in: the host looks, then the sender closes
          out[1] = static_cast<int64_t>(got);
          out[2] = wrong;
          publish(box, 0, 1);
          await_box(box, 1);
        }
        warp::sync(all);
        if (scalar) {
          r = lane == 0 ? raw::recv(c, rbuf, want, MSG_WAITALL) : 0;
          r = warp::shfl(all, r, 0);
        } else {
          r = raw::warp_recv(all, c, rbuf, want, 0);
        }
        if (r <= 0) break;
        if (lane == 0) {
          for (int64_t k = 0; k < r; ++k) wrong += rbuf[k] != pattern(got + k);
        }
        got += static_cast<uint64_t>(r);
        warp::sync(all);
      }
      if (lane == 0) {
        if (got != bytes) out[1] = static_cast<int64_t>(got);
        out[3] = c < 0 ? c : r;
        publish(box, 0, 1);  // (again, for a receiver that never got there)
        raw::close(c);
        raw::close(l);
      }
    } else {
      int c = lane == 0 ? ld_connect(77) : 0;
      c = warp::shfl(all, c, 0);
      if (c < 0) {
        if (lane == 0) out[0] = c;
        return;
      }
      if (lane == 0) {  // wait for the reader's offer (the test's reason to exist)
        const ld::Table* t = ld::detail::table();
        ld::Socket* me = &t->sockets[ld::fd_index(c)];
        ld::Socket* peer = &t->sockets[ld::detail::get(me->peer)];
        const uint64_t t0 = gpusock::globaltimer_ns();
        int64_t waited = 0;
        while ((ld::detail::A32(peer->post).load(gpusock::Order::kAcquire) & ld::kPostState) != ld::kPosted) {
          waited = static_cast<int64_t>(gpusock::globaltimer_ns() - t0);
          if (waited > 10'000'000'000) break;
        }
        out[4] = (ld::detail::A32(peer->post).load(gpusock::Order::kAcquire) & ld::kPostState) == ld::kPosted ? 0 : waited;
      }
      warp::sync(all);
      constexpr uint32_t kSizes[] = {40000, 1, 7, 4096, 100, 20000, 65536, 333, 131072, 12};
      int64_t r = 0;
      uint64_t off = 0;
      for (uint32_t i = 0; off < bytes && r >= 0; ++i) {
        uint64_t n = kSizes[i % 10];
        if (n > bytes - off) n = bytes - off;
        for (uint64_t k = lane; k < n; k += 32) sbuf[k] = pattern(off + k);
        warp::sync(all);
        if (scalar) {
          r = lane == 0 ? raw::send(c, sbuf, n, 0) : 0;
          r = warp::shfl(all, r, 0);
        } else {
          r = raw::warp_send(all, c, sbuf, n, 0);
        }
        if (r != static_cast<int64_t>(n)) r = r < 0 ? r : -1;
        off += n;
      }
      if (lane == 0) {
        out[0] = r < 0 ? r : 0;
        publish(box, 2, 1);  // every send returned (its counters are in)
        await_box(box, 1);
        raw::close(c);
      }
    }
  }
};

class LdHandedTest : public LdTest {
 protected:
  void Run(bool scalar) {
    constexpr uint64_t kBytes = (1ull << 20) + 3;
    Start();  // 16 KiB rings: most pieces are larger than the ring
    auto sbuf = Buffer<uint8_t>(131072);
    auto rbuf = Buffer<uint8_t>(65536);
    auto out = Buffer<int64_t>(5);
    auto k = Launch({2}, {32}, HandedStraight{}, kBytes, scalar, sbuf.data(), rbuf.data(), box_.dev, out.data());
    const bool held = Await(0) != 0 && Await(2) != 0;
    auto snap = ld_->snapshot();
    Post(1, 1);
    Finish(k);
    ASSERT_TRUE(held) << "the receiver never got to the end";
    auto o = out.to_host();
    EXPECT_EQ(o[0], 0) << "sender";
    EXPECT_EQ(o[1], static_cast<int64_t>(kBytes)) << "bytes received";
    EXPECT_EQ(o[2], 0) << "bytes out of place";
    EXPECT_EQ(o[3], 0) << "the receiver's last recv (0: end of stream)";
    EXPECT_EQ(o[4], 0) << "ns the sender waited for an offer that never came";
    ASSERT_TRUE(snap.ok()) << snap.status().to_string();
    const gpusock::net::LocalSocketInfo* reader = nullptr;
    for (const auto& i : snap->sockets) {
      if (i.state == "connected" && i.fd >= 0 && i.bytes_in > 0) reader = &i;
    }
    ASSERT_NE(reader, nullptr) << "the reader's socket is not in the snapshot";
    EXPECT_EQ(reader->bytes_in, kBytes);
    EXPECT_GT(reader->bytes_direct, 0u) << "no byte went straight into the waiting recv's buffer";
    EXPECT_LE(reader->bytes_direct, kBytes);
    EXPECT_EQ(snap->direct_bytes, reader->bytes_direct);
    EXPECT_EQ(HostcallLanes(), 0u);
    std::printf("%s: %llu of %llu bytes went straight into the recv's buffer\n", scalar ? "recv/send" : "warp_recv/warp_send",
                static_cast<unsigned long long>(reader->bytes_direct), static_cast<unsigned long long>(kBytes));
  }
};
INSTANTIATE_TEST_SUITE_P(BothDevices, LdHandedTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

TEST_P(LdHandedTest, AWaitingWarpRecvGetsTheBytesStraightIntoItsBufferInOrder) { Run(false); }
TEST_P(LdHandedTest, AWaitingRecvWaitallGetsTheBytesStraightIntoItsBufferInOrder) { Run(true); }

// ---- a blocked sender's bytes taken straight by the reader ----------------------------

// Warp 1 streams `bytes` (a multiple of 8; word k is mix64(k)) to warp 0 with warp_send of
// `chunk`-byte pieces out of device memory, larger than the 16 KiB ring, so each send
// finds the ring full and offers the rest of its piece. Warp 0 reads into a device buffer
// of `chunk` bytes with warp_recv, with MSG_DONTWAIT, again on EAGAIN (a non-blocking recv
// offers no buffer of its own, so every byte that goes straight is one it took from the
// sender). By `mode`, before each recv: 0, nothing; 1, a MSG_PEEK of one byte (which must
// see an offer without taking it); 2, poll() for POLLIN (which must report one); 3, after
// each of its first 8 receives the reader stays away 3 ms, so the sender takes its offer
// back (kOfferPatienceNs) and writes into the ring; 4, before each of its first 8
// receives the reader peeks for 3 ms on end, so the sender's taking back meets peeks
// that hold the offer for a moment and put it back. out[0]: sender
// result, out[1]: bytes received, out[2]: wrong words, out[3]: the receiver's last recv,
// out[4]: the reader socket's bytes_direct before it closed.
struct OfferedSends {
  GPUSOCK_HD void operator()(uint64_t bytes, uint32_t chunk, int mode, uint8_t* sbuf, uint8_t* rbuf,
                             int64_t* out) const {
    namespace ld = gpusock::net::local;
    const uint32_t all = 0xffffffffu;
    const uint32_t lane = warp::lane_id();
    if (gpusock::global_warp_id() == 1) {
      int c = lane == 0 ? ld_connect(12) : 0;
      c = warp::shfl(all, c, 0);
      if (c < 0) {
        if (lane == 0) out[0] = c;
        return;
      }
      const int64_t r = send_words(c, bytes, chunk, sbuf);
      if (lane == 0) {
        raw::close(c);
        out[0] = r;
      }
      return;
    }
    int l = 0;
    const int c = warp_listen_accept(12, &l);
    if (c < 0) {
      if (lane == 0) out[3] = c;
      return;
    }
    uint64_t got = 0, wrong = 0;
    int64_t r = 1;
    int pauses = 0;
    while (r > 0) {
      if (mode == 1) {
        r = raw::warp_recv(all, c, rbuf, 1, MSG_PEEK);
        if (r <= 0) break;
      } else if (mode == 4 && pauses < 8) {
        ++pauses;
        const uint64_t t0 = gpusock::globaltimer_ns();
        for (;;) {
          r = raw::warp_recv(all, c, rbuf, 1, MSG_PEEK | MSG_DONTWAIT);
          if (r != -EAGAIN && r <= 0) break;
          // Lane 0's clock decides for the warp: the next call is the whole warp's.
          const int more = lane == 0 ? gpusock::globaltimer_ns() - t0 < 3000000 : 0;
          if (r > 0 && warp::shfl(all, more, 0) == 0) break;
        }
        if (r <= 0) break;
      } else if (mode == 2) {
        int ready = 0;
        if (lane == 0) {
          pollfd p{c, POLLIN, 0};
          ready = raw::poll(&p, 1, 5000);
        }
        if (warp::shfl(all, ready, 0) != 1) {
          r = -ETIMEDOUT;
          break;
        }
      }
      r = raw::warp_recv(all, c, rbuf, chunk, MSG_DONTWAIT);
      if (r == -EAGAIN) {
        r = 1;
        continue;
      }
      if (r <= 0) break;
      // Pieces end on word boundaries except where a recv splits a word: check whole words.
      const uint64_t first = (got + 7) / 8, last = (got + static_cast<uint64_t>(r)) / 8;
      for (uint64_t k = first + lane; k < last; k += 32) {
        uint64_t w;
        memcpy(&w, rbuf + (k * 8 - got), 8);
        wrong += w != mix64(k);
      }
      got += static_cast<uint64_t>(r);
      warp::sync(all);
      if (mode == 3 && ++pauses <= 8) {
        const uint64_t t0 = gpusock::globaltimer_ns();
        while (gpusock::globaltimer_ns() - t0 < 3000000) gpusock::spin_pause(64);
      }
    }
    for (uint32_t o = 16; o > 0; o /= 2) wrong += warp::shfl(all, wrong, (lane + o) % 32);
    if (lane == 0) {
      ld::Socket* me = ld::detail::slot_of(ld::detail::table(), c);
      out[4] = me != nullptr ? static_cast<int64_t>(ld::detail::A64(me->bytes_direct).load(gpusock::Order::kRelaxed)) : -1;
      raw::close(c);
      raw::close(l);
      out[1] = static_cast<int64_t>(got);
      out[2] = static_cast<int64_t>(wrong);
      out[3] = r;
    }
  }
};

class LdOfferTest : public LdTest {
 protected:
  void Run(int mode) {
    constexpr uint64_t kBytes = 8ull << 20;
    constexpr uint32_t kChunk = 64u << 10;
    Start();  // 16 KiB rings
    auto sbuf = Buffer<uint8_t>(kChunk);
    auto rbuf = Buffer<uint8_t>(kChunk);
    auto out = Buffer<int64_t>(5);
    auto k = Launch({2}, {32}, OfferedSends{}, kBytes, kChunk, mode, sbuf.data(), rbuf.data(), out.data());
    Finish(k);
    auto o = out.to_host();
    EXPECT_EQ(o[0], 0) << "sender";
    EXPECT_EQ(o[1], static_cast<int64_t>(kBytes)) << "bytes received";
    EXPECT_EQ(o[2], 0) << "words out of place";
    EXPECT_EQ(o[3], 0) << "the receiver's last recv (0: end of stream)";
    if (mode < 3) {
      EXPECT_GT(o[4], 0) << "no offered byte was taken straight (a non-blocking recv: none was handed to it)";
    }
    EXPECT_LE(o[4], static_cast<int64_t>(kBytes));
    EXPECT_EQ(HostcallLanes(), 0u);
    std::printf("mode %d: %lld of %llu bytes taken straight from the sender's buffer\n", mode,
                static_cast<long long>(o[4]), static_cast<unsigned long long>(kBytes));
  }
};
INSTANTIATE_TEST_SUITE_P(BothDevices, LdOfferTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

TEST_P(LdOfferTest, AReaderTakesABlockedSendersBytesStraightInOrder) { Run(0); }
TEST_P(LdOfferTest, APeekSeesAnOfferWithoutTakingIt) { Run(1); }
TEST_P(LdOfferTest, PollReportsAnOfferAsReadable) { Run(2); }
TEST_P(LdOfferTest, ASenderWhoseReaderStaysAwayTakesItsOfferBackAndUsesTheRing) { Run(3); }
TEST_P(LdOfferTest, ASenderTakesItsOfferBackWhileTheReaderPeeksAtIt) { Run(4); }

// ---- many lanes on one stream ----------------------------------------------------------

// Warp 1's 32 lanes all send `records` records of 1000 bytes on one connection at once,
// each record filled with (lane, sequence); warp 0's lane 0 reads them all and checks that
// no record is torn by another lane's bytes. out[0]: records received whole, out[1]: torn
// records, out[2]: records out of order per lane, out[3]: the receiver's last recv.
struct SharedStream {
  GPUSOCK_HD void operator()(int records, int64_t* out) const {
    const uint32_t lane = warp::lane_id();
    if (gpusock::global_warp_id() == 0) {
      if (lane != 0) return;
      int l = ld_listen(31, 1);
      int c = raw::accept(l, nullptr, nullptr);
      int next[32] = {};
      uint8_t rec[1000];
      int64_t whole = 0, torn = 0, disorder = 0, r = 0;
      while ((r = raw::recv(c, rec, sizeof rec, MSG_WAITALL)) == static_cast<int64_t>(sizeof rec)) {
        bool same = true;
        for (uint32_t k = 2; k < sizeof rec; ++k) same &= rec[k] == rec[0];
        if (!same || rec[0] >= 32) {
          ++torn;
          continue;
        }
        ++whole;
        disorder += rec[1] != static_cast<uint8_t>(next[rec[0]]);
        next[rec[0]] = rec[1] + 1;
      }
      out[0] = whole;
      out[1] = torn;
      out[2] = disorder;
      out[3] = r;
      raw::close(c);
      raw::close(l);
    } else {
      int c = lane == 0 ? ld_connect(31) : 0;
      c = warp::shfl(0xffffffffu, c, 0);
      uint8_t rec[1000];
      for (int i = 0; i < records; ++i) {
        for (uint32_t k = 0; k < sizeof rec; ++k) rec[k] = static_cast<uint8_t>(lane);
        rec[1] = static_cast<uint8_t>(i);
        if (raw::send(c, rec, sizeof rec, 0) != static_cast<int64_t>(sizeof rec)) break;
      }
      warp::sync(0xffffffffu);
      if (lane == 0) raw::close(c);
    }
  }
};

TEST_P(LdTest, ConcurrentSendsOnOneStreamNeverInterleaveInsideACall) {
  Start();  // 16 KiB rings: senders wait for room while holding the peer's lock
  auto out = Buffer<int64_t>(4);
  auto k = Launch({2}, {32}, SharedStream{}, 50, out.data());
  Finish(k);
  auto o = out.to_host();
  EXPECT_EQ(o[0], 32 * 50);
  EXPECT_EQ(o[1], 0) << "records with another lane's bytes inside";
  EXPECT_EQ(o[2], 0) << "one lane's records out of order";
  EXPECT_EQ(o[3], 0) << "end of stream after the last record";
  EXPECT_EQ(HostcallLanes(), 0u);
}

// Lane 0 sends without end into a connection nobody reads; lane 1 closes the descriptor
// under it. The send must end (EBADF or EPIPE), and nothing may hang.
struct CloseUnderSend {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    const uint32_t lane = warp::lane_id();
    if (gpusock::global_warp_id() != 0 || lane > 1) return;
    if (lane == 0) {
      int l = ld_listen(32, 1);
      int c = ld_connect(32);
      gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(box[8]).store(static_cast<uint32_t>(c), gpusock::Order::kRelease);
      char b[512] = {};
      int64_t r;
      while ((r = raw::send(c, b, sizeof b, 0)) > 0) {
      }
      out[0] = r;
      out[2] = raw::close(l);
    } else {
      uint32_t c;
      for (uint32_t i = 0; (c = gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(box[8]).load(gpusock::Order::kAcquire)) == 0; ++i) {
        gpusock::backoff(i);
      }
      // Let the sender fill the ring and block.
      const uint64_t until = gpusock::globaltimer_ns() + 20'000'000ull;
      for (uint32_t i = 0; gpusock::globaltimer_ns() < until; ++i) gpusock::backoff(i);
      out[1] = raw::close(static_cast<int>(c));
    }
  }
};

TEST_P(LdTest, CloseUnderABlockedSendEndsItWithEbadf) {
  Start();
  auto out = Buffer<int64_t>(4);
  auto dbox = Buffer<uint32_t>(16);
  auto k = Launch({1}, {32}, CloseUnderSend{}, dbox.data(), out.data());
  Finish(k, std::chrono::seconds(60));
  auto o = out.to_host();
  EXPECT_EQ(o[0], -EBADF);
  EXPECT_EQ(o[1], 0);
  EXPECT_EQ(o[2], 0);
  auto snap = ld_->snapshot();
  ASSERT_TRUE(snap.ok());
  // The client's slot is gone; the listener is closed; the queued server side was reset.
  EXPECT_TRUE(snap->sockets.empty()) << snap->sockets.size() << " sockets left";
}

// ---- datagrams -------------------------------------------------------------------------

// Lane 0: a receiver on localdevice:5 and a sender; message boundaries, sources,
// MSG_TRUNC, EMSGSIZE, and a full receiver (EAGAIN without loss).
struct Datagrams {
  GPUSOCK_HD void operator()(uint32_t ring_bytes, uint8_t* big, int64_t* out) const {
    if (warp::lane_id() != 0) return;
    int rx = raw::socket(AF_LOCALDEVICE, SOCK_DGRAM, 0);
    sockaddr_ld a = ld_addr(5);
    out[0] = raw::bind(rx, sa(a), sizeof a);
    int tx = raw::socket(AF_LOCALDEVICE, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    const uint32_t sizes[] = {1, 100, 1000, 8000, 0, 3};
    uint8_t msg[8000];
    for (uint32_t i = 0; i < 6; ++i) {
      for (uint32_t k = 0; k < sizes[i]; ++k) msg[k] = static_cast<uint8_t>(i + k);
      if (raw::sendto(tx, msg, sizes[i], 0, sa(a), sizeof a) != sizes[i]) out[1] |= 1 << i;
    }
    sockaddr_ld txname{};
    socklen_t tl = sizeof txname;
    raw::getsockname(tx, sa(txname), &tl);
    uint8_t got[8000];
    for (uint32_t i = 0; i < 6; ++i) {
      sockaddr_ld from{};
      socklen_t fl = sizeof from;
      int64_t n = raw::recvfrom(rx, got, sizeof got, 0, sa(from), &fl);
      if (n != sizes[i] || from.sld_port != txname.sld_port || fl != sizeof from) out[2] |= 1 << i;
      for (uint32_t k = 0; k < sizes[i] && k < sizeof got; ++k) {
        if (got[k] != static_cast<uint8_t>(i + k)) out[2] |= 1 << (8 + i);
      }
    }
    // MSG_TRUNC: a short buffer gets the head; the call reports the datagram's length;
    // the rest of that datagram is gone, the next one is whole.
    raw::sendto(tx, msg, 500, 0, sa(a), sizeof a);
    raw::sendto(tx, msg, 7, 0, sa(a), sizeof a);
    out[3] = raw::recv(rx, got, 10, MSG_TRUNC);
    out[4] = raw::recv(rx, got, sizeof got, MSG_PEEK);
    out[5] = raw::recv(rx, got, sizeof got, 0);
    // The largest datagram fills the whole (empty) ring; one byte more can never fit.
    out[6] = raw::sendto(tx, big, ring_bytes - 8, 0, sa(a), sizeof a);
    out[14] = raw::recv(rx, big, ring_bytes, 0);
    out[15] = raw::sendto(tx, big, ring_bytes - 7, 0, sa(a), sizeof a);
    // Fill the receiver: the sender is non-blocking, so the first datagram that does not
    // fit answers EAGAIN; nothing sent before it is lost.
    int64_t sent = 0, last = 0;
    for (;;) {
      int64_t dg[13] = {sent};  // 104 bytes; the datagram is the first 100, numbered
      last = raw::sendto(tx, dg, 100, 0, sa(a), sizeof a);
      if (last < 0) break;
      ++sent;
    }
    out[7] = last;
    out[8] = sent;
    int64_t received = 0, in_order = 1;
    for (;;) {
      int64_t v = -1;
      int64_t n = raw::recv(rx, &v, 8, MSG_DONTWAIT | MSG_TRUNC);
      if (n < 0) {
        out[9] = n;  // EAGAIN once drained
        break;
      }
      in_order &= v == received;
      ++received;
    }
    out[10] = received;
    out[11] = in_order;
    // A datagram with nobody bound at the destination.
    sockaddr_ld nowhere = ld_addr(6);
    out[12] = raw::sendto(tx, msg, 1, 0, sa(nowhere), sizeof nowhere);
    out[13] = raw::send(tx, msg, 1, 0);  // no destination
    raw::close(tx);
    raw::close(rx);
  }
};

TEST_P(LdTest, DatagramsKeepBoundariesAndAFullReceiverLosesNothing) {
  Start();
  auto out = Buffer<int64_t>(16);
  auto big = Buffer<uint8_t>(small().ring_bytes);
  auto k = Launch({1}, {32}, Datagrams{}, small().ring_bytes, big.data(), out.data());
  Finish(k);
  auto o = out.to_host();
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], 0) << "sends that failed (bit per datagram)";
  EXPECT_EQ(o[2], 0) << "datagrams received wrong (bit per datagram; +8: content)";
  EXPECT_EQ(o[3], 500) << "MSG_TRUNC reports the datagram's full length";
  EXPECT_EQ(o[4], 7) << "PEEK sees the next datagram whole";
  EXPECT_EQ(o[5], 7);
  EXPECT_EQ(o[7], -EAGAIN);
  // 100-byte datagrams take 8 + 104 bytes of the 16 KiB ring.
  EXPECT_EQ(o[8], static_cast<int64_t>((16u << 10) / 112));
  EXPECT_EQ(o[9], -EAGAIN);
  EXPECT_EQ(o[10], o[8]) << "every datagram sent was received";
  EXPECT_EQ(o[11], 1) << "in order";
  EXPECT_EQ(o[12], -ECONNREFUSED);
  EXPECT_EQ(o[13], -EDESTADDRREQ);
  EXPECT_EQ(o[6], static_cast<int64_t>(small().ring_bytes - 8));
  EXPECT_EQ(o[14], static_cast<int64_t>(small().ring_bytes - 8));
  EXPECT_EQ(o[15], -EMSGSIZE);
  EXPECT_EQ(HostcallLanes(), 0u);
}

// ---- errors, each its own test ------------------------------------------------------------

enum Probe : int {
  kRefused, kAddrInUse, kBadFd, kNotConn, kPipeAndEof, kAgain, kBadArgs, kReset, kShutWr, kMsgSize, kPollTimeout,
  kOptions,
};

struct ErrorProbe {
  GPUSOCK_HD void operator()(int which, int64_t* out) const {
    if (warp::lane_id() != 0) return;
    switch (which) {
      case kRefused: {
        int c = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
        sockaddr_ld a = ld_addr(4242);
        out[0] = raw::connect(c, sa(a), sizeof a);
        int l = ld_listen(4242, 1);
        out[1] = raw::connect(c, sa(a), sizeof a);
        raw::close(l);
        raw::close(c);
        int d = raw::socket(AF_LOCALDEVICE, SOCK_DGRAM, 0);
        out[2] = raw::connect(d, sa(a), sizeof a);
        raw::close(d);
        break;
      }
      case kAddrInUse: {
        int l = ld_listen(80, 1);
        int b = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
        sockaddr_ld a = ld_addr(80);
        out[0] = raw::bind(b, sa(a), sizeof a);
        // Datagram ports are a namespace of their own.
        int d = raw::socket(AF_LOCALDEVICE, SOCK_DGRAM, 0);
        out[1] = raw::bind(d, sa(a), sizeof a);
        // The port is free again once its socket is closed.
        raw::close(l);
        out[2] = raw::bind(b, sa(a), sizeof a);
        raw::close(b);
        raw::close(d);
        break;
      }
      case kBadFd: {
        int c = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
        out[0] = raw::close(c);
        out[1] = raw::close(c);
        char x = 0;
        out[2] = raw::send(c, &x, 1, 0);
        out[3] = raw::recv(gpusock::net::local::kFdBase + 12345, &x, 1, 0);
        // A stale descriptor whose slot was reused names nothing.
        int again = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
        out[4] = gpusock::net::local::fd_index(again) == gpusock::net::local::fd_index(c) ? 1 : 0;
        out[5] = raw::listen(c, 1);
        raw::close(again);
        break;
      }
      case kNotConn: {
        int c = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
        char x = 0;
        out[0] = raw::send(c, &x, 1, 0);
        out[1] = raw::recv(c, &x, 1, 0);
        sockaddr_ld a{};
        socklen_t len = sizeof a;
        out[2] = raw::getpeername(c, sa(a), &len);
        out[3] = raw::shutdown(c, SHUT_WR);
        raw::close(c);
        break;
      }
      case kPipeAndEof: {
        int l, c, s;
        ld_pair(&l, &c, &s);
        out[0] = raw::send(c, "abc", 3, 0);
        raw::close(c);
        char b[8];
        out[1] = raw::recv(s, b, sizeof b, 0);  // bytes sent before the close still arrive
        out[2] = raw::recv(s, b, sizeof b, 0);  // then end of stream
        out[3] = raw::send(s, "x", 1, 0);       // and the peer is gone
        raw::close(s);
        raw::close(l);
        break;
      }
      case kAgain: {
        int l = raw::socket(AF_LOCALDEVICE, SOCK_STREAM | SOCK_NONBLOCK, 0);
        sockaddr_ld a = ld_addr(0);
        raw::bind(l, sa(a), sizeof a);
        raw::listen(l, 1);
        socklen_t len = sizeof a;
        raw::getsockname(l, sa(a), &len);
        out[0] = raw::accept(l, nullptr, nullptr);
        int c = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
        raw::connect(c, sa(a), sizeof a);
        int s = raw::accept(l, nullptr, nullptr);
        char b[256] = {};
        out[1] = raw::recv(s, b, sizeof b, MSG_DONTWAIT);
        // A full ring: a non-blocking sender gets exactly the ring's worth in, then EAGAIN.
        raw::fcntl(c, F_SETFL, O_NONBLOCK);
        out[6] = raw::fcntl(c, F_GETFL, 0);
        int64_t total = 0, r = 0;
        while ((r = raw::send(c, b, sizeof b, 0)) > 0) total += r;
        out[2] = r;
        out[3] = total;
        // A second listener connection beyond the backlog of 1: EAGAIN for non-blocking.
        int c2 = raw::socket(AF_LOCALDEVICE, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int c3 = raw::socket(AF_LOCALDEVICE, SOCK_STREAM | SOCK_NONBLOCK, 0);
        out[4] = raw::connect(c2, sa(a), sizeof a);
        out[5] = raw::connect(c3, sa(a), sizeof a);
        raw::close(c3);
        raw::close(c2);
        raw::close(s);
        raw::close(c);
        raw::close(l);
        break;
      }
      case kBadArgs: {
        int c = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
        sockaddr_ld a = ld_addr(1);
        out[0] = raw::bind(c, sa(a), 4);  // shorter than sockaddr_ld
        sockaddr_in in{};
        in.sin_family = AF_INET;
        out[1] = raw::bind(c, reinterpret_cast<sockaddr*>(&in), sizeof in);
        a.sld_port = 70000;
        out[2] = raw::bind(c, sa(a), sizeof a);
        out[3] = raw::socket(AF_LOCALDEVICE, SOCK_RAW, 0);
        int d = raw::socket(AF_LOCALDEVICE, SOCK_DGRAM, 0);
        out[4] = raw::listen(d, 1);
        out[5] = raw::shutdown(c, 7);
        raw::close(d);
        raw::close(c);
        break;
      }
      case kReset: {
        // The listener closes with the connection still in its queue.
        uint32_t port = 0;
        int l = ld_listen(0, 4, &port);
        sockaddr_ld a = ld_addr(port);
        int c = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
        out[0] = raw::connect(c, sa(a), sizeof a);
        raw::close(l);
        char b[4];
        out[1] = raw::recv(c, b, sizeof b, 0);
        out[2] = raw::send(c, "x", 1, 0);
        raw::close(c);
        break;
      }
      case kShutWr: {
        int l, c, s;
        ld_pair(&l, &c, &s);
        raw::send(c, "hello", 5, 0);
        out[0] = raw::shutdown(c, SHUT_WR);
        out[1] = raw::send(c, "x", 1, 0);  // EPIPE: our side is shut
        char b[16];
        out[2] = raw::recv(s, b, sizeof b, MSG_WAITALL);  // the 5 bytes, then EOF ends WAITALL
        out[3] = raw::recv(s, b, sizeof b, 0);
        out[4] = raw::send(s, "back", 4, 0);  // the other direction still works
        out[5] = raw::recv(c, b, sizeof b, 0);
        raw::close(s);
        raw::close(c);
        raw::close(l);
        break;
      }
      case kPollTimeout: {
        int l = ld_listen(0, 1);
        int d = raw::socket(AF_LOCALDEVICE, SOCK_DGRAM, 0);
        sockaddr_ld a = ld_addr(0);
        raw::bind(d, sa(a), sizeof a);
        pollfd p[3] = {{l, POLLIN, 0}, {d, POLLIN, 0}, {-1, POLLIN, 0}};
        const uint64_t t0 = gpusock::globaltimer_ns();
        out[0] = raw::poll(p, 3, 50);
        out[1] = static_cast<int64_t>((gpusock::globaltimer_ns() - t0) / 1000000u);
        out[2] = p[0].revents | p[1].revents | p[2].revents;
        pollfd bad{gpusock::net::local::kFdBase + 777, POLLIN, 0};
        out[3] = raw::poll(&bad, 1, 0);
        out[4] = bad.revents;
        raw::close(d);
        raw::close(l);
        break;
      }
      case kOptions: {
        int c = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
        int one = 1, v = -1;
        socklen_t len = sizeof v;
        out[0] = raw::setsockopt(c, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        raw::getsockopt(c, SOL_SOCKET, SO_REUSEADDR, &v, &len);
        out[1] = v;
        len = sizeof v;
        raw::getsockopt(c, SOL_SOCKET, SO_DOMAIN, &v, &len);
        out[2] = v;
        len = sizeof v;
        raw::getsockopt(c, SOL_SOCKET, SO_TYPE, &v, &len);
        out[3] = v;
        out[4] = raw::setsockopt(c, SOL_SOCKET, SO_BROADCAST, &one, sizeof one);
        out[5] = raw::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        len = sizeof v;
        raw::getsockopt(c, SOL_SOCKET, SO_ERROR, &v, &len);
        out[6] = v;
        raw::close(c);
        break;
      }
      default:
        break;
    }
  }
};


class LdErrorTest : public LdTest {
 protected:
  std::vector<int64_t> Run(Probe which) {
    Start();
    auto out = Buffer<int64_t>(16);
    auto k = Launch({1}, {32}, ErrorProbe{}, static_cast<int>(which), out.data());
    Finish(k);
    EXPECT_EQ(HostcallLanes(), 0u) << "localdevice calls made hostcalls";
    return out.to_host();
  }
};
INSTANTIATE_TEST_SUITE_P(BothDevices, LdErrorTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

TEST_P(LdErrorTest, ConnectWithNothingListeningIsRefused) {
  auto o = Run(kRefused);
  EXPECT_EQ(o[0], -ECONNREFUSED);
  EXPECT_EQ(o[1], 0) << "the same socket connects once something listens";
  EXPECT_EQ(o[2], -ECONNREFUSED) << "datagram connect to an unbound port";
}

TEST_P(LdErrorTest, BindToAPortInUseFails) {
  auto o = Run(kAddrInUse);
  EXPECT_EQ(o[0], -EADDRINUSE);
  EXPECT_EQ(o[1], 0) << "stream and datagram ports are separate";
  EXPECT_EQ(o[2], 0) << "closing the holder frees the port";
}

TEST_P(LdErrorTest, ClosedStaleAndUnknownDescriptorsAreEbadf) {
  auto o = Run(kBadFd);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], -EBADF);
  EXPECT_EQ(o[2], -EBADF);
  EXPECT_EQ(o[3], -EBADF);
  EXPECT_EQ(o[5], -EBADF) << "stale descriptor (slot reused: " << o[4] << ")";
}

TEST_P(LdErrorTest, UnconnectedStreamIsEnotconn) {
  auto o = Run(kNotConn);
  EXPECT_EQ(o[0], -ENOTCONN);
  EXPECT_EQ(o[1], -ENOTCONN);
  EXPECT_EQ(o[2], -ENOTCONN);
  EXPECT_EQ(o[3], -ENOTCONN);
}

TEST_P(LdErrorTest, PeerCloseGivesTheBytesThenEofThenEpipe) {
  auto o = Run(kPipeAndEof);
  EXPECT_EQ(o[0], 3);
  EXPECT_EQ(o[1], 3);
  EXPECT_EQ(o[2], 0);
  EXPECT_EQ(o[3], -EPIPE);
}

TEST_P(LdErrorTest, NonBlockingCallsAnswerEagainAndAFullRingTakesExactlyItsSize) {
  auto o = Run(kAgain);
  EXPECT_EQ(o[0], -EAGAIN) << "accept";
  EXPECT_EQ(o[1], -EAGAIN) << "recv MSG_DONTWAIT";
  EXPECT_EQ(o[2], -EAGAIN) << "send into a full ring";
  EXPECT_EQ(o[3], static_cast<int64_t>(small().ring_bytes));
  EXPECT_EQ(o[4], 0) << "the first connection fills the backlog of 1";
  EXPECT_EQ(o[5], -EAGAIN) << "a non-blocking connect beyond the backlog";
  EXPECT_EQ(o[6], O_RDWR | O_NONBLOCK);
}

TEST_P(LdErrorTest, BadArgumentsAreRefusedWithTheirErrno) {
  auto o = Run(kBadArgs);
  EXPECT_EQ(o[0], -EINVAL) << "short address";
  EXPECT_EQ(o[1], -EAFNOSUPPORT) << "AF_INET address on a localdevice socket";
  EXPECT_EQ(o[2], -EINVAL) << "port above 65535";
  EXPECT_EQ(o[3], -EPROTONOSUPPORT) << "SOCK_RAW";
  EXPECT_EQ(o[4], -EOPNOTSUPP) << "listen on a datagram socket";
  EXPECT_EQ(o[5], -EINVAL) << "shutdown how";
}

TEST_P(LdErrorTest, ListenerClosedBeforeAcceptResetsTheClient) {
  auto o = Run(kReset);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], -ECONNRESET);
  EXPECT_EQ(o[2], -EPIPE);
}

TEST_P(LdErrorTest, ShutWrEndsOneDirectionOnly) {
  auto o = Run(kShutWr);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], -EPIPE);
  EXPECT_EQ(o[2], 5);
  EXPECT_EQ(o[3], 0);
  EXPECT_EQ(o[4], 4);
  EXPECT_EQ(o[5], 4);
}

TEST_P(LdErrorTest, PollTimesOutWithNothingReadyAndFlagsBadDescriptors) {
  auto o = Run(kPollTimeout);
  EXPECT_EQ(o[0], 0);
  EXPECT_GE(o[1], 50) << "ms waited";
  EXPECT_EQ(o[2], 0);
  EXPECT_EQ(o[3], 1);
  EXPECT_EQ(o[4], POLLNVAL);
}

TEST_P(LdErrorTest, OptionsAreKeptOrRefused) {
  auto o = Run(kOptions);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], 1);
  EXPECT_EQ(o[2], AF_LOCALDEVICE);
  EXPECT_EQ(o[3], SOCK_STREAM);
  EXPECT_EQ(o[4], -ENOPROTOOPT);
  EXPECT_EQ(o[5], 0);
  EXPECT_EQ(o[6], 0);
}

// ---- descriptor exhaustion ---------------------------------------------------------------

struct Exhaust {
  GPUSOCK_HD void operator()(int64_t* out) const {
    if (warp::lane_id() != 0) return;
    int fds[16];
    int n = 0;
    int r = 0;
    while (n < 16 && (r = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0)) >= 0) fds[n++] = r;
    out[0] = n;
    out[1] = r;
    raw::close(fds[0]);
    out[2] = raw::socket(AF_LOCALDEVICE, SOCK_DGRAM, 0) >= 0 ? 1 : 0;  // one slot back
    for (int i = 1; i < n; ++i) raw::close(fds[i]);
  }
};

TEST_P(LdTest, SocketLimitGivesEmfileAndCloseGivesTheSlotBack) {
  gpusock::net::LocalDeviceOptions o = small();
  o.max_sockets = 8;
  Start(o);
  auto out = Buffer<int64_t>(4);
  auto k = Launch({1}, {32}, Exhaust{}, out.data());
  Finish(k);
  auto r = out.to_host();
  EXPECT_EQ(r[0], 8);
  EXPECT_EQ(r[1], -EMFILE);
  EXPECT_EQ(r[2], 1);
  EXPECT_EQ(HostcallLanes(), 0u);
}

// ---- runtime shutdown while warps block ------------------------------------------------

// Warp 0 blocks in accept, warp 1 in recv on a connection nobody writes to, warp 2 in a
// poll without timeout, warp 3 in a send into a full ring. Each publishes that it is about
// to block; the host shuts the runtime down; each must return an error.
struct Blockers {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    if (warp::lane_id() != 0) return;
    const uint64_t w = gpusock::global_warp_id();
    if (w == 0) {
      ld_listen(100, 8);           // warps 1 and 3 connect here; nobody accepts
      int l = ld_listen(101, 8);   // and nobody connects here
      publish(box, 0, 1);
      out[0] = raw::accept(l, nullptr, nullptr);
    } else if (w == 1) {
      int c = ld_connect(100);
      char b;
      publish(box, 1, 1);
      out[1] = raw::recv(c, &b, 1, 0);
    } else if (w == 2) {
      int d = raw::socket(AF_LOCALDEVICE, SOCK_DGRAM, 0);
      sockaddr_ld a = ld_addr(0);
      raw::bind(d, sa(a), sizeof a);
      pollfd p{d, POLLIN, 0};
      publish(box, 2, 1);
      out[2] = raw::poll(&p, 1, -1);
    } else {
      int c = ld_connect(100);
      char b[512] = {};
      int64_t r = 0;
      publish(box, 3, 1);
      while ((r = raw::send(c, b, sizeof b, 0)) > 0) {
      }
      out[3] = r;
    }
  }
};

TEST_P(LdTest, RuntimeShutdownEndsBlockedCallsWithAnError) {
  Start();
  auto out = Buffer<int64_t>(4);
  auto k = Launch({4}, {32}, Blockers{}, box_.dev, out.data());
  for (uint32_t i = 0; i < 4; ++i) ASSERT_NE(Await(i), 0u) << "warp " << i << " never got to block";
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  rt_->shutdown();
  ASSERT_TRUE(k.wait_for(std::chrono::seconds(60))) << "blocked calls did not end at shutdown";
  auto o = out.to_host();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(o[i], -ESHUTDOWN) << "warp " << i;
}

// ---- poll over localdevice and TCP descriptors together ------------------------------

// Lane 0 of warp 0 polls a TCP listener and a localdevice listener in one call: first the
// host connects over TCP, then warp 1 connects over localdevice.
struct MixedPoll {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    if (warp::lane_id() != 0) return;
    if (gpusock::global_warp_id() == 1) {
      await_box(box, 2);
      int c = ld_connect(55);
      await_box(box, 3);
      raw::close(c);
      return;
    }
    int t = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
    raw::bind(t, reinterpret_cast<sockaddr*>(&a), sizeof a);
    raw::listen(t, 4);
    socklen_t len = sizeof a;
    raw::getsockname(t, reinterpret_cast<sockaddr*>(&a), &len);
    int l = ld_listen(55, 4);
    publish(box, 0, gpusock::ntohs(a.sin_port));
    pollfd p[2] = {{t, POLLIN, 0}, {l, POLLIN, 0}};
    out[0] = raw::poll(p, 2, 20000);
    out[1] = p[0].revents;
    out[2] = p[1].revents;
    int h = raw::accept(t, nullptr, nullptr);
    publish(box, 2, 1);  // warp 1: connect now
    p[0].revents = p[1].revents = 0;
    out[3] = raw::poll(p, 2, 20000);
    out[4] = p[0].revents;
    out[5] = p[1].revents;
    publish(box, 3, 1);
    raw::close(h);
    raw::close(l);
    raw::close(t);
  }
};

TEST_P(LdTest, PollMixesLocaldeviceAndTcpDescriptors) {
  Start(small(), /*tcp=*/true);
  auto out = Buffer<int64_t>(8);
  auto k = Launch({2}, {32}, MixedPoll{}, box_.dev, out.data());
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  Finish(k);
  ::close(fd);
  auto o = out.to_host();
  EXPECT_EQ(o[0], 1);
  EXPECT_EQ(o[1], POLLIN) << "the TCP listener";
  EXPECT_EQ(o[2], 0);
  EXPECT_EQ(o[3], 1);
  EXPECT_EQ(o[4], 0);
  EXPECT_EQ(o[5], POLLIN) << "the localdevice listener";
}

// ---- the host's view -------------------------------------------------------------------

struct HoldState {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    if (warp::lane_id() != 0) return;
    int l = ld_listen(42, 16);
    int c = ld_connect(42);
    char b[1000] = {};
    out[0] = raw::send(c, b, sizeof b, 0);
    publish(box, 0, 1);
    await_box(box, 1);
    raw::close(c);
    raw::close(l);
  }
};

TEST_P(LdTest, HostSnapshotShowsListenersConnectionsAndQueuedBytes) {
  Start();
  auto out = Buffer<int64_t>(1);
  auto k = Launch({1}, {32}, HoldState{}, box_.dev, out.data());
  ASSERT_NE(Await(0), 0u);
  auto snap = ld_->snapshot();
  Post(1, 1);
  Finish(k);
  ASSERT_TRUE(snap.ok()) << snap.status().to_string();
  EXPECT_EQ(snap->listeners, 1u);
  EXPECT_EQ(snap->connected, 2u) << "the client and its not yet accepted server side";
  EXPECT_EQ(snap->queued_bytes, 1000u);
  ASSERT_EQ(snap->sockets.size(), 3u);
  int seen = 0;
  for (const auto& s : snap->sockets) {
    if (s.state == "listening") {
      EXPECT_EQ(s.port, 42u);
      EXPECT_EQ(s.queued, 1u) << "one connection waits for accept";
      EXPECT_GE(s.fd, gpusock::net::local::kFdBase);
      seen |= 1;
    } else if (s.fd == -1) {
      EXPECT_EQ(s.queued, 1000u);
      EXPECT_EQ(s.port, 42u);
      seen |= 2;
    } else {
      EXPECT_EQ(s.peer_port, 42u);
      EXPECT_EQ(s.bytes_out, 1000u);
      seen |= 4;
    }
  }
  EXPECT_EQ(seen, 7);
  auto after = ld_->snapshot();
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(after->sockets.empty());
}

TEST_P(LdTest, WithoutEnablingTheFamilySocketIsEafnosupport) {
  auto rt = Runtime::create(opts_);
  ASSERT_TRUE(rt.ok());
  rt_ = std::move(rt.value());
  auto out = Buffer<int64_t>(1);
  auto k = Launch({1}, {32}, [] GPUSOCK_HD(int64_t* o) {
    if (warp::lane_id() == 0) o[0] = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
  }, out.data());
  Finish(k);
  EXPECT_EQ(out.to_host()[0], -EAFNOSUPPORT);
}

}  // namespace
