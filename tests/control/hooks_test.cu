// The hooks the control plane reads, tested at their own interfaces and without gRPC:
// RuntimeStats' service-time histogram and occupancy (hostcall/; on the cpu device and on
// a GPU), and the io_uring backend's list_sockets / abort_socket / stop_accepting /
// observer (net::Backend; on the cpu device).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/opcodes.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/socket.hpp"
#include "../net/kernel_test.hpp"

namespace {

namespace raw = gpusock::raw;
using gpusock::AtomicRef;
using gpusock::Order;
using gpusock::Scope;

constexpr uint32_t kOpHeld = gpusock::hostcall::kTestFirst + 0x61;

template <typename F>
bool eventually(F f, std::chrono::milliseconds limit = std::chrono::milliseconds(60000)) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return f();
}

TEST(LatencyHistogram, QuantilesAreTheUpperEdgesOfTheirBuckets) {
  gpusock::LatencyHistogram h;
  EXPECT_EQ(h.quantile_ns(0.5), 0u);
  h.buckets[10] = 50;  // [1024, 2048) ns
  h.buckets[12] = 49;  // [4096, 8192)
  h.buckets[20] = 1;   // [1 Mi, 2 Mi)
  h.count = 100;
  EXPECT_EQ(h.quantile_ns(0.50), 2048u);
  EXPECT_EQ(h.quantile_ns(0.51), 8192u);
  EXPECT_EQ(h.quantile_ns(0.99), 8192u);
  EXPECT_EQ(h.quantile_ns(1.0), 2u << 20);
  gpusock::LatencyHistogram g;
  g.buckets[10] = 100;
  g.count = 100;
  g.sum_ns = 7;
  h.merge(g);
  EXPECT_EQ(h.count, 200u);
  EXPECT_EQ(h.sum_ns, 7u);
  EXPECT_EQ(h.quantile_ns(0.75), 2048u);
}

// Every lane makes one kOpHeld call; the host holds the calls until told to answer.
struct HeldCaller {
  GPUSOCK_HD void operator()(int64_t* out) const {
    out[gpusock::global_thread_id()] = gpusock::hostcall::call(kOpHeld, 1);
  }
};

class RuntimeStatsTest : public gpusock::testing::KernelTest {};
INSTANTIATE_TEST_SUITE_P(BothDevices, RuntimeStatsTest,
                         ::testing::Values(gpusock::DeviceKind::kCpu, gpusock::DeviceKind::kCuda),
                         gpusock::testing::device_name);

TEST_P(RuntimeStatsTest, HeldCallsShowAsInFlightAndTheirServiceTimeIsRecorded) {
  opts_.cpu_resident_warps = 4;
  StartRuntime();
  if (HasFatalFailure()) return;
  auto* rt = &rt_;
  std::mutex mu;
  std::vector<gpusock::hostcall::DeferredCall> held;
  ASSERT_TRUE((*rt)->register_handler(kOpHeld, "test.held", [&](gpusock::hostcall::Call& c) {
    c.set_all(7);
    std::lock_guard<std::mutex> lock(mu);
    held.push_back(c.defer());
  }).ok());
  auto out = (*rt)->mapped_alloc(2 * 32 * sizeof(int64_t));
  ASSERT_TRUE(out.ok());
  (*rt)->mapped_free_at_exit(out->host);
  auto k = gpusock::launch(**rt, {2}, {32}, HeldCaller{}, static_cast<int64_t*>(out->device));
  ASSERT_TRUE(k.ok());
  // Two warps: two slots owned and two calls published, none answered.
  ASSERT_TRUE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return held.size() == 2;
  }));
  gpusock::RuntimeStats st = (*rt)->stats();
  EXPECT_EQ(st.slots, (*rt)->slot_count());
  EXPECT_EQ(st.calls_in_flight, 2u);
  EXPECT_EQ(st.slots_owned, 2u);
  EXPECT_EQ(st.staging_pages, (*rt)->staging_size() / 4096);
  EXPECT_EQ(st.staging_pages_used, 0u);  // no payloads
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& d : held) EXPECT_TRUE(d.complete());
  }
  ASSERT_TRUE(k->wait_for(std::chrono::seconds(60)));
  for (int i = 0; i < 64; ++i) EXPECT_EQ(static_cast<int64_t*>(out->host)[i], 7);
  st = (*rt)->stats();
  EXPECT_EQ(st.calls_in_flight, 0u);
  EXPECT_EQ(st.slots_owned, 0u);
  for (const auto& op : st.by_opcode) {
    if (op.opcode != kOpHeld) continue;
    EXPECT_EQ(op.calls, 2u);
    EXPECT_EQ(op.latency.count, 2u);
    // Held for at least 20 ms: both calls are in buckets at or above 2^24 ns (16.8 ms).
    EXPECT_GE(op.latency.quantile_ns(0.01), 1u << 25);
    EXPECT_GE(op.latency.sum_ns, 2 * 20'000'000u);
  }
}

// ---- the io_uring backend's control hooks ---------------------------------------------

enum Box : uint32_t { kPort = 0, kRecv = 1, kRecv2 = 2, kListen2 = 3, kAccept = 4, kDone = 5 };

// Results travel as result + 1000, so 0 means "not yet".
constexpr int64_t kBias = 1000;

GPUSOCK_HD inline void put(uint32_t* box, uint32_t i, uint32_t v) {
  AtomicRef<uint32_t, Scope::kSystem>(box[i]).store(v, Order::kRelease);
}
GPUSOCK_HD inline uint32_t get(uint32_t* box, uint32_t i) {
  return AtomicRef<uint32_t, Scope::kSystem>(box[i]).load(Order::kAcquire);
}

// Lane 0: listens, accepts one connection, receives on it (blocking) and records the
// result; then calls accept again and records that; then tries a second listen().
struct OneConnection {
  GPUSOCK_HD void operator()(uint32_t* box) const {
    if (gpusock::warp::lane_id() != 0) return;
    int l = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
    socklen_t len = sizeof a;
    raw::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a);
    raw::listen(l, 16);
    raw::getsockname(l, reinterpret_cast<sockaddr*>(&a), &len);
    put(box, kPort, gpusock::ntohs(a.sin_port));
    int c = raw::accept4(l, nullptr, nullptr, 0);
    char buf[64];
    // Nothing arrives: the host aborts the connection while this waits, then the next call.
    put(box, kRecv, static_cast<uint32_t>(raw::recv(c, buf, sizeof buf, 0) + kBias));
    put(box, kRecv2, static_cast<uint32_t>(raw::recv(c, buf, sizeof buf, 0) + kBias));
    put(box, kAccept, static_cast<uint32_t>(raw::accept4(l, nullptr, nullptr, 0) + kBias));  // after stop_accepting
    int l2 = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in b{};
    b.sin_family = AF_INET;
    b.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
    raw::bind(l2, reinterpret_cast<sockaddr*>(&b), sizeof b);
    put(box, kListen2, static_cast<uint32_t>(raw::listen(l2, 16) + kBias));
    put(box, kDone, raw::close(c) == 0 && raw::close(l) == 0 && raw::close(l2) == 0 ? 1 : 2);
  }
};

struct Recorder : gpusock::net::SocketObserver {
  std::mutex mu;
  std::vector<gpusock::net::SocketEvent> events;
  void on_socket_event(const gpusock::net::SocketEvent& e) override {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(e);
  }
};

TEST(IouringControlHooks, ListAbortStopAcceptingAndEvents) {
  gpusock::RuntimeOptions o;
  o.device = gpusock::DeviceKind::kCpu;
  o.cpu_resident_warps = 4;
  auto rt = gpusock::Runtime::create(o);
  ASSERT_TRUE(rt.ok());
  auto be = gpusock::iouring::create_backend(**rt);
  ASSERT_TRUE(be.ok()) << be.status().to_string();
  std::shared_ptr<gpusock::net::Backend> backend = *be;
  ASSERT_TRUE(gpusock::net::attach(**rt, backend).ok());
  auto rec = std::make_shared<Recorder>();
  backend->set_observer(rec);
  auto m = (*rt)->mapped_alloc(4096);
  ASSERT_TRUE(m.ok());
  (*rt)->mapped_free_at_exit(m->host);
  auto* box = static_cast<uint32_t*>(m->host);
  auto box_at = [&](uint32_t i) { return std::atomic_ref<uint32_t>(box[i]).load(std::memory_order_acquire); };
  auto k = gpusock::launch(**rt, {1}, {32}, OneConnection{}, static_cast<uint32_t*>(m->device));
  ASSERT_TRUE(k.ok());
  ASSERT_TRUE(eventually([&] { return box_at(kPort) != 0; }));

  int client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(box_at(kPort)));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(client, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);

  // Two sockets: the listener and the accepted connection, with their addresses.
  std::vector<gpusock::net::SocketInfo> socks;
  ASSERT_TRUE(eventually([&] {
    socks = backend->list_sockets();
    return socks.size() == 2 && (socks[0].state == "connected" || socks[1].state == "connected");
  }));
  const gpusock::net::SocketInfo conn = socks[0].state == "connected" ? socks[0] : socks[1];
  const gpusock::net::SocketInfo lis = socks[0].state == "connected" ? socks[1] : socks[0];
  EXPECT_EQ(lis.state, "listening");
  EXPECT_TRUE(lis.listener);
  EXPECT_FALSE(conn.listener);
  EXPECT_EQ(conn.family, AF_INET);
  EXPECT_EQ(conn.type, SOCK_STREAM);
  EXPECT_EQ(conn.backend, "io_uring");
  EXPECT_GT(conn.peer_len, 0u);
  EXPECT_EQ(reinterpret_cast<const sockaddr_in&>(lis.local).sin_port, a.sin_port);
  EXPECT_EQ(backend->abort_socket(12345678), -EBADF);
  ASSERT_EQ(backend->abort_socket(conn.fd), 0);
  // The waiting recv and the one after it both answer ECONNABORTED; the peer sees the end.
  ASSERT_TRUE(eventually([&] { return box_at(kRecv2) != 0; }));
  EXPECT_EQ(static_cast<int64_t>(box_at(kRecv)) - kBias, -ECONNABORTED);
  EXPECT_EQ(static_cast<int64_t>(box_at(kRecv2)) - kBias, -ECONNABORTED);
  char b;
  EXPECT_EQ(::recv(client, &b, 1, 0), 0);
  socks = backend->list_sockets();
  for (const auto& s : socks) {
    if (s.fd == conn.fd) {
      EXPECT_EQ(s.state, "aborted");
    }
  }
  // stop_accepting: the listener is aborted (the kernel's accept answers ECONNABORTED)
  // and a later listen() is refused.
  EXPECT_EQ(backend->stop_accepting(), 1);
  ASSERT_TRUE(eventually([&] { return box_at(kDone) != 0; }));
  EXPECT_EQ(static_cast<int64_t>(box_at(kAccept)) - kBias, -ECONNABORTED);
  EXPECT_EQ(static_cast<int64_t>(box_at(kListen2)) - kBias, -ECONNABORTED);
  EXPECT_EQ(box_at(kDone), 1u);  // close still works on aborted sockets
  ASSERT_TRUE(k->wait_for(std::chrono::seconds(60)));
  EXPECT_TRUE(backend->list_sockets().empty());
  ::close(client);

  // Events: opened (listener), opened (connection), aborted (connection), aborted
  // (listener), then the closes; the second listen socket opened and closed too.
  std::vector<std::pair<gpusock::net::SocketEvent::Kind, int>> ev;
  {
    std::lock_guard<std::mutex> lock(rec->mu);
    for (const auto& e : rec->events) ev.push_back({e.kind, e.fd});
  }
  using K = gpusock::net::SocketEvent::Kind;
  ASSERT_GE(ev.size(), 4u);
  EXPECT_EQ(ev[0], std::make_pair(K::kOpened, lis.fd));
  EXPECT_EQ(ev[1], std::make_pair(K::kOpened, conn.fd));
  EXPECT_EQ(ev[2], std::make_pair(K::kAborted, conn.fd));
  EXPECT_EQ(ev[3], std::make_pair(K::kAborted, lis.fd));
  int opened = 0, closed = 0;
  for (const auto& e : ev) {
    opened += e.first == K::kOpened;
    closed += e.first == K::kClosed;
  }
  EXPECT_EQ(opened, 3);
  EXPECT_EQ(closed, 3);
  backend->set_observer(nullptr);
}

// Lane 0: connects to a port nobody listens on; out[0] = connect's result.
struct RefusedConnect {
  GPUSOCK_HD void operator()(uint16_t port, int64_t* out) const {
    if (gpusock::warp::lane_id() != 0) return;
    int fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = gpusock::htons(port);
    a.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
    out[0] = raw::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    out[1] = fd;
    raw::close(fd);
  }
};

TEST(IouringControlHooks, AFailedConnectIsAnErrorEvent) {
  gpusock::RuntimeOptions o;
  o.device = gpusock::DeviceKind::kCpu;
  o.cpu_resident_warps = 4;
  auto rt = gpusock::Runtime::create(o);
  ASSERT_TRUE(rt.ok());
  auto be = gpusock::iouring::create_backend(**rt);
  ASSERT_TRUE(be.ok()) << be.status().to_string();
  std::shared_ptr<gpusock::net::Backend> backend = *be;
  ASSERT_TRUE(gpusock::net::attach(**rt, backend).ok());
  auto rec = std::make_shared<Recorder>();
  backend->set_observer(rec);
  // A port that was free a moment ago and has no listener.
  int probe = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(probe, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ::getsockname(probe, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(probe);
  auto out = (*rt)->mapped_alloc(64);
  ASSERT_TRUE(out.ok());
  (*rt)->mapped_free_at_exit(out->host);
  auto k = gpusock::launch(**rt, {1}, {32}, RefusedConnect{}, ntohs(a.sin_port), static_cast<int64_t*>(out->device));
  ASSERT_TRUE(k.ok());
  ASSERT_TRUE(k->wait_for(std::chrono::seconds(60)));
  const int64_t* r = static_cast<const int64_t*>(out->host);
  ASSERT_EQ(r[0], -ECONNREFUSED);
  std::lock_guard<std::mutex> lock(rec->mu);
  ASSERT_EQ(rec->events.size(), 3u);
  EXPECT_EQ(rec->events[0].kind, gpusock::net::SocketEvent::Kind::kOpened);
  EXPECT_EQ(rec->events[1].kind, gpusock::net::SocketEvent::Kind::kError);
  EXPECT_EQ(rec->events[1].error, ECONNREFUSED);
  EXPECT_EQ(rec->events[1].fd, r[1]);
  EXPECT_STREQ(rec->events[1].backend, "io_uring");
  EXPECT_EQ(rec->events[2].kind, gpusock::net::SocketEvent::Kind::kClosed);
}

}  // namespace
