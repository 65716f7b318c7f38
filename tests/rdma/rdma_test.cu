// Sockets for kernels over RDMA, against the host-side peer (gpusock::rdma::Peer and the
// gpusock-rdma-peer tool) on a real RDMA device. Where ibv_get_device_list finds none the
// cases skip, saying so; scripts/rdma-vm.sh runs them against soft-RoCE (rdma_rxe) in a VM.
// The device address comes from GPUSOCK_RDMA_ADDR (default 10.77.0.1, the VM's).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "gpusock/hostcall/launch.hpp"
#include "gpusock/net/socket.hpp"
#include "gpusock/rdma/backend.hpp"
#include "gpusock/rdma/peer.hpp"
#include "gpusock/rdma/policy.hpp"
#include "engine.hpp"
#include "../net/kernel_test.hpp"

extern char** environ;

namespace {

using gpusock::DeviceKind;
using gpusock::testing::mix64;
using gpusock::testing::publish;
namespace raw = gpusock::raw;
namespace rdma = gpusock::rdma;

GPUSOCK_HD inline uint8_t pattern_byte(uint64_t i) { return static_cast<uint8_t>((i * 2654435761u) >> 13); }
GPUSOCK_HD inline uint64_t byte_hash(uint64_t offset, uint8_t b) { return mix64((offset << 8) | b); }
uint64_t stream_hash(uint64_t total) {
  uint64_t h = 0;
  for (uint64_t i = 0; i < total; ++i) h += byte_hash(i, pattern_byte(i));
  return h;
}

GPUSOCK_HD inline sockaddr_in addr4(uint32_t ip, uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = gpusock::htons(port);
  a.sin_addr.s_addr = gpusock::htonl(ip);
  return a;
}
GPUSOCK_HD inline sockaddr* sa(sockaddr_in& a) { return reinterpret_cast<sockaddr*>(&a); }

std::string rdma_addr() {
  const char* e = std::getenv("GPUSOCK_RDMA_ADDR");
  return e && *e ? e : "10.77.0.1";
}
uint32_t rdma_ip() {
  in_addr a{};
  inet_pton(AF_INET, rdma_addr().c_str(), &a);
  return ntohl(a.s_addr);
}

class RdmaTest : public gpusock::testing::KernelTest {
 protected:
  void SetUp() override {
    KernelTest::SetUp();
    if (IsSkipped()) return;
    if (!rdma::device_present()) {
      GTEST_SKIP() << "no RDMA device (ibv_get_device_list found none); scripts/rdma-vm.sh runs this test "
                      "against soft-RoCE (rdma_rxe) in a VM";
    }
    opts_.cpu_resident_warps = 16;
    // A slot for every lane: lanes of one warp that the cpu device does not gather into one
    // call (under the VM's emulated CPUs they often arrive too far apart), or that are let
    // go as stragglers, make calls of their own, and each holds a slot while it blocks.
    // SixtyFourConnectionsToOneKernelListener's 64 lanes blocked at once need 64; with the
    // default two per warp (32 here) the rest waited out slot_wait and gave up (EBUSY).
    opts_.slots_per_warp = 32;
  }
  void Start(const rdma::Options& o = {}) {
    StartRuntime();
    if (HasFatalFailure()) return;
    auto be = rdma::create_backend(*rt_, o);
    ASSERT_TRUE(be.ok()) << be.status().to_string();
    std::printf("%s\n", (*be)->describe().c_str());
    ASSERT_TRUE(gpusock::net::attach(*rt_, *be).ok());
    MakePeer();
  }
  void MakePeer() {
    auto p = rdma::Peer::create();
    ASSERT_TRUE(p.ok()) << p.status().to_string();
    peer_ = std::move(p.value());
  }
  std::unique_ptr<rdma::Peer> peer_;
};

INSTANTIATE_TEST_SUITE_P(BothDevices, RdmaTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

// Lane 0 listens on ip:0, publishes the port in box[0], serves one connection: echoes
// until the peer closes. out[0]: bytes echoed or -errno.
struct EchoServerOnce {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out, uint32_t ip) const {
    if (gpusock::warp::lane_id() != 0) return;
    int lfd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = addr4(ip, 0);
    int r = lfd < 0 ? lfd : raw::bind(lfd, sa(a), sizeof a);
    if (r == 0) r = raw::listen(lfd, 16);
    socklen_t len = sizeof a;
    if (r == 0) r = raw::getsockname(lfd, sa(a), &len);
    if (r < 0) {
      out[0] = r;
      publish(box, 0, 0xffffffffu);
      return;
    }
    publish(box, 0, gpusock::ntohs(a.sin_port));
    int c = raw::accept(lfd, nullptr, nullptr);
    if (c < 0) {
      out[0] = c;
      return;
    }
    int one = 1;
    raw::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // TCP code runs unchanged
    static char buf[200000];
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

TEST_P(RdmaTest, KernelServerEchoesWhatAPeerSends) {
  Start();
  auto out = Buffer<int64_t>(1);
  auto k = Launch({1}, {32}, EchoServerOnce{}, box_.dev, out.data(), rdma_ip());
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  int fd = peer_->connect(rdma_addr(), static_cast<uint16_t>(port), 60000);
  ASSERT_GE(fd, 0) << std::strerror(-fd);
  size_t sent = 0;
  for (int i = 0; i < 40; ++i) {
    // From one byte to three receive buffers' worth (64 KiB each).
    std::string msg(1 + (i * 4999) % 200000, static_cast<char>('a' + i % 26));
    ASSERT_EQ(peer_->send(fd, msg.data(), msg.size()), static_cast<int64_t>(msg.size()));
    std::string back(msg.size(), '\0');
    ASSERT_EQ(peer_->recv(fd, back.data(), back.size(), true, 30000), static_cast<int64_t>(back.size()));
    ASSERT_EQ(back, msg) << "message " << i;
    sent += msg.size();
  }
  peer_->close(fd);
  Finish(k);
  EXPECT_EQ(Read(out)[0], static_cast<int64_t>(sent));
}

// Lanes 0..n-1 each connect to ip:port, send their id, read id * 7 back (MSG_WAITALL).
// out[lane] = 0 when right, else a code naming the step that failed.
struct ClientPerLane {
  GPUSOCK_HD void operator()(uint32_t ip, uint16_t port, uint32_t n, int64_t* out) const {
    const uint32_t tid = static_cast<uint32_t>(gpusock::global_thread_id());
    if (tid >= n) return;
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
      out[tid] = 1000 - fd;
      return;
    }
    sockaddr_in a = addr4(ip, port);
    int r = raw::connect(fd, sa(a), sizeof a);
    if (r < 0) {
      out[tid] = 2000 - r;
      raw::close(fd);
      return;
    }
    uint64_t id = tid, answer = 0;
    int64_t w = raw::send(fd, &id, sizeof id, 0);
    int64_t got = raw::recv(fd, &answer, sizeof answer, MSG_WAITALL);
    out[tid] = (w == 8 && got == 8 && answer == id * 7) ? 0 : 3000 + (w != 8) * 100 + (got != 8) * 10 + (answer != id * 7);
    raw::close(fd);
  }
};

// Serves `n` connections on `peer`: each sends a u64, gets it back times 7.
void serve_times7(rdma::Peer& peer, int lfd, int n, std::atomic<int>* served) {
  std::vector<int> fds;
  for (int i = 0; i < n; ++i) {
    int c = peer.accept(lfd, 60000);
    if (c < 0) break;
    fds.push_back(c);
  }
  for (int c : fds) {
    uint64_t id = 0;
    if (peer.recv(c, &id, sizeof id, true, 60000) != 8) continue;
    uint64_t a = id * 7;
    if (peer.send(c, &a, sizeof a) == 8) served->fetch_add(1);
  }
  for (int c : fds) peer.close(c);
  peer.drain(500);
}

TEST_P(RdmaTest, KernelClientsTalkToAPeerServer) {
  Start();
  uint16_t port = 0;
  int lfd = peer_->listen(rdma_addr(), 0, 128, &port);
  ASSERT_GE(lfd, 0) << std::strerror(-lfd);
  constexpr uint32_t kClients = 8;
  std::atomic<int> served{0};
  std::thread server([&] { serve_times7(*peer_, lfd, kClients, &served); });
  auto out = Buffer<int64_t>(32);
  auto k = Launch({1}, {32}, ClientPerLane{}, rdma_ip(), port, kClients, out.data());
  Finish(k);
  server.join();
  auto o = Read(out);
  for (uint32_t i = 0; i < kClients; ++i) EXPECT_EQ(o[i], 0) << "lane " << i;
  EXPECT_EQ(served.load(), static_cast<int>(kClients));
}

// The whole warp sends `total` pattern bytes with warp_send to ip:port. out[0]: bytes or -errno.
struct BulkSender {
  GPUSOCK_HD void operator()(uint32_t ip, uint16_t port, uint64_t total, uint8_t* chunk, uint32_t chunk_bytes,
                             int64_t* out) const {
    const uint32_t lane = gpusock::warp::lane_id();
    int fd = -1;
    if (lane == 0) {
      fd = raw::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a = addr4(ip, port);
      int r = fd < 0 ? fd : raw::connect(fd, sa(a), sizeof a);
      if (r < 0) fd = r;
    }
    fd = gpusock::warp::shfl(0xffffffffu, fd, 0);
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

// Lane 0 listens (port into box[0]) and accepts one connection; the whole warp receives
// until EOF or an error, hashing. out: {bytes, hash, mismatches, last result}.
struct BulkReceiverServer {
  GPUSOCK_HD void operator()(uint32_t* box, uint32_t ip, uint8_t* chunk, uint32_t chunk_bytes, int64_t* out) const {
    const uint32_t lane = gpusock::warp::lane_id();
    int fd = -1;
    if (lane == 0) {
      int lfd = raw::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a = addr4(ip, 0);
      int r = lfd < 0 ? lfd : raw::bind(lfd, sa(a), sizeof a);
      if (r == 0) r = raw::listen(lfd, 4);
      socklen_t len = sizeof a;
      if (r == 0) r = raw::getsockname(lfd, sa(a), &len);
      publish(box, 0, r < 0 ? 0xffffffffu : gpusock::ntohs(a.sin_port));
      fd = r < 0 ? r : raw::accept(lfd, nullptr, nullptr);
      if (lfd >= 0) raw::close(lfd);
    }
    fd = gpusock::warp::shfl(0xffffffffu, fd, 0);
    if (fd < 0) {
      if (lane == 0) out[3] = fd;
      return;
    }
    uint64_t off = 0, hash = 0, bad = 0;
    int64_t n = 0;
    for (;;) {
      n = raw::warp_recv(0xffffffffu, fd, chunk, chunk_bytes, 0);
      if (n <= 0) break;
      for (uint32_t i = lane; i < static_cast<uint32_t>(n); i += 32) {
        hash += byte_hash(off + i, chunk[i]);
        bad += chunk[i] != pattern_byte(off + i);
      }
      off += static_cast<uint64_t>(n);
      gpusock::warp::sync(0xffffffffu);
    }
    for (uint32_t d = 16; d > 0; d /= 2) {
      hash += gpusock::warp::shfl(0xffffffffu, hash, (lane + d) % 32);
      bad += gpusock::warp::shfl(0xffffffffu, bad, (lane + d) % 32);
    }
    if (lane == 0) {
      raw::close(fd);
      out[0] = static_cast<int64_t>(off);
      out[1] = static_cast<int64_t>(hash);
      out[2] = static_cast<int64_t>(bad);
      out[3] = n;
    }
  }
};

constexpr uint64_t kBulk = 256ull << 20;

// Receives everything on a new connection from `lfd`, hashing; `slow_us` sleeps per recv.
struct Sink {
  uint64_t got = 0, hash = 0, bad = 0;
  int64_t last = 0;
  void run(rdma::Peer& peer, int lfd, uint32_t slow_us, size_t piece) {
    int c = peer.accept(lfd, 60000);
    if (c < 0) {
      last = c;
      return;
    }
    std::vector<uint8_t> buf(piece);
    for (;;) {
      int64_t r = peer.recv(c, buf.data(), buf.size(), false, 120000);
      last = r;
      if (r <= 0) break;
      for (int64_t i = 0; i < r; ++i) {
        hash += byte_hash(got + i, buf[i]);
        bad += buf[i] != pattern_byte(got + i);
      }
      got += static_cast<uint64_t>(r);
      if (slow_us) usleep(slow_us);
    }
    peer.close(c);
  }
};

TEST_P(RdmaTest, QuarterGigabyteFromKernelToPeerArrivesWholeAndInOrder) {
  Start();
  uint16_t port = 0;
  int lfd = peer_->listen(rdma_addr(), 0, 4, &port);
  ASSERT_GE(lfd, 0);
  Sink sink;
  std::thread t([&] { sink.run(*peer_, lfd, 0, 1 << 20); });
  constexpr uint32_t kChunk = 256 * 1024;
  auto chunk = Buffer<uint8_t>(kChunk);
  auto out = Buffer<int64_t>(1);
  auto k = Launch({1}, {32}, BulkSender{}, rdma_ip(), port, kBulk, chunk.data(), kChunk, out.data());
  Finish(k);
  t.join();
  EXPECT_EQ(Read(out)[0], static_cast<int64_t>(kBulk));
  EXPECT_EQ(sink.last, 0) << "the stream should end with EOF";
  EXPECT_EQ(sink.got, kBulk);
  EXPECT_EQ(sink.bad, 0u);
  EXPECT_EQ(sink.hash, stream_hash(kBulk));
}

TEST_P(RdmaTest, QuarterGigabyteFromPeerToKernelArrivesWholeAndInOrder) {
  // 256 KiB receive buffers: warp_recv takes one buffer per call, so a quarter of the
  // hostcalls of the 64 KiB default.
  rdma::Options big;
  big.recv_buffer_bytes = 256 * 1024;
  Start(big);
  constexpr uint32_t kChunk = 256 * 1024;
  auto chunk = Buffer<uint8_t>(kChunk);
  auto out = Buffer<int64_t>(4);
  auto k = Launch({1}, {32}, BulkReceiverServer{}, box_.dev, rdma_ip(), chunk.data(), kChunk, out.data());
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  int fd = peer_->connect(rdma_addr(), static_cast<uint16_t>(port), 60000);
  ASSERT_GE(fd, 0) << std::strerror(-fd);
  std::vector<uint8_t> buf(4 << 20);
  for (uint64_t off = 0; off < kBulk; off += buf.size()) {
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = pattern_byte(off + i);
    ASSERT_EQ(peer_->send(fd, buf.data(), buf.size()), static_cast<int64_t>(buf.size()));
  }
  peer_->close(fd);
  Finish(k);
  auto o = Read(out);
  EXPECT_EQ(o[3], 0) << "the stream should end with EOF";
  EXPECT_EQ(o[0], static_cast<int64_t>(kBulk));
  EXPECT_EQ(o[2], 0);
  EXPECT_EQ(static_cast<uint64_t>(o[1]), stream_hash(kBulk));
}

TEST_P(RdmaTest, SlowReaderHoldsTheSenderBackAndLosesNothing) {
  Start();
  uint16_t port = 0;
  int lfd = peer_->listen(rdma_addr(), 0, 4, &port);
  ASSERT_GE(lfd, 0);
  // 16 MiB read 4 KiB at a time with a pause after each: the kernel's sends outrun the
  // reader many times over, so they wait for credits (16 buffers of 64 KiB at the peer).
  constexpr uint64_t kBytes = 16ull << 20;
  Sink sink;
  std::thread t([&] { sink.run(*peer_, lfd, 200, 4096); });
  constexpr uint32_t kChunk = 256 * 1024;
  auto chunk = Buffer<uint8_t>(kChunk);
  auto out = Buffer<int64_t>(1);
  auto k = Launch({1}, {32}, BulkSender{}, rdma_ip(), port, kBytes, chunk.data(), kChunk, out.data());
  Finish(k);
  t.join();
  EXPECT_EQ(Read(out)[0], static_cast<int64_t>(kBytes));
  EXPECT_EQ(sink.got, kBytes);
  EXPECT_EQ(sink.bad, 0u);
  EXPECT_EQ(sink.hash, stream_hash(kBytes));
}

// Lane 0: connects, then sends 64 KiB pattern pieces with MSG_DONTWAIT while the peer
// reads nothing (a non-blocking send is refused once the peer's receive buffers have no
// credits left to give), going on after each EAGAIN only while POLLOUT comes within
// 50 ms; tells the host (box[0]), waits for POLLOUT once the peer reads, sends one more
// piece (blocking), closes. out: {bytes taken while the peer read nothing, the last of
// those results, EAGAINs, the last 50 ms poll, poll once the peer reads, its revents, the
// last send, total}.
struct NonBlockingFiller {
  GPUSOCK_HD void operator()(uint32_t* box, uint32_t ip, uint16_t port, uint8_t* buf, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    constexpr uint32_t kPiece = 64 * 1024;
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = addr4(ip, port);
    int r = fd < 0 ? fd : raw::connect(fd, sa(a), sizeof a);
    if (r < 0) {
      out[1] = r;
      publish(box, 0, 1);
      return;
    }
    uint64_t total = 0;
    int64_t w = 0, refused = 0, stalled = 0;
    pollfd p{fd, POLLOUT, 0};
    for (int i = 0; i < 10000; ++i) {
      for (uint32_t j = 0; j < kPiece; ++j) buf[j] = pattern_byte(total + j);
      w = raw::send(fd, buf, kPiece, MSG_DONTWAIT);
      if (w > 0) {
        total += static_cast<uint64_t>(w);  // a short count: the next piece starts there
        continue;
      }
      if (w != -EAGAIN) break;
      ++refused;
      // Credits come back only as the peer reads; until then POLLOUT must not come.
      stalled = raw::poll(&p, 1, 50);
      if (stalled <= 0) break;
    }
    out[0] = static_cast<int64_t>(total);
    out[1] = w;
    out[2] = refused;
    out[3] = stalled;
    publish(box, 0, 1);
    out[4] = raw::poll(&p, 1, 60000);
    out[5] = p.revents;
    for (uint32_t j = 0; j < kPiece; ++j) buf[j] = pattern_byte(total + j);
    w = raw::send(fd, buf, kPiece, 0);
    out[6] = w;
    if (w > 0) total += static_cast<uint64_t>(w);
    out[7] = static_cast<int64_t>(total);
    raw::close(fd);
  }
};

TEST_P(RdmaTest, NonBlockingSendsGetEagainWithoutCreditsAndPolloutWhenTheReaderCatchesUp) {
  Start();
  if (HasFatalFailure()) return;
  uint16_t port = 0;
  int lfd = peer_->listen(rdma_addr(), 0, 4, &port);
  ASSERT_GE(lfd, 0);
  auto buf = Buffer<uint8_t>(64 * 1024);
  auto out = Buffer<int64_t>(8);
  auto k = Launch({1}, {32}, NonBlockingFiller{}, box_.dev, rdma_ip(), port, buf.data(), out.data());
  const int c = peer_->accept(lfd, 60000);
  ASSERT_GE(c, 0);
  // The peer reads nothing until the kernel has been refused.
  ASSERT_NE(Await(0), 0u);
  uint64_t got = 0, bad = 0;
  std::vector<uint8_t> b(1 << 20);
  for (int64_t r; (r = peer_->recv(c, b.data(), b.size(), false, 60000)) > 0;) {
    for (int64_t i = 0; i < r; ++i) bad += b[i] != pattern_byte(got + i);
    got += static_cast<uint64_t>(r);
  }
  peer_->close(c);
  Finish(k);
  auto o2 = Read(out);
  // Taken while the peer read nothing: what its 16 receive buffers of 64 KiB hold (their
  // credits, less those kept for control messages). A POLLOUT that did not mean credits
  // would run past this.
  std::printf("taken while the peer read nothing: %lld bytes, %lld EAGAIN\n", static_cast<long long>(o2[0]),
              static_cast<long long>(o2[2]));
  EXPECT_GE(o2[0], 64 * 1024);
  EXPECT_LE(o2[0], 16 * 64 * 1024);
  EXPECT_EQ(o2[1], -EAGAIN);
  EXPECT_GE(o2[2], 1);
  EXPECT_EQ(o2[3], 0) << "no POLLOUT while the peer reads nothing and its buffers are full";
  EXPECT_EQ(o2[4], 1) << "POLLOUT once the peer reads";
  EXPECT_EQ(o2[5], POLLOUT);
  EXPECT_EQ(o2[6], 64 * 1024);
  EXPECT_EQ(got, static_cast<uint64_t>(o2[7])) << "every byte the kernel was told was sent arrives";
  EXPECT_EQ(bad, 0u);
}

// Lane 0 listens; every lane of the block accepts one connection, reads its id, answers
// id * 7, then waits for EOF. out[tid]: 0 when right.
struct ManyConnectionServer {
  GPUSOCK_HD void operator()(uint32_t* box, uint32_t ip, int* lfd_slot, int64_t* out) const {
    const uint32_t tid = static_cast<uint32_t>(gpusock::global_thread_id());
    if (tid == 0) {
      int lfd = raw::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a = addr4(ip, 0);
      int r = lfd < 0 ? lfd : raw::bind(lfd, sa(a), sizeof a);
      if (r == 0) r = raw::listen(lfd, 256);
      socklen_t len = sizeof a;
      if (r == 0) r = raw::getsockname(lfd, sa(a), &len);
      gpusock::AtomicRef<int, gpusock::Scope::kDevice>(*lfd_slot).store(r < 0 ? r : lfd, gpusock::Order::kRelease);
      publish(box, 0, r < 0 ? 0xffffffffu : gpusock::ntohs(a.sin_port));
    }
    int lfd;
    for (uint32_t i = 0; (lfd = gpusock::AtomicRef<int, gpusock::Scope::kDevice>(*lfd_slot).load(gpusock::Order::kAcquire)) == 0; ++i) {
      gpusock::backoff(i);
    }
    if (lfd < 0) {
      out[tid] = 100;
      return;
    }
    int c = raw::accept(lfd, nullptr, nullptr);
    if (c < 0) {
      out[tid] = 1000 - c;
      return;
    }
    uint64_t id = 0;
    int64_t r = raw::recv(c, &id, sizeof id, MSG_WAITALL);
    uint64_t a = id * 7;
    int64_t w = r == 8 ? raw::send(c, &a, sizeof a, 0) : -1;
    char x;
    int64_t eof = raw::recv(c, &x, 1, 0);
    out[tid] = (r == 8 && w == 8 && eof == 0) ? 0 : 2000 + (r != 8) * 100 + (w != 8) * 10 + (eof != 0);
    raw::close(c);
  }
};

TEST_P(RdmaTest, SixtyFourConnectionsToOneKernelListener) {
  Start();
  constexpr uint32_t kConns = 64;
  auto slot = Buffer<int>(1);
  auto out = Buffer<int64_t>(kConns);
  auto k = Launch({1}, {kConns}, ManyConnectionServer{}, box_.dev, rdma_ip(), slot.data(), out.data());
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  std::vector<int> fds;
  for (uint32_t i = 0; i < kConns; ++i) {
    int fd = peer_->connect(rdma_addr(), static_cast<uint16_t>(port), 60000);
    ASSERT_GE(fd, 0) << "connection " << i << ": " << std::strerror(-fd);
    fds.push_back(fd);
  }
  std::vector<uint64_t> ids(kConns);
  for (uint32_t i = 0; i < kConns; ++i) {
    uint64_t id = 1000 + i;
    ASSERT_EQ(peer_->send(fds[i], &id, sizeof id), 8);
  }
  for (uint32_t i = 0; i < kConns; ++i) {
    uint64_t a = 0;
    // EXPECT, not ASSERT: the kernel must still be finished below, and its codes say why.
    EXPECT_EQ(peer_->recv(fds[i], &a, sizeof a, true, 60000), 8) << "connection " << i;
    EXPECT_EQ(a, (1000 + i) * 7);
  }
  for (int fd : fds) peer_->close(fd);
  Finish(k);
  auto o = Read(out);
  for (uint32_t i = 0; i < kConns; ++i) EXPECT_EQ(o[i], 0) << "thread " << i;
}

// Lane 0 listens (port in box[0]), accepts one connection and reads until the read
// fails or ends. out: {bytes, last result}.
struct ReadUntilEnd {
  GPUSOCK_HD void operator()(uint32_t* box, uint32_t ip, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    int lfd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = addr4(ip, 0);
    int r = lfd < 0 ? lfd : raw::bind(lfd, sa(a), sizeof a);
    if (r == 0) r = raw::listen(lfd, 4);
    socklen_t len = sizeof a;
    if (r == 0) r = raw::getsockname(lfd, sa(a), &len);
    publish(box, 0, r < 0 ? 0xffffffffu : gpusock::ntohs(a.sin_port));
    int c = r < 0 ? r : raw::accept(lfd, nullptr, nullptr);
    if (c < 0) {
      out[1] = c;
      return;
    }
    static char buf[65536];
    int64_t total = 0, n;
    while ((n = raw::recv(c, buf, sizeof buf, 0)) > 0) total += n;
    out[0] = total;
    out[1] = n;
    raw::close(c);
    raw::close(lfd);
  }
};

std::string peer_tool() {
  if (const char* e = std::getenv("GPUSOCK_RDMA_PEER"); e && *e) return e;
  if (access(GPUSOCK_RDMA_PEER_PATH, X_OK) == 0) return GPUSOCK_RDMA_PEER_PATH;
  return "gpusock-rdma-peer";  // on PATH (the VM puts it in /bin)
}

TEST_P(RdmaTest, PeerDeathMidStreamGivesTheKernelConnectionReset) {
  Start();
  auto out = Buffer<int64_t>(2);
  auto k = Launch({1}, {32}, ReadUntilEnd{}, box_.dev, rdma_ip(), out.data());
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  // A separate process (verbs state must not be shared through fork): it sends 3 MB and
  // exits without closing, so its QP goes away with no FIN.
  const std::string tool = peer_tool(), ps = std::to_string(port), addr = rdma_addr();
  const char* argv[] = {tool.c_str(), "connect", addr.c_str(), ps.c_str(), "--send", "0", "--die-after", "3000000", nullptr};
  pid_t pid = 0;
  ASSERT_EQ(posix_spawnp(&pid, tool.c_str(), nullptr, nullptr, const_cast<char**>(argv), environ), 0) << tool;
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 3) << "the peer tool should have died on purpose after sending";
  Finish(k);
  auto o = Read(out);
  EXPECT_EQ(o[1], -ECONNRESET);
  EXPECT_LE(o[0], 3000000);
}

struct ConnectOnce {
  GPUSOCK_HD void operator()(uint32_t ip, uint16_t port, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = addr4(ip, port);
    out[0] = fd < 0 ? fd : raw::connect(fd, sa(a), sizeof a);
    if (fd >= 0) raw::close(fd);
  }
};

TEST_P(RdmaTest, ConnectToAPortNobodyListensOnIsRefused) {
  Start();
  uint16_t port = 0;
  int lfd = peer_->listen(rdma_addr(), 0, 4, &port);  // find a free port, then free it
  ASSERT_GE(lfd, 0);
  peer_->close(lfd);
  auto out = Buffer<int64_t>(1);
  auto k = Launch({1}, {32}, ConnectOnce{}, rdma_ip(), port, out.data());
  Finish(k);
  EXPECT_EQ(Read(out)[0], -ECONNREFUSED);
}

// ---- lanes of one warp call do not wait on each other -----------------------------------
//
// The lanes of a warp call are answered together; a lane blocked in the engine (accept,
// recv) would hold back the lanes that are done, here for ever: the peer connects its next
// client only after the last one was answered. The backend lets blocked lanes go
// (net/backend.hpp, "Stragglers"; Engine::let_go) and they ask again.

// Every lane of one warp accepts a connection on the RDMA listener and serves it: reads an
// 8-byte id, answers id * 3 and waits for the end of the stream. out[lane]: 0, or what
// went wrong.
struct OneRdmaClientAtATime {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out, uint32_t ip) const {
    using gpusock::testing::await_box;
    const uint32_t lane = gpusock::warp::lane_id();
    if (lane == 0) {
      int lfd = raw::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a = addr4(ip, 0);
      int r = lfd < 0 ? lfd : raw::bind(lfd, sa(a), sizeof a);
      if (r == 0) r = raw::listen(lfd, 64);
      socklen_t len = sizeof a;
      if (r == 0) r = raw::getsockname(lfd, sa(a), &len);
      publish(box, 1, r == 0 ? static_cast<uint32_t>(lfd) + 1 : 0);
      publish(box, 0, r == 0 ? gpusock::ntohs(a.sin_port) : 0xffffffffu);
    }
    const int lfd = static_cast<int>(await_box(box, 1)) - 1;
    int64_t status = 0;
    const int c = lfd < 0 ? -EBADF : raw::accept(lfd, nullptr, nullptr);
    if (c < 0) {
      status = 1000 - c;
    } else {
      uint64_t id = 0;
      const int64_t r = raw::recv(c, &id, sizeof id, MSG_WAITALL);
      const uint64_t a = id * 3;
      const int64_t w = raw::send(c, &a, sizeof a, 0);
      char x;
      const int64_t eof = raw::recv(c, &x, 1, 0);
      raw::close(c);
      if (r != 8 || w != 8 || eof != 0) status = 3000 + (r != 8) * 100 + (w != 8) * 10 + (eof != 0);
    }
    out[lane] = status;
    if (gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(box[2]).fetch_add(1, gpusock::Order::kAcqRel) + 1 == 32) {
      raw::close(lfd);
    }
  }
};

TEST_P(RdmaTest, LanesOfOneCallDoNotWaitForEachOtherInAcceptAndRecv) {
  Start();
  auto out = Buffer<int64_t>(32);
  auto k = Launch({1}, {32}, OneRdmaClientAtATime{}, box_.dev, out.data(), rdma_ip());
  const uint32_t port = Await(0);
  ASSERT_NE(port, 0u);
  ASSERT_NE(port, 0xffffffffu);
  int served = 0;
  for (int i = 0; i < 32; ++i) {
    const int fd = peer_->connect(rdma_addr(), static_cast<uint16_t>(port), 30000);
    if (fd < 0) {
      ADD_FAILURE() << "client " << i << ": connect: " << std::strerror(-fd);
      break;
    }
    const uint64_t id = 7000 + i;
    uint64_t a = 0;
    const bool ok = peer_->send(fd, &id, sizeof id) == 8 && peer_->recv(fd, &a, sizeof a, true, 30000) == 8 && a == id * 3;
    peer_->close(fd);
    if (!ok) break;
    ++served;
  }
  EXPECT_EQ(served, 32) << "client " << served << " got no answer within 30 s";
  if (served != 32) rt_->shutdown();
  Finish(k);
  peer_->drain(500);
  auto o = Read(out);
  for (int i = 0; i < 32 && served == 32; ++i) EXPECT_EQ(o[i], 0) << "lane " << i;
}

// ---- Engine::let_go, on the engine itself ---------------------------------------------

// Two engines in this thread, one connection between them; everything is driven by
// progress() here. The receiving side has 4 buffers of 64 KiB, so a 1 MiB send posts a few
// messages and then waits for credits.
TEST(RdmaEngine, ASendLetGoPartWayIsAnsweredWhatWentOutAndTheRestFollowsInOrder) {
  namespace ri = gpusock::rdma::internal;
  if (!rdma::device_present()) {
    GTEST_SKIP() << "no RDMA device (ibv_get_device_list found none); scripts/rdma-vm.sh runs this test "
                    "against soft-RoCE (rdma_rxe) in a VM";
  }
  ri::EngineOptions o;
  o.recv_buffers = 4;
  o.recv_buffer_bytes = 64 << 10;
  o.memory.alloc = [](size_t bytes, void** host, uint64_t* dev) -> int {
    void* p = std::aligned_alloc(4096, (bytes + 4095) & ~size_t{4095});
    if (p == nullptr) return -ENOMEM;
    *host = p;
    *dev = reinterpret_cast<uint64_t>(p);
    return 0;
  };
  o.memory.free = [](void* host, bool) { std::free(host); };
  int err = 0;
  std::string msg;
  auto a = ri::Engine::create(o, &err, &msg);
  ASSERT_TRUE(a) << msg;
  auto b = ri::Engine::create(o, &err, &msg);
  ASSERT_TRUE(b) << msg;
  auto spin = [&](auto done, int ms) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (!done() && std::chrono::steady_clock::now() < end) {
      a->progress();
      b->progress();
    }
    return done();
  };
  // b listens, a connects.
  sockaddr_in addr = addr4(rdma_ip(), 0);
  const int l = b->socket(AF_INET, SOCK_STREAM);
  ASSERT_GE(l, 0);
  ASSERT_EQ(b->bind(l, sa(addr), sizeof addr), 0);
  ASSERT_EQ(b->listen(l, 4), 0);
  sockaddr_storage bound{};
  socklen_t blen = sizeof bound;
  ASSERT_EQ(b->getsockname(l, &bound, &blen), 0);
  addr.sin_port = reinterpret_cast<sockaddr_in*>(&bound)->sin_port;
  const int c = a->socket(AF_INET, SOCK_STREAM);
  int64_t connected = 1;
  int server = -1;
  a->connect(c, sa(addr), sizeof addr, [&](int64_t v) { connected = v; });
  b->accept(l, 0, [&](int64_t fd, const sockaddr_storage&, socklen_t) { server = static_cast<int>(fd); });
  ASSERT_TRUE(spin([&] { return connected <= 0 && server >= 0; }, 10000));
  ASSERT_EQ(connected, 0);

  constexpr uint32_t kTotal = 1u << 20;
  std::vector<uint8_t> src(kTotal);
  for (uint32_t i = 0; i < kTotal; ++i) src[i] = pattern_byte(i);
  const uint32_t lkey = a->register_memory(src.data(), src.size());
  ASSERT_NE(lkey, 0u);
  constexpr int64_t kNone = INT64_MIN;
  int64_t first = kNone;
  a->send(c, src.data(), kTotal, lkey, 0, [&](int64_t v) { first = v; });
  const uint64_t id = a->last_wait();
  EXPECT_FALSE(spin([&] { return first != kNone; }, 200)) << "the send should wait for credits";
  a->let_go(c, id);
  ASSERT_TRUE(spin([&] { return first != kNone; }, 5000)) << "let go, the send was never answered";
  ASSERT_GT(first, 0);
  ASSERT_NE(first & ri::kSentSoFar, 0) << "answered " << first << ": not the bytes so far | kSentSoFar";
  const uint32_t sent = static_cast<uint32_t>(first & ~ri::kSentSoFar);
  EXPECT_GT(sent, 0u);
  EXPECT_LT(sent, kTotal);
  // A send with nothing posted (no credits) that is let go: kLetGo, and nothing of it goes.
  int64_t none = kNone;
  a->send(c, src.data() + sent, 4096, lkey, 0, [&](int64_t v) { none = v; });
  EXPECT_EQ(none, kNone);
  a->let_go(c, a->last_wait());
  EXPECT_EQ(none, ri::kLetGo);
  a->let_go(c, a->last_wait());  // again: answered already, ignored
  // The rest, as the lane would send it; b reads everything.
  int64_t rest = kNone;
  a->send(c, src.data() + sent, kTotal - sent, lkey, 0, [&](int64_t v) { rest = v; });
  std::vector<uint8_t> got;
  bool reading = false, ended = false;
  ASSERT_TRUE(spin(
      [&] {
        if (!reading && !ended && got.size() < kTotal) {
          reading = true;
          b->recv(server, 1 << 20, 0, [&](int64_t n, const ri::RecvLend& lend) {
            reading = false;
            if (n <= 0) {
              ended = true;
              return;
            }
            got.insert(got.end(), lend.host, lend.host + n);
            std::atomic_ref<uint32_t>(*lend.flag_host).store(0, std::memory_order_release);
          });
        }
        return ended || (got.size() >= kTotal && rest != kNone);
      },
      20000));
  EXPECT_EQ(rest, static_cast<int64_t>(kTotal - sent));
  ASSERT_EQ(got.size(), kTotal);
  EXPECT_TRUE(got == src) << "bytes lost, repeated or out of order around the let-go";
  a->teardown(ECANCELED);
  b->teardown(ECANCELED);
}

// ---- transport policy ------------------------------------------------------------------

// Unchanged socket code: connect, send a u64, read the answer; optionally force the
// transport first. out: {0 or error code, transport reported by getsockopt}.
struct PolicyClient {
  GPUSOCK_HD void operator()(uint32_t ip, uint16_t port, int force, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
      out[0] = 1000 - fd;
      return;
    }
    if (force != 0) raw::setsockopt(fd, rdma::kSolGpusock, rdma::kSoTransport, &force, sizeof force);
    sockaddr_in a = addr4(ip, port);
    int r = raw::connect(fd, sa(a), sizeof a);
    if (r < 0) {
      out[0] = 2000 - r;
      raw::close(fd);
      return;
    }
    int t = -1;
    socklen_t tl = sizeof t;
    raw::getsockopt(fd, rdma::kSolGpusock, rdma::kSoTransport, &t, &tl);
    out[1] = t;
    uint64_t id = 6, answer = 0;
    int64_t w = raw::send(fd, &id, sizeof id, 0);
    int64_t g = raw::recv(fd, &answer, sizeof answer, MSG_WAITALL);
    out[0] = (w == 8 && g == 8 && answer == 42) ? 0 : 3000;
    raw::close(fd);
  }
};

class RdmaPolicyTest : public RdmaTest {
 protected:
  void StartWithPolicy(const std::string& rules) {
    StartRuntime();
    if (HasFatalFailure()) return;
    auto p = rdma::Policy::parse(rules);
    ASSERT_TRUE(p.ok()) << p.status().to_string();
    gpusock::Status s = rdma::enable_with_policy(*rt_, *p);
    ASSERT_TRUE(s.ok()) << s.to_string();
    MakePeer();
  }
  // A host TCP server on 127.0.0.1 that answers one u64 times 7.
  // A host TCP listener on 127.0.0.1, port chosen by the kernel: its descriptor, or -1.
  static int ListenLoopback(uint16_t* port) {
    int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = addr4(0x7f000001u, 0);
    if (lfd < 0 || ::bind(lfd, sa(a), sizeof a) != 0 || ::listen(lfd, 4) != 0) {
      if (lfd >= 0) ::close(lfd);
      return -1;
    }
    socklen_t len = sizeof a;
    ::getsockname(lfd, sa(a), &len);
    *port = ntohs(a.sin_port);
    return lfd;
  }
  int TcpServer(uint16_t* port, std::thread* t) {
    int lfd = ListenLoopback(port);
    if (lfd < 0) return -1;
    *t = std::thread([lfd] {
      int c = ::accept(lfd, nullptr, nullptr);
      uint64_t id = 0;
      if (c >= 0 && ::recv(c, &id, sizeof id, MSG_WAITALL) == 8) {
        uint64_t a = id * 7;
        ::send(c, &a, sizeof a, 0);
        char x;
        ::recv(c, &x, 1, 0);
      }
      if (c >= 0) ::close(c);
      ::close(lfd);
    });
    return 0;
  }
};

INSTANTIATE_TEST_SUITE_P(BothDevices, RdmaPolicyTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

TEST_P(RdmaPolicyTest, RulesSendTheSameKernelOverRdmaOrTcp) {
  StartWithPolicy("rdma connect " + rdma_addr() + "/32; tcp *");
  // RDMA: the peer library serves the RDMA address.
  uint16_t rport = 0;
  int lfd = peer_->listen(rdma_addr(), 0, 4, &rport);
  ASSERT_GE(lfd, 0);
  std::atomic<int> served{0};
  std::thread rs([&] { serve_times7(*peer_, lfd, 1, &served); });
  auto out = Buffer<int64_t>(2);
  auto k = Launch({1}, {32}, PolicyClient{}, rdma_ip(), rport, 0, out.data());
  Finish(k);
  rs.join();
  auto o = Read(out);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], static_cast<int>(rdma::Transport::kRdma));
  EXPECT_EQ(served.load(), 1);
  // TCP: a plain host socket on loopback, the same kernel.
  uint16_t tport = 0;
  std::thread ts;
  ASSERT_EQ(TcpServer(&tport, &ts), 0);
  auto out2 = Buffer<int64_t>(2);
  auto k2 = Launch({1}, {32}, PolicyClient{}, 0x7f000001u, tport, 0, out2.data());
  Finish(k2);
  ts.join();
  auto o2 = Read(out2);
  EXPECT_EQ(o2[0], 0);
  EXPECT_EQ(o2[1], static_cast<int>(rdma::Transport::kTcp));
}

TEST_P(RdmaPolicyTest, SocketOptionOverridesThePolicy) {
  StartWithPolicy("tcp *");
  uint16_t rport = 0;
  int lfd = peer_->listen(rdma_addr(), 0, 4, &rport);
  ASSERT_GE(lfd, 0);
  std::atomic<int> served{0};
  std::thread rs([&] { serve_times7(*peer_, lfd, 1, &served); });
  auto out = Buffer<int64_t>(2);
  auto k = Launch({1}, {32}, PolicyClient{}, rdma_ip(), rport, static_cast<int>(rdma::Transport::kRdma), out.data());
  Finish(k);
  rs.join();
  auto o = Read(out);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], static_cast<int>(rdma::Transport::kRdma));
}

// ---- poll over TCP and RDMA descriptors at once ------------------------------------------

// Lane 0: an RDMA connection and a TCP connection (the policy chooses), then one poll over
// both (and an ignored entry) at each step the host drives through the mailbox.
// box[0]: 1 connected (0xffff failed); box[1..3]: the kernel is ready for step 1..3.
// out: {setup error, timeout poll, its revents, poll after RDMA data, revents, RDMA recv,
// poll after TCP data, revents, TCP recv, both-ready revents seen}. revents are packed
// RDMA entry | TCP entry << 16.
struct MixedPoller {
  GPUSOCK_HD void operator()(uint32_t* box, uint32_t rip, uint16_t rport, uint16_t tport, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    int fr = raw::socket(AF_INET, SOCK_STREAM, 0);
    int ft = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in ar = addr4(rip, rport), at = addr4(0x7f000001u, tport);
    int r = fr < 0 ? fr : ft < 0 ? ft : raw::connect(fr, sa(ar), sizeof ar);
    if (r == 0) r = raw::connect(ft, sa(at), sizeof at);
    if (r < 0) {
      out[0] = r;
      publish(box, 0, 0xffff);
      return;
    }
    publish(box, 0, 1);
    pollfd p[3] = {{fr, POLLIN, 0}, {-1, POLLIN, 0}, {ft, POLLIN, 0}};
    auto packed = [&] { return static_cast<int64_t>(static_cast<uint16_t>(p[0].revents)) |
                               (static_cast<int64_t>(static_cast<uint16_t>(p[2].revents)) << 16) |
                               (static_cast<int64_t>(p[1].revents != 0) << 32); };
    uint64_t v = 0;
    out[1] = raw::poll(p, 3, 30);  // nothing was sent: times out
    out[2] = packed();
    publish(box, 1, 1);            // host: 8 bytes over RDMA
    out[3] = raw::poll(p, 3, 30000);
    out[4] = packed();
    out[5] = raw::recv(fr, &v, sizeof v, MSG_WAITALL) == 8 ? static_cast<int64_t>(v) : -1;
    publish(box, 2, 1);            // host: 8 bytes over TCP
    out[6] = raw::poll(p, 3, 30000);
    out[7] = packed();
    out[8] = raw::recv(ft, &v, sizeof v, MSG_WAITALL) == 8 ? static_cast<int64_t>(v) : -1;
    publish(box, 3, 1);            // host: 8 more bytes on each
    int64_t seen = 0;
    for (int i = 0; i < 1000 && seen != (POLLIN | (POLLIN << 16)); ++i) {
      if (raw::poll(p, 3, 30000) < 0) break;
      seen |= packed();
    }
    out[9] = seen;
    raw::close(fr);
    raw::close(ft);
  }
};

TEST_P(RdmaPolicyTest, OnePollWaitsOnTcpAndRdmaDescriptorsTogether) {
  StartWithPolicy("rdma connect " + rdma_addr() + "/32; tcp *");
  uint16_t rport = 0;
  int rl = peer_->listen(rdma_addr(), 0, 4, &rport);
  ASSERT_GE(rl, 0);
  uint16_t tport = 0;
  const int tl = ListenLoopback(&tport);
  ASSERT_GE(tl, 0);
  auto out = Buffer<int64_t>(10);
  auto k = Launch({1}, {32}, MixedPoller{}, box_.dev, rdma_ip(), rport, tport, out.data());
  std::thread tcp([&] {
    int c = ::accept(tl, nullptr, nullptr);
    uint64_t two = 2, four = 4;
    if (c >= 0 && Await(2) != 0) ::send(c, &two, sizeof two, 0);
    if (c >= 0 && Await(3) != 0) ::send(c, &four, sizeof four, 0);
    char x;
    if (c >= 0) ::recv(c, &x, 1, 0);  // until the kernel closes
    if (c >= 0) ::close(c);
  });
  const int c = peer_->accept(rl, 60000);
  ASSERT_GE(c, 0);
  ASSERT_EQ(Await(0), 1u) << "the kernel could not connect";
  uint64_t one = 1, three = 3;
  ASSERT_NE(Await(1), 0u);
  EXPECT_EQ(peer_->send(c, &one, sizeof one), 8);
  ASSERT_NE(Await(3), 0u);
  EXPECT_EQ(peer_->send(c, &three, sizeof three), 8);
  peer_->drain(200);
  Finish(k);
  tcp.join();
  ::close(tl);
  peer_->close(c);
  auto o = Read(out);
  EXPECT_EQ(o[0], 0);
  EXPECT_EQ(o[1], 0) << "a poll with nothing ready times out";
  EXPECT_EQ(o[2], 0);
  EXPECT_EQ(o[3], 1) << "RDMA data ends the wait";
  EXPECT_EQ(o[4], POLLIN) << "only the RDMA entry is readable";
  EXPECT_EQ(o[5], 1);
  EXPECT_EQ(o[6], 1) << "TCP data ends the wait";
  EXPECT_EQ(o[7], int64_t{POLLIN} << 16) << "only the TCP entry is readable";
  EXPECT_EQ(o[8], 2);
  EXPECT_EQ(o[9], POLLIN | (int64_t{POLLIN} << 16)) << "both entries readable, the ignored one never";
}

// Where there is no RDMA device the backend says so (the VM run skips this one).
TEST(RdmaBackend, WithoutADeviceCreateSaysENODEV) {
  if (rdma::device_present()) GTEST_SKIP() << "an RDMA device is present; this case is for machines without one";
  gpusock::RuntimeOptions o;
  o.device = DeviceKind::kCpu;
  auto rt = gpusock::Runtime::create(o);
  ASSERT_TRUE(rt.ok());
  auto be = rdma::create_backend(**rt);
  ASSERT_FALSE(be.ok());
  EXPECT_EQ(be.status().code(), ENODEV);
  EXPECT_NE(be.status().message().find("no RDMA device"), std::string::npos) << be.status().message();
  auto peer = rdma::Peer::create();
  ASSERT_FALSE(peer.ok());
  EXPECT_EQ(peer.status().code(), ENODEV);
}

}  // namespace
