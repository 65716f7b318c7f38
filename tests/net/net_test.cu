// Sockets for kernels over io_uring, against real peers on the real kernel. Every test runs
// on the cpu device and on a GPU (skipped, with the reason, where there is none).
#include <arpa/inet.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/socket.hpp"
#include "gpusock/net/tcp.hpp"
#include "kernel_test.hpp"

namespace {

using gpusock::DeviceBuffer;
using gpusock::DeviceKind;
using gpusock::Dim3;
using gpusock::Runtime;
namespace hc = gpusock::hostcall;
namespace raw = gpusock::raw;

using gpusock::testing::ForeignMemory;
using gpusock::testing::await_box;
using gpusock::testing::kKernelTimeout;
using gpusock::testing::mix64;
using gpusock::testing::publish;
using gpusock::testing::read_box;

// ---- helpers shared by kernels and host ---------------------------------------------

GPUSOCK_HD inline uint8_t pattern_byte(uint64_t i) { return static_cast<uint8_t>((i * 2654435761u) >> 13); }

// Order-sensitive stream hash: the sum over bytes of mix(offset, byte). Lost, extra or
// reordered bytes change it; lanes can add their shares in any order.
GPUSOCK_HD inline uint64_t byte_hash(uint64_t offset, uint8_t b) { return mix64((offset << 8) | b); }

GPUSOCK_HD inline sockaddr_in loopback4(uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = gpusock::htons(port);
  a.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
  return a;
}
GPUSOCK_HD inline sockaddr* sa(sockaddr_in& a) { return reinterpret_cast<sockaddr*>(&a); }

// Opens a listener on 127.0.0.1:0 (port into *port). Returns fd or -errno.
GPUSOCK_HD inline int listen_loopback(uint16_t* port, int backlog = 128) {
  int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return fd;
  int one = 1;
  raw::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a = loopback4(0);
  int r = raw::bind(fd, sa(a), sizeof a);
  if (r == 0) r = raw::listen(fd, backlog);
  socklen_t len = sizeof a;
  if (r == 0) r = raw::getsockname(fd, sa(a), &len);
  if (r < 0) {
    raw::close(fd);
    return r;
  }
  *port = gpusock::ntohs(a.sin_port);
  return fd;
}

// ---- host-side peers ----------------------------------------------------------------

int host_listen(uint16_t* port, int family = AF_INET, int backlog = 4096) {
  int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_storage ss{};
  socklen_t len;
  if (family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_addr = in6addr_loopback;
    len = sizeof *a;
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 || ::listen(fd, backlog) != 0) return -1;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  *port = ntohs(family == AF_INET ? reinterpret_cast<sockaddr_in*>(&ss)->sin_port
                                  : reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  return fd;
}

int host_connect(uint16_t port, int family = AF_INET) {
  int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_storage ss{};
  socklen_t len;
  if (family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    a->sin6_addr = in6addr_loopback;
    len = sizeof *a;
  }
  for (int i = 0; i < 200; ++i) {
    if (::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0) return fd;
    if (errno != ECONNREFUSED && errno != EAGAIN) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::close(fd);
  return -1;
}

bool send_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t r = ::send(fd, c, n, MSG_NOSIGNAL);
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}
bool recv_all(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = ::recv(fd, c, n, 0);
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// ---- fixture ------------------------------------------------------------------------

class NetTest : public gpusock::testing::KernelTest {
 protected:
  void SetUp() override {
    KernelTest::SetUp();
    opts_.cpu_resident_warps = 64;
  }
  void Start(gpusock::iouring::Options io = {}) {
    StartRuntime();
    if (HasFatalFailure()) return;
    gpusock::Status s = gpusock::iouring::enable(*rt_, io);
    ASSERT_TRUE(s.ok()) << s.to_string();
  }
  // A fresh runtime whose backend has 16 KiB receive buffers and delivers receives of
  // 8 KiB and up, or none.
  // Defined beside the Receives kernel it launches.
  void OneReceiveOfWaitingBytes(uint8_t* dst, uint32_t ask, uint32_t sent, int64_t got[2]);
  void StartSmallBuffers(bool deliver) {
    rt_.reset();
    gpusock::iouring::Options io;
    io.recv_buffer_bytes = 16 * 1024;
    io.deliver_min_bytes = deliver ? 8 * 1024 : 0;
    Start(io);
  }
  uint64_t Lanes(uint32_t opcode) {
    for (auto& o : rt_->stats().by_opcode) if (o.opcode == opcode) return o.lanes;
    return 0;
  }
  uint64_t Calls(uint32_t opcode) {
    for (auto& o : rt_->stats().by_opcode) if (o.opcode == opcode) return o.calls;
    return 0;
  }
};

INSTANTIATE_TEST_SUITE_P(BothDevices, NetTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

// ---- kernels ------------------------------------------------------------------------

// Lane 0 serves one connection: echoes until the peer closes. out[0]: bytes echoed or -errno.
struct EchoServerOnce {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out, int family) const {
    if (gpusock::warp::lane_id() != 0) return;
    int lfd;
    uint16_t port = 0;
    if (family == AF_INET) {
      lfd = listen_loopback(&port);
    } else {
      lfd = raw::socket(AF_INET6, SOCK_STREAM, 0);
      sockaddr_in6 a{};
      a.sin6_family = AF_INET6;
      gpusock::inet_pton(AF_INET6, "::1", &a.sin6_addr);
      int r = lfd < 0 ? lfd : raw::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a);
      if (r == 0) r = raw::listen(lfd, 16);
      socklen_t len = sizeof a;
      if (r == 0) r = raw::getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len);
      if (r < 0) lfd = r;
      port = gpusock::ntohs(a.sin6_port);
    }
    if (lfd < 0) {
      out[0] = lfd;
      publish(box, 0, 0xffffffffu);
      return;
    }
    publish(box, 0, port);
    sockaddr_storage peer{};
    socklen_t plen = sizeof peer;
    int c = raw::accept(lfd, reinterpret_cast<sockaddr*>(&peer), &plen);
    if (c < 0) {
      out[0] = c;
      return;
    }
    int one = 1;
    raw::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    out[1] = peer.ss_family;
    char buf[3000];
    int64_t total = 0;
    for (;;) {
      int64_t n = raw::recv(c, buf, sizeof buf, 0);
      if (n <= 0) {
        if (n < 0) total = n;
        break;
      }
      int64_t w = raw::send(c, buf, static_cast<uint64_t>(n), 0);
      if (w != n) {
        total = w < 0 ? w : -EIO;
        break;
      }
      total += n;
    }
    raw::close(c);
    raw::close(lfd);
    out[0] = total;
  }
};

TEST_P(NetTest, KernelTcpServerEchoesWhatAHostClientSends) {
  Start();
  auto out = Buffer<int64_t>(2);
  auto k = Launch({1}, {32}, EchoServerOnce{}, box_.dev, out.data(), AF_INET);
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  int fd = host_connect(static_cast<uint16_t>(port));
  ASSERT_GE(fd, 0);
  std::string sent, got;
  for (int i = 0; i < 50; ++i) {
    std::string msg(1 + (i * 977) % 9000, static_cast<char>('a' + i % 26));
    ASSERT_TRUE(send_all(fd, msg.data(), msg.size()));
    std::string back(msg.size(), '\0');
    ASSERT_TRUE(recv_all(fd, back.data(), back.size()));
    EXPECT_EQ(back, msg);
    sent += msg;
  }
  ::close(fd);
  Finish(k);
  auto o = Read(out);
  EXPECT_EQ(o[0], static_cast<int64_t>(sent.size()));
  EXPECT_EQ(o[1], AF_INET);
}

TEST_P(NetTest, KernelTcpServerOverIpv6) {
  Start();
  auto out = Buffer<int64_t>(2);
  auto k = Launch({1}, {32}, EchoServerOnce{}, box_.dev, out.data(), AF_INET6);
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu) << "kernel could not listen on [::1]";
  int fd = host_connect(static_cast<uint16_t>(port), AF_INET6);
  ASSERT_GE(fd, 0);
  const char msg[] = "hello over ipv6";
  ASSERT_TRUE(send_all(fd, msg, sizeof msg));
  char back[sizeof msg];
  ASSERT_TRUE(recv_all(fd, back, sizeof back));
  EXPECT_STREQ(back, msg);
  ::close(fd);
  Finish(k);
  auto o = Read(out);
  EXPECT_EQ(o[0], static_cast<int64_t>(sizeof msg));
  EXPECT_EQ(o[1], AF_INET6);
}

// Every lane connects to the host server, sends its id, reads the answer (id * 7).
// out[tid] = 0 when right, else an error code.
struct ClientPerLane {
  GPUSOCK_HD void operator()(uint16_t port, int64_t* out) const {
    uint64_t tid = gpusock::global_thread_id();
    int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
      out[tid] = 1000 + gpusock::errno_value();
      return;
    }
    sockaddr_in a = loopback4(port);
    if (gpusock::connect(fd, sa(a), sizeof a) != 0) {
      out[tid] = 2000 + gpusock::errno_value();
      gpusock::close(fd);
      return;
    }
    uint64_t id = tid;
    uint64_t answer = 0;
    int64_t w = gpusock::send(fd, &id, sizeof id, 0);
    int64_t r = gpusock::recv(fd, &answer, sizeof answer, MSG_WAITALL);
    out[tid] = (w == 8 && r == 8 && answer == id * 7) ? 0 : 3000 + (w != 8) * 100 + (r != 8) * 10 + (answer != id * 7);
    gpusock::close(fd);
  }
};

TEST_P(NetTest, KernelTcpClientsTalkToAHostServer) {
  Start();
  uint16_t port;
  int lfd = host_listen(&port);
  ASSERT_GE(lfd, 0);
  constexpr int kClients = 64;
  std::thread server([&] {
    std::vector<std::thread> conns;
    for (int i = 0; i < kClients; ++i) {
      int c = ::accept(lfd, nullptr, nullptr);
      if (c < 0) break;
      conns.emplace_back([c] {
        uint64_t id;
        if (recv_all(c, &id, sizeof id)) {
          uint64_t a = id * 7;
          send_all(c, &a, sizeof a);
        }
        char x;
        ::recv(c, &x, 1, 0);  // until the kernel closes
        ::close(c);
      });
    }
    for (auto& t : conns) t.join();
  });
  auto out = Buffer<int64_t>(kClients);
  auto k = Launch({2}, {32}, ClientPerLane{}, port, out.data());
  Finish(k);
  server.join();
  ::close(lfd);
  for (int i = 0; i < kClients; ++i) EXPECT_EQ(Read(out)[i], 0) << "lane " << i;
}


// ---- UDP ----------------------------------------------------------------------------

// Lane 0: a UDP socket on 127.0.0.1:0; first sends "hello" to the host's socket, then
// echoes `count` datagrams back to their sources, reversed. out[0]: datagrams echoed or -errno.
struct UdpEcho {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out, uint16_t host_port, int count) const {
    if (gpusock::warp::lane_id() != 0) return;
    auto u = gpusock::UdpSocket::bind(gpusock::SockAddr::ipv4(127, 0, 0, 1, 0));
    if (!u) {
      out[0] = -u.error();
      publish(box, 0, 0xffffffffu);
      return;
    }
    publish(box, 0, u->local_addr()->port());
    auto sent = u->send_to("hello", 5, gpusock::SockAddr::ipv4(127, 0, 0, 1, host_port));
    if (!sent || *sent != 5) {
      out[0] = -1000;
      return;
    }
    static constexpr int kMax = 65507;
    uint8_t* buf = new uint8_t[kMax];
    uint8_t* rev = new uint8_t[kMax];
    int64_t echoed = 0;
    for (int i = 0; i < count; ++i) {
      gpusock::SockAddr from;
      auto n = u->recv_from(buf, kMax, &from);
      publish(box, 3, static_cast<uint32_t>(n.ok() ? *n : 0xfffff000u + n.error()));  // diagnostics
      if (!n) {
        echoed = -n.error();
        break;
      }
      for (uint64_t j = 0; j < *n; ++j) rev[j] = buf[*n - 1 - j];
      auto w = u->send_to(rev, *n, from);
      publish(box, 4, static_cast<uint32_t>(w.ok() ? *w : 0xfffff000u + w.error()));
      if (!w || *w != *n) {
        echoed = -2000;
        break;
      }
      ++echoed;
    }
    delete[] buf;
    delete[] rev;
    out[0] = echoed;
  }
};

TEST_P(NetTest, UdpBothWaysKeepsDatagramBoundaries) {
  Start();
  int hs = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(hs, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  socklen_t alen = sizeof a;
  ::getsockname(hs, reinterpret_cast<sockaddr*>(&a), &alen);
  timeval tv{30, 0};
  ::setsockopt(hs, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  const std::vector<size_t> sizes = {1, 100, 1400, 8000, 65507, 0, 3};
  auto out = Buffer<int64_t>(1);
  auto k = Launch({1}, {32}, UdpEcho{}, box_.dev, out.data(), ntohs(a.sin_port), static_cast<int>(sizes.size()));
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  char hello[16];
  sockaddr_in from{};
  socklen_t flen = sizeof from;
  ASSERT_EQ(::recvfrom(hs, hello, sizeof hello, 0, reinterpret_cast<sockaddr*>(&from), &flen), 5) << std::strerror(errno) << " kernel: " << Read(out)[0];
  EXPECT_EQ(std::string(hello, 5), "hello");
  EXPECT_EQ(ntohs(from.sin_port), port);
  std::vector<uint8_t> buf(70000);
  for (size_t n : sizes) {
    std::vector<uint8_t> d(n);
    for (size_t i = 0; i < n; ++i) d[i] = static_cast<uint8_t>(i * 31 + n);
    ASSERT_EQ(::sendto(hs, d.data(), n, 0, reinterpret_cast<sockaddr*>(&from), flen), static_cast<ssize_t>(n));
    ssize_t r = ::recv(hs, buf.data(), buf.size(), 0);
    const int err = errno;
    ASSERT_EQ(r, static_cast<ssize_t>(n)) << "datagram of " << n << ": " << std::strerror(err)
                                           << "; kernel received " << std::hex << box_.host[3] << ", sent " << box_.host[4];
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(buf[i], d[n - 1 - i]) << "byte " << i << " of " << n;
  }
  Finish(k);
  EXPECT_EQ(Read(out)[0], static_cast<int64_t>(sizes.size()));
  ::close(hs);
}

// ---- a gigabyte each way, checked by hash ---------------------------------------------

// A gigabyte in the plain build (here and on a GPU). The sanitizer builds move 64 MiB
// through the same code: under ThreadSanitizer a gigabyte alone would take most of CI's
// time budget, and size adds no code path.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr uint64_t kGiB = 64ull << 20;
#else
constexpr uint64_t kGiB = 1ull << 30;
#endif

// Lane 0 connects to 127.0.0.1:port; every lane gets the descriptor, or -errno.
GPUSOCK_HD inline int warp_connect4(uint16_t port) {
  int fd = -1;
  if (gpusock::warp::lane_id() == 0) {
    fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = loopback4(port);
    int r = fd < 0 ? fd : raw::connect(fd, sa(a), sizeof a);
    if (r < 0) fd = r;
  }
  return gpusock::warp::shfl(0xffffffffu, fd, 0);
}

// This lane's share of checking piece[0, n), which starts at stream offset `off`.
GPUSOCK_HD inline void check_piece(const uint8_t* piece, uint32_t n, uint64_t off, uint64_t& hash, uint64_t& bad) {
  for (uint32_t i = gpusock::warp::lane_id(); i < n; i += 32) {
    hash += byte_hash(off + i, piece[i]);
    bad += piece[i] != pattern_byte(off + i);
  }
}

// Sums the lanes' hash and mismatches; lane 0 closes fd and writes {bytes, hash,
// mismatches, last recv result}.
GPUSOCK_HD inline void report_stream(int fd, uint64_t bytes, uint64_t hash, uint64_t bad, int64_t last, int64_t* out) {
  const uint32_t lane = gpusock::warp::lane_id();
  for (uint32_t d = 16; d > 0; d /= 2) {
    hash += gpusock::warp::shfl(0xffffffffu, hash, (lane + d) % 32);
    bad += gpusock::warp::shfl(0xffffffffu, bad, (lane + d) % 32);
  }
  if (lane == 0) {
    raw::close(fd);
    out[0] = static_cast<int64_t>(bytes);
    out[1] = static_cast<int64_t>(hash);
    out[2] = static_cast<int64_t>(bad);
    out[3] = last;
  }
}

// The whole warp: lane 0 connects and sends `total` pattern bytes from a device buffer
// the warp fills. out[0]: bytes sent or -errno.
struct BulkSender {
  GPUSOCK_HD void operator()(uint16_t port, uint64_t total, uint8_t* chunk, uint32_t chunk_bytes, int64_t* out) const {
    const uint32_t lane = gpusock::warp::lane_id();
    const int fd = warp_connect4(port);
    if (fd < 0) {
      if (lane == 0) out[0] = fd;
      return;
    }
    uint64_t off = 0;
    int64_t err = 0;
    while (off < total && err == 0) {
      const uint32_t n = static_cast<uint32_t>(total - off < chunk_bytes ? total - off : chunk_bytes);
      for (uint32_t i = lane; i < n; i += 32) chunk[i] = pattern_byte(off + i);
      gpusock::warp::sync(0xffffffffu);
      // All 32 lanes send together: one stream of bytes, copied by the whole warp.
      int64_t w = raw::warp_send(0xffffffffu, fd, chunk, n, 0);
      if (w != static_cast<int64_t>(n)) err = w < 0 ? w : -EIO;
      off += n;
    }
    if (lane == 0) {
      raw::close(fd);
      out[0] = err != 0 ? err : static_cast<int64_t>(off);
    }
  }
};

// The whole warp receives a stream until EOF and checks every byte (hash and pattern).
// With `mapped` null, every receive is a warp_recv of `piece` bytes into `dev`. Otherwise
// the receives take turns over three kinds of memory: device_alloc() memory (whole warp,
// warp_recv), mapped host memory (whole warp), and device_alloc() memory at an odd
// offset (lane 0 alone, MSG_WAITALL). out: {bytes, hash, mismatches, last recv result}.
struct StreamReceiver {
  GPUSOCK_HD void operator()(uint16_t port, uint8_t* dev, uint8_t* mapped, uint32_t piece, int64_t* out) const {
    const int fd = warp_connect4(port);
    if (fd < 0) {
      if (gpusock::warp::lane_id() == 0) out[3] = fd;
      return;
    }
    uint64_t off = 0, hash = 0, bad = 0;
    int64_t n = 0;
    for (uint32_t turn = 0;; ++turn) {
      const uint32_t kind = mapped == nullptr ? 0 : turn % 3;
      uint8_t* into = kind == 1 ? mapped : (kind == 2 ? dev + 3 : dev);
      if (kind == 2) {
        int64_t r = 0;
        if (gpusock::warp::lane_id() == 0) r = raw::recv(fd, into, piece, MSG_WAITALL);
        n = gpusock::warp::shfl(0xffffffffu, r, 0);
      } else {
        n = raw::warp_recv(0xffffffffu, fd, into, piece, 0);
      }
      if (n <= 0) break;
      check_piece(into, static_cast<uint32_t>(n), off, hash, bad);
      off += static_cast<uint64_t>(n);
      gpusock::warp::sync(0xffffffffu);
    }
    report_stream(fd, off, hash, bad, n, out);
  }
};

// Accepts one connection on lfd, sends `total` pattern bytes and closes it.
void send_pattern(int lfd, uint64_t total) {
  int c = ::accept(lfd, nullptr, nullptr);
  std::vector<uint8_t> buf(1 << 20);
  for (uint64_t off = 0; off < total; off += buf.size()) {
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = pattern_byte(off + i);
    if (!send_all(c, buf.data(), static_cast<size_t>(std::min<uint64_t>(buf.size(), total - off)))) break;
  }
  ::close(c);
}

uint64_t host_stream_hash(uint64_t total) {
  uint64_t h = 0;
  for (uint64_t i = 0; i < total; ++i) h += byte_hash(i, pattern_byte(i));
  return h;
}

// Accepts one connection on lfd and reads it to EOF, checking every byte against the
// pattern: what arrived, its hash, and how many bytes differ.
struct PatternSink {
  uint64_t got = 0, hash = 0, bad = 0;
  void run(int lfd) {
    int c = ::accept(lfd, nullptr, nullptr);
    std::vector<uint8_t> buf(1 << 20);
    for (;;) {
      ssize_t r = ::recv(c, buf.data(), buf.size(), 0);
      if (r <= 0) break;
      for (ssize_t i = 0; i < r; ++i) {
        hash += byte_hash(got + i, buf[i]);
        bad += buf[i] != pattern_byte(got + i);
      }
      got += static_cast<uint64_t>(r);
    }
    ::close(c);
  }
};

TEST_P(NetTest, GigabyteFromKernelToHostArrivesWholeAndInOrder) {
  Start();
  uint16_t port;
  int lfd = host_listen(&port);
  ASSERT_GE(lfd, 0);
  PatternSink sink;
  std::thread reader([&] { sink.run(lfd); });
  constexpr uint32_t kChunk = 256 * 1024;
  auto chunk = Buffer<uint8_t>(kChunk);
  auto out = Buffer<int64_t>(1);
  auto k = Launch({1}, {32}, BulkSender{}, port, kGiB, chunk.data(), kChunk, out.data());
  Finish(k);
  reader.join();
  ::close(lfd);
  EXPECT_EQ(Read(out)[0], static_cast<int64_t>(kGiB));
  EXPECT_EQ(sink.got, kGiB);
  EXPECT_EQ(sink.bad, 0u);
  EXPECT_EQ(sink.hash, host_stream_hash(kGiB));
}

// A blocking warp_send of at least kPullMinBytes out of device_alloc() or registered
// memory is taken from there by the host (Runtime::start_fetch(), DMA on a GPU), in pull
// pieces reused many times within each call; out of other memory (mapped host memory),
// or with pull_sends off, the warp copies it through staging. Every way, the stream
// arrives whole and in order, and the runtime's fetch counter says which way it went.
TEST_P(NetTest, LargeWarpSendsOutOfDeviceMemoryAreTakenByTheHost) {
  enum Mem { kAlloc, kRegistered, kMapped };
  struct Case {
    const char* what;
    bool pull;
    Mem mem;
    uint32_t chunk;
  };
  // 1 MiB + 12345: not a whole number of pieces, so a send's last piece is short and a
  // span (one send(2) over pieces whose copies have ended) stops there. 128 KiB: two whole
  // pieces, so spans may also run across the pieces of two sends (where copies end while
  // an earlier span is out: on a GPU), and start over at the area's start.
  constexpr uint32_t kOdd = (1u << 20) + 12345;
  const Case cases[] = {{"device_alloc memory", true, kAlloc, kOdd},
                        {"device_alloc memory, pull_sends off", false, kAlloc, kOdd},
                        {"registered memory", true, kRegistered, kOdd},
                        {"mapped host memory", true, kMapped, kOdd},
                        {"device_alloc memory, sends of whole pieces", true, kAlloc, 128u * 1024}};
  constexpr uint64_t kTotal = 20ull << 20;  // the last send of kOdd ones is 794 KiB
  for (const Case& c : cases) {
    const uint32_t kChunk = c.chunk;
    SCOPED_TRACE(c.what);
    rt_.reset();
    gpusock::iouring::Options io;
    io.pull_sends = c.pull;
    io.pull_chunk_bytes = 64 * 1024;
    io.pull_chunks = 3;
    Start(io);
    ASSERT_FALSE(HasFatalFailure());
    ForeignMemory foreign(GetParam(), kChunk);
    ASSERT_NE(foreign.data(), nullptr);
    auto alloc = Buffer<uint8_t>(kChunk);
    auto mapped = rt_->mapped_alloc(kChunk);
    ASSERT_TRUE(mapped.ok());
    uint8_t* chunk = c.mem == kAlloc ? alloc.data()
                     : c.mem == kRegistered ? foreign.data()
                                            : static_cast<uint8_t*>(mapped->device);
    if (c.mem == kRegistered) {
      ASSERT_TRUE(rt_->register_device_memory(foreign.data(), kChunk).ok());
    }
    uint16_t port;
    int lfd = host_listen(&port);
    ASSERT_GE(lfd, 0);
    PatternSink sink;
    std::thread reader([&] { sink.run(lfd); });
    const gpusock::RuntimeStats before = rt_->stats();
    auto out = Buffer<int64_t>(1);
    auto k = Launch({1}, {32}, BulkSender{}, port, kTotal, chunk, kChunk, out.data());
    Finish(k);
    reader.join();
    ::close(lfd);
    EXPECT_EQ(Read(out)[0], static_cast<int64_t>(kTotal));
    EXPECT_EQ(sink.got, kTotal);
    EXPECT_EQ(sink.bad, 0u);
    EXPECT_EQ(sink.hash, host_stream_hash(kTotal));
    const gpusock::RuntimeStats after = rt_->stats();
    EXPECT_EQ(after.fetched_bytes - before.fetched_bytes, c.pull && c.mem != kMapped ? kTotal : 0u);
    if (c.mem == kRegistered) {
      ASSERT_TRUE(rt_->unregister_device_memory(foreign.data()).ok());
    }
    rt_->mapped_free(mapped->host);
  }
}

// Lane 0 connects; the warp sends `first` bytes of buf, then `second`. out: both results.
struct SendsTwice {
  GPUSOCK_HD void operator()(uint16_t port, const uint8_t* buf, uint64_t first, uint64_t second, int64_t* out) const {
    const int fd = warp_connect4(port);
    if (fd < 0) {
      if (gpusock::warp::lane_id() == 0) out[0] = fd;
      return;
    }
    const int64_t a = raw::warp_send(0xffffffffu, fd, buf, first, 0);
    const int64_t b = raw::warp_send(0xffffffffu, fd, buf, second, 0);
    if (gpusock::warp::lane_id() == 0) {
      raw::close(fd);
      out[0] = a;
      out[1] = b;
    }
  }
};

// Lane 0 connects; the warp waits in recv until the peer has gone, then sends `n` bytes
// of buf. out: both results.
struct RecvThenSend {
  GPUSOCK_HD void operator()(uint16_t port, uint8_t* buf, uint64_t n, int64_t* out) const {
    const int fd = warp_connect4(port);
    if (fd < 0) {
      if (gpusock::warp::lane_id() == 0) out[0] = fd;
      return;
    }
    const int64_t r = raw::warp_recv(0xffffffffu, fd, buf, 16, 0);
    const int64_t w = raw::warp_send(0xffffffffu, fd, buf, n, 0);
    if (gpusock::warp::lane_id() == 0) {
      raw::close(fd);
      out[0] = r;
      out[1] = w;
    }
  }
};

// A send out of device memory on a socket that has already failed answers the failure,
// as send(2) would, without taking a byte: the host asks the socket first (a zero-byte
// send) instead of answering once a piece has gone out (docs 12.4, send 2a).
TEST_P(NetTest, ATakenSendOnAResetSocketAnswersTheErrorAndTakesNothing) {
  Start();
  constexpr uint64_t kBytes = 256 * 1024;
  auto buf = Buffer<uint8_t>(kBytes);
  uint16_t port;
  int lfd = host_listen(&port);
  ASSERT_GE(lfd, 0);
  std::thread peer([&] {
    int c = ::accept(lfd, nullptr, nullptr);
    linger lg{1, 0};
    ::setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    ::close(c);  // RST
  });
  const gpusock::RuntimeStats before = rt_->stats();
  auto out = Buffer<int64_t>(2);
  auto k = Launch({1}, {32}, RecvThenSend{}, port, buf.data(), kBytes, out.data());
  Finish(k);
  peer.join();
  ::close(lfd);
  auto o = Read(out);
  EXPECT_THAT(o[0], ::testing::AnyOf(-ECONNRESET, 0));
  EXPECT_THAT(o[1], ::testing::AnyOf(-ECONNRESET, -EPIPE));
  EXPECT_EQ(rt_->stats().fetched_bytes - before.fetched_bytes, 0u) << "bytes taken for a send that could not go";
}

// A peer that resets the connection while the host sends a warp's bytes out of device
// memory ends that send with what went out before (or the error), and the next send
// fails: nothing hangs, the pull area is given back (a later taken send works).
TEST_P(NetTest, APeerResetDuringATakenSendEndsIt) {
  Start();
  constexpr uint64_t kBig = 48ull << 20, kRead = 1ull << 20;
  auto buf = Buffer<uint8_t>(kBig);
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round == 0 ? "reset" : "whole");
    uint16_t port;
    int lfd = host_listen(&port);
    ASSERT_GE(lfd, 0);
    uint64_t read = 0;
    std::thread peer([&] {
      int c = ::accept(lfd, nullptr, nullptr);
      std::vector<uint8_t> b(64 * 1024);
      while (round == 1 || read < kRead) {
        const ssize_t r = ::recv(c, b.data(), b.size(), 0);
        if (r <= 0) break;
        read += static_cast<uint64_t>(r);
      }
      if (round == 0) {
        linger lg{1, 0};
        ::setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
      }
      ::close(c);  // round 0: RST while the kernel's first send is under way
    });
    const gpusock::RuntimeStats before = rt_->stats();
    auto out = Buffer<int64_t>(2);
    auto k = Launch({1}, {32}, SendsTwice{}, port, static_cast<const uint8_t*>(buf.data()), kBig,
                    uint64_t{256 * 1024}, out.data());
    Finish(k);
    peer.join();
    ::close(lfd);
    auto o = Read(out);
    if (round == 0) {
      if (o[0] > 0) {
        EXPECT_GE(o[0], static_cast<int64_t>(kRead));
        EXPECT_LT(o[0], static_cast<int64_t>(kBig));
      } else {
        EXPECT_THAT(o[0], ::testing::AnyOf(-ECONNRESET, -EPIPE));
      }
      EXPECT_THAT(o[1], ::testing::AnyOf(-ECONNRESET, -EPIPE));
    } else {
      EXPECT_EQ(o[0], static_cast<int64_t>(kBig));
      EXPECT_EQ(o[1], 256 * 1024);
      EXPECT_EQ(read, kBig + 256 * 1024);
      EXPECT_EQ(rt_->stats().fetched_bytes - before.fetched_bytes, kBig + 256 * 1024);
    }
  }
}

// The warp sends buf[0, a) (taken out of device memory), buf[a, a + b) (short: through
// staging) and buf[a + b, a + b + c) (taken), then ends with close() or with
// shutdown(SHUT_WR) and a recv() that waits for the peer's EOF. out: the four results.
struct TakenThenStaged {
  GPUSOCK_HD void operator()(uint16_t port, const uint8_t* buf, uint64_t a, uint64_t b, uint64_t c, int close_at_end,
                             int64_t* out) const {
    const int fd = warp_connect4(port);
    if (fd < 0) {
      if (gpusock::warp::lane_id() == 0) out[0] = fd;
      return;
    }
    const int64_t r0 = raw::warp_send(0xffffffffu, fd, buf, a, 0);
    const int64_t r1 = raw::warp_send(0xffffffffu, fd, buf + a, b, 0);
    const int64_t r2 = raw::warp_send(0xffffffffu, fd, buf + a + b, c, 0);
    if (gpusock::warp::lane_id() != 0) return;
    out[0] = r0;
    out[1] = r1;
    out[2] = r2;
    if (close_at_end != 0) {
      out[3] = raw::close(fd);
      return;
    }
    out[3] = raw::shutdown(fd, SHUT_WR);
    char x;
    out[4] = raw::recv(fd, &x, 1, 0);  // 0 once the peer has read everything and closed
    raw::close(fd);
  }
};

// A taken send is answered once its bytes are in the pull area, before they are all out
// (docs 12.4, send 2a). What the lane does next must still reach the peer after them: a
// short send (through staging), the next taken send, a shutdown's FIN, a close. A slow
// peer keeps bytes in the area while those calls arrive; it must read every byte, in
// order, then EOF.
TEST_P(NetTest, WhatFollowsTakenBytesGoesOutAfterThem) {
  Start();
  constexpr uint64_t kA = 6ull << 20, kB = 1000, kC = (2ull << 20) + 7;
  constexpr uint64_t kTotal = kA + kB + kC;
  std::vector<uint8_t> h(kTotal);
  for (uint64_t i = 0; i < kTotal; ++i) h[i] = pattern_byte(i);
  auto buf = Buffer<uint8_t>(kTotal);
  ASSERT_TRUE(rt_->copy_to_device(buf.data(), h.data(), kTotal).ok());
  for (const int close_at_end : {0, 1}) {
    SCOPED_TRACE(close_at_end ? "close" : "shutdown");
    uint16_t port;
    int lfd = host_listen(&port);
    ASSERT_GE(lfd, 0);
    uint64_t got = 0, bad = 0;
    std::thread peer([&] {
      int c = ::accept(lfd, nullptr, nullptr);
      std::vector<uint8_t> b(64 * 1024);
      for (;;) {
        std::this_thread::sleep_for(std::chrono::microseconds(500));  // a slow reader
        const ssize_t r = ::recv(c, b.data(), b.size(), 0);
        if (r <= 0) break;
        for (ssize_t i = 0; i < r; ++i) bad += b[i] != pattern_byte(got + i);
        got += static_cast<uint64_t>(r);
      }
      ::close(c);
    });
    const gpusock::RuntimeStats before = rt_->stats();
    auto out = Buffer<int64_t>(5);
    auto k = Launch({1}, {32}, TakenThenStaged{}, port, static_cast<const uint8_t*>(buf.data()), kA, kB, kC, close_at_end,
                    out.data());
    Finish(k);
    peer.join();
    ::close(lfd);
    auto o = Read(out);
    EXPECT_EQ(o[0], static_cast<int64_t>(kA));
    EXPECT_EQ(o[1], static_cast<int64_t>(kB));
    EXPECT_EQ(o[2], static_cast<int64_t>(kC));
    EXPECT_EQ(o[3], 0);
    if (!close_at_end) {
      EXPECT_EQ(o[4], 0);
    }
    EXPECT_EQ(got, kTotal) << "bytes lost";
    EXPECT_EQ(bad, 0u) << "bytes out of order";
    EXPECT_EQ(rt_->stats().fetched_bytes - before.fetched_bytes, kA + kC);
  }
}

TEST_P(NetTest, GigabyteFromHostToKernelArrivesWholeAndInOrder) {
  Start();
  uint16_t port;
  int lfd = host_listen(&port);
  ASSERT_GE(lfd, 0);
  std::thread source(send_pattern, lfd, kGiB);
  constexpr uint32_t kChunk = 256 * 1024;
  auto chunk = Buffer<uint8_t>(kChunk);
  auto out = Buffer<int64_t>(4);
  auto k = Launch({1}, {32}, StreamReceiver{}, port, chunk.data(), static_cast<uint8_t*>(nullptr), kChunk, out.data());
  Finish(k);
  source.join();
  ::close(lfd);
  auto o = Read(out);
  EXPECT_EQ(o[3], 0) << "recv ended with an error";
  EXPECT_EQ(o[0], static_cast<int64_t>(kGiB));
  EXPECT_EQ(o[2], 0) << "bytes differing from what the host sent";
  EXPECT_EQ(static_cast<uint64_t>(o[1]), host_stream_hash(kGiB));
}

// Receives of at least deliver_min_bytes into device_alloc() memory are copied there by
// the host (Runtime::deliver(), by DMA on a GPU); the rest are lent and copied by the
// warp. Both ways, and the same stream with delivery off, arrive whole and in order.
TEST_P(NetTest, LargeReceivesIntoDeviceMemoryAreDeliveredByTheHost) {
  for (const bool deliver : {true, false}) {
    SCOPED_TRACE(deliver ? "delivery on" : "delivery off");
    rt_.reset();
    gpusock::iouring::Options io;
    if (!deliver) io.deliver_min_bytes = 0;
    Start(io);
    ASSERT_FALSE(HasFatalFailure());
    constexpr uint64_t kTotal = 24ull << 20;
    constexpr uint32_t kPiece = 100 * 1024;  // above one 64 KiB receive buffer: MSG_WAITALL loops
    uint16_t port;
    int lfd = host_listen(&port);
    ASSERT_GE(lfd, 0);
    std::thread source(send_pattern, lfd, kTotal);
    auto dev = Buffer<uint8_t>(kPiece + 3);
    auto mapped = rt_->mapped_alloc(kPiece);
    ASSERT_TRUE(mapped.ok());
    rt_->mapped_free_at_exit(mapped->host);
    auto out = Buffer<int64_t>(4);
    const gpusock::RuntimeStats before = rt_->stats();
    auto k = Launch({1}, {32}, StreamReceiver{}, port, dev.data(), static_cast<uint8_t*>(mapped->device), kPiece,
                    out.data());
    Finish(k);
    source.join();
    ::close(lfd);
    auto o = Read(out);
    EXPECT_EQ(o[3], 0) << "recv ended with an error";
    EXPECT_EQ(o[0], static_cast<int64_t>(kTotal));
    EXPECT_EQ(o[2], 0) << "bytes differing from what the host sent";
    EXPECT_EQ(static_cast<uint64_t>(o[1]), host_stream_hash(kTotal));
    const gpusock::RuntimeStats after = rt_->stats();
    const uint64_t delivered = after.delivered_bytes - before.delivered_bytes;
    if (deliver) {
      // Two turns in three receive into device memory; the mapped turn is always lent.
      EXPECT_GT(after.deliveries, before.deliveries);
      EXPECT_GT(delivered, 0u);
      EXPECT_LT(delivered, kTotal);
    } else {
      EXPECT_EQ(after.deliveries, before.deliveries);
    }
  }
}

// Lane 0 connects, waits for box[0] (the host has sent), then makes `count` recvs of
// `ask` bytes into `dev`. out: their results, then the mismatches of the first one's bytes
// against the pattern.
struct Receives {
  GPUSOCK_HD void operator()(uint32_t* box, uint16_t port, uint8_t* dev, uint32_t ask, int count, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = loopback4(port);
    int r = fd < 0 ? fd : raw::connect(fd, sa(a), sizeof a);
    if (r < 0) {
      out[0] = r;
      return;
    }
    await_box(box, 0);
    for (int i = 0; i < count; ++i) out[i] = raw::recv(fd, dev, ask, 0);
    int64_t bad = 0;
    for (int64_t i = 0; i < out[0]; ++i) bad += dev[i] != pattern_byte(static_cast<uint64_t>(i));
    raw::close(fd);
    out[count] = bad;
  }
};

// The kernel connects; the host sends `sent` pattern bytes and gives them a moment to
// queue (loopback queues them at the receiver before send() returns, plus the receiving
// side's processing); then the kernel makes one recv of `ask` bytes into dst. got: its
// result and the mismatching bytes among those it received.
void NetTest::OneReceiveOfWaitingBytes(uint8_t* dst, uint32_t ask, uint32_t sent, int64_t got[2]) {
  uint16_t port;
  int lfd = host_listen(&port);
  ASSERT_GE(lfd, 0);
  auto out = Buffer<int64_t>(2);
  auto k = Launch({1}, {32}, Receives{}, box_.dev, port, dst, ask, 1, out.data());
  int c = ::accept(lfd, nullptr, nullptr);
  ASSERT_GE(c, 0);
  std::vector<uint8_t> buf(sent);
  for (uint32_t i = 0; i < sent; ++i) buf[i] = pattern_byte(i);
  ASSERT_TRUE(send_all(c, buf.data(), buf.size()));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  Post(0, 1);
  Finish(k);
  ::close(c);
  ::close(lfd);
  auto o = Read(out);
  got[0] = o[0];
  got[1] = o[1];
}

// A delivered receive that fills its buffer goes on, in the same call, with what the
// socket already holds: 48 KiB waiting, 16 KiB buffers, one recv of 100 KiB gets all 48.
// With delivery off the same recv gets one buffer.
TEST_P(NetTest, ADeliveredReceiveTakesWhatTheSocketHoldsInOneCall) {
  for (const bool deliver : {true, false}) {
    SCOPED_TRACE(deliver ? "delivery on" : "delivery off");
    StartSmallBuffers(deliver);
    ASSERT_FALSE(HasFatalFailure());
    constexpr uint32_t kSent = 48 * 1024;
    auto dev = Buffer<uint8_t>(100 * 1024);
    int64_t o[2];
    OneReceiveOfWaitingBytes(dev.data(), 100u * 1024, kSent, o);
    ASSERT_FALSE(HasFatalFailure());
    EXPECT_EQ(o[0], deliver ? int64_t{kSent} : int64_t{16 * 1024});
    EXPECT_EQ(o[1], 0) << "bytes differing from what the host sent";
  }
}

// Memory the program allocated itself (cudaMalloc on a GPU) is delivered into once
// registered with the runtime, as device_alloc() memory is, and lent to before and after:
// 48 KiB waiting, 16 KiB buffers, one recv of 100 KiB gets all 48 KiB only while the
// buffer is registered.
TEST_P(NetTest, RegisteredMemoryOfTheProgramIsDeliveredInto) {
  for (const bool registered : {true, false}) {
    SCOPED_TRACE(registered ? "registered" : "not registered");
    StartSmallBuffers(true);
    ASSERT_FALSE(HasFatalFailure());
    constexpr uint32_t kSent = 48 * 1024, kAsk = 100 * 1024;
    ForeignMemory mem(GetParam(), kAsk);
    ASSERT_NE(mem.data(), nullptr);
    if (registered) {
      ASSERT_TRUE(rt_->register_device_memory(mem.data(), kAsk).ok());
    }
    const gpusock::RuntimeStats before = rt_->stats();
    int64_t o[2];
    OneReceiveOfWaitingBytes(mem.data(), kAsk, kSent, o);
    ASSERT_FALSE(HasFatalFailure());
    EXPECT_EQ(o[0], registered ? int64_t{kSent} : int64_t{16 * 1024});
    EXPECT_EQ(o[1], 0) << "bytes differing from what the host sent";
    const gpusock::RuntimeStats after = rt_->stats();
    EXPECT_EQ(after.delivered_bytes - before.delivered_bytes, registered ? uint64_t{kSent} : 0u);
    if (registered) {
      ASSERT_TRUE(rt_->unregister_device_memory(mem.data()).ok());  // before mem is freed
    }
  }
}

// A reset that a delivering receive meets after its first buffer is answered by the next
// receive, as recv(2) would: 16 KiB (one whole buffer) then a reset; the kernel sees
// 16384, ECONNRESET, 0, with delivery on and off.
TEST_P(NetTest, AResetMetWhileDeliveringAnswersTheNextReceive) {
  for (const bool deliver : {true, false}) {
    SCOPED_TRACE(deliver ? "delivery on" : "delivery off");
    StartSmallBuffers(deliver);
    ASSERT_FALSE(HasFatalFailure());
    uint16_t port;
    int lfd = host_listen(&port);
    ASSERT_GE(lfd, 0);
    auto dev = Buffer<uint8_t>(100 * 1024);
    auto out = Buffer<int64_t>(4);
    Post(0, 0);
    auto k = Launch({1}, {32}, Receives{}, box_.dev, port, dev.data(), 100u * 1024, 3, out.data());
    int c = ::accept(lfd, nullptr, nullptr);
    ASSERT_GE(c, 0);
    std::vector<uint8_t> buf(16 * 1024);
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = pattern_byte(i);
    ASSERT_TRUE(send_all(c, buf.data(), buf.size()));
    linger lg{1, 0};
    ::setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    ::close(c);  // a reset, after the 16 KiB
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    Post(0, 1);
    Finish(k);
    ::close(lfd);
    auto o = Read(out);
    EXPECT_EQ(o[0], 16 * 1024);
    EXPECT_EQ(o[1], -ECONNRESET);
    EXPECT_EQ(o[2], 0);
    EXPECT_EQ(o[3], 0) << "bytes differing from what the host sent";
  }
}

// ---- many connections ---------------------------------------------------------------

// One listener (lane 0 of block 0 makes it and publishes the port in box[0]); every lane
// accepts one connection, answers the 8-byte id it reads with id * 3, reads to EOF, closes.
struct ManyConnectionServer {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    uint64_t tid = gpusock::global_thread_id();
    if (tid == 0) {
      uint16_t port = 0;
      int lfd = listen_loopback(&port, 4096);
      publish(box, 1, static_cast<uint32_t>(lfd < 0 ? 0 : lfd) + 1);
      publish(box, 0, lfd < 0 ? 0xffffffffu : port);
    }
    uint32_t lfd1 = await_box(box, 1);
    int lfd = static_cast<int>(lfd1) - 1;
    int c = gpusock::accept(lfd, nullptr, nullptr);
    if (c < 0) {
      out[tid] = 1000 + gpusock::errno_value();
      return;
    }
    uint64_t id = 0;
    int64_t r = gpusock::recv(c, &id, sizeof id, MSG_WAITALL);
    uint64_t a = id * 3;
    int64_t w = gpusock::send(c, &a, sizeof a, 0);
    char x;
    int64_t eof = gpusock::recv(c, &x, 1, 0);
    gpusock::close(c);
    out[tid] = (r == 8 && w == 8 && eof == 0) ? 0 : 2000 + (r != 8) * 100 + (w != 8) * 10 + (eof != 0);
    // The last lane out closes the listener.
    if (gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(box[2]).fetch_add(1, gpusock::Order::kAcqRel) + 1 ==
        gpusock::grid_dim().x * gpusock::block_dim().x) {
      gpusock::close(lfd);
    }
  }
};

TEST_P(NetTest, ThousandConcurrentConnectionsToAKernelServer) {
  constexpr int kConns = 1024;
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_max < 3 * kConns + 256) GTEST_SKIP() << "RLIMIT_NOFILE hard limit " << rl.rlim_max << " < " << 3 * kConns + 256;
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  Start();
  auto out = Buffer<int64_t>(kConns);
  auto k = Launch({kConns / 128}, {128}, ManyConnectionServer{}, box_.dev, out.data());
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  // All connections open at once, then every request, then every answer.
  std::vector<int> fds;
  for (int i = 0; i < kConns; ++i) {
    int fd = host_connect(static_cast<uint16_t>(port));
    ASSERT_GE(fd, 0) << "connection " << i;
    fds.push_back(fd);
  }
  for (int i = 0; i < kConns; ++i) {
    uint64_t id = 1000 + i;
    ASSERT_TRUE(send_all(fds[i], &id, sizeof id));
  }
  int wrong = 0;
  for (int i = 0; i < kConns; ++i) {
    uint64_t a = 0;
    if (!recv_all(fds[i], &a, sizeof a) || a != (1000ull + i) * 3) ++wrong;
  }
  EXPECT_EQ(wrong, 0);
  for (int fd : fds) ::close(fd);
  Finish(k);
  auto o = Read(out);
  int bad = 0;
  for (int i = 0; i < kConns; ++i) bad += o[i] != 0;
  EXPECT_EQ(bad, 0) << "first: " << o[0];
}

// ---- lanes of one warp call do not wait on each other --------------------------------
//
// The lanes of a warp call are answered together, so without the host letting blocked
// lanes go (net/backend.hpp, "Stragglers") a lane that is done would wait for the call's
// lanes still blocked, here for ever: what they wait for comes only after it goes on.

// Every lane of one warp accepts a connection and serves it: (optionally polls it,) reads
// an 8-byte id, answers id * 3 and waits for the end of the stream. out[lane]: 0, or what
// went wrong.
struct OneClientAtATime {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out, int use_poll) const {
    const uint32_t lane = gpusock::warp::lane_id();
    if (lane == 0) {
      uint16_t port = 0;
      int lfd = listen_loopback(&port, 64);
      publish(box, 1, static_cast<uint32_t>(lfd < 0 ? 0 : lfd) + 1);
      publish(box, 0, lfd < 0 ? 0xffffffffu : port);
    }
    const int lfd = static_cast<int>(await_box(box, 1)) - 1;
    int64_t status = 0;
    const int c = raw::accept(lfd, nullptr, nullptr);
    if (c < 0) {
      status = 1000 - c;
    } else {
      if (use_poll) {
        pollfd p{c, POLLIN, 0};
        const int pr = raw::poll(&p, 1, 60000);
        if (pr != 1 || (p.revents & POLLIN) == 0) status = 2000 + (pr < 0 ? -pr : pr);
      }
      uint64_t id = 0;
      const int64_t r = raw::recv(c, &id, sizeof id, MSG_WAITALL);
      const uint64_t a = id * 3;
      const int64_t w = raw::send(c, &a, sizeof a, 0);
      char x;
      const int64_t eof = raw::recv(c, &x, 1, 0);
      raw::close(c);
      if (status == 0 && (r != 8 || w != 8 || eof != 0)) status = 3000 + (r != 8) * 100 + (w != 8) * 10 + (eof != 0);
    }
    out[lane] = status;
    if (gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(box[2]).fetch_add(1, gpusock::Order::kAcqRel) + 1 == 32) {
      raw::close(lfd);
    }
  }
};

TEST_P(NetTest, LanesOfOneCallDoNotWaitForEachOtherInAcceptAndRecv) {
  Start();
  auto out = Buffer<int64_t>(32);
  auto k = Launch({1}, {32}, OneClientAtATime{}, box_.dev, out.data(), 0);
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  int served = 0;
  for (int i = 0; i < 32; ++i) {
    const int fd = host_connect(static_cast<uint16_t>(port));
    ASSERT_GE(fd, 0) << "client " << i;
    timeval tv{30, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    const uint64_t id = 7000 + i;
    uint64_t a = 0;
    const bool ok = send_all(fd, &id, sizeof id) && recv_all(fd, &a, sizeof a) && a == id * 3;
    ::close(fd);
    if (!ok) break;
    ++served;
  }
  EXPECT_EQ(served, 32) << "client " << served << " got no answer within 30 s";
  if (served != 32) rt_->shutdown();
  Finish(k);
  auto o = Read(out);
  for (int i = 0; i < 32 && served == 32; ++i) EXPECT_EQ(o[i], 0) << "lane " << i;
}

TEST_P(NetTest, LanesOfOneCallDoNotWaitForEachOtherInPoll) {
  Start();
  auto out = Buffer<int64_t>(32);
  auto k = Launch({1}, {32}, OneClientAtATime{}, box_.dev, out.data(), 1);
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  // Every client connects first (so every accept is answered at once); then they are
  // served one at a time, and each lane waits in poll until its client speaks.
  std::vector<int> fds;
  for (int i = 0; i < 32; ++i) {
    const int fd = host_connect(static_cast<uint16_t>(port));
    ASSERT_GE(fd, 0) << "client " << i;
    timeval tv{30, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    fds.push_back(fd);
  }
  int served = 0;
  for (int i = 0; i < 32; ++i) {
    const uint64_t id = 9000 + i;
    uint64_t a = 0;
    const bool ok = send_all(fds[i], &id, sizeof id) && recv_all(fds[i], &a, sizeof a) && a == id * 3;
    if (!ok) break;
    ::close(fds[i]);
    fds[i] = -1;
    ++served;
  }
  EXPECT_EQ(served, 32) << "client " << served << " got no answer within 30 s";
  for (int fd : fds) if (fd >= 0) ::close(fd);
  if (served != 32) rt_->shutdown();
  Finish(k);
  auto o = Read(out);
  for (int i = 0; i < 32 && served == 32; ++i) EXPECT_EQ(o[i], 0) << "lane " << i;
}

inline constexpr uint64_t kSmallHello = 0x5348454c4c4f3031ull, kSmallDone = 0x5348444f4e453031ull;

// Lanes 0 and 1 each accept a connection, then send together: lane 0 kBig bytes into a
// connection its peer does not read yet (small buffers, so the send blocks), lane 1 eight
// bytes; lane 1 then needs the peer's answer before it sends its last eight, and only then
// does the peer read lane 0's bytes. out[0]: lane 0's send result; out[1]: lane 1's status.
struct SendBesideABlockedSend {
  static constexpr uint32_t kBig = 4u << 20, kPiece = 64u << 10;
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out, uint8_t* big) const {
    const uint32_t lane = gpusock::warp::lane_id();
    if (lane > 1) return;
    if (lane == 0) {
      for (uint32_t i = 0; i < kBig; ++i) big[i] = pattern_byte(i);
      uint16_t port = 0;
      int lfd = listen_loopback(&port, 16);
      publish(box, 1, static_cast<uint32_t>(lfd < 0 ? 0 : lfd) + 1);
      publish(box, 0, lfd < 0 ? 0xffffffffu : port);
    }
    const int lfd = static_cast<int>(await_box(box, 1)) - 1;
    const int c = raw::accept(lfd, nullptr, nullptr);
    if (c < 0) {
      out[lane] = c;
      return;
    }
    if (lane == 0) {
      int small = 4096;
      raw::setsockopt(c, SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    }
    const uint64_t hello = kSmallHello;
    // Both lanes send in one call: lane 0 its first piece (small enough that the two
    // payloads share a staging run, which a whole-run piece would not), lane 1 its eight.
    gpusock::warp::sync(0x3u);
    const int64_t s = raw::send(c, lane == 0 ? static_cast<const void*>(big) : &hello, lane == 0 ? kPiece : 8, 0);
    if (lane == 0) {
      uint64_t sent = s > 0 ? static_cast<uint64_t>(s) : 0;
      int64_t r = s;
      while (r > 0 && sent < kBig) {
        const uint64_t n = kBig - sent < kPiece ? kBig - sent : kPiece;
        r = raw::send(c, big + sent, n, 0);
        if (r > 0) sent += static_cast<uint64_t>(r);
      }
      out[0] = r < 0 ? r : static_cast<int64_t>(sent);
    } else {
      uint64_t answer = 0, done = kSmallDone;
      const int64_t r = raw::recv(c, &answer, 8, MSG_WAITALL);
      const int64_t d = raw::send(c, &done, 8, 0);
      out[1] = (s == 8 && r == 8 && answer == kSmallHello + 1 && d == 8) ? 0 : 1 + (s != 8) * 100 + (r != 8) * 10 + (d != 8);
    }
    char x;
    raw::recv(c, &x, 1, 0);  // the peer's close
    raw::close(c);
    if (lane == 0) raw::close(lfd);
  }
};

TEST_P(NetTest, LanesOfOneCallDoNotWaitForEachOtherInSend) {
  Start();
  auto out = Buffer<int64_t>(2);
  auto big = Buffer<uint8_t>(SendBesideABlockedSend::kBig);
  auto k = Launch({1}, {32}, SendBesideABlockedSend{}, box_.dev, out.data(), big.data());
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  int fds[2];
  for (int& fd : fds) {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int small = 4096;
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    timeval tv{30, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << std::strerror(errno);
  }
  // Which lane took which connection is the kernel's business: the first eight bytes say.
  uint64_t first[2] = {};
  ASSERT_TRUE(recv_all(fds[0], &first[0], 8));
  ASSERT_TRUE(recv_all(fds[1], &first[1], 8));
  const int small = first[0] == kSmallHello ? 0 : 1;
  ASSERT_EQ(first[small], kSmallHello);
  const int bigfd = fds[1 - small];
  const uint64_t answer = kSmallHello + 1;
  ASSERT_TRUE(send_all(fds[small], &answer, 8));
  uint64_t done = 0;
  const bool got_done = recv_all(fds[small], &done, 8);
  EXPECT_TRUE(got_done) << "lane 1 sent nothing more within 30 s: it waited for lane 0's blocked send";
  EXPECT_EQ(done, kSmallDone);
  // Now lane 0's bytes, every one in order.
  uint64_t wrong = 0, n = 8;
  for (uint64_t i = 0; i < 8; ++i) wrong += reinterpret_cast<uint8_t*>(&first[1 - small])[i] != pattern_byte(i);
  std::vector<uint8_t> buf(1 << 16);
  while (got_done && n < SendBesideABlockedSend::kBig) {
    const ssize_t r = ::recv(bigfd, buf.data(), buf.size(), 0);
    if (r <= 0) break;
    for (ssize_t i = 0; i < r; ++i) wrong += buf[i] != pattern_byte(n + i);
    n += static_cast<uint64_t>(r);
  }
  EXPECT_EQ(n, got_done ? SendBesideABlockedSend::kBig : n);
  EXPECT_EQ(wrong, 0u);
  ::close(fds[0]);
  ::close(fds[1]);
  if (!got_done) rt_->shutdown();
  Finish(k);
  if (got_done) {
    auto o = Read(out);
    EXPECT_EQ(o[0], SendBesideABlockedSend::kBig);
    EXPECT_EQ(o[1], 0);
  }
}

TEST_P(NetTest, ExternalNcClientAgainstAKernelServer) {
  if (std::system("command -v nc >/dev/null 2>&1") != 0) GTEST_SKIP() << "nc (netcat-openbsd) is not installed";
  Start();
  auto out = Buffer<int64_t>(2);
  auto k = Launch({1}, {32}, EchoServerOnce{}, box_.dev, out.data(), AF_INET);
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  std::string cmd = "printf 'hello from nc\\n' | nc -q 2 -w 10 127.0.0.1 " + std::to_string(port) + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  char line[256] = {};
  std::string got;
  while (std::fgets(line, sizeof line, p) != nullptr) got += line;
  ::pclose(p);
  EXPECT_EQ(got, "hello from nc\n");
  Finish(k);
  EXPECT_EQ(Read(out)[0], 14);
}

// ---- errors, each its own test --------------------------------------------------------

enum Probe : int {
  kRefused, kAddrInUse, kBadFd, kNotConn, kPipe, kReset, kAgain, kPollTimeout, kBadAddrLen, kUnsupportedOpt,
};

// Lane 0 runs one error scenario; out[0..3] are what it saw (see each test).
struct ErrorProbe {
  GPUSOCK_HD void operator()(int which, uint16_t port, uint32_t* box, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    sockaddr_in a = loopback4(port);
    switch (which) {
      case kRefused: {
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        out[0] = gpusock::connect(fd, sa(a), sizeof a);
        out[1] = gpusock::errno_value();
        gpusock::close(fd);
        break;
      }
      case kAddrInUse: {
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        out[0] = gpusock::bind(fd, sa(a), sizeof a);
        out[1] = gpusock::errno_value();
        gpusock::close(fd);
        break;
      }
      case kBadFd: {
        char c = 0;
        out[0] = raw::send(9999, &c, 1, 0);
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        gpusock::close(fd);
        out[1] = raw::recv(fd, &c, 1, 0);
        out[2] = raw::close(fd);
        out[3] = raw::send(1, &c, 1, 0);  // stdout is not one of the runtime's sockets
        break;
      }
      case kNotConn: {
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        char c;
        out[0] = raw::recv(fd, &c, 1, 0);
        sockaddr_in p{};
        socklen_t len = sizeof p;
        out[1] = raw::getpeername(fd, sa(p), &len);
        out[2] = raw::shutdown(fd, SHUT_WR);
        gpusock::close(fd);
        break;
      }
      case kPipe: {
        // Connect, wait until the host has closed its end, then send until it fails.
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        out[0] = raw::connect(fd, sa(a), sizeof a);
        publish(box, 0, 1);
        await_box(box, 1);
        char buf[1024] = {};
        int64_t first_error = 0;
        for (int i = 0; i < 1000 && first_error == 0; ++i) {
          int64_t r = raw::send(fd, buf, sizeof buf, 0);
          if (r < 0) first_error = r;
        }
        out[1] = first_error;
        out[2] = raw::send(fd, buf, sizeof buf, 0);  // after the reset: EPIPE
        gpusock::close(fd);
        break;
      }
      case kReset: {
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        out[0] = raw::connect(fd, sa(a), sizeof a);
        char buf[4096];
        int64_t total = 0, r;
        while ((r = raw::recv(fd, buf, sizeof buf, 0)) > 0) total += r;
        out[1] = r;
        out[2] = total;
        gpusock::close(fd);
        break;
      }
      case kAgain: {
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        out[0] = raw::connect(fd, sa(a), sizeof a);
        char c;
        out[1] = raw::recv(fd, &c, 1, MSG_DONTWAIT);
        int fl = gpusock::fcntl(fd, F_GETFL);
        gpusock::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
        out[2] = raw::recv(fd, &c, 1, 0);
        uint16_t lport;
        int lfd = listen_loopback(&lport);
        raw::fcntl(lfd, F_SETFL, O_NONBLOCK);
        out[3] = raw::accept(lfd, nullptr, nullptr);
        out[4] = (raw::fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
        gpusock::close(lfd);
        gpusock::close(fd);
        break;
      }
      case kPollTimeout: {
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        out[0] = raw::connect(fd, sa(a), sizeof a);
        pollfd p{fd, POLLIN, 0};
        timespec t0, t1;
        gpusock::clock_gettime(CLOCK_MONOTONIC, &t0);
        out[1] = gpusock::poll(&p, 1, 150);
        gpusock::clock_gettime(CLOCK_MONOTONIC, &t1);
        out[2] = (t1.tv_sec - t0.tv_sec) * 1000000000ll + (t1.tv_nsec - t0.tv_nsec);
        out[3] = p.revents;
        gpusock::close(fd);
        break;
      }
      case kBadAddrLen: {
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        out[0] = raw::bind(fd, sa(a), 3);
        out[1] = raw::connect(fd, sa(a), 3);
        out[2] = raw::bind(fd, sa(a), 4096);
        out[3] = raw::sendto(gpusock::socket(AF_INET, SOCK_DGRAM, 0), "x", 1, 0, sa(a), 64);
        gpusock::close(fd);
        break;
      }
      case kUnsupportedOpt: {
        int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
        int v = 1;
        out[0] = raw::setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &v, sizeof v);
        out[1] = raw::setsockopt(fd, SOL_SOCKET, SO_ERROR, &v, sizeof v);
        out[2] = raw::socket(AF_UNIX, SOCK_STREAM, 0);
        out[3] = raw::socket(AF_INET, SOCK_RAW, 0);
        gpusock::close(fd);
        break;
      }
    }
  }
};

class NetErrorTest : public NetTest {
 protected:
  std::vector<int64_t> RunProbe(Probe p, uint16_t port) {
    auto out = Buffer<int64_t>(8);
    auto k = Launch({1}, {32}, ErrorProbe{}, static_cast<int>(p), port, box_.dev, out.data());
    Finish(k);
    return Read(out);
  }
};
INSTANTIATE_TEST_SUITE_P(BothDevices, NetErrorTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

TEST_P(NetErrorTest, ConnectToAClosedPortIsRefused) {
  Start();
  uint16_t port;
  int l = host_listen(&port);
  ::close(l);
  auto o = RunProbe(kRefused, port);
  EXPECT_EQ(o[0], -1);
  EXPECT_EQ(o[1], ECONNREFUSED);
}

TEST_P(NetErrorTest, BindToAPortInUseFails) {
  Start();
  uint16_t port;
  int l = host_listen(&port);
  auto o = RunProbe(kAddrInUse, port);
  ::close(l);
  EXPECT_EQ(o[0], -1);
  EXPECT_EQ(o[1], EADDRINUSE);
}

TEST_P(NetErrorTest, UnknownOrClosedDescriptorsAreEbadf) {
  Start();
  auto o = RunProbe(kBadFd, 0);
  EXPECT_EQ(o[0], -EBADF);
  EXPECT_EQ(o[1], -EBADF);
  EXPECT_EQ(o[2], -EBADF);
  EXPECT_EQ(o[3], -EBADF);
}

TEST_P(NetErrorTest, UnconnectedSocketIsEnotconn) {
  Start();
  auto o = RunProbe(kNotConn, 0);
  EXPECT_EQ(o[0], -ENOTCONN);
  EXPECT_EQ(o[1], -ENOTCONN);
  EXPECT_EQ(o[2], -ENOTCONN);
}

TEST_P(NetErrorTest, SendAfterPeerClosedIsEpipeWithoutSigpipe) {
  Start();
  uint16_t port;
  int l = host_listen(&port);
  auto out = Buffer<int64_t>(8);
  auto k = Launch({1}, {32}, ErrorProbe{}, static_cast<int>(kPipe), port, box_.dev, out.data());
  int c = ::accept(l, nullptr, nullptr);
  ASSERT_GE(c, 0);
  ASSERT_NE(Await(0), 0u);
  ::close(c);  // unread data later makes the kernel answer with a reset
  Post(1, 1);
  Finish(k);
  ::close(l);
  auto o = Read(out);
  EXPECT_EQ(o[0], 0);
  // The first failing send reports the reset or the broken pipe; the next one, EPIPE.
  EXPECT_THAT(o[1], ::testing::AnyOf(-EPIPE, -ECONNRESET));
  EXPECT_EQ(o[2], -EPIPE);
  // This process is still here: no SIGPIPE was raised.
}

TEST_P(NetErrorTest, PeerResetMidStreamIsEconnreset) {
  Start();
  uint16_t port;
  int l = host_listen(&port);
  std::thread peer([&] {
    int c = ::accept(l, nullptr, nullptr);
    char buf[8192] = {};
    send_all(c, buf, sizeof buf);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    linger lg{1, 0};
    ::setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    ::close(c);  // RST
  });
  auto o = RunProbe(kReset, port);
  peer.join();
  ::close(l);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], -ECONNRESET);
  EXPECT_LE(o[2], 8192);
}

TEST_P(NetErrorTest, NonBlockingCallsAnswerEagain) {
  Start();
  uint16_t port;
  int l = host_listen(&port);
  auto o = RunProbe(kAgain, port);
  ::close(l);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], -EAGAIN);
  EXPECT_EQ(o[2], -EAGAIN);
  EXPECT_EQ(o[3], -EAGAIN);
  EXPECT_EQ(o[4], 1);
}

TEST_P(NetErrorTest, PollTimesOutWithNothingReady) {
  Start();
  uint16_t port;
  int l = host_listen(&port);
  auto o = RunProbe(kPollTimeout, port);
  ::close(l);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], 0);
  EXPECT_GE(o[2], 140'000'000) << "poll returned early";
  EXPECT_LT(o[2], 5'000'000'000ll);
  EXPECT_EQ(o[3], 0);
}

TEST_P(NetErrorTest, BadSockaddrLengthIsEinval) {
  Start();
  auto o = RunProbe(kBadAddrLen, 9);
  EXPECT_EQ(o[0], -EINVAL);
  EXPECT_EQ(o[1], -EINVAL);
  EXPECT_EQ(o[2], -EINVAL);
  EXPECT_EQ(o[3], -EINVAL);
}

TEST_P(NetErrorTest, OptionsAndFamiliesOutsideTheAllowedSetAreRefused) {
  Start();
  auto o = RunProbe(kUnsupportedOpt, 0);
  EXPECT_EQ(o[0], -ENOPROTOOPT);
  EXPECT_EQ(o[1], -ENOPROTOOPT);
  EXPECT_EQ(o[2], -EAFNOSUPPORT);
  EXPECT_EQ(o[3], -EINVAL);
}

// Opens sockets until the runtime's limit; out: {opened, errno of the next, reopen after close}.
struct OpenUntilFull {
  GPUSOCK_HD void operator()(int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    int fds[64];
    int n = 0;
    int64_t err = 0;
    while (n < 64) {
      int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
      if (fd < 0) {
        err = fd;
        break;
      }
      fds[n++] = fd;
    }
    out[0] = n;
    out[1] = err;
    raw::close(fds[0]);
    int again = raw::socket(AF_INET, SOCK_DGRAM, 0);
    out[2] = again >= 0;
    if (again >= 0) raw::close(again);
    for (int i = 1; i < n; ++i) raw::close(fds[i]);
  }
};

TEST_P(NetErrorTest, DescriptorLimitGivesEmfile) {
  gpusock::iouring::Options io;
  io.max_sockets = 8;
  Start(io);
  auto out = Buffer<int64_t>(3);
  auto k = Launch({1}, {32}, OpenUntilFull{}, out.data());
  Finish(k);
  auto o = Read(out);
  EXPECT_EQ(o[0], 8);
  EXPECT_EQ(o[1], -EMFILE);
  EXPECT_EQ(o[2], 1);
}

// Every lane connects, then all 32 receive at once (one warp call) a message the host
// has already sent: with fewer receive buffers than lanes, the call cannot get a buffer for
// every lane in one go.
struct AllLanesReceive {
  GPUSOCK_HD void operator()(uint16_t port, uint32_t bytes, uint8_t* bufs, int64_t* out) const {
    const uint64_t tid = gpusock::global_thread_id();
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = loopback4(port);
    int r = raw::connect(fd, sa(a), sizeof a);
    uint64_t id = tid;
    if (r == 0) r = raw::send(fd, &id, 8, 0) == 8 ? 0 : -EIO;
    uint8_t* b = bufs + tid * bytes;
    int64_t got = r == 0 ? raw::recv(fd, b, bytes, MSG_WAITALL) : r;
    int64_t bad = 0;
    for (uint32_t i = 0; got == bytes && i < bytes; ++i) bad += b[i] != pattern_byte(tid * 7919 + i);
    out[tid] = got == bytes ? bad : (got < 0 ? got : -100000 - got);
    raw::close(fd);
  }
};

TEST_P(NetErrorTest, ReceiveBufferExhaustionInsideOneWarpCallResolves) {
  // 16 buffers for 32 lanes that receive together: half the lanes find the pool empty
  // while the other half hold buffers that only come back after the call is answered.
  gpusock::iouring::Options io;
  io.recv_buffers = 16;
  io.recv_buffer_bytes = 4096;
  Start(io);
  constexpr int kLanes = 32;
  constexpr uint32_t kBytes = 3000;
  uint16_t port;
  int l = host_listen(&port);
  ASSERT_GE(l, 0);
  std::thread peer([&] {
    std::vector<int> cs;
    for (int i = 0; i < kLanes; ++i) {
      int c = ::accept(l, nullptr, nullptr);
      uint64_t id = 0;
      if (c < 0 || !recv_all(c, &id, sizeof id) || id >= kLanes) break;
      std::vector<uint8_t> m(kBytes);
      for (uint32_t k = 0; k < kBytes; ++k) m[k] = pattern_byte(id * 7919 + k);
      send_all(c, m.data(), m.size());
      cs.push_back(c);
    }
    for (int c : cs) {
      char x;
      ::recv(c, &x, 1, 0);  // until the kernel closes
      ::close(c);
    }
  });
  auto bufs = Buffer<uint8_t>(kLanes * kBytes);
  auto out = Buffer<int64_t>(kLanes);
  auto k = Launch({1}, {32}, AllLanesReceive{}, port, kBytes, bufs.data(), out.data());
  Finish(k);
  peer.join();
  ::close(l);
  auto o = Read(out);
  for (int i = 0; i < kLanes; ++i) EXPECT_EQ(o[i], 0) << "lane " << i << " (0: every byte right)";
}

// Each lane connects and sends `per_lane` pattern bytes (offset by its id) in one send().
struct ManySenders {
  GPUSOCK_HD void operator()(uint16_t port, uint32_t per_lane, uint8_t* bufs, int64_t* out) const {
    uint64_t tid = gpusock::global_thread_id();
    uint8_t* b = bufs + tid * per_lane;
    for (uint32_t i = 0; i < per_lane; ++i) b[i] = pattern_byte(tid * 7919 + i);
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = loopback4(port);
    int r = raw::connect(fd, sa(a), sizeof a);
    uint64_t id = tid;
    if (r == 0) r = raw::send(fd, &id, 8, 0) == 8 ? 0 : -EIO;
    out[tid] = r == 0 ? raw::send(fd, b, per_lane, 0) : r;
    raw::close(fd);
  }
};

TEST_P(NetErrorTest, StagingExhaustionBlocksSendersAndLosesNothing) {
  opts_.staging_bytes = 256 * 1024;  // one staging run
  Start();
  constexpr int kLanes = 64;
  constexpr uint32_t kPerLane = 128 * 1024;  // 8 MiB in all through 256 KiB of staging
  uint16_t port;
  int l = host_listen(&port);
  std::atomic<int> bad{0};
  std::thread sink([&] {
    std::vector<int> cs;
    for (int i = 0; i < kLanes; ++i) cs.push_back(::accept(l, nullptr, nullptr));
    // Read nothing for a while: the kernel's socket buffers fill, sends block in the host,
    // staging stays held, and later sends wait for staging.
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    std::vector<std::thread> rs;
    for (int c : cs) {
      rs.emplace_back([&, c] {
        uint64_t id = 0;
        std::vector<uint8_t> d(kPerLane);
        if (!recv_all(c, &id, 8) || !recv_all(c, d.data(), d.size())) {
          bad++;
        } else {
          for (uint32_t i = 0; i < kPerLane; ++i) {
            if (d[i] != pattern_byte(id * 7919 + i)) {
              bad++;
              break;
            }
          }
          char x;
          if (::recv(c, &x, 1, 0) != 0) bad++;  // nothing extra
        }
        ::close(c);
      });
    }
    for (auto& t : rs) t.join();
  });
  auto bufs = Buffer<uint8_t>(size_t{kLanes} * kPerLane);
  auto out = Buffer<int64_t>(kLanes);
  auto k = Launch({kLanes / 32}, {32}, ManySenders{}, port, kPerLane, bufs.data(), out.data());
  Finish(k);
  sink.join();
  ::close(l);
  auto o = Read(out);
  for (int i = 0; i < kLanes; ++i) EXPECT_EQ(o[i], kPerLane) << "lane " << i;
  EXPECT_EQ(bad.load(), 0);
}

// ---- poll, options, flags, aggregation, shutdown ----------------------------------------

// Lane 0: listener; accepts 3 connections (the host writes to #0 and #2), then polls them
// plus a bogus and a negative descriptor. out: {ready, revents0..2, revents bogus, revents neg}
struct PollMany {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    uint16_t port;
    int lfd = listen_loopback(&port);
    publish(box, 0, port);
    pollfd p[5];
    for (int i = 0; i < 3; ++i) p[i] = {raw::accept(lfd, nullptr, nullptr), POLLIN, 0};
    await_box(box, 1);
    p[3] = {4000, POLLIN, 0};
    p[4] = {-1, POLLIN, 0};
    out[0] = gpusock::poll(p, 5, 5000);
    for (int i = 0; i < 5; ++i) out[1 + i] = p[i].revents;
    // A wait that a host write ends.
    pollfd q{p[1].fd, POLLIN, 0};
    publish(box, 2, 1);
    out[6] = gpusock::poll(&q, 1, 10000);
    out[7] = q.revents;
    for (int i = 0; i < 3; ++i) raw::close(p[i].fd);
    raw::close(lfd);
  }
};

TEST_P(NetTest, PollReportsExactlyTheReadyDescriptors) {
  Start();
  auto out = Buffer<int64_t>(8);
  auto k = Launch({1}, {32}, PollMany{}, box_.dev, out.data());
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  int c[3];
  for (int& fd : c) fd = host_connect(static_cast<uint16_t>(port));
  ASSERT_TRUE(send_all(c[0], "a", 1));
  ASSERT_TRUE(send_all(c[2], "b", 1));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  Post(1, 1);
  ASSERT_NE(Await(2), 0u);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(send_all(c[1], "c", 1));
  Finish(k);
  for (int fd : c) ::close(fd);
  auto o = Read(out);
  EXPECT_EQ(o[0], 3);  // two readable, one POLLNVAL
  EXPECT_EQ(o[1], POLLIN);
  EXPECT_EQ(o[2], 0);
  EXPECT_EQ(o[3], POLLIN);
  EXPECT_EQ(o[4], POLLNVAL);
  EXPECT_EQ(o[5], 0);
  EXPECT_EQ(o[6], 1);
  EXPECT_EQ(o[7], POLLIN);
}

// Lane 0 polls a listening socket: first with nothing pending (timeout), then while the
// host connects (readable), then once the connection was accepted (not readable again).
// The multishot accept takes connections off the socket as they arrive, so this is what
// the listener's accept eventfd is for. out: {idle, revents, ready, revents, accepted,
// after-accept ready}
struct PollListener {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    uint16_t port;
    int lfd = listen_loopback(&port);
    pollfd p{lfd, POLLIN, 0};
    out[0] = raw::poll(&p, 1, 50);
    out[1] = p.revents;
    publish(box, 0, port);  // the host connects now
    p.revents = 0;
    out[2] = raw::poll(&p, 1, 20000);
    out[3] = p.revents;
    int c = raw::accept(lfd, nullptr, nullptr);
    out[4] = c >= 0 ? 1 : c;
    p.revents = 0;
    out[5] = raw::poll(&p, 1, 50);
    raw::close(c);
    raw::close(lfd);
  }
};

TEST_P(NetTest, PollOnAListenerWakesWhenAConnectionArrives) {
  Start();
  auto out = Buffer<int64_t>(6);
  auto k = Launch({1}, {32}, PollListener{}, box_.dev, out.data());
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the poll start waiting
  int fd = host_connect(static_cast<uint16_t>(port));
  ASSERT_GE(fd, 0);
  Finish(k);
  ::close(fd);
  auto o = Read(out);
  EXPECT_EQ(o[0], 0) << "nothing pending: timeout";
  EXPECT_EQ(o[1], 0);
  EXPECT_EQ(o[2], 1);
  EXPECT_EQ(o[3], POLLIN);
  EXPECT_EQ(o[4], 1);
  EXPECT_EQ(o[5], 0) << "the one connection was taken";
}

// Lane 0 sets and reads back each option the API promises. out[i] = 0 when right.
struct OptionRoundTrip {
  GPUSOCK_HD void operator()(int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
    struct O {
      int level, name, value;
    };
    const O opts[] = {{SOL_SOCKET, SO_REUSEADDR, 1}, {SOL_SOCKET, SO_REUSEPORT, 1}, {IPPROTO_TCP, TCP_NODELAY, 1},
                      {SOL_SOCKET, SO_KEEPALIVE, 1}, {SOL_SOCKET, SO_RCVBUF, 65536},  {SOL_SOCKET, SO_SNDBUF, 65536}};
    for (int i = 0; i < 6; ++i) {
      int v = opts[i].value, got = 0;
      socklen_t len = sizeof got;
      int s = gpusock::setsockopt(fd, opts[i].level, opts[i].name, &v, sizeof v);
      int g = gpusock::getsockopt(fd, opts[i].level, opts[i].name, &got, &len);
      // Linux doubles buffer sizes it is given.
      bool ok = s == 0 && g == 0 && len == sizeof got && (got == v || (i >= 4 && got == 2 * v));
      out[i] = ok ? 0 : 1 + (s != 0) * 10 + (g != 0) * 100;
    }
    int err = -1;
    socklen_t len = sizeof err;
    out[6] = gpusock::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0 ? 0 : 1;
    int type = 0;
    len = sizeof type;
    out[7] = gpusock::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM ? 0 : 1;
    gpusock::close(fd);
  }
};

TEST_P(NetTest, SocketOptionsRoundTrip) {
  Start();
  auto out = Buffer<int64_t>(8);
  auto k = Launch({1}, {32}, OptionRoundTrip{}, out.data());
  Finish(k);
  auto o = Read(out);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(o[i], 0) << "option " << i;
}

// Every lane connects, then the whole warp sends at once (one hostcall), then each lane
// receives with MSG_PEEK, then for real with MSG_WAITALL, then write()/read() and
// shutdown(SHUT_WR). out[tid] = 0 when right.
struct WarpTogether {
  GPUSOCK_HD void operator()(uint16_t port, uint32_t* box, int64_t* out) const {
    uint64_t tid = gpusock::global_thread_id();
    int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = loopback4(port);
    int64_t err = gpusock::connect(fd, sa(a), sizeof a) == 0 ? 0 : 1;
    uint64_t v[4] = {tid, tid + 1, tid + 2, tid + 3};
    gpusock::warp::sync(0xffffffffu);
    if (gpusock::warp::lane_id() == 0) publish(box, 0, 1);  // host: snapshot counters now
    await_box(box, 1);
    gpusock::warp::sync(0xffffffffu);
    err += (gpusock::send(fd, v, sizeof v, 0) != sizeof v) * 10;
    gpusock::warp::sync(0xffffffffu);
    if (gpusock::warp::lane_id() == 0) publish(box, 2, 1);
    // The host echoes what each connection sent, in 1-byte pieces at first.
    uint64_t peek = 0, got[4] = {};
    err += (gpusock::recv(fd, &peek, 1, MSG_PEEK) != 1) * 100;
    err += (gpusock::recv(fd, got, sizeof got, MSG_WAITALL) != sizeof got) * 1000;
    err += ((peek & 0xff) != (tid & 0xff) || got[0] != tid || got[3] != tid + 3) * 10000;
    err += (gpusock::write(fd, "bye", 3) != 3) * 100000;
    err += (gpusock::shutdown(fd, SHUT_WR) != 0) * 1000000;
    char rest[8];
    err += (gpusock::read(fd, rest, sizeof rest) != 0) * 10000000;  // the host closes after "bye"
    gpusock::close(fd);
    out[tid] = err;
  }
};

TEST_P(NetTest, WholeWarpSendsShareOneHostcallAndFlagsWork) {
  Start();
  uint16_t port;
  int l = host_listen(&port);
  constexpr int kLanes = 32;
  std::thread peer([&] {
    std::vector<std::thread> ts;
    for (int i = 0; i < kLanes; ++i) {
      int c = ::accept(l, nullptr, nullptr);
      ts.emplace_back([c] {
        uint8_t v[32];
        if (!recv_all(c, v, sizeof v)) return (void)::close(c);
        for (int j = 0; j < 4; ++j) {  // pieces: MSG_WAITALL must gather them
          send_all(c, v + j, 1);
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        send_all(c, v + 4, sizeof v - 4);
        char bye[3];
        recv_all(c, bye, 3);
        char x;
        ::recv(c, &x, 1, 0);  // EOF from SHUT_WR
        ::close(c);
      });
    }
    for (auto& t : ts) t.join();
  });
  auto out = Buffer<int64_t>(kLanes);
  auto k = Launch({1}, {kLanes}, WarpTogether{}, port, box_.dev, out.data());
  ASSERT_NE(Await(0), 0u);
  const uint64_t calls0 = Calls(gpusock::net::op::kSend), lanes0 = Lanes(gpusock::net::op::kSend);
  Post(1, 1);
  ASSERT_NE(Await(2), 0u);
  const uint64_t calls1 = Calls(gpusock::net::op::kSend), lanes1 = Lanes(gpusock::net::op::kSend);
  Finish(k);
  peer.join();
  ::close(l);
  auto o = Read(out);
  for (int i = 0; i < kLanes; ++i) EXPECT_EQ(o[i], 0) << "lane " << i;
  EXPECT_EQ(lanes1 - lanes0, 32u);
  EXPECT_EQ(calls1 - calls0, 1u) << "32 lanes sending together should share one hostcall";
}

// Every lane accepts on one listener; those that get one of the host's 16 connections
// then block in recv. The host shuts the runtime down. out[tid] = what the call returned.
struct BlockForever {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    uint32_t lane = gpusock::warp::lane_id();
    if (lane == 0) {
      uint16_t port;
      int lfd = listen_loopback(&port);
      publish(box, 1, static_cast<uint32_t>(lfd) + 1);
      publish(box, 0, port);
    }
    uint32_t l1 = await_box(box, 1);
    int lfd = static_cast<int>(l1) - 1;
    // Sixteen lanes get the host's connections and block in recv (the host sends
    // nothing); the other sixteen block in accept.
    int c = raw::accept(lfd, nullptr, nullptr);
    char x;
    out[lane] = c < 0 ? c : raw::recv(c, &x, 1, 0);
  }
};

TEST_P(NetTest, ShutdownWhileKernelsBlockInAcceptAndRecvEndsThemWithAnError) {
  Start();
  auto out = Buffer<int64_t>(32);
  auto k = Launch({1}, {32}, BlockForever{}, box_.dev, out.data());
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  std::vector<int> cs;
  for (int i = 0; i < 16; ++i) cs.push_back(host_connect(static_cast<uint16_t>(port)));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto t0 = std::chrono::steady_clock::now();
  rt_->shutdown();
  ASSERT_TRUE(k.wait_for(std::chrono::seconds(30))) << "kernel still blocked after shutdown";
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  auto o = Read(out);
  int failed = 0;
  for (int i = 0; i < 32; ++i) failed += o[i] == -ESHUTDOWN;
  EXPECT_EQ(failed, 32) << "every lane waits in accept or recv until shutdown";
  for (int fd : cs) ::close(fd);
}

// ---- the C++ layer ------------------------------------------------------------------

struct CppLayer {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    auto l = gpusock::TcpListener::bind(gpusock::SockAddr::ipv4(127, 0, 0, 1, 0));
    if (!l) {
      out[0] = -l.error();
      return;
    }
    auto where = l->local_addr();
    publish(box, 0, where->port());
    auto s = l->accept();
    if (!s) {
      out[0] = -s.error();
      return;
    }
    char buf[5];
    auto n = s->recv_exact(buf, 5);
    auto w = s->send_all(buf, n.ok() ? *n : 0);
    auto peer = s->peer_addr();
    out[0] = n.ok() && *n == 5 && w.ok() && *w == 5 && peer.ok() && peer->family() == AF_INET ? 1 : 0;
    auto bad = gpusock::SockAddr::parse("not an address", 1);
    out[1] = bad.ok() ? 0 : bad.error();
    auto v6 = gpusock::SockAddr::parse("::1", 80);
    out[2] = v6.ok() && v6->family() == AF_INET6 && v6->port() == 80;
    // The destructors close both descriptors.
  }
};

TEST_P(NetTest, CppLayerOwnsDescriptorsAndReturnsExpected) {
  Start();
  auto out = Buffer<int64_t>(3);
  auto k = Launch({1}, {32}, CppLayer{}, box_.dev, out.data());
  uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  int fd = host_connect(static_cast<uint16_t>(port));
  ASSERT_TRUE(send_all(fd, "12345", 5));
  char back[5];
  ASSERT_TRUE(recv_all(fd, back, 5));
  EXPECT_EQ(std::string(back, 5), "12345");
  char x;
  EXPECT_EQ(::recv(fd, &x, 1, 0), 0) << "the stream's destructor closes the connection";
  ::close(fd);
  Finish(k);
  auto o = Read(out);
  EXPECT_EQ(o[0], 1);
  EXPECT_EQ(o[1], EINVAL);
  EXPECT_EQ(o[2], 1);
}

// ---- start-up checks ----------------------------------------------------------------

// ---- poll on the device (kSoPollOnDevice, docs 12.9a) ---------------------------------

GPUSOCK_HD inline int poll_on_device(int fd, int on = 1) {
  return raw::setsockopt(fd, gpusock::net::kSolGpusock, gpusock::net::kSoPollOnDevice, &on, sizeof on);
}
// ReadyHead::in_use: 1 once a socket of this runtime was polled on the device, when poll()
// starts reading readiness words; -1 where the backend keeps none.
GPUSOCK_HD inline int64_t words_in_use() {
  const auto* h = static_cast<const gpusock::net::ReadyHead*>(gpusock::hostcall::module_head(gpusock::net::kReadyModule));
  if (h->words == nullptr || h->in_use == nullptr) return -1;
  return gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(*h->in_use).load(gpusock::Order::kRelaxed);
}
GPUSOCK_HD inline int64_t polled_on_device(int fd) {
  int v = -1;
  socklen_t len = sizeof v;
  const int r = raw::getsockopt(fd, gpusock::net::kSolGpusock, gpusock::net::kSoPollOnDevice, &v, &len);
  return r < 0 ? r : v;
}

// Lane 0 walks one connection through what a readiness word says: a listener with the
// option, a connection that inherits it, bytes, a receive that empties the socket, the end
// of the stream, a POLLOUT entry (the host answers it), the option turned off, a closed
// descriptor, and the option's errors. The host counts poll hostcalls between box 1 and
// box 3: there must be none. out: see the test.
struct PollOnDeviceWalk {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    uint16_t port;
    int lfd = listen_loopback(&port);
    out[24] = words_in_use();
    out[0] = poll_on_device(lfd);
    out[25] = words_in_use();
    out[1] = polled_on_device(lfd);
    publish(box, 0, port);  // the host connects
    pollfd p{lfd, POLLIN, 0};
    out[2] = raw::poll(&p, 1, 20000);
    out[3] = p.revents;
    int c = raw::accept(lfd, nullptr, nullptr);
    out[4] = polled_on_device(c);
    p = {lfd, POLLIN, 0};
    out[5] = raw::poll(&p, 1, 0);  // the queue is empty again
    publish(box, 1, 1);  // the host takes its count of polls, then sends 5 bytes
    pollfd q{c, POLLIN, 0};
    out[6] = raw::poll(&q, 1, 20000);
    out[7] = q.revents;
    char buf[64];
    out[8] = raw::recv(c, buf, sizeof buf, MSG_DONTWAIT);
    q.revents = 0;
    out[9] = raw::poll(&q, 1, 0);     // emptied by that receive
    out[10] = raw::poll(&q, 1, 30);   // and nothing comes: a timeout
    publish(box, 2, 1);  // the host sends one byte and closes
    q = {c, POLLIN | POLLRDHUP, 0};
    out[11] = raw::poll(&q, 1, 20000);
    int64_t got = 0;
    for (int i = 0; i < 1000 && got < 1; ++i) {
      const int64_t n = raw::recv(c, buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) got += n;
      else if (n != -EAGAIN) break;
    }
    out[12] = got;
    q = {c, POLLIN | POLLRDHUP, 0};
    out[13] = raw::poll(&q, 1, 20000);  // the end of the stream stays readable
    out[14] = q.revents & (POLLIN | POLLRDHUP);
    out[15] = raw::recv(c, buf, sizeof buf, MSG_DONTWAIT);
    publish(box, 3, 1);  // the host reads its count of polls again
    await_box(box, 4);
    q = {c, POLLOUT, 0};
    out[16] = raw::poll(&q, 1, 1000);  // POLLOUT: through the host
    out[17] = poll_on_device(c, 0);
    out[18] = polled_on_device(c);
    raw::close(c);
    q = {c, POLLIN, 0};
    out[19] = raw::poll(&q, 1, 0);
    out[20] = q.revents;
    int u = raw::socket(AF_INET, SOCK_STREAM, 0);
    out[21] = poll_on_device(u);  // not listening, not connected
    short small = 1;
    out[22] = raw::setsockopt(lfd, gpusock::net::kSolGpusock, gpusock::net::kSoPollOnDevice, &small, sizeof small);
    int one = 1;
    out[23] = raw::setsockopt(lfd, gpusock::net::kSolGpusock, 99, &one, sizeof one);
    raw::close(u);
    raw::close(lfd);
  }
};

TEST_P(NetTest, PollOnDeviceFollowsTheSocketWithoutAHostcall) {
  Start();
  auto out = Buffer<int64_t>(26);
  auto k = Launch({1}, {32}, PollOnDeviceWalk{}, box_.dev, out.data());
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  int fd = host_connect(static_cast<uint16_t>(port));
  ASSERT_GE(fd, 0);
  ASSERT_NE(Await(1), 0u);
  const uint64_t polls_before = Calls(gpusock::net::op::kPoll);
  ASSERT_TRUE(send_all(fd, "hello", 5));
  ASSERT_NE(Await(2), 0u);
  ASSERT_TRUE(send_all(fd, "x", 1));
  ::shutdown(fd, SHUT_WR);
  ASSERT_NE(Await(3), 0u);
  const uint64_t polls_while_on_device = Calls(gpusock::net::op::kPoll) - polls_before;
  Post(4, 1);
  Finish(k);
  ::close(fd);
  const uint64_t polls_after = Calls(gpusock::net::op::kPoll) - polls_before;
  auto o = Read(out);
  EXPECT_EQ(o[0], 0) << "setsockopt on the listener";
  EXPECT_EQ(o[1], 1);
  EXPECT_EQ(o[2], 1) << "the listener wakes when a connection arrives";
  EXPECT_EQ(o[3], POLLIN);
  EXPECT_EQ(o[4], 1) << "the accepted connection inherits the option";
  EXPECT_EQ(o[5], 0) << "the listener's queue is empty after accept";
  EXPECT_EQ(o[6], 1);
  EXPECT_EQ(o[7], POLLIN);
  EXPECT_EQ(o[8], 5);
  EXPECT_EQ(o[9], 0) << "a short read empties the word's POLLIN";
  EXPECT_EQ(o[10], 0) << "timeout";
  EXPECT_EQ(o[11], 1);
  EXPECT_EQ(o[12], 1) << "the last byte";
  EXPECT_EQ(o[13], 1);
  EXPECT_EQ(o[14], POLLIN | POLLRDHUP) << "the end of the stream is readable, with POLLRDHUP";
  EXPECT_EQ(o[15], 0) << "end of stream";
  EXPECT_EQ(polls_while_on_device, 0u) << "every one of those polls was answered on the device";
  EXPECT_EQ(o[16], 1) << "POLLOUT, answered by the host";
  EXPECT_GE(polls_after, 1u);
  EXPECT_EQ(o[17], 0);
  EXPECT_EQ(o[18], 0) << "turned off";
  EXPECT_EQ(o[19], 1);
  EXPECT_EQ(o[20], POLLNVAL) << "a closed descriptor goes to the host again";
  EXPECT_EQ(o[21], -ENOTCONN);
  EXPECT_EQ(o[22], -EINVAL);
  EXPECT_EQ(o[23], -ENOPROTOOPT);
  EXPECT_EQ(o[24], 0) << "a fresh runtime: poll() goes straight to the host";
  EXPECT_EQ(o[25], 1) << "after the option: poll() reads the words";
}

// The warp accepts kConns connections from a listener polled on the device, then the whole
// warp polls them with warp_poll() and records which are ready; each lane then receives on
// its share of those, and a second warp_poll() must find none. out[0..2]: ready count,
// second count, bytes received; out[3 + i]: connection i's revents.
constexpr int kWarpPollConns = 40;
struct WarpPollOnDevice {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out, pollfd* p) const {
    const uint32_t lane = gpusock::warp::lane_id();
    const uint32_t all = gpusock::warp::existing_mask();
    if (lane == 0) {
      uint16_t port;
      int lfd = listen_loopback(&port);
      poll_on_device(lfd);
      publish(box, 0, port);
      for (int i = 0; i < kWarpPollConns; ++i) p[i] = {raw::accept(lfd, nullptr, nullptr), POLLIN, 0};
      p[kWarpPollConns] = {lfd, POLLIN, 0};
      publish(box, 1, 1);
    }
    gpusock::warp::sync(all);
    await_box(box, 2);  // the host has sent to every third connection
    const int ready = raw::warp_poll(all, p, kWarpPollConns + 1, 5000);
    for (int i = static_cast<int>(lane); i < kWarpPollConns; i += 32) out[3 + i] = p[i].revents;
    int64_t got = 0;
    char buf[16];
    for (int i = static_cast<int>(lane); i < kWarpPollConns; i += 32) {
      if ((p[i].revents & POLLIN) != 0) {
        const int64_t n = raw::recv(p[i].fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0) got += n;
      }
    }
    uint32_t total = 0;
    gpusock::warp::exclusive_sum(all, static_cast<uint32_t>(got), total);
    gpusock::warp::sync(all);
    const int again = raw::warp_poll(all, p, kWarpPollConns + 1, 0);
    if (lane == 0) {
      out[0] = ready;
      out[1] = again;
      out[2] = total;
    }
    gpusock::warp::sync(all);
    for (int i = static_cast<int>(lane); i <= kWarpPollConns; i += 32) raw::close(p[i].fd);
  }
};

TEST_P(NetTest, WarpPollOnDeviceReportsExactlyTheReadyConnections) {
  Start();
  auto out = Buffer<int64_t>(3 + kWarpPollConns);
  auto fds = Buffer<pollfd>(kWarpPollConns + 1);
  auto k = Launch({1}, {32}, WarpPollOnDevice{}, box_.dev, out.data(), fds.data());
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  std::vector<int> c;
  for (int i = 0; i < kWarpPollConns; ++i) c.push_back(host_connect(static_cast<uint16_t>(port)));
  ASSERT_NE(Await(1), 0u);
  const uint64_t polls_before = Calls(gpusock::net::op::kPoll);
  for (int i = 0; i < kWarpPollConns; i += 3) ASSERT_TRUE(send_all(c[i], "abc", 3));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  Post(2, 1);
  Finish(k);
  for (int fd : c) ::close(fd);
  auto o = Read(out);
  // The kernel accepted in order, so connection i there is host connection i.
  const int expect = (kWarpPollConns + 2) / 3;
  EXPECT_EQ(o[0], expect);
  EXPECT_EQ(o[1], 0) << "every ready connection was emptied";
  EXPECT_EQ(o[2], 3 * expect);
  for (int i = 0; i < kWarpPollConns; ++i) EXPECT_EQ(o[3 + i], i % 3 == 0 ? POLLIN : 0) << "connection " << i;
  EXPECT_EQ(Calls(gpusock::net::op::kPoll), polls_before) << "no poll hostcall";
}

// Request/response through a socket polled on the device, each request sent only after
// the answer to the one before came back: the receive that empties the socket and the
// next request's arrival race as closely as they can. A missed arrival would leave the
// kernel's poll waiting until its timeout, which the kernel counts as an error. out:
// {rounds answered, polls that timed out, receives that found nothing, error}.
struct PingPongPolledOnDevice {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out, int rounds, int size) const {
    if (gpusock::warp::lane_id() != 0) return;
    uint16_t port;
    int lfd = listen_loopback(&port);
    poll_on_device(lfd);
    publish(box, 0, port);
    int c = raw::accept4(lfd, nullptr, nullptr, SOCK_NONBLOCK);
    int one = 1;
    raw::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char buf[256];
    int64_t answered = 0, timeouts = 0, empty = 0, err = 0;
    int have = 0;
    while (answered < rounds && err == 0) {
      pollfd q{c, POLLIN, 0};
      const int r = raw::poll(&q, 1, 5000);
      if (r == 0) {
        ++timeouts;
        err = -ETIMEDOUT;
        break;
      }
      if (r < 0) {
        err = r;
        break;
      }
      const int64_t n = raw::recv(c, buf + have, static_cast<uint64_t>(size - have), 0);
      if (n == -EAGAIN) {
        ++empty;
        continue;
      }
      if (n <= 0) {
        err = n == 0 ? -EPIPE : n;
        break;
      }
      have += static_cast<int>(n);
      if (have < size) continue;
      if (raw::send(c, buf, static_cast<uint64_t>(size), 0) != size) err = -EIO;
      have = 0;
      ++answered;
    }
    out[0] = answered;
    out[1] = timeouts;
    out[2] = empty;
    out[3] = err;
    raw::close(c);
    raw::close(lfd);
  }
};

TEST_P(NetTest, PollOnDeviceMissesNoArrivalInRequestResponse) {
  Start();
  const int rounds = GetParam() == DeviceKind::kCpu ? 2000 : 5000;
  const int size = 100;
  auto out = Buffer<int64_t>(4);
  auto k = Launch({1}, {32}, PingPongPolledOnDevice{}, box_.dev, out.data(), rounds, size);
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  int fd = host_connect(static_cast<uint16_t>(port));
  ASSERT_GE(fd, 0);
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  std::vector<uint8_t> msg(size), back(size);
  int wrong = 0, done = 0;
  for (int i = 0; i < rounds; ++i) {
    for (int j = 0; j < size; ++j) msg[j] = pattern_byte(static_cast<uint64_t>(i) * size + j);
    // Every 7th request comes in two pieces, so a receive that empties the socket has the
    // rest arrive right behind it.
    if (i % 7 == 3) {
      if (!send_all(fd, msg.data(), 10)) break;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      if (!send_all(fd, msg.data() + 10, size - 10)) break;
    } else if (!send_all(fd, msg.data(), size)) {
      break;
    }
    if (!recv_all(fd, back.data(), size)) break;
    wrong += back != msg;
    ++done;
  }
  Finish(k);
  ::close(fd);
  auto o = Read(out);
  EXPECT_EQ(done, rounds);
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(o[0], rounds);
  EXPECT_EQ(o[1], 0) << "a poll waited out its timeout: an arrival was missed";
  EXPECT_EQ(o[3], 0);
  std::printf("[ info ] %d rounds; receives after a poll that found nothing (a stale POLLIN): %lld\n", rounds,
              static_cast<long long>(o[2]));
}

// A datagram socket polled on the device: two datagrams wait; after the first is read the
// socket is still readable, after the second it is not. out: {set, ready, n, ready, n, ready}.
struct UdpPolledOnDevice {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    int fd = raw::socket(AF_INET, SOCK_DGRAM, 0);
    sockaddr_in a = loopback4(0);
    raw::bind(fd, sa(a), sizeof a);
    socklen_t len = sizeof a;
    raw::getsockname(fd, sa(a), &len);
    out[0] = poll_on_device(fd);
    publish(box, 0, gpusock::ntohs(a.sin_port));
    await_box(box, 1);  // two datagrams were sent
    pollfd q{fd, POLLIN, 0};
    out[1] = raw::poll(&q, 1, 5000);
    char buf[64];
    out[2] = raw::recv(fd, buf, sizeof buf, 0);
    out[3] = raw::poll(&q, 1, 0);
    out[4] = raw::recv(fd, buf, sizeof buf, 0);
    out[5] = raw::poll(&q, 1, 0);
    raw::close(fd);
  }
};

TEST_P(NetTest, DatagramSocketPolledOnDeviceIsReadableWhileDatagramsWait) {
  Start();
  auto out = Buffer<int64_t>(6);
  auto k = Launch({1}, {32}, UdpPolledOnDevice{}, box_.dev, out.data());
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  int hs = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(port));
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::sendto(hs, "one", 3, 0, reinterpret_cast<sockaddr*>(&to), sizeof to), 3);
  ASSERT_EQ(::sendto(hs, "second", 6, 0, reinterpret_cast<sockaddr*>(&to), sizeof to), 6);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  Post(1, 1);
  Finish(k);
  ::close(hs);
  auto o = Read(out);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], 1);
  EXPECT_EQ(o[2], 3);
  EXPECT_EQ(o[3], 1) << "the second datagram still waits";
  EXPECT_EQ(o[4], 6);
  EXPECT_EQ(o[5], 0) << "none left";
}

// Where the backend keeps no word for a socket, the option is refused and poll() goes
// through the host as before. out: {setsockopt, getsockopt, poll, revents, words_in_use}.
struct PollOnDeviceRefused {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    uint16_t port;
    int lfd = listen_loopback(&port);
    out[0] = poll_on_device(lfd);
    out[1] = polled_on_device(lfd);
    out[4] = words_in_use();
    publish(box, 0, port);
    pollfd p{lfd, POLLIN, 0};
    out[2] = raw::poll(&p, 1, 20000);
    out[3] = p.revents;
    raw::close(raw::accept(lfd, nullptr, nullptr));
    raw::close(lfd);
  }
};

TEST_P(NetTest, PollOnDeviceIsRefusedWhereTheBackendKeepsNoWord) {
  for (const uint32_t words : {0u, 3u}) {  // none at all; none for descriptors past 2
    SCOPED_TRACE(words);
    rt_.reset();
    gpusock::iouring::Options io;
    io.ready_words = words;
    Start(io);
    if (HasFatalFailure()) return;
    std::fill(box_.host, box_.host + 8, 0u);
    auto out = Buffer<int64_t>(5);
    auto k = Launch({1}, {32}, PollOnDeviceRefused{}, box_.dev, out.data());
    const uint32_t port = Await(0);
    ASSERT_NE(port, 0u);
    int fd = host_connect(static_cast<uint16_t>(port));
    ASSERT_GE(fd, 0);
    Finish(k);
    ::close(fd);
    auto o = Read(out);
    EXPECT_EQ(o[0], words == 0 ? -ENOPROTOOPT : -ENOSPC);
    EXPECT_EQ(o[1], 0);
    EXPECT_EQ(o[2], 1);
    EXPECT_EQ(o[3], POLLIN);
    EXPECT_EQ(o[4], words == 0 ? -1 : 0) << "a refused option leaves poll() going straight to the host";
    // A fresh runtime: on the device this poll would have made none.
    EXPECT_GE(Calls(gpusock::net::op::kPoll), 1u) << "the poll went through the host";
  }
}

TEST(IouringFeatures, DisabledIoUringNamesTheSettingAndTheFix) {
  gpusock::iouring::KernelFeatures f;
  f.setup_error = EPERM;
  f.io_uring_disabled = 2;
  gpusock::Status s = gpusock::iouring::check_features(f);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), ::testing::HasSubstr("kernel.io_uring_disabled is 2"));
  EXPECT_THAT(s.message(), ::testing::HasSubstr("sysctl -w kernel.io_uring_disabled=0"));
}

TEST(IouringFeatures, MissingOperationsAreEachNamedWithTheirKernelVersion) {
  gpusock::iouring::KernelFeatures f = gpusock::iouring::probe_kernel();
  ASSERT_EQ(f.setup_error, 0) << "this machine's kernel has no io_uring";
  EXPECT_TRUE(gpusock::iouring::check_features(f).ok()) << gpusock::iouring::check_features(f).to_string();
  f.missing_ops = {"IORING_OP_SEND (Linux 5.6)"};
  f.buf_ring = false;
  f.multishot_accept = false;
  gpusock::Status s = gpusock::iouring::check_features(f);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), ::testing::HasSubstr("IORING_OP_SEND (Linux 5.6)"));
  EXPECT_THAT(s.message(), ::testing::HasSubstr("IORING_REGISTER_PBUF_RING, Linux 5.19"));
  EXPECT_THAT(s.message(), ::testing::HasSubstr("IORING_ACCEPT_MULTISHOT, Linux 5.19"));
  EXPECT_THAT(s.message(), ::testing::HasSubstr("What to do"));
}

}  // namespace
