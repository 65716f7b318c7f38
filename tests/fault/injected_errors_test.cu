// io_uring operations failed on purpose (iouring::FaultPlan), ENOBUFS and ECANCELED, per
// kind of operation. What must hold for each: the lane either never sees the error (the
// backend retries: a recv out of buffers, a cancel it did not ask for) or gets it as the
// POSIX call documents it and can go on; no call hangs; every byte arrives once, in order.
#include <atomic>
#include <cstdio>
#include <mutex>
#include <vector>

#include "fault_test.hpp"

namespace {

using gpusock::DeviceKind;
using gpusock::testing::Fd;
using gpusock::testing::kLoopback;
using gpusock::testing::stream_byte;
namespace iou = gpusock::iouring;
namespace raw = gpusock::raw;

constexpr uint32_t kLanes = 32;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr uint64_t kBytes = 64 * 1024;  // each way, per connection
#else
constexpr uint64_t kBytes = 256 * 1024;
#endif
constexpr uint32_t kChunk = 16 * 1024;
constexpr uint64_t kBack = 0x8000;  // the kernel's stream back is stream id + kBack

iou::Options plan_of(std::vector<iou::FaultRule> rules, uint64_t seed, std::shared_ptr<iou::FaultPlan>* plan) {
  *plan = std::make_shared<iou::FaultPlan>(std::move(rules), seed);
  iou::Options o;
  o.faults = *plan;
  return o;
}

// Each lane connects, sends its id, receives kBytes (checking each), then sends kBytes
// back. A send failed with ENOBUFS (send(2): "the output queue was full") is tried again,
// as an application would; any other error ends the lane.
// out[lane * 4 + ...]: {bytes received, bytes that did not match, last error (0: none), ENOBUFS seen}.
struct StreamClient {
  GPUSOCK_HD void operator()(uint16_t port, uint8_t* scratch, int64_t* out) const {
    const uint64_t id = gpusock::global_thread_id();
    uint8_t* buf = scratch + id * kChunk;
    int64_t* o = out + id * 4;
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = gpusock::testing::ipv4(kLoopback, port);
    int64_t r = fd < 0 ? fd : raw::connect(fd, gpusock::testing::sa(a), sizeof a);
    uint64_t got = 0, bad = 0, nobufs = 0;
    if (r == 0) {
      while ((r = raw::send(fd, &id, 8, 0)) == -ENOBUFS) ++nobufs;
      r = r == 8 ? 0 : (r < 0 ? r : -EIO);
    }
    while (r == 0 && got < kBytes) {
      const int64_t n = raw::recv(fd, buf, kChunk, 0);
      if (n <= 0) {
        r = n == 0 ? -EPIPE : n;
        break;
      }
      for (int64_t i = 0; i < n; ++i) bad += buf[i] != stream_byte(id, got + static_cast<uint64_t>(i));
      got += static_cast<uint64_t>(n);
    }
    for (uint64_t sent = 0; r == 0 && sent < kBytes;) {
      const uint32_t len = static_cast<uint32_t>(kBytes - sent < kChunk ? kBytes - sent : kChunk);
      for (uint32_t i = 0; i < len; ++i) buf[i] = stream_byte(id + kBack, sent + i);
      const int64_t n = raw::send(fd, buf, len, 0);
      if (n == -ENOBUFS) {
        ++nobufs;
        continue;
      }
      if (n <= 0) r = n == 0 ? -EIO : n;
      else sent += static_cast<uint64_t>(n);  // a short count: the rest goes next
    }
    o[0] = static_cast<int64_t>(got);
    o[1] = static_cast<int64_t>(bad);
    o[2] = r;
    o[3] = static_cast<int64_t>(nobufs);
    if (fd >= 0) raw::close(fd);
  }
};

// Host side of StreamClient: per connection, sends the stream in pieces of random size
// and checks the one that comes back. Returns the bytes back that did not match, plus
// kBytes for each connection that ended early.
uint64_t serve_streams(int listener) {
  std::atomic<uint64_t> errors{0};
  std::vector<std::thread> peers;
  for (uint32_t i = 0; i < kLanes; ++i) {
    Fd c(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    if (c.get() < 0) break;
    peers.emplace_back([&errors](Fd c) {
      uint64_t id = 0;
      if (!gpusock::testing::host_recv_all(c.get(), &id, sizeof id)) return errors.fetch_add(kBytes), void();
      std::vector<uint8_t> buf(kChunk * 2);
      uint64_t x = id + 1;
      for (uint64_t off = 0; off < kBytes;) {
        x = gpusock::testing::mix64(x);
        const size_t n = std::min<uint64_t>(kBytes - off, 1 + x % buf.size());
        for (size_t j = 0; j < n; ++j) buf[j] = stream_byte(id, off + j);
        if (!gpusock::testing::host_send_all(c.get(), buf.data(), n)) return errors.fetch_add(kBytes), void();
        off += n;
      }
      uint64_t got = 0, bad = 0;
      while (got < kBytes) {
        const ssize_t r = ::recv(c.get(), buf.data(), buf.size(), 0);
        if (r <= 0) break;
        for (ssize_t j = 0; j < r; ++j) bad += buf[j] != stream_byte(id + kBack, got + static_cast<uint64_t>(j));
        got += static_cast<uint64_t>(r);
      }
      // Nothing beyond the stream: the kernel closes after its last byte.
      char extra = 0;
      const bool more = ::recv(c.get(), &extra, 1, 0) > 0;
      errors.fetch_add(bad + (got == kBytes ? 0 : kBytes) + (more ? 1 : 0));
    }, std::move(c));
  }
  for (auto& t : peers) t.join();
  return errors.load();
}

class InjectedErrorsTest : public gpusock::testing::FaultTest {
 protected:
  // One runtime with `rules`: 32 lanes each take a stream in and send one back. Expects
  // every byte intact both ways and the rule to have fired; returns the ENOBUFS the lanes'
  // sends saw.
  uint64_t RunStreams(std::vector<iou::FaultRule> rules, iou::FaultOp op) {
    std::shared_ptr<iou::FaultPlan> plan;
    Start(plan_of(std::move(rules), 7, &plan));
    if (HasFatalFailure()) return 0;
    uint16_t port = 0;
    Fd l = gpusock::testing::host_listen(&port);
    EXPECT_GE(l.get(), 0);
    uint64_t host_errors = 0;
    std::thread host([&] { host_errors = serve_streams(l.get()); });
    uint64_t nobufs = 0;
    {
      auto scratch = Buffer<uint8_t>(size_t{kLanes} * kChunk);
      auto out = Buffer<int64_t>(size_t{kLanes} * 4);
      auto k = Launch({1}, {kLanes}, StreamClient{}, port, scratch.data(), out.data());
      Finish(k);
      ::shutdown(l.get(), SHUT_RDWR);
      host.join();
      auto o = Read(out);
      for (uint32_t lane = 0; lane < kLanes; ++lane) {
        SCOPED_TRACE("lane " + std::to_string(lane));
        EXPECT_EQ(o[lane * 4 + 2], 0) << "the lane's stream failed";
        EXPECT_EQ(o[lane * 4 + 0], static_cast<int64_t>(kBytes)) << "bytes lost on the way to the kernel";
        EXPECT_EQ(o[lane * 4 + 1], 0) << "bytes the kernel received differ from those sent";
        nobufs += static_cast<uint64_t>(o[lane * 4 + 3]);
      }
    }
    EXPECT_EQ(host_errors, 0u) << "the stream back was cut, changed or longer than sent";
    EXPECT_GT(plan->injected(op), 0u) << "the rule never fired: the case proves nothing";
    rt_.reset();
    return nobufs;
  }
};
INSTANTIATE_TEST_SUITE_P(BothDevices, InjectedErrorsTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

TEST_P(InjectedErrorsTest, RecvErrorsAreRetriedAndLoseNothing) {
  for (int e : {ENOBUFS, ECANCELED}) {
    SCOPED_TRACE("recv fails with errno " + std::to_string(e));
    RunStreams({{.op = iou::FaultOp::kRecv, .error = e, .probability = 0.3, .max_hits = 400}}, iou::FaultOp::kRecv);
    if (HasFatalFailure()) return;
  }
}

TEST_P(InjectedErrorsTest, SendCancelIsRetriedAndLosesNothing) {
  RunStreams({{.op = iou::FaultOp::kSend, .error = ECANCELED, .probability = 0.3, .max_hits = 400},
              {.op = iou::FaultOp::kSendZc, .error = ECANCELED, .probability = 0.3, .max_hits = 400}},
             iou::FaultOp::kSend);
}

TEST_P(InjectedErrorsTest, SendNoBufsReachesTheLaneAndLosesNothing) {
  const uint64_t seen = RunStreams({{.op = iou::FaultOp::kSend, .error = ENOBUFS, .probability = 0.3, .max_hits = 400}},
                                   iou::FaultOp::kSend);
  // send(2) reports ENOBUFS; a failure after part of a send was taken shows as a short count.
  EXPECT_GT(seen, 0u) << "no lane saw ENOBUFS";
}

// A listener whose accepts fail: ECANCELED is re-armed unseen, ENOBUFS reaches one waiting
// accept (accept(2) documents it), which tries again. Every connection is accepted once.
struct AcceptServer {
  GPUSOCK_HD void operator()(uint32_t* box, uint32_t conns, int64_t* out) const {
    int lfd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = gpusock::testing::ipv4(kLoopback, 0);
    int r = lfd < 0 ? lfd : raw::bind(lfd, gpusock::testing::sa(a), sizeof a);
    if (r == 0) r = raw::listen(lfd, 64);
    socklen_t len = sizeof a;
    if (r == 0) r = raw::getsockname(lfd, gpusock::testing::sa(a), &len);
    out[0] = r;
    if (r != 0) {
      gpusock::testing::publish(box, 0, 0x10000u);  // port 0: the host gives up
      return;
    }
    gpusock::testing::publish(box, 0, gpusock::ntohs(a.sin_port) | 0x10000u);
    int64_t accepted = 0, nobufs = 0, bad = 0;
    while (accepted < conns) {
      const int c = raw::accept(lfd, nullptr, nullptr);
      if (c == -ENOBUFS) {
        ++nobufs;
        continue;
      }
      if (c < 0) {
        out[0] = c;
        break;
      }
      uint8_t b = 0;
      bad += raw::recv(c, &b, 1, MSG_WAITALL) != 1 || b != 0x5a;
      raw::close(c);
      ++accepted;
    }
    out[1] = accepted;
    out[2] = nobufs;
    out[3] = bad;
    raw::close(lfd);
  }
};

TEST_P(InjectedErrorsTest, AcceptErrorsLoseNoConnection) {
  constexpr uint32_t kConns = 24;
  for (int e : {ECANCELED, ENOBUFS}) {
    SCOPED_TRACE("accept fails with errno " + std::to_string(e));
    std::shared_ptr<iou::FaultPlan> plan;
    Start(plan_of({{.op = iou::FaultOp::kAccept, .error = e, .nth = 1, .probability = 0.4, .max_hits = 100}}, 11, &plan));
    if (HasFatalFailure()) return;
    {
      auto out = Buffer<int64_t>(4);
      auto k = Launch({1}, {1}, AcceptServer{}, box_.dev, kConns, out.data());
      const uint32_t word = Await(0);
      ASSERT_NE(word, 0u) << "the kernel never listened";
      const uint16_t port = static_cast<uint16_t>(word & 0xffff);
      uint32_t connected = 0;
      for (uint32_t i = 0; port != 0 && i < kConns; ++i) {
        Fd c = gpusock::testing::host_connect(port);
        const uint8_t b = 0x5a;
        // Sent at once: the connection waits in the backlog until the kernel accepts it.
        if (c.get() >= 0 && gpusock::testing::host_send_all(c.get(), &b, 1)) ++connected;
        char tmp;
        ::recv(c.get(), &tmp, 1, 0);  // until the kernel closes its end
      }
      Finish(k);
      auto o = Read(out);
      EXPECT_EQ(o[0], 0) << "the listener failed";
      EXPECT_EQ(connected, kConns);
      EXPECT_EQ(o[1], kConns) << "connections were lost";
      EXPECT_EQ(o[3], 0) << "an accepted connection carried the wrong byte";
      if (e == ECANCELED) {
        EXPECT_EQ(o[2], 0) << "a cancel the lane never asked for reached it";
      }
    }
    EXPECT_GT(plan->injected(iou::FaultOp::kAccept), 0u);
    rt_.reset();
  }
}

// The first connect fails; the lane gets the error, closes, and a second socket connects
// and carries a byte.
struct ConnectTwice {
  GPUSOCK_HD void operator()(uint16_t port, int64_t* out) const {
    sockaddr_in a = gpusock::testing::ipv4(kLoopback, port);
    for (int i = 0; i < 2; ++i) {
      int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
      int64_t r = fd < 0 ? fd : raw::connect(fd, gpusock::testing::sa(a), sizeof a);
      if (r == 0) {
        const uint8_t b = 0x33;
        r = raw::send(fd, &b, 1, 0) == 1 ? 0 : -EIO;
      }
      out[i] = r;
      if (fd >= 0) raw::close(fd);
    }
  }
};

TEST_P(InjectedErrorsTest, ConnectErrorIsReportedAndTheNextConnectWorks) {
  for (int e : {ENOBUFS, ECANCELED}) {
    SCOPED_TRACE("connect fails with errno " + std::to_string(e));
    std::shared_ptr<iou::FaultPlan> plan;
    Start(plan_of({{.op = iou::FaultOp::kConnect, .error = e, .nth = 1}}, 3, &plan));
    if (HasFatalFailure()) return;
    uint16_t port = 0;
    Fd l = gpusock::testing::host_listen(&port);
    ASSERT_GE(l.get(), 0);
    {
      auto out = Buffer<int64_t>(2);
      auto k = Launch({1}, {1}, ConnectTwice{}, port, out.data());
      Fd c(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
      uint8_t b = 0;
      EXPECT_TRUE(gpusock::testing::host_recv_all(c.get(), &b, 1));
      EXPECT_EQ(b, 0x33);
      Finish(k);
      auto o = Read(out);
      EXPECT_EQ(o[0], -e) << "the failed connect must say why";
      EXPECT_EQ(o[1], 0) << "the socket after it must connect";
    }
    EXPECT_EQ(plan->injected(iou::FaultOp::kConnect), 1u);
    rt_.reset();
  }
}

// poll on a connected socket: first with nothing to read and a 100 ms timeout, then after
// the host sent a byte, without a timeout. out: {first poll, second poll, its revents}.
struct PollTwice {
  GPUSOCK_HD void operator()(uint16_t port, uint32_t* box, int64_t* out) const {
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = gpusock::testing::ipv4(kLoopback, port);
    int64_t r = fd < 0 ? fd : raw::connect(fd, gpusock::testing::sa(a), sizeof a);
    out[0] = out[1] = r;
    if (r == 0) {
      pollfd p{fd, POLLIN, 0};
      out[0] = raw::poll(&p, 1, 100);
      gpusock::testing::publish(box, 0, 1);  // the host may send now
      p.revents = 0;
      out[1] = raw::poll(&p, 1, -1);
      out[2] = p.revents;
    }
    gpusock::testing::publish(box, 0, 1);
    if (fd >= 0) raw::close(fd);
  }
};

TEST_P(InjectedErrorsTest, PollErrorsEndTheWaitOrAreRetried) {
  struct Case {
    iou::FaultOp op;
    int error;
    int64_t first;  // what the first poll must answer
  };
  // A cancel nobody asked for re-arms the operation: the first poll still times out. Any
  // other failure of the only descriptor's arm, or of the timer, ends that poll with the
  // error (nothing is ready). The second poll, not failed, sees the byte.
  for (const Case& c : {Case{iou::FaultOp::kPoll, ECANCELED, 0}, Case{iou::FaultOp::kPollTimeout, ECANCELED, 0},
                        Case{iou::FaultOp::kPoll, ENOBUFS, -ENOBUFS}, Case{iou::FaultOp::kPollTimeout, ENOBUFS, -ENOBUFS}}) {
    SCOPED_TRACE(std::string(c.op == iou::FaultOp::kPoll ? "poll arm" : "poll timer") + " fails with errno " +
                 std::to_string(c.error));
    std::shared_ptr<iou::FaultPlan> plan;
    Start(plan_of({{.op = c.op, .error = c.error, .nth = 1}}, 5, &plan));
    if (HasFatalFailure()) return;
    uint16_t port = 0;
    Fd l = gpusock::testing::host_listen(&port);
    ASSERT_GE(l.get(), 0);
    {
      auto out = Buffer<int64_t>(3);
      auto k = Launch({1}, {1}, PollTwice{}, port, box_.dev, out.data());
      Fd s(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
      EXPECT_NE(Await(0), 0u) << "the first poll never returned";
      const uint8_t b = 1;
      EXPECT_TRUE(gpusock::testing::host_send_all(s.get(), &b, 1));
      Finish(k);
      auto o = Read(out);
      EXPECT_EQ(o[0], c.first);
      EXPECT_EQ(o[1], 1);
      EXPECT_EQ(o[2] & POLLIN, POLLIN);
    }
    EXPECT_EQ(plan->injected(c.op), 1u);
    rt_.reset();
  }
}

}  // namespace
