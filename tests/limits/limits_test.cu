// Resource limits, each hit on purpose, each answered with its documented outcome
// (docs/architecture.md, section 18.3). Every case runs on the cpu device and on a GPU
// (skipped, with the reason, where there is none). NetErrorTest.DescriptorLimitGivesEmfile
// (tests/net) covers socket() at max_sockets; the socket cases here add accept() past the
// limit, the accept queue, and descriptor counts from /proc/self/fd.
#include <arpa/inet.h>
#include <dirent.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../net/kernel_test.hpp"
#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/opcodes.hpp"
#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/socket.hpp"
#include "gpusock/net/tcp.hpp"

namespace {

using gpusock::DeviceKind;
namespace hc = gpusock::hostcall;
namespace raw = gpusock::raw;
using gpusock::testing::await_box;
using gpusock::testing::publish;

constexpr uint32_t kOpHold = hc::kTestFirst + 0x20;  // deferred; the test answers arg * 2
constexpr uint32_t kOpEcho = hc::kTestFirst + 0x21;  // arg0 * 3 + arg1
constexpr uint32_t kOpSum = hc::kTestFirst + 0x22;   // sum of the payload's bytes

// Each open descriptor of this process and what it points at ("5=socket:[123]"), from
// /proc/self/fd.
std::vector<std::string> fd_entries() {
  std::vector<std::string> r;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return r;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.' || std::atoi(e->d_name) == ::dirfd(d)) continue;
    char buf[256];
    ssize_t n = ::readlinkat(::dirfd(d), e->d_name, buf, sizeof buf - 1);
    r.push_back(std::string(e->d_name) + "=" + (n > 0 ? std::string(buf, static_cast<size_t>(n)) : "?"));
  }
  ::closedir(d);
  return r;
}

// How many descriptors are open; with `sockets_only`, how many of them are sockets.
int open_fds(bool sockets_only = false) {
  int n = 0;
  for (auto& e : fd_entries()) n += !sockets_only || e.find("=socket:") != std::string::npos;
  return n;
}

std::string fd_list() {
  std::string r;
  for (auto& e : fd_entries()) r += e + " ";
  return r;
}

// The number of open sockets once the service threads are done with closed ones (a
// closed listener's cancelled accept completes a moment after close() has answered).
// Waits up to 30 s for `want` and returns the last count seen.
int settled_sockets(int want) {
  int n = open_fds(true);
  for (int i = 0; i < 3000 && n != want; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    n = open_fds(true);
  }
  return n;
}

class LimitsTest : public gpusock::testing::KernelTest {
 protected:
  void SetUp() override {
    KernelTest::SetUp();
    opts_.cpu_resident_warps = 8;
  }
  void StartHostcalls() {
    StartRuntime();
    if (HasFatalFailure()) return;
    ASSERT_TRUE(rt_->register_handler(kOpHold, "hold", [this](hc::Call& c) {
                      std::lock_guard<std::mutex> lock(mu_);
                      held_.push_back(c.defer());
                    }).ok());
    ASSERT_TRUE(rt_->register_handler(kOpEcho, "echo", [](hc::Call& c) {
                      c.for_each_lane([&](uint32_t l) { c.set_result(l, static_cast<int64_t>(c.arg(l, 0) * 3 + c.arg(l, 1))); });
                    }).ok());
    ASSERT_TRUE(rt_->register_handler(kOpSum, "sum", [](hc::Call& c) {
                      c.for_each_lane([&](uint32_t l) {
                        std::span<const uint8_t> p;
                        int e = c.payload(l, 0, &p);
                        int64_t sum = 0;
                        for (uint8_t b : p) sum += b;
                        c.set_result(l, e != 0 ? e : sum);
                      });
                    }).ok());
  }
  size_t Held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_.size();
  }
  // Answers every held call with its argument times two.
  void AnswerHeld() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& d : held_) {
      d.call().for_each_lane([&](uint32_t l) { d.call().set_result(l, static_cast<int64_t>(d.call().arg(l, 0) * 2)); });
      EXPECT_TRUE(d.complete());
    }
    held_.clear();
  }
  void TearDown() override {
    // Unanswered held calls answer ECANCELED as they go; the runtime goes first so that
    // no kernel is left waiting on them.
    if (rt_) rt_->shutdown();
    std::lock_guard<std::mutex> lock(mu_);
    held_.clear();
  }

  std::mutex mu_;
  std::vector<hc::DeferredCall> held_;
};

INSTANTIATE_TEST_SUITE_P(BothDevices, LimitsTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

// ---- slots --------------------------------------------------------------------------

// One lane (each call its own group, its own slot) takes slots with try_submit until the
// pool is dry, then makes a blocking submit with the pool still dry, then waits on every
// ticket once the host answers. out: {tickets taken, try_submit's error, blocking
// submit's result, wrong answers, a call afterwards, a try_submit afterwards}.
struct FillSlots {
  GPUSOCK_HD void operator()(uint32_t* box, hc::Ticket* tickets, uint32_t max, int64_t* out) const {
    if (gpusock::global_thread_id() != 0) return;
    uint32_t n = 0;
    int64_t err = 0;
    while (n < max) {
      hc::Ticket t = hc::try_submit(kOpHold, n);
      if (t.slot == hc::kNoSlot) {
        err = t.error;
        break;
      }
      tickets[n++] = t;
    }
    out[0] = n;
    out[1] = err;
    hc::Ticket b = hc::submit(kOpEcho, 1, 2);
    out[2] = b.slot == hc::kNoSlot ? b.error : hc::wait(b);
    publish(box, 0, 1);
    await_box(box, 1);
    int64_t bad = 0;
    for (uint32_t i = 0; i < n; ++i) bad += hc::wait(tickets[i]) != static_cast<int64_t>(i) * 2;
    out[3] = bad;
    out[4] = hc::call(kOpEcho, 1, 2);
    hc::Ticket again = hc::try_submit(kOpEcho, 2, 0);
    out[5] = again.slot == hc::kNoSlot ? again.error : hc::wait(again);
  }
};

TEST_P(LimitsTest, DrySlotPoolGivesEagainToTrySubmitAndEbusyAfterTheSlotWait) {
  opts_.slots_per_warp = 1;
  opts_.slot_wait = std::chrono::milliseconds(200);
  StartHostcalls();
  const uint32_t nslots = rt_->slot_count();
  ASSERT_GT(nslots, 0u);
  auto tickets = Buffer<hc::Ticket>(nslots + 1);
  auto out = Buffer<int64_t>(6);
  auto k = Launch({1}, {32}, FillSlots{}, box_.dev, tickets.data(), nslots + 1, out.data());
  ASSERT_NE(Await(0, std::chrono::seconds(120)), 0u) << "the kernel never reported a dry pool";
  // Every slot is held by a call the host has not answered.
  gpusock::RuntimeStats st = rt_->stats();
  EXPECT_EQ(st.slots_owned, nslots);
  EXPECT_EQ(st.calls_in_flight, nslots);
  EXPECT_EQ(Held(), nslots);
  AnswerHeld();
  Post(1, 1);
  Finish(k);
  auto o = Read(out);
  EXPECT_EQ(o[0], nslots) << "try_submit took every slot, and only those";
  EXPECT_EQ(o[1], -EAGAIN);
  EXPECT_EQ(o[2], -EBUSY) << "a blocking submit on a dry pool waits slot_wait, then fails";
  EXPECT_EQ(o[3], 0);
  EXPECT_EQ(o[4], 5) << "the pool works again once the tickets are waited";
  EXPECT_EQ(o[5], 6);
  st = rt_->stats();
  EXPECT_EQ(st.slots_owned, 0u);
  EXPECT_EQ(st.calls_in_flight, 0u);
}

// ---- staging ------------------------------------------------------------------------

// Lane 0 against the smallest arena (one run). out: {payload one byte over a run, a
// payload of a whole run held unwaited: try_submit_with_payload, try_submit without a
// payload, the whole run's sum, the same try_submit_with_payload once the run is back}.
struct StagingProbe {
  GPUSOCK_HD void operator()(const uint8_t* buf, int64_t* out) const {
    if (gpusock::global_thread_id() != 0) return;
    constexpr uint32_t kRun = hc::kStagingMaxRun * hc::kStagingPageBytes;
    hc::Ticket big = hc::submit_with_payload(kOpSum, buf, kRun + 1);
    out[0] = big.slot == hc::kNoSlot ? big.error : hc::wait(big);
    hc::Ticket whole = hc::submit_with_payload(kOpSum, buf, kRun);
    hc::Ticket more = hc::try_submit_with_payload(kOpSum, buf, 16);
    out[1] = more.slot == hc::kNoSlot ? more.error : hc::wait(more);
    hc::Ticket plain = hc::try_submit(kOpEcho, 1, 1);
    out[2] = plain.slot == hc::kNoSlot ? plain.error : hc::wait(plain);
    out[3] = whole.slot == hc::kNoSlot ? whole.error : hc::wait(whole);
    hc::Ticket after = hc::try_submit_with_payload(kOpSum, buf, 16);
    out[4] = after.slot == hc::kNoSlot ? after.error : hc::wait(after);
  }
};

TEST_P(LimitsTest, SmallestStagingArenaRefusesOversizedPayloadsAndTryGivesEagainWhenFull) {
  opts_.staging_bytes = 1;  // rounds up to the minimum: one run of 64 pages
  StartHostcalls();
  constexpr uint32_t kRun = hc::kStagingMaxRun * hc::kStagingPageBytes;
  ASSERT_EQ(rt_->staging_size(), kRun);
  std::vector<uint8_t> bytes(kRun + 1);
  int64_t run_sum = 0, first16 = 0;
  for (uint32_t i = 0; i < bytes.size(); ++i) {
    bytes[i] = static_cast<uint8_t>(i * 7 + 3);
    if (i < kRun) run_sum += bytes[i];
    if (i < 16) first16 += bytes[i];
  }
  auto buf = Buffer<uint8_t>(bytes.size());
  ASSERT_TRUE(rt_->copy_to_device(buf.data(), bytes.data(), bytes.size()).ok());
  auto out = Buffer<int64_t>(5);
  auto k = Launch({1}, {32}, StagingProbe{}, static_cast<const uint8_t*>(buf.data()), out.data());
  Finish(k);
  auto o = Read(out);
  EXPECT_EQ(o[0], -EMSGSIZE) << "one lane's payload larger than a staging run";
  EXPECT_EQ(o[1], -EAGAIN) << "the arena is held whole by an unwaited ticket";
  EXPECT_EQ(o[2], 4) << "a call without payload still gets a slot";
  EXPECT_EQ(o[3], run_sum);
  EXPECT_EQ(o[4], first16);
  EXPECT_EQ(rt_->stats().staging_pages_used, 0u);
}

// ---- sockets ------------------------------------------------------------------------

class SocketLimitsTest : public gpusock::testing::KernelTest {
 protected:
  void SetUp() override {
    KernelTest::SetUp();
    opts_.cpu_resident_warps = 8;
  }
  void Start(gpusock::iouring::Options io) {
    StartRuntime();
    if (HasFatalFailure()) return;
    gpusock::Status s = gpusock::iouring::enable(*rt_, io);
    ASSERT_TRUE(s.ok()) << s.to_string();
  }
};

INSTANTIATE_TEST_SUITE_P(BothDevices, SocketLimitsTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         gpusock::testing::device_name);

GPUSOCK_HD inline sockaddr_in loopback(uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = gpusock::htons(port);
  a.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
  return a;
}

// Returns a listener on 127.0.0.1:0 and its port, or -errno.
GPUSOCK_HD inline int listen_any(uint16_t* port, int backlog) {
  int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return fd;
  sockaddr_in a = loopback(0);
  int r = raw::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  if (r == 0) r = raw::listen(fd, backlog);
  socklen_t len = sizeof a;
  if (r == 0) r = raw::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  if (r < 0) {
    raw::close(fd);
    return r;
  }
  *port = gpusock::ntohs(a.sin_port);
  return fd;
}

int host_connect(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Waits up to 60 s for one byte; returns it, -2 at end of stream, -errno on an error, -3
// on timeout.
int read_byte(int fd) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 60000) != 1) return -3;
  uint8_t b;
  ssize_t n = ::recv(fd, &b, 1, 0);
  if (n == 1) return b;
  return n == 0 ? -2 : -errno;
}

// Lane 0, with max_sockets = 8: a listener plus accepted connections up to the limit; the
// next accept() answers EMFILE (that connection is closed); after a close, accept() works
// again and socket() is refused at the limit. Each accepted connection gets one byte: its
// number. out: {accepts that worked, the refused accept, the accept after a close, the
// socket() at the limit, the socket() after closing all but the listener}.
struct AcceptPastTheLimit {
  GPUSOCK_HD void operator()(uint32_t* box, uint32_t clients, int64_t* out) const {
    if (gpusock::global_thread_id() != 0) return;
    uint16_t port = 0;
    int lfd = listen_any(&port, 64);
    if (lfd < 0) {
      out[0] = lfd;
      publish(box, 0, 0xffffffffu);
      return;
    }
    publish(box, 0, port);
    await_box(box, 1);  // every client is connected
    int fds[16];
    int n = 0;
    int64_t refused = 0;
    for (uint32_t k = 0; k < clients && n < 16; ++k) {
      int c = raw::accept(lfd, nullptr, nullptr);
      if (c < 0) {
        refused = c;
        break;
      }
      uint8_t b = static_cast<uint8_t>(k);
      raw::send(c, &b, 1, 0);
      fds[n++] = c;
    }
    out[0] = n;
    out[1] = refused;
    raw::close(fds[0]);
    int again = raw::accept(lfd, nullptr, nullptr);
    out[2] = again;
    if (again >= 0) {
      uint8_t b = 100;
      raw::send(again, &b, 1, 0);
      fds[0] = again;
    }
    out[3] = raw::socket(AF_INET, SOCK_STREAM, 0);
    for (int i = 0; i < n; ++i) raw::close(fds[i]);
    int s = raw::socket(AF_INET, SOCK_DGRAM, 0);
    out[4] = s >= 0 ? 1 : s;
    if (s >= 0) raw::close(s);
    raw::close(lfd);
    publish(box, 2, 1);
  }
};

TEST_P(SocketLimitsTest, AcceptPastMaxSocketsIsEmfileClosesThatConnectionAndLeaksNothing) {
  const int fds_before = open_fds();
  const std::string fds_before_list = fd_list();
  {
    gpusock::iouring::Options io;
    io.max_sockets = 8;
    Start(io);
    ASSERT_FALSE(HasFatalFailure());
    const int sockets_started = open_fds(true);
    const std::string fds_started_list = fd_list();
    constexpr uint32_t kClients = 9;  // the listener and 7 connections fill the table
    {
      auto out = gpusock::DeviceBuffer<int64_t>::create(*rt_, 5);
      ASSERT_TRUE(out.ok());
      auto k = Launch({1}, {32}, AcceptPastTheLimit{}, box_.dev, kClients, out->data());
      const uint32_t port = Await(0);
      ASSERT_NE(port, 0u);
      ASSERT_NE(port, 0xffffffffu);
      std::vector<int> cs;
      for (uint32_t i = 0; i < kClients; ++i) {
        // One after another, so the kernel's accept queue holds them in this order.
        int c = host_connect(static_cast<uint16_t>(port));
        ASSERT_GE(c, 0) << "client " << i;
        cs.push_back(c);
      }
      Post(1, 1);
      ASSERT_NE(Await(2, std::chrono::seconds(120)), 0u) << "the kernel did not finish its accepts";
      Finish(k);
      auto o = out->to_host();
      EXPECT_EQ(o[0], 7) << "the listener and 7 connections are the 8 sockets allowed";
      EXPECT_EQ(o[1], -EMFILE);
      EXPECT_GE(o[2], 0) << "a close gives the slot back to accept()";
      EXPECT_EQ(o[3], -EMFILE) << "socket() at the limit";
      EXPECT_EQ(o[4], 1) << "socket() after the closes";
      for (uint32_t i = 0; i < 7; ++i) EXPECT_EQ(read_byte(cs[i]), static_cast<int>(i)) << "client " << i;
      // The connection refused with EMFILE was closed by the runtime, not left open.
      const int r = read_byte(cs[7]);
      EXPECT_TRUE(r == -2 || r == -ECONNRESET) << "client 7 read " << r;
      EXPECT_EQ(read_byte(cs[8]), 100) << "the next client is accepted after the close";
      for (int c : cs) ::close(c);
      EXPECT_EQ(settled_sockets(sockets_started), sockets_started)
          << "every accepted and refused socket is closed\nbefore: " << fds_started_list << "\nafter: " << fd_list();
    }
    rt_.reset();
  }
  EXPECT_EQ(open_fds(), fds_before) << "before: " << fds_before_list << "\nafter: " << fd_list();
}

// Lane 0 of one warp serves `clients` connections one at a time: accept, read an 8-byte
// id, send it back plus one, close. out[0]: connections served, or -errno.
struct SlowAcceptor {
  GPUSOCK_HD void operator()(uint32_t* box, uint32_t clients, int64_t* out) const {
    if (gpusock::global_thread_id() != 0) return;
    uint16_t port = 0;
    int lfd = listen_any(&port, 4);
    if (lfd < 0) {
      out[0] = lfd;
      publish(box, 0, 0xffffffffu);
      return;
    }
    publish(box, 0, port);
    await_box(box, 1);  // the clients are all connecting: the queues are full by now
    int64_t served = 0;
    for (uint32_t k = 0; k < clients; ++k) {
      int c = raw::accept(lfd, nullptr, nullptr);
      if (c < 0) {
        served = c;
        break;
      }
      uint64_t id = 0;
      int64_t r = raw::recv(c, &id, sizeof id, MSG_WAITALL);
      if (r == sizeof id) {
        id += 1;
        r = raw::send(c, &id, sizeof id, 0);
      }
      raw::close(c);
      if (r != sizeof id) {
        served = r < 0 ? r : -EIO;
        break;
      }
      ++served;
    }
    raw::close(lfd);
    out[0] = served;
  }
};

TEST_P(SocketLimitsTest, SmallAcceptQueueKeepsClientsInTheKernelBacklogAndLosesNone) {
  const int fds_before = open_fds();
  const std::string fds_before_list = fd_list();
  {
    gpusock::iouring::Options io;
    io.accept_queue = 4;
    Start(io);
    ASSERT_FALSE(HasFatalFailure());
    constexpr uint32_t kClients = 32;
    {
      auto out = gpusock::DeviceBuffer<int64_t>::create(*rt_, 1);
      ASSERT_TRUE(out.ok());
      auto k = Launch({1}, {32}, SlowAcceptor{}, box_.dev, kClients, out->data());
      const uint32_t port = Await(0);
      ASSERT_NE(port, 0u);
      ASSERT_NE(port, 0xffffffffu);
      std::atomic<int> ok{0};
      std::atomic<int> connecting{0};
      std::vector<std::thread> ts;
      for (uint32_t i = 0; i < kClients; ++i) {
        ts.emplace_back([&, i] {
          connecting++;
          int c = host_connect(static_cast<uint16_t>(port));
          if (c < 0) return;
          uint64_t id = 1000 + i, back = 0;
          bool good = ::send(c, &id, sizeof id, MSG_NOSIGNAL) == sizeof id;
          pollfd p{c, POLLIN, 0};
          good = good && ::poll(&p, 1, 120000) == 1 && ::recv(c, &back, sizeof back, MSG_WAITALL) == sizeof back;
          if (good && back == id + 1) ok++;
          ::close(c);
        });
      }
      while (connecting.load() < static_cast<int>(kClients)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      // Let the connections pile up (queue of 4, backlog of 4, the rest retrying their
      // handshakes) before the kernel starts to accept.
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      Post(1, 1);
      for (auto& t : ts) t.join();
      Finish(k);
      EXPECT_EQ(ok.load(), static_cast<int>(kClients)) << "every client was served";
      EXPECT_EQ(out->to_host()[0], kClients);
    }
    rt_.reset();
  }
  EXPECT_EQ(open_fds(), fds_before) << "before: " << fds_before_list << "\nafter: " << fd_list();
}

// Lane 0 sends `n` pattern bytes in one send() through a 256 KiB staging arena.
struct BigSend {
  GPUSOCK_HD void operator()(uint16_t port, const uint8_t* buf, uint32_t n, int64_t* out) const {
    if (gpusock::global_thread_id() != 0) return;
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = loopback(port);
    int r = raw::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    out[0] = r == 0 ? raw::send(fd, buf, n, 0) : r;
    raw::close(fd);
  }
};

TEST_P(SocketLimitsTest, SendLargerThanTheStagingArenaArrivesWhole) {
  opts_.staging_bytes = 1;  // one run, 256 KiB
  Start({});
  ASSERT_FALSE(HasFatalFailure());
  constexpr uint32_t kBytes = 1u << 20;
  std::vector<uint8_t> data(kBytes);
  for (uint32_t i = 0; i < kBytes; ++i) data[i] = static_cast<uint8_t>((i * 2654435761u) >> 13);
  auto buf = Buffer<uint8_t>(kBytes);
  ASSERT_TRUE(rt_->copy_to_device(buf.data(), data.data(), kBytes).ok());
  int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(l, 4), 0);
  socklen_t len = sizeof a;
  ::getsockname(l, reinterpret_cast<sockaddr*>(&a), &len);
  std::vector<uint8_t> got;
  std::thread peer([&] {
    int c = ::accept(l, nullptr, nullptr);
    uint8_t tmp[65536];
    ssize_t n;
    while ((n = ::recv(c, tmp, sizeof tmp, 0)) > 0) got.insert(got.end(), tmp, tmp + n);
    ::close(c);
  });
  auto out = Buffer<int64_t>(1);
  auto k = Launch({1}, {32}, BigSend{}, ntohs(a.sin_port), static_cast<const uint8_t*>(buf.data()), kBytes, out.data());
  Finish(k);
  peer.join();
  ::close(l);
  EXPECT_EQ(Read(out)[0], kBytes);
  EXPECT_TRUE(got == data) << "received " << got.size() << " bytes";
}

// Lane 0 of warps 0 and 1 each open a TcpListener. Warp 0's then blocks in an accept()
// that no client answers: the abort ends it with -ECANCELED and the lane returns
// normally, so ~TcpListener closes the socket outside any unwinding (on a GPU its close
// is made because the destructor holds a LaneStopHold). Warp 1's spins and is stopped
// there: on the cpu device its ~TcpListener runs while the stop unwinds the lane; on a GPU
// a stopped lane runs no destructor, and its socket stays open until the runtime goes.
// Warp 2's lane 0 traps once both listen.
struct TrapWithListenersOpen {
  GPUSOCK_HD void operator()(uint32_t* box, int64_t* out) const {
    const uint64_t warp = gpusock::global_warp_id();
    if (gpusock::warp::lane_id() != 0) return;
    if (warp == 2) {
      await_box(box, 0);
      gpusock::trap();
    }
    auto l = gpusock::TcpListener::bind(gpusock::SockAddr::ipv4(127, 0, 0, 1, 0), 4);
    out[warp] = l ? 1 : -l.error();
    publish(box, 1 + static_cast<uint32_t>(warp), 1);
    if (!l) return;
    if (warp == 0) {
      auto c = l->accept();
      out[0] = c ? 0 : -c.error();
      return;
    }
    await_box(box, 9);  // never posted
  }
};

TEST_P(SocketLimitsTest, AbortedKernelsListenersCloseAsItsLanesStop) {
  const bool gpu = GetParam() != DeviceKind::kCpu;
  Start({});
  ASSERT_FALSE(HasFatalFailure());
  const int sockets_started = open_fds(true);  // the runtime itself opens no socket
  const std::string fds_started_list = fd_list();
  {
    auto out = Buffer<int64_t>(2);
    auto k = Launch({1}, {96}, TrapWithListenersOpen{}, box_.dev, out.data());
    ASSERT_NE(Await(1), 0u);
    ASSERT_NE(Await(2), 0u);
    EXPECT_EQ(open_fds(true), sockets_started + 2);
    Post(0, 1);
    ASSERT_TRUE(k.wait_for(std::chrono::seconds(120))) << "the aborted launch did not end";
    gpusock::Status s = k.wait();
    EXPECT_EQ(s.code(), EIO) << s.to_string();
    EXPECT_NE(s.message().find("trap"), std::string::npos) << s.to_string();
    auto o = Read(out);
    EXPECT_EQ(o[0], -ECANCELED) << "the blocked accept() ends with the abort, and its lane returns";
    EXPECT_EQ(o[1], 1);
    // cpu device: both listeners are closed. GPU: warp 0's is; warp 1's stays open (its lane
    // was stopped without running its destructor) until the runtime is destroyed.
    const int want = sockets_started + (gpu ? 1 : 0);
    EXPECT_EQ(settled_sockets(want), want) << "\nbefore: " << fds_started_list << "\nafter: " << fd_list();
    gpusock::RuntimeStats st = rt_->stats();
    EXPECT_EQ(st.slots_owned, 0u);
    EXPECT_EQ(st.staging_pages_used, 0u);
    EXPECT_TRUE(rt_->health().ok()) << rt_->health().to_string();
  }
  rt_.reset();
  EXPECT_EQ(settled_sockets(sockets_started), sockets_started) << "destroying the runtime closes the rest\n" << fd_list();
}

}  // namespace
