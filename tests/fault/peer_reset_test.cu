// Peers that reset connections (close with SO_LINGER 0) at random points of a transfer,
// in both directions, over many seeded connections. What must hold: the kernel sees
// ECONNRESET or EPIPE; the bytes it received are exactly a prefix of what the peer sent,
// and include everything the peer's TCP saw acknowledged before the reset; the bytes the
// peer received are exactly a prefix of what the kernel sent, and no more than the kernel
// was told went out.
#include <linux/sockios.h>
#include <sys/ioctl.h>

#include <atomic>
#include <cstdio>
#include <mutex>
#include <vector>

#include "fault_test.hpp"

namespace {

using gpusock::DeviceKind;
using gpusock::testing::Fd;
using gpusock::testing::kLoopback;
using gpusock::testing::mix64;
using gpusock::testing::stream_byte;
namespace raw = gpusock::raw;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr uint32_t kBlocks = 1, kRounds = 3;
#else
constexpr uint32_t kBlocks = 2, kRounds = 4;
#endif
constexpr uint32_t kLanes = kBlocks * 32;
constexpr uint32_t kConns = kLanes * kRounds;
constexpr uint32_t kMaxPoint = 384 * 1024;     // the reset comes within this many bytes
constexpr uint64_t kSendLimit = 16ull << 20;   // a kernel sender that gets this far was never reset
constexpr uint32_t kChunk = 16 * 1024;         // the kernel's receive and send unit
constexpr int kBuf = 64 * 1024;                // SO_SNDBUF / SO_RCVBUF: the reset finds bytes in flight

// Connection `id` of run `seed`: does the host send (and the kernel receive)?
GPUSOCK_HD inline bool host_sends(uint64_t seed, uint64_t id) { return (mix64(seed ^ (id * 0x9e3779b97f4a7c15ull)) & 1) == 0; }

// Each lane makes kRounds connections one after another. On each it sends its id, then
// receives until an error (verifying every byte), or sends the stream until an error.
// out[id * 4 + ...]: {last result, bytes moved, bytes that did not match, step that failed}.
struct ResetClient {
  GPUSOCK_HD void operator()(uint16_t port, uint64_t seed, uint8_t* scratch, int64_t* out) const {
    const uint64_t lane = gpusock::global_thread_id();
    uint8_t* buf = scratch + lane * kChunk;
    for (uint32_t round = 0; round < kRounds; ++round) {
      const uint64_t id = lane * kRounds + round;
      int64_t* o = out + id * 4;
      int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
      int64_t r = fd < 0 ? fd : 0;
      int size = kBuf;
      if (r == 0) r = raw::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
      if (r == 0) r = raw::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
      sockaddr_in a = gpusock::testing::ipv4(kLoopback, port);
      if (r == 0) r = raw::connect(fd, gpusock::testing::sa(a), sizeof a);
      if (r == 0) r = raw::send(fd, &id, 8, 0);
      if (r != 8) {
        o[0] = r;
        o[3] = 1;
        if (fd >= 0) raw::close(fd);
        continue;
      }
      uint64_t moved = 0, bad = 0;
      int64_t n = 0;
      if (host_sends(seed, id)) {
        while ((n = raw::recv(fd, buf, kChunk, 0)) > 0) {
          for (int64_t i = 0; i < n; ++i) bad += buf[i] != stream_byte(id, moved + static_cast<uint64_t>(i));
          moved += static_cast<uint64_t>(n);
        }
      } else {
        for (;;) {
          for (uint32_t i = 0; i < kChunk; ++i) buf[i] = stream_byte(id, moved + i);
          n = raw::send(fd, buf, kChunk, 0);
          if (n <= 0) break;
          moved += static_cast<uint64_t>(n);  // a short count: the next chunk starts there
          if (moved >= kSendLimit) {
            n = 0;
            break;
          }
        }
      }
      o[0] = n;
      o[1] = static_cast<int64_t>(moved);
      o[2] = static_cast<int64_t>(bad);
      o[3] = 2;
      raw::close(fd);
    }
  }
};

// What the host's end of connection `id` did.
struct HostEnd {
  bool seen = false;
  bool sent = false;       // the host sent (else it received)
  uint64_t point = 0;      // bytes sent, or bytes to receive, before the reset
  uint64_t acked = 0;      // host sending: bytes its TCP saw acknowledged before the reset
  uint64_t received = 0;   // host receiving: bytes it got
  uint64_t bad = 0;        // host receiving: bytes that did not match
};

// One host end: reads the id, then sends `point` bytes or receives them, then resets.
void serve_one(Fd c, uint64_t seed, std::vector<HostEnd>& ends, std::mutex& mu) {
  uint64_t id = 0;
  if (!gpusock::testing::host_recv_all(c.get(), &id, sizeof id) || id >= kConns) return;
  HostEnd e;
  e.seen = true;
  e.sent = host_sends(seed, id);
  const uint64_t rnd = mix64(seed + 0x51ed27 * (id + 1));
  // One in eight resets comes within the first 64 bytes; the rest anywhere up to kMaxPoint.
  e.point = (rnd & 7) == 0 ? (rnd >> 8) % 64 : (rnd >> 8) % kMaxPoint;
  const bool wait_for_ack = ((rnd >> 3) & 1) != 0;
  const bool pause = ((rnd >> 4) & 1) != 0;
  std::vector<uint8_t> buf(64 * 1024);
  if (e.sent) {
    uint64_t off = 0, piece_rnd = rnd;
    while (off < e.point) {
      piece_rnd = mix64(piece_rnd);
      const size_t n = std::min<uint64_t>(e.point - off, 1 + piece_rnd % buf.size());
      for (size_t i = 0; i < n; ++i) buf[i] = stream_byte(id, off + i);
      if (!gpusock::testing::host_send_all(c.get(), buf.data(), n)) break;
      off += n;
    }
    e.point = off;
    int unacked = 0;
    if (wait_for_ack) {
      // Until the kernel's socket has acknowledged everything (bounded: 20 s).
      for (int i = 0; i < 20000; ++i) {
        if (::ioctl(c.get(), SIOCOUTQ, &unacked) != 0 || unacked == 0) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    if (::ioctl(c.get(), SIOCOUTQ, &unacked) != 0) unacked = static_cast<int>(e.point);
    // A lower bound: more may be acknowledged between this look and the reset.
    e.acked = e.point - std::min<uint64_t>(e.point, static_cast<uint64_t>(unacked));
  } else {
    while (e.received < e.point) {
      const ssize_t r = ::recv(c.get(), buf.data(), std::min<uint64_t>(buf.size(), e.point - e.received), 0);
      if (r <= 0) break;
      for (ssize_t i = 0; i < r; ++i) e.bad += buf[i] != stream_byte(id, e.received + static_cast<uint64_t>(i));
      e.received += static_cast<uint64_t>(r);
    }
  }
  if (pause) std::this_thread::sleep_for(std::chrono::milliseconds(1 + (rnd >> 5) % 5));
  c.reset_hard();
  std::lock_guard<std::mutex> lock(mu);
  ends[id] = e;
}

class PeerResetTest : public gpusock::testing::FaultTest {};
INSTANTIATE_TEST_SUITE_P(BothDevices, PeerResetTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

TEST_P(PeerResetTest, ResetsAtRandomPointsLoseAndDuplicateNothing) {
  uint64_t seed = 20261125;
  if (const char* s = std::getenv("GPUSOCK_FAULT_SEED")) seed = std::strtoull(s, nullptr, 0);
  SCOPED_TRACE("seed " + std::to_string(seed) + " (set GPUSOCK_FAULT_SEED to replay another)");
  Start();
  if (HasFatalFailure()) return;
  uint16_t port = 0;
  Fd l = gpusock::testing::host_listen(&port, 1024, kLoopback, kBuf);
  ASSERT_GE(l.get(), 0);
  std::vector<HostEnd> ends(kConns);
  std::mutex mu;
  std::thread acceptor([&] {
    std::vector<std::thread> peers;
    for (uint32_t i = 0; i < kConns; ++i) {
      Fd c(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (c.get() < 0) break;  // the listener was shut down: the kernel failed early
      peers.emplace_back(serve_one, std::move(c), seed, std::ref(ends), std::ref(mu));
    }
    for (auto& t : peers) t.join();
  });
  auto scratch = Buffer<uint8_t>(size_t{kLanes} * kChunk);
  auto out = Buffer<int64_t>(size_t{kConns} * 4);
  auto k = Launch({kBlocks}, {32}, ResetClient{}, port, seed, scratch.data(), out.data());
  Finish(k);
  ::shutdown(l.get(), SHUT_RDWR);  // ends the acceptor if the kernel connected fewer times
  acceptor.join();
  auto o = Read(out);
  uint32_t host_to_kernel = 0, kernel_to_host = 0, exact = 0;
  for (uint32_t id = 0; id < kConns; ++id) {
    const int64_t* r = o.data() + id * 4;
    const HostEnd& e = ends[id];
    SCOPED_TRACE("connection " + std::to_string(id));
    ASSERT_EQ(r[3], 2) << "setup failed with " << r[0];
    ASSERT_TRUE(e.seen) << "the host never served this connection";
    if (e.sent) {
      ++host_to_kernel;
      EXPECT_EQ(r[0], -ECONNRESET) << "the kernel's receive must end with the reset";
      EXPECT_EQ(r[2], 0) << "bytes the kernel received differ from those sent";
      EXPECT_LE(static_cast<uint64_t>(r[1]), e.point) << "the kernel received more than was sent";
      EXPECT_GE(static_cast<uint64_t>(r[1]), e.acked) << "acknowledged bytes were lost (sent " << e.point << ")";
      exact += static_cast<uint64_t>(r[1]) == e.point;
    } else {
      ++kernel_to_host;
      EXPECT_THAT(r[0], ::testing::AnyOf(-ECONNRESET, -EPIPE)) << "the kernel's send must end with the reset";
      EXPECT_EQ(e.bad, 0u) << "bytes the host received differ from those the kernel sent";
      EXPECT_EQ(e.received, e.point) << "the host did not get the bytes it waited for";
      EXPECT_GE(static_cast<uint64_t>(r[1]), e.received) << "the host got bytes the kernel never reported sent";
    }
  }
  std::printf("%u connections host->kernel (%u with every byte delivered before the reset), %u kernel->host\n",
              host_to_kernel, exact, kernel_to_host);
  // Both directions really ran, and some resets left nothing in flight (the exact case).
  EXPECT_GT(host_to_kernel, kConns / 4);
  EXPECT_GT(kernel_to_host, kConns / 4);
  EXPECT_GT(exact, 0u);
}

}  // namespace
