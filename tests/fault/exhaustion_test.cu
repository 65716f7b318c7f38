// Slots and staging both scarce at once: one slot per resident warp (slots_per_warp = 1)
// and a single 256 KiB staging run, under warps whose lanes split into groups that each
// hold a slot while they wait (a recv group and a send group per warp). What must hold:
// every group waits for a slot or for staging and then gets through; no call hangs and
// every byte is echoed back once, in order. (Staging alone is
// NetErrorTest.StagingExhaustionBlocksSendersAndLosesNothing.)
#include <atomic>
#include <cstdio>
#include <vector>

#include "fault_test.hpp"

namespace {

using gpusock::DeviceKind;
using gpusock::testing::Fd;
using gpusock::testing::kLoopback;
using gpusock::testing::stream_byte;
namespace raw = gpusock::raw;

constexpr uint32_t kWarps = 4;
constexpr uint32_t kLanes = kWarps * 32;
constexpr uint32_t kPiece = 8 * 1024;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr uint32_t kRounds = 8;
#else
constexpr uint32_t kRounds = 32;
#endif

// Each lane streams kRounds pieces to a host echo and checks each piece that comes back.
// Odd lanes have a receive in flight before they send (they run one piece behind), so
// in one warp a recv group and a send group wait at the same time, each in its own slot.
// out[lane * 2 + ...]: {result (0 ok, else -errno; -EIO: bad bytes), bytes echoed back}.
struct EchoLanes {
  GPUSOCK_HD void operator()(uint16_t port, uint8_t* scratch, int64_t* out) const {
    const uint64_t id = gpusock::global_thread_id();
    uint8_t* buf = scratch + id * 2 * kPiece;
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = gpusock::testing::ipv4(kLoopback, port);
    int64_t r = fd < 0 ? fd : raw::connect(fd, gpusock::testing::sa(a), sizeof a);
    uint64_t sent = 0, back = 0;
    const uint64_t total = uint64_t{kRounds} * kPiece;
    const uint64_t lead = (id & 1) ? kPiece : 0;  // odd lanes: send one piece ahead first
    while (r == 0 && back < total) {
      if (sent < total && sent <= back + lead) {
        for (uint32_t i = 0; i < kPiece; ++i) buf[i] = stream_byte(id, sent + i);
        const int64_t n = raw::send(fd, buf, kPiece, 0);
        if (n != kPiece) r = n < 0 ? n : -EIO;  // a blocking stream send takes it all
        else sent += kPiece;
        continue;
      }
      const int64_t n = raw::recv(fd, buf + kPiece, kPiece, 0);
      if (n <= 0) {
        r = n < 0 ? n : -EPIPE;
        break;
      }
      for (int64_t i = 0; i < n; ++i) {
        if (buf[kPiece + i] != stream_byte(id, back + static_cast<uint64_t>(i))) r = -EIO;
      }
      back += static_cast<uint64_t>(n);
    }
    if (r == 0 && back != total) r = -EIO;
    out[id * 2] = r;
    out[id * 2 + 1] = static_cast<int64_t>(back);
    if (fd >= 0) raw::close(fd);
  }
};

class ExhaustionTest : public gpusock::testing::FaultTest {};
INSTANTIATE_TEST_SUITE_P(BothDevices, ExhaustionTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

TEST_P(ExhaustionTest, ScarceSlotsAndStagingTogetherLoseNothing) {
  opts_.slots_per_warp = 1;
  opts_.staging_bytes = 256 * 1024;  // one run
  // On the cpu device the slots are exactly these warps' (kWarps slots for 2 * kWarps
  // waiting groups). On a GPU there is a slot per resident warp of the whole device, so
  // the same kernel runs there without running out of slots: it checks correctness only.
  opts_.cpu_resident_warps = kWarps;
  Start();
  if (HasFatalFailure()) return;
  uint16_t port = 0;
  Fd l = gpusock::testing::host_listen(&port);
  ASSERT_GE(l.get(), 0);
  std::thread echo([&] {
    std::vector<std::thread> peers;
    for (uint32_t i = 0; i < kLanes; ++i) {
      Fd c(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (c.get() < 0) break;
      peers.emplace_back([](Fd c) {
        char b[4096];
        ssize_t n;
        while ((n = ::recv(c.get(), b, sizeof b, 0)) > 0) {
          if (!gpusock::testing::host_send_all(c.get(), b, static_cast<size_t>(n))) break;
        }
      }, std::move(c));
    }
    for (auto& t : peers) t.join();
  });
  // How full the slots and the staging arena got (a diagnostic copy of device state).
  std::atomic<bool> done{false};
  uint32_t slots = 0, max_owned = 0, max_pages = 0, pages = 0;
  std::thread watch([&] {
    while (!done.load()) {
      const gpusock::RuntimeStats st = rt_->stats();
      slots = st.slots;
      pages = st.staging_pages;
      max_owned = std::max(max_owned, st.slots_owned);
      max_pages = std::max(max_pages, st.staging_pages_used);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  std::vector<int64_t> o;
  {
    auto scratch = Buffer<uint8_t>(size_t{kLanes} * 2 * kPiece);
    auto out = Buffer<int64_t>(size_t{kLanes} * 2);
    auto k = Launch({kWarps}, {32}, EchoLanes{}, port, scratch.data(), out.data());
    Finish(k);
    o = Read(out);
  }
  done.store(true);
  watch.join();
  ::shutdown(l.get(), SHUT_RDWR);
  echo.join();
  ASSERT_EQ(o.size(), size_t{kLanes} * 2);
  for (uint32_t lane = 0; lane < kLanes; ++lane) {
    SCOPED_TRACE("lane " + std::to_string(lane));
    EXPECT_EQ(o[lane * 2], 0) << "the lane's echo failed";
    EXPECT_EQ(o[lane * 2 + 1], int64_t{kRounds} * kPiece) << "bytes were lost or duplicated";
  }
  std::printf("slots %u, most owned at once %u; staging pages %u, most used at once %u\n", slots, max_owned, pages,
              max_pages);
  if (GetParam() == DeviceKind::kCpu) {
    EXPECT_EQ(slots, kWarps) << "the case needs one slot per warp";
  }
}

}  // namespace
