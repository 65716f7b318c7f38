// The control plane against a live runtime: a persistent echo kernel on the cpu device
// serves real TCP clients through io_uring while a real gRPC channel calls every RPC, and
// gpusockctl runs as a separate process. (The kernel is compiled by g++ here, so it runs
// on the cpu device only; the control plane has no device-specific code.)
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "echo/echo_server.hpp"
#include "gpusock/control/server.hpp"
#include "gpusock/control/v1/control.grpc.pb.h"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/localdevice.hpp"
#include "gpusock/net/localdevice_host.hpp"
#include "gpusock/net/socket.hpp"

namespace {

namespace v1 = gpusock::control::v1;
namespace raw = gpusock::raw;
using gpusock::AtomicRef;
using gpusock::Order;
using gpusock::Scope;

// ---- the echo kernel ----------------------------------------------------------------

// Mailbox words the echo kernel and the host share.
enum Box : uint32_t {
  kPort = 0,            // kernel: the listener's port
  kStop = 1,            // host: leave the loop
  kAccepted = 2,        // kernel: connections accepted
  kBytes = 3,           // kernel: bytes echoed
  kAborted = 4,         // kernel: connections whose call answered ECONNABORTED
  kListenerAborted = 5, // kernel: accept answered ECONNABORTED (drain)
  kExit = 6,            // kernel: 1 + errno of what ended the loop (1: stop or drained)
  kBoxWords = 8,
};

GPUSOCK_HD inline void put(uint32_t* box, uint32_t i, uint32_t v) {
  // Release, system scope: the host that reads the value sees the kernel's work before it.
  AtomicRef<uint32_t, Scope::kSystem>(box[i]).store(v, Order::kRelease);
}
GPUSOCK_HD inline uint32_t get(uint32_t* box, uint32_t i) {
  return AtomicRef<uint32_t, Scope::kSystem>(box[i]).load(Order::kAcquire);
}

constexpr int kMaxConns = 62;

// Lane 0: a listener on 127.0.0.1 and a poll loop over it and every connection, echoing
// what arrives. Ends when the host posts kStop, when the listener was aborted (drain) and
// the last connection has ended, or when a call fails for good (runtime shutdown).
struct EchoKernel {
  GPUSOCK_HD void operator()(uint32_t* box) const {
    if (gpusock::warp::lane_id() != 0) return;
    int l = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
    socklen_t alen = sizeof a;
    int r = l < 0 ? l : raw::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a);
    if (r == 0) r = raw::listen(l, 128);
    if (r == 0) r = raw::getsockname(l, reinterpret_cast<sockaddr*>(&a), &alen);
    if (r < 0) {
      put(box, kExit, 1 + static_cast<uint32_t>(-r));
      return;
    }
    put(box, kPort, gpusock::ntohs(a.sin_port));
    int conns[kMaxConns];
    int n = 0;
    bool listening = true;
    uint32_t accepted = 0, bytes = 0, aborted = 0, exit_code = 1;
    char buf[2048];
    while (get(box, kStop) == 0) {
      pollfd fds[kMaxConns + 1];
      int k = 0;
      if (listening) fds[k++] = {l, static_cast<short>(n < kMaxConns ? POLLIN : 0), 0};
      for (int i = 0; i < n; ++i) fds[k++] = {conns[i], POLLIN, 0};
      if (k == 0) break;  // drained: the listener is gone and so is every connection
      const int ready = raw::poll(fds, static_cast<uint32_t>(k), 50);
      if (ready < 0) {
        exit_code = 1 + static_cast<uint32_t>(-ready);
        break;
      }
      const int base = listening ? 1 : 0;
      for (int i = n - 1; i >= 0; --i) {
        if (fds[base + i].revents == 0) continue;
        int64_t got = raw::recv(conns[i], buf, sizeof buf, MSG_DONTWAIT);
        if (got == -EAGAIN) continue;
        if (got > 0) {
          int64_t sent = 0;
          while (sent < got) {
            int64_t s = raw::send(conns[i], buf + sent, static_cast<uint64_t>(got - sent), 0);
            if (s <= 0) break;
            sent += s;
          }
          bytes += static_cast<uint32_t>(sent);
          put(box, kBytes, bytes);
          if (sent == got) continue;
        }
        if (got == -ECONNABORTED) put(box, kAborted, ++aborted);
        raw::close(conns[i]);
        conns[i] = conns[--n];
      }
      if (listening && (fds[0].revents & POLLIN) != 0) {
        int c = raw::accept4(l, nullptr, nullptr, 0);
        if (c >= 0) {
          conns[n++] = c;
          put(box, kAccepted, ++accepted);
        } else if (c == -ECONNABORTED) {
          put(box, kListenerAborted, 1);
          raw::close(l);
          listening = false;
        } else if (c != -EAGAIN) {
          exit_code = 1 + static_cast<uint32_t>(-c);
          break;
        }
      }
    }
    for (int i = 0; i < n; ++i) raw::close(conns[i]);
    if (listening) raw::close(l);
    put(box, kExit, exit_code);
  }
};

// Lane 0: a localdevice listener on port 42 and one client that connects and sends 100
// bytes nobody reads; waits for the host's kStop.
struct LocalDeviceKernel {
  GPUSOCK_HD void operator()(uint32_t* box) const {
    if (gpusock::warp::lane_id() != 0) return;
    int l = gpusock::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
    gpusock::sockaddr_ld addr{AF_LOCALDEVICE, 42};
    int r = gpusock::bind(l, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    if (r == 0) r = gpusock::listen(l, 16);
    int c = gpusock::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
    if (r == 0) r = gpusock::connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    char bytes[100] = {};
    if (r == 0 && gpusock::send(c, bytes, sizeof bytes, 0) != 100) r = -1;
    put(box, kPort, r == 0 ? 1 : 2);
    for (uint32_t i = 0; get(box, kStop) == 0; ++i) gpusock::backoff(i);
    gpusock::close(c);
    gpusock::close(l);
    put(box, kExit, 1);
  }
};

// ---- host-side clients --------------------------------------------------------------

int connect_to(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    int e = errno;
    ::close(fd);
    return -e;
  }
  timeval tv{30, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

// Sends `text` and reads it back. True when the echo matches.
bool echo(int fd, const std::string& text) {
  if (::send(fd, text.data(), text.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(text.size())) return false;
  std::string back(text.size(), '\0');
  size_t got = 0;
  while (got < back.size()) {
    ssize_t r = ::recv(fd, back.data() + got, back.size() - got, 0);
    if (r <= 0) return false;
    got += static_cast<size_t>(r);
  }
  return back == text;
}

uint16_t local_port(int fd) {
  sockaddr_in a{};
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  return ntohs(a.sin_port);
}

template <typename F>
bool eventually(F f, std::chrono::milliseconds limit = std::chrono::milliseconds(60000)) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return f();
}

// ---- fixture ------------------------------------------------------------------------

class ControlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gpusock-control-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    // The server's default path and gpusockctl's discovery both follow XDG_RUNTIME_DIR.
    ::setenv("XDG_RUNTIME_DIR", dir_.c_str(), 1);
  }
  void TearDown() override {
    StopAll();
    std::string cmd = "rm -rf '" + dir_ + "'";
    (void)std::system(cmd.c_str());
  }

  // A cpu-device runtime with io_uring sockets (and localdevice if asked) and the server.
  void Start(gpusock::control::ServerOptions so = {}, bool localdevice = false) {
    gpusock::RuntimeOptions o;
    o.device = gpusock::DeviceKind::kCpu;
    o.cpu_resident_warps = 16;
    auto rt = gpusock::Runtime::create(o);
    ASSERT_TRUE(rt.ok()) << rt.status().to_string();
    rt_ = std::move(rt.value());
    auto be = gpusock::iouring::create_backend(*rt_);
    ASSERT_TRUE(be.ok()) << be.status().to_string();
    backend_ = *be;
    ASSERT_TRUE(gpusock::net::attach(*rt_, backend_).ok());
    gpusock::control::Sources src;
    src.backends = {backend_};
    src.config["test"] = "control_test";
    if (localdevice) {
      auto ld = gpusock::net::enable_localdevice(*rt_, {64, 4096});
      ASSERT_TRUE(ld.ok()) << ld.status().to_string();
      src.localdevice = *ld;
    }
    auto m = rt_->mapped_alloc(4096);
    ASSERT_TRUE(m.ok());
    rt_->mapped_free_at_exit(m->host);
    box_host_ = static_cast<uint32_t*>(m->host);
    box_dev_ = static_cast<uint32_t*>(m->device);
    auto srv = gpusock::control::ControlServer::start(*rt_, src, so);
    ASSERT_TRUE(srv.ok()) << srv.status().to_string();
    server_ = std::move(srv.value());
    channel_ = grpc::CreateChannel(server_->endpoint(), grpc::InsecureChannelCredentials());
    stub_ = v1::Control::NewStub(channel_);
  }

  void StartEcho() {
    auto k = gpusock::launch(*rt_, {1}, {32}, EchoKernel{}, box_dev_);
    ASSERT_TRUE(k.ok()) << k.status().to_string();
    kernel_ = std::make_unique<gpusock::Launch>(std::move(k.value()));
    ASSERT_TRUE(eventually([&] { return Box(kPort) != 0 || Box(kExit) != 0; })) << Calls();
    ASSERT_EQ(Box(kExit), 0u) << "echo kernel failed to listen: errno " << Box(kExit) - 1;
    port_ = static_cast<uint16_t>(Box(kPort));
  }

  // What the runtime has answered so far, for failure messages.
  std::string Calls() {
    gpusock::RuntimeStats st = rt_->stats();
    std::string r = "in flight " + std::to_string(st.calls_in_flight) + ", slots owned " + std::to_string(st.slots_owned) + ";";
    for (const auto& o : st.by_opcode) {
      if (o.calls != 0) r += " " + o.name + "=" + std::to_string(o.calls) + "/" + std::to_string(o.latency.count);
    }
    return r;
  }
  uint32_t Box(uint32_t i) { return std::atomic_ref<uint32_t>(box_host_[i]).load(std::memory_order_acquire); }
  void Post(uint32_t i, uint32_t v) { std::atomic_ref<uint32_t>(box_host_[i]).store(v, std::memory_order_release); }

  // Ends the kernel (kStop) and waits for it; true when it finished in time.
  bool FinishKernel() {
    if (!kernel_) return true;
    Post(kStop, 1);
    bool done = kernel_->wait_for(std::chrono::seconds(60));
    kernel_.reset();
    return done;
  }

  void StopAll() {
    if (kernel_) {
      Post(kStop, 1);
      if (!kernel_->wait_for(std::chrono::seconds(60))) rt_->shutdown();
      kernel_.reset();
    }
    stub_.reset();
    channel_.reset();
    if (server_) server_->stop();
    server_.reset();
    if (rt_) rt_->shutdown();
    rt_.reset();
    backend_.reset();
  }

  // The descriptor (as kernels see it) of the connection whose peer is `client`.
  int KernelFdOf(int client) {
    const std::string want = "127.0.0.1:" + std::to_string(local_port(client));
    int fd = -1;
    eventually([&] {
      grpc::ClientContext c;
      v1::ListSocketsRequest req;
      req.set_state("connected");
      v1::ListSocketsResponse r;
      if (!stub_->ListSockets(&c, req, &r).ok()) return false;
      for (const auto& s : r.sockets()) {
        if (s.peer() == want) fd = s.fd();
      }
      return fd >= 0;
    });
    return fd;
  }

  std::string dir_;
  std::unique_ptr<gpusock::Runtime> rt_;
  std::shared_ptr<gpusock::net::Backend> backend_;
  std::unique_ptr<gpusock::control::ControlServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Control::Stub> stub_;
  std::unique_ptr<gpusock::Launch> kernel_;
  uint32_t* box_host_ = nullptr;
  uint32_t* box_dev_ = nullptr;
  uint16_t port_ = 0;
};

// ---- the RPCs -----------------------------------------------------------------------

// The echo example itself (examples/echo, 2 warps) under the control plane: its sockets
// are listed, its traffic counted, and a connection closed by the operator is dropped by
// the example's event loop while the other connection keeps echoing.
TEST_F(ControlTest, ServesTheEchoExample) {
  Start();
  gpusock::examples::EchoConfig cfg;
  cfg.addr_be = htonl(INADDR_LOOPBACK);
  cfg.conns_per_warp = 8;
  std::unique_ptr<gpusock::examples::EchoState> echo_state;
  for (int attempt = 0; attempt < 20 && !echo_state; ++attempt) {
    int probe = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(probe, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    cfg.port = local_port(probe);
    ::close(probe);
    auto st = gpusock::examples::EchoState::create(*rt_, 2, cfg);
    ASSERT_TRUE(st.ok()) << st.status().to_string();
    auto k = gpusock::launch(*rt_, {2}, {32}, gpusock::examples::EchoServer{}, (*st)->view());
    ASSERT_TRUE(k.ok()) << k.status().to_string();
    ASSERT_TRUE(eventually([&] { return (*st)->listening() != 0; })) << Calls();
    if ((*st)->listening() > 0) {
      kernel_ = std::make_unique<gpusock::Launch>(std::move(k.value()));
      echo_state = std::move(st.value());
    } else {
      k->wait();  // the port was taken meanwhile: every warp has ended; try another
    }
  }
  ASSERT_TRUE(echo_state) << "no free port for the echo example";
  int a = connect_to(cfg.port), b = connect_to(cfg.port);
  ASSERT_GE(a, 0);
  ASSERT_GE(b, 0);
  const std::string text(700, 'e');
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(echo(a, text));
    ASSERT_TRUE(echo(b, text));
  }

  // Both warps' listeners and both connections are listed, with their bytes.
  int listeners = 0, connected = 0;
  ASSERT_TRUE(eventually([&] {
    grpc::ClientContext ctx;
    v1::ListSocketsRequest req;
    v1::ListSocketsResponse r;
    if (!stub_->ListSockets(&ctx, req, &r).ok()) return false;
    listeners = connected = 0;
    for (const auto& s : r.sockets()) {
      if (s.state() == "listening" && s.local() == "127.0.0.1:" + std::to_string(cfg.port)) ++listeners;
      if (s.state() == "connected" && s.bytes_in() >= 7000 && s.bytes_out() >= 7000) ++connected;
    }
    return listeners == 2 && connected == 2;
  })) << listeners << " listeners, " << connected << " connections with their bytes";

  // The event loop's three calls are all counted (the example polls through the host
  // unless told --poll device).
  grpc::ClientContext sctx;
  v1::Stats st;
  ASSERT_TRUE(stub_->GetStats(&sctx, {}, &st).ok());
  std::map<std::string, uint64_t> calls;
  for (const auto& o : st.opcodes()) calls[o.name()] = o.calls();
  EXPECT_GT(calls["net.poll"], 0u);
  EXPECT_GE(calls["net.recv"], 10u);
  EXPECT_GE(calls["net.send"], 10u);

  // CloseSocket on a's connection: the example's next call on it answers ECONNABORTED,
  // it closes the descriptor, and a sees the end of the stream; b goes on.
  const int fd_a = KernelFdOf(a);
  ASSERT_GE(fd_a, 0);
  grpc::ClientContext cctx;
  v1::CloseSocketRequest creq;
  creq.set_fd(fd_a);
  v1::CloseSocketResponse cresp;
  ASSERT_TRUE(stub_->CloseSocket(&cctx, creq, &cresp).ok());
  EXPECT_FALSE(echo(a, text)) << "the closed connection still echoes";
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(echo(b, text));
  ::close(a);
  ::close(b);

  echo_state->request_stop();
  ASSERT_TRUE(kernel_->wait_for(std::chrono::seconds(60)));
  ASSERT_TRUE(kernel_->wait().ok());
  kernel_.reset();
  uint64_t accepted = 0, in = 0;
  for (const auto& c : echo_state->counters()) {
    accepted += c.accepted;
    in += c.bytes_in;
    EXPECT_EQ(c.error, 0);
  }
  EXPECT_EQ(accepted, 2u);
  EXPECT_GE(in, 25u * 700);
}


TEST_F(ControlTest, GetInfoReportsDeviceBackendsAndConfigOverAPrivateUnixSocket) {
  Start();
  ASSERT_EQ(server_->unix_path(), dir_ + "/gpusock-" + std::to_string(::getpid()) + ".sock");
  struct stat st {};
  ASSERT_EQ(::stat(server_->unix_path().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  grpc::ClientContext c;
  v1::Info info;
  grpc::Status s = stub_->GetInfo(&c, {}, &info);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(info.device(), "cpu");
  EXPECT_FALSE(info.version().empty());
  EXPECT_EQ(info.pid(), ::getpid());
  ASSERT_EQ(info.backends_size(), 1);
  EXPECT_EQ(info.backends(0).name(), "io_uring");
  EXPECT_NE(info.backends(0).description().find("io_uring: setup"), std::string::npos);
  EXPECT_EQ(info.config().at("slots"), std::to_string(rt_->slot_count()));
  EXPECT_EQ(info.config().at("test"), "control_test");
  EXPECT_FALSE(info.localdevice());

  // stop() removes the socket.
  const std::string path = server_->unix_path();
  server_->stop();
  EXPECT_NE(::access(path.c_str(), F_OK), 0);
}

TEST_F(ControlTest, GetStatsCountsCallsLatencySocketsAndBytes) {
  Start();
  StartEcho();
  int c = connect_to(port_);
  ASSERT_GE(c, 0);
  const std::string text(1000, 'x');
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(echo(c, text));
  ASSERT_TRUE(eventually([&] { return Box(kBytes) == 20000; }));

  // A call's latency is recorded just after its reply is published: wait until every
  // answered call is in its histogram.
  v1::Stats st;
  auto consistent = [&] {
    grpc::ClientContext ctx;
    st.Clear();
    if (!stub_->GetStats(&ctx, {}, &st).ok()) return false;
    for (const auto& o : st.opcodes()) {
      if (o.name() != "net.recv" && o.name() != "net.send") continue;
      uint64_t sum = 0;
      for (uint64_t b : o.latency_buckets()) sum += b;
      if (sum != o.calls()) return false;
    }
    return true;
  };
  ASSERT_TRUE(eventually(consistent));
  bool saw_recv = false, saw_send = false;
  for (const auto& o : st.opcodes()) {
    if (o.name() == "net.recv" || o.name() == "net.send") {
      (o.name() == "net.recv" ? saw_recv : saw_send) = true;
      EXPECT_GE(o.calls(), 20u) << o.name();
      EXPECT_GT(o.latency_p50_ns(), 0u) << o.name();
      EXPECT_LE(o.latency_p50_ns(), o.latency_p99_ns()) << o.name();
      EXPECT_LE(o.latency_p99_ns(), o.latency_max_ns()) << o.name();
      uint64_t sum = 0;
      for (uint64_t b : o.latency_buckets()) sum += b;
      EXPECT_EQ(sum, o.calls()) << o.name() << ": every answered call is in the histogram";
      EXPECT_GT(o.latency_sum_ns(), 0u);
    }
  }
  EXPECT_TRUE(saw_recv && saw_send);
  EXPECT_GE(st.calls(), 40u);
  EXPECT_EQ(st.slots(), rt_->slot_count());
  EXPECT_LE(st.slots_owned(), st.slots());
  EXPECT_EQ(st.staging_bytes(), rt_->staging_size());
  EXPECT_LE(st.staging_bytes_used(), st.staging_bytes());
  // Bytes of the sockets open now: the connection carried 20000 each way.
  EXPECT_EQ(st.bytes_in(), 20000u);
  EXPECT_EQ(st.bytes_out(), 20000u);
  uint32_t listening = 0, connected = 0;
  for (const auto& s : st.sockets()) {
    EXPECT_EQ(s.family(), "inet");
    EXPECT_EQ(s.type(), "stream");
    if (s.state() == "listening") listening += s.count();
    if (s.state() == "connected") connected += s.count();
  }
  EXPECT_EQ(listening, 1u);
  EXPECT_EQ(connected, 1u);
  EXPECT_FALSE(st.draining());
  ::close(c);
  EXPECT_TRUE(FinishKernel());
}

TEST_F(ControlTest, ListSocketsPagesAndFilters) {
  Start();
  StartEcho();
  std::vector<int> clients;
  for (int i = 0; i < 5; ++i) {
    int c = connect_to(port_);
    ASSERT_GE(c, 0);
    ASSERT_TRUE(echo(c, "hello " + std::to_string(i)));
    clients.push_back(c);
  }
  // A send is counted when its completion is reaped, which may be just after the client
  // already has the bytes: wait for the counters to settle.
  ASSERT_TRUE(eventually([&] {
    grpc::ClientContext c;
    v1::ListSocketsRequest q;
    q.set_state("connected");
    v1::ListSocketsResponse r;
    if (!stub_->ListSockets(&c, q, &r).ok() || r.sockets_size() != 5) return false;
    return std::all_of(r.sockets().begin(), r.sockets().end(), [](const v1::SocketInfo& x) { return x.bytes_out() == 7; });
  }));
  // Pages of two: three pages, every socket once, ascending.
  v1::ListSocketsRequest req;
  req.set_page_size(2);
  std::vector<v1::SocketInfo> all;
  for (int page = 0; page < 10; ++page) {
    grpc::ClientContext c;
    v1::ListSocketsResponse r;
    ASSERT_TRUE(stub_->ListSockets(&c, req, &r).ok());
    EXPECT_EQ(r.total(), 6u);
    EXPECT_LE(r.sockets_size(), 2);
    for (const auto& s : r.sockets()) all.push_back(s);
    if (r.next_page_token().empty()) break;
    req.set_page_token(r.next_page_token());
  }
  ASSERT_EQ(all.size(), 6u);
  for (size_t i = 1; i < all.size(); ++i) EXPECT_LT(all[i - 1].fd(), all[i].fd());
  int listeners = 0;
  for (const auto& s : all) {
    EXPECT_EQ(s.backend(), "io_uring");
    EXPECT_EQ(s.family(), "inet");
    if (s.state() == "listening") {
      ++listeners;
      EXPECT_EQ(s.local(), "127.0.0.1:" + std::to_string(port_));
      EXPECT_EQ(s.peer(), "");
    } else {
      EXPECT_EQ(s.state(), "connected");
      EXPECT_EQ(s.bytes_in(), 7u);  // "hello N"
      EXPECT_EQ(s.bytes_out(), 7u);
    }
  }
  EXPECT_EQ(listeners, 1);
  // Every client appears as a peer.
  for (int c : clients) {
    const std::string peer = "127.0.0.1:" + std::to_string(local_port(c));
    EXPECT_TRUE(std::any_of(all.begin(), all.end(), [&](const v1::SocketInfo& s) { return s.peer() == peer; })) << peer;
  }
  // Filters.
  {
    grpc::ClientContext c;
    v1::ListSocketsRequest f;
    f.set_state("listening");
    v1::ListSocketsResponse r;
    ASSERT_TRUE(stub_->ListSockets(&c, f, &r).ok());
    EXPECT_EQ(r.sockets_size(), 1);
    EXPECT_EQ(r.total(), 1u);
  }
  {
    grpc::ClientContext c;
    v1::ListSocketsRequest f;
    f.set_family("inet6");
    v1::ListSocketsResponse r;
    ASSERT_TRUE(stub_->ListSockets(&c, f, &r).ok());
    EXPECT_EQ(r.sockets_size(), 0);
  }
  {
    grpc::ClientContext c;
    v1::ListSocketsRequest f;
    f.set_family("carrier-pigeon");
    v1::ListSocketsResponse r;
    EXPECT_EQ(stub_->ListSockets(&c, f, &r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext c;
    v1::ListSocketsRequest f;
    f.set_page_token("not-a-number");
    v1::ListSocketsResponse r;
    EXPECT_EQ(stub_->ListSockets(&c, f, &r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  for (int c : clients) ::close(c);
  EXPECT_TRUE(FinishKernel());
}

TEST_F(ControlTest, ListLocalDeviceShowsListenersConnectionsAndQueuedBytes) {
  Start({}, /*localdevice=*/true);
  auto k = gpusock::launch(*rt_, {1}, {32}, LocalDeviceKernel{}, box_dev_);
  ASSERT_TRUE(k.ok());
  kernel_ = std::make_unique<gpusock::Launch>(std::move(k.value()));
  ASSERT_TRUE(eventually([&] { return Box(kPort) != 0; })) << Calls();
  ASSERT_EQ(Box(kPort), 1u) << "the kernel's localdevice calls failed";

  grpc::ClientContext c;
  v1::LocalDeviceState st;
  ASSERT_TRUE(stub_->ListLocalDevice(&c, {}, &st).ok());
  EXPECT_TRUE(st.enabled());
  EXPECT_EQ(st.max_sockets(), 64u);
  EXPECT_EQ(st.ring_bytes(), 4096u);
  EXPECT_EQ(st.listeners(), 1u);
  EXPECT_EQ(st.connected(), 2u);  // both ends of the one connection
  EXPECT_EQ(st.queued_bytes(), 100u);
  bool listener = false, queued = false;
  for (const auto& s : st.sockets()) {
    if (s.state() == "listening") {
      listener = true;
      EXPECT_EQ(s.port(), 42u);
      EXPECT_EQ(s.queued(), 1u);  // one connection waiting to be accepted
      EXPECT_GE(s.fd(), gpusock::net::kDeviceFdFirst);
    }
    if (s.queued() == 100) {
      queued = true;
      EXPECT_EQ(s.fd(), -1);  // the server side, not accepted yet
    }
  }
  EXPECT_TRUE(listener && queued);

  grpc::ClientContext c2;
  v1::Stats stats;
  ASSERT_TRUE(stub_->GetStats(&c2, {}, &stats).ok());
  EXPECT_EQ(stats.localdevice_listeners(), 1u);
  EXPECT_EQ(stats.localdevice_queued_bytes(), 100u);

  // A localdevice descriptor cannot be aborted from the host.
  grpc::ClientContext c3;
  v1::CloseSocketRequest cr;
  cr.set_fd(gpusock::net::kDeviceFdFirst + 1);
  v1::CloseSocketResponse cresp;
  EXPECT_EQ(stub_->CloseSocket(&c3, cr, &cresp).error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_TRUE(FinishKernel());
}

TEST_F(ControlTest, ListLocalDeviceSaysWhenTheFamilyIsOff) {
  Start();
  grpc::ClientContext c;
  v1::LocalDeviceState st;
  ASSERT_TRUE(stub_->ListLocalDevice(&c, {}, &st).ok());
  EXPECT_FALSE(st.enabled());
}

TEST_F(ControlTest, CloseSocketIsSeenByTheKernelAsEconnaborted) {
  Start();
  StartEcho();
  int victim = connect_to(port_), bystander = connect_to(port_);
  ASSERT_GE(victim, 0);
  ASSERT_GE(bystander, 0);
  ASSERT_TRUE(echo(victim, "before"));
  ASSERT_TRUE(echo(bystander, "before"));
  const int fd = KernelFdOf(victim);
  ASSERT_GE(fd, 0);

  grpc::ClientContext c;
  v1::CloseSocketRequest req;
  req.set_fd(fd);
  v1::CloseSocketResponse r;
  grpc::Status s = stub_->CloseSocket(&c, req, &r);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(r.backend(), "io_uring");

  // The kernel's next recv on it answers ECONNABORTED; it closes the descriptor.
  ASSERT_TRUE(eventually([&] { return Box(kAborted) == 1; }));
  // The client sees the connection end.
  char b;
  EXPECT_EQ(::recv(victim, &b, 1, 0), 0);
  // The other connection is untouched.
  EXPECT_TRUE(echo(bystander, "after"));
  EXPECT_EQ(Box(kAborted), 1u);

  // Unknown descriptors: NOT_FOUND.
  grpc::ClientContext c2;
  req.set_fd(fd + 1000);
  EXPECT_EQ(stub_->CloseSocket(&c2, req, &r).error_code(), grpc::StatusCode::NOT_FOUND);
  ::close(victim);
  ::close(bystander);
  EXPECT_TRUE(FinishKernel());
}

TEST_F(ControlTest, DrainStopsAcceptingAndWaitsForOpenConnections) {
  Start();
  StartEcho();
  int a = connect_to(port_), b = connect_to(port_);
  ASSERT_GE(a, 0);
  ASSERT_GE(b, 0);
  ASSERT_TRUE(echo(a, "a"));
  ASSERT_TRUE(echo(b, "b"));

  v1::DrainResponse r;
  grpc::Status s;
  std::thread drainer([&] {
    grpc::ClientContext c;
    v1::DrainRequest req;
    req.set_deadline_ms(20000);
    s = stub_->Drain(&c, req, &r);
  });
  // The listener goes: the kernel's accept answers ECONNABORTED and new clients are refused.
  ASSERT_TRUE(eventually([&] { return Box(kListenerAborted) == 1; }));
  // (The host socket stops listening on the backend's thread, a moment after the abort.)
  EXPECT_TRUE(eventually([&] {
    int fd = connect_to(port_);
    if (fd >= 0) ::close(fd);
    return fd == -ECONNREFUSED;
  }));
  // Open connections still work until their clients leave.
  EXPECT_TRUE(echo(a, "still here"));
  ::close(a);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_TRUE(echo(b, "still here"));
  ::close(b);
  drainer.join();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(r.listeners_stopped(), 1u);
  EXPECT_TRUE(r.drained());
  EXPECT_EQ(r.left_size(), 0);
  EXPECT_GE(r.waited_ms(), 300u);
  // With nothing left the kernel ends by itself.
  ASSERT_TRUE(kernel_->wait_for(std::chrono::seconds(30)));
  EXPECT_EQ(Box(kExit), 1u);
  kernel_.reset();

  grpc::ClientContext c;
  v1::Stats st;
  ASSERT_TRUE(stub_->GetStats(&c, {}, &st).ok());
  EXPECT_TRUE(st.draining());
}

TEST_F(ControlTest, DrainReportsConnectionsLeftAtTheDeadline) {
  Start();
  StartEcho();
  int a = connect_to(port_);
  ASSERT_GE(a, 0);
  ASSERT_TRUE(echo(a, "a"));
  grpc::ClientContext c;
  v1::DrainRequest req;
  req.set_deadline_ms(200);
  v1::DrainResponse r;
  ASSERT_TRUE(stub_->Drain(&c, req, &r).ok());
  EXPECT_FALSE(r.drained());
  ASSERT_EQ(r.left_size(), 1);
  EXPECT_EQ(r.left(0).peer(), "127.0.0.1:" + std::to_string(local_port(a)));
  EXPECT_EQ(r.left(0).state(), "connected");
  EXPECT_GE(r.waited_ms(), 200u);
  ::close(a);
  EXPECT_TRUE(FinishKernel());
}

TEST_F(ControlTest, WatchEventsArriveInOrder) {
  Start();
  StartEcho();
  grpc::ClientContext wc;
  auto reader = stub_->WatchEvents(&wc, {});
  // Headers come once the server has registered the watcher: nothing after this is missed.
  reader->WaitForInitialMetadata();
  std::vector<v1::Event> got;
  // Reads events until one is `what` for `fd`: the kernel's close of a descriptor happens
  // on a service thread a moment after the host saw its effect, so each step waits for
  // its event before the next step makes events of its own.
  auto read_until = [&](const std::string& what, int fd) {
    v1::Event ev;
    while (reader->Read(&ev)) {
      got.push_back(ev);
      if (ev.has_socket() && ev.socket().what() == what && ev.socket().fd() == fd) return true;
    }
    return false;
  };

  int a = connect_to(port_);
  ASSERT_GE(a, 0);
  ASSERT_TRUE(echo(a, "one"));
  const int fd_a = KernelFdOf(a);
  ::close(a);  // the kernel sees end of stream and closes fd_a
  ASSERT_TRUE(read_until("closed", fd_a));
  int b = connect_to(port_);
  ASSERT_GE(b, 0);
  ASSERT_TRUE(echo(b, "two"));
  const int fd_b = KernelFdOf(b);
  {
    grpc::ClientContext c;
    v1::CloseSocketRequest q;
    q.set_fd(fd_b);
    v1::CloseSocketResponse r;
    ASSERT_TRUE(stub_->CloseSocket(&c, q, &r).ok());
  }
  ASSERT_TRUE(eventually([&] { return Box(kAborted) == 1; }));
  ::close(b);
  ASSERT_TRUE(read_until("closed", fd_b));  // the kernel's close after ECONNABORTED
  {
    grpc::ClientContext c;
    v1::DrainRequest q;
    q.set_deadline_ms(5000);
    v1::DrainResponse r;
    ASSERT_TRUE(stub_->Drain(&c, q, &r).ok());
    EXPECT_TRUE(r.drained());
  }

  // Expected, in this order: opened a, closed a, opened b, aborted b, closed b, the
  // listener's abort (Drain stops accepting first); then drain started before drain done,
  // and the kernel's close of the listener anywhere among them (the kernel closes it when
  // its accept answers ECONNABORTED, while the drain runs on another thread).
  v1::Event ev;
  bool done = false, listener_closed = false;
  while (!(done && listener_closed) && reader->Read(&ev)) {
    got.push_back(ev);
    done |= ev.has_drain() && ev.drain().phase() == "done";
    listener_closed |= ev.has_socket() && ev.socket().what() == "closed" && ev.socket().fd() != fd_a && ev.socket().fd() != fd_b;
  }
  ASSERT_TRUE(done && listener_closed);
  wc.TryCancel();
  reader->Finish();
  std::vector<std::string> seen;
  for (size_t i = 0; i < got.size(); ++i) {
    if (i > 0) {
      EXPECT_EQ(got[i].seq(), got[i - 1].seq() + 1) << "events are numbered without gaps";
      EXPECT_GE(got[i].unix_ns(), got[i - 1].unix_ns());
    }
    const auto& e = got[i];
    if (e.has_drain()) {
      seen.push_back("drain " + e.drain().phase());
    } else {
      const int fd = e.socket().fd();
      const std::string who = fd == fd_a ? "a" : fd == fd_b ? "b" : "listener";
      seen.push_back(e.socket().what() + " " + who);
    }
  }
  std::string all;
  for (const auto& x : seen) all += x + "; ";
  SCOPED_TRACE(all);
  // fd_a's number may be reused by b: tell them apart by position.
  std::vector<std::string> want_prefix = {"opened a", "closed a", "opened " + std::string(fd_b == fd_a ? "a" : "b")};
  ASSERT_GE(seen.size(), 8u);
  EXPECT_EQ(seen[0], want_prefix[0]);
  EXPECT_EQ(seen[1], want_prefix[1]);
  EXPECT_EQ(seen[2], want_prefix[2]);
  const std::string b_name = fd_b == fd_a ? "a" : "b";
  EXPECT_EQ(seen[3], "aborted " + b_name);
  EXPECT_EQ(seen[4], "closed " + b_name);
  EXPECT_EQ(seen[5], "aborted listener");
  ASSERT_EQ(seen.size(), 9u);
  std::vector<std::string> rest(seen.begin() + 6, seen.end());
  auto at = [&](const std::string& x) { return std::find(rest.begin(), rest.end(), x) - rest.begin(); };
  EXPECT_LT(at("drain started"), at("drain done"));
  EXPECT_LT(at("drain done"), 3);
  EXPECT_LT(at("closed listener"), 3);
  for (const auto& e : got) {
    if (e.has_socket()) {
      EXPECT_EQ(e.socket().backend(), "io_uring");
      EXPECT_EQ(e.socket().family(), "inet");
      if (e.socket().what() == "aborted") {
        EXPECT_EQ(e.socket().error(), ECONNABORTED);
      }
    }
  }
  ASSERT_TRUE(kernel_->wait_for(std::chrono::seconds(30)));
  kernel_.reset();
}

TEST_F(ControlTest, GetStatsFromEightThreadsWhileTrafficFlows) {
  Start();
  StartEcho();
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> echoes{0};
  std::atomic<int> client_failures{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&, t] {
      int c = connect_to(port_);
      if (c < 0) {
        client_failures++;
        return;
      }
      const std::string text(64 + t * 100, static_cast<char>('a' + t));
      while (!stop.load()) {
        if (!echo(c, text)) {
          client_failures++;
          break;
        }
        echoes++;
      }
      ::close(c);
    });
  }
  std::atomic<int> rpc_failures{0}, regressions{0};
  std::atomic<uint64_t> rpcs{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 8; ++t) {
    readers.emplace_back([&] {
      uint64_t last = 0;
      for (int i = 0; i < 40; ++i) {
        grpc::ClientContext c;
        v1::Stats st;
        if (!stub_->GetStats(&c, {}, &st).ok()) {
          rpc_failures++;
          continue;
        }
        rpcs++;
        if (st.calls() < last) regressions++;  // counters never go back
        last = st.calls();
      }
    });
  }
  for (auto& r : readers) r.join();
  stop = true;
  for (auto& c : clients) c.join();
  EXPECT_EQ(rpc_failures.load(), 0);
  EXPECT_EQ(regressions.load(), 0);
  EXPECT_EQ(rpcs.load(), 320u);
  EXPECT_EQ(client_failures.load(), 0);
  EXPECT_GT(echoes.load(), 0u);
  EXPECT_TRUE(FinishKernel());
}

TEST_F(ControlTest, SetLogLevelChangesTheThresholdAndRejectsUnknownLevels) {
  Start();
  grpc::ClientContext c;
  v1::SetLogLevelRequest req;
  req.set_level("debug");
  v1::SetLogLevelResponse r;
  ASSERT_TRUE(stub_->SetLogLevel(&c, req, &r).ok());
  EXPECT_EQ(r.previous(), "warn");
  grpc::ClientContext c2;
  req.set_level("info");
  ASSERT_TRUE(stub_->SetLogLevel(&c2, req, &r).ok());
  EXPECT_EQ(r.previous(), "debug");
  grpc::ClientContext c3;
  req.set_level("loud");
  EXPECT_EQ(stub_->SetLogLevel(&c3, req, &r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

// ---- access -------------------------------------------------------------------------

// Calls ServerReflectionInfo with list_services through a generic stub (no generated
// reflection stubs needed). Returns the status and the raw response bytes.
grpc::Status list_services(std::shared_ptr<grpc::Channel> ch, const std::string& token, std::string* response) {
  grpc::GenericStub stub(ch);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto call = stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  auto step = [&](intptr_t t) {
    if (!cq.Next(&tag, &ok)) return false;
    return reinterpret_cast<intptr_t>(tag) == t && ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  step(1);
  // ServerReflectionRequest { list_services (field 7) = "" }
  const char req[] = {0x3a, 0x00};
  grpc::Slice slice(req, sizeof req);
  grpc::ByteBuffer bb(&slice, 1);
  call->Write(bb, reinterpret_cast<void*>(2));
  step(2);
  call->WritesDone(reinterpret_cast<void*>(3));
  step(3);
  grpc::ByteBuffer resp;
  call->Read(&resp, reinterpret_cast<void*>(4));
  if (step(4)) {
    std::vector<grpc::Slice> slices;
    resp.Dump(&slices);
    for (auto& s : slices) response->append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  grpc::Status st;
  call->Finish(&st, reinterpret_cast<void*>(5));
  step(5);
  return st;
}

TEST_F(ControlTest, ReflectionListsTheService) {
  Start();
  std::string resp;
  grpc::Status s = list_services(channel_, "", &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_NE(resp.find("gpusock.control.v1.Control"), std::string::npos);
}

TEST_F(ControlTest, TcpListenerRequiresTheBearerToken) {
  gpusock::control::ServerOptions so;
  so.tcp_address = "127.0.0.1:0";
  so.token = "s3cret-token";
  Start(so);
  ASSERT_GT(server_->tcp_port(), 0);
  auto tcp = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->tcp_port()), grpc::InsecureChannelCredentials());
  auto stub = v1::Control::NewStub(tcp);
  auto call = [&](const std::string& auth) {
    grpc::ClientContext c;
    if (!auth.empty()) c.AddMetadata("authorization", auth);
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    v1::Info info;
    return stub->GetInfo(&c, {}, &info);
  };
  EXPECT_EQ(call("").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call("Bearer wrong").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call("Bearer s3cret-token-and-more").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call("s3cret-token").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  grpc::Status ok = call("Bearer s3cret-token");
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  // Reflection is behind the token too.
  std::string resp;
  EXPECT_EQ(list_services(tcp, "", &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  resp.clear();
  EXPECT_TRUE(list_services(tcp, "s3cret-token", &resp).ok());
  EXPECT_NE(resp.find("gpusock.control.v1.Control"), std::string::npos);
  // The unix socket needs no token.
  grpc::ClientContext c;
  v1::Info info;
  EXPECT_TRUE(stub_->GetInfo(&c, {}, &info).ok());
}

TEST_F(ControlTest, StartRefusesUnsafeOrEmptyConfigurations) {
  gpusock::RuntimeOptions o;
  o.device = gpusock::DeviceKind::kCpu;
  o.cpu_resident_warps = 4;
  auto rt = gpusock::Runtime::create(o);
  ASSERT_TRUE(rt.ok());
  gpusock::control::ServerOptions so;
  so.tcp_address = "127.0.0.1:0";  // no token
  EXPECT_EQ(gpusock::control::ControlServer::start(**rt, {}, so).status().code(), EINVAL);
  so.token = "t";
  so.unix_socket = false;
  so.tcp_address = "0.0.0.0:0";  // not loopback, not allowed
  EXPECT_EQ(gpusock::control::ControlServer::start(**rt, {}, so).status().code(), EINVAL);
  so.tcp_address = "";
  EXPECT_EQ(gpusock::control::ControlServer::start(**rt, {}, so).status().code(), EINVAL);  // no listener
  gpusock::control::ServerOptions bad;
  bad.log_level = "loud";
  EXPECT_EQ(gpusock::control::ControlServer::start(**rt, {}, bad).status().code(), EINVAL);
}

// ---- gpusockctl end to end ----------------------------------------------------------

struct CtlRun {
  int code = -1;
  std::string out;
};

// Runs gpusockctl with `args` (a shell command line tail); captures stdout.
CtlRun ctl(const std::string& args, const std::string& env = "") {
  std::string cmd = env + " " GPUSOCKCTL_PATH " " + args + " 2>/dev/null";
  CtlRun r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int st = ::pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// Copies the host made into device memory for kernels (received bytes delivered into a
// kernel's buffer) and out of it (a warp's send taken from where it lies) show in
// GetStats, in `gpusockctl stats` and in its metrics. Made here with Runtime::deliver()
// and start_fetch(), the calls the io_uring backend makes for them.
TEST_F(ControlTest, GetStatsCountsDeliveriesIntoDeviceMemory) {
  gpusock::control::ServerOptions so;
  so.tcp_address = "127.0.0.1:0";
  so.token = "tok";
  Start(so);
  auto before = [&] {
    grpc::ClientContext ctx;
    v1::Stats st;
    EXPECT_TRUE(stub_->GetStats(&ctx, {}, &st).ok());
    return st;
  }();
  void* dev = rt_->device_alloc(8192).value();
  std::vector<uint8_t> bytes(5000, 7);
  ASSERT_TRUE(rt_->deliver(dev, bytes.data(), 5000).ok());
  ASSERT_TRUE(rt_->deliver(static_cast<uint8_t*>(dev) + 5000, bytes.data(), 3000).ok());
  EXPECT_EQ(rt_->deliver(static_cast<uint8_t*>(dev) + 5000, bytes.data(), 5000).code(), EFAULT);  // not counted
  ASSERT_TRUE(rt_->start_fetch(bytes.data(), static_cast<uint8_t*>(dev) + 100, 4000).ok());
  EXPECT_EQ(rt_->start_fetch(bytes.data(), static_cast<uint8_t*>(dev) + 8000, 400).code(), EFAULT);  // not counted
  ASSERT_TRUE(rt_->finish_deliveries().ok());
  grpc::ClientContext ctx;
  v1::Stats st;
  ASSERT_TRUE(stub_->GetStats(&ctx, {}, &st).ok());
  EXPECT_EQ(st.deliveries() - before.deliveries(), 2u);
  EXPECT_EQ(st.delivered_bytes() - before.delivered_bytes(), 8000u);
  EXPECT_EQ(st.fetches() - before.fetches(), 1u);
  EXPECT_EQ(st.fetched_bytes() - before.fetched_bytes(), 4000u);
  const std::string ep = "--timeout 60 --endpoint " + server_->endpoint();
  CtlRun r = ctl(ep + " stats");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("delivered into device memory by the host: " + std::to_string(st.deliveries()) + " copies, " +
                       std::to_string(st.delivered_bytes()) + " bytes"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("taken out of device memory by the host: " + std::to_string(st.fetches()) + " copies, " +
                       std::to_string(st.fetched_bytes()) + " bytes"),
            std::string::npos)
      << r.out;
  r = ctl(ep + " metrics");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("# TYPE gpusock_deliveries_total counter\ngpusock_deliveries_total " + std::to_string(st.deliveries())),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("gpusock_delivered_bytes_total " + std::to_string(st.delivered_bytes())), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("# TYPE gpusock_fetches_total counter\ngpusock_fetches_total " + std::to_string(st.fetches())),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("gpusock_fetched_bytes_total " + std::to_string(st.fetched_bytes())), std::string::npos) << r.out;
  rt_->device_free(dev);
}

TEST_F(ControlTest, GpusockctlEndToEnd) {
  gpusock::control::ServerOptions so;
  so.tcp_address = "127.0.0.1:0";
  so.token = "tok";
  Start(so);
  StartEcho();
  int c = connect_to(port_);
  ASSERT_GE(c, 0);
  ASSERT_TRUE(echo(c, "hello gpusockctl"));
  // Generous call deadlines: the machine running the tests may be heavily loaded.
  const std::string ep = "--timeout 60 --endpoint " + server_->endpoint();

  // info --json parses back into the message, and says what the runtime is.
  CtlRun r = ctl(ep + " info --json");
  ASSERT_EQ(r.code, 0) << r.out;
  v1::Info info;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(r.out, &info).ok()) << r.out;
  EXPECT_EQ(info.device(), "cpu");
  EXPECT_EQ(info.pid(), ::getpid());

  // Auto-discovery: the one live gpusock-<pid>.sock in $XDG_RUNTIME_DIR.
  r = ctl("--timeout 60 stats");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("net.recv"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("OPCODE"), std::string::npos);

  // sockets: table and JSON agree on the connection.
  r = ctl(ep + " sockets --state connected --json");
  ASSERT_EQ(r.code, 0);
  v1::ListSocketsResponse socks;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(r.out, &socks).ok()) << r.out;
  ASSERT_EQ(socks.sockets_size(), 1);
  EXPECT_EQ(socks.sockets(0).peer(), "127.0.0.1:" + std::to_string(local_port(c)));
  r = ctl(ep + " sockets");
  ASSERT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("FD"), std::string::npos);
  EXPECT_NE(r.out.find("listening"), std::string::npos);
  EXPECT_NE(r.out.find(socks.sockets(0).peer()), std::string::npos);

  // metrics: Prometheus text.
  r = ctl(ep + " metrics");
  ASSERT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("# TYPE gpusock_hostcall_latency_seconds histogram"), std::string::npos);
  EXPECT_NE(r.out.find("gpusock_hostcalls_total{opcode=\"net.recv\"}"), std::string::npos);
  EXPECT_NE(r.out.find("gpusock_hostcall_latency_seconds_bucket{opcode=\"net.recv\",le=\"+Inf\"}"), std::string::npos);
  EXPECT_NE(r.out.find("gpusock_sockets{family=\"inet\",type=\"stream\",state=\"listening\"} 1"), std::string::npos);

  // localdevice: the family is off here.
  r = ctl(ep + " localdevice");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("not enabled"), std::string::npos);

  // Exit codes.
  EXPECT_EQ(ctl(ep + " close 99999").code, 5);                       // not found
  EXPECT_EQ(ctl(ep + " close notanumber").code, 2);                  // usage
  EXPECT_EQ(ctl(ep + " frobnicate").code, 2);                        // usage
  EXPECT_EQ(ctl("--bogus info").code, 2);                            // usage
  EXPECT_EQ(ctl("--endpoint unix:" + dir_ + "/nothing.sock sockets --nope").code, 2);  // checked before connecting
  EXPECT_EQ(ctl(ep + " stats extra").code, 2);
  EXPECT_EQ(ctl(ep + " log-level loud").code, 2);                    // INVALID_ARGUMENT
  EXPECT_EQ(ctl("--endpoint unix:" + dir_ + "/nothing.sock --timeout 1 info").code, 3);  // unreachable
  const std::string tcp = "--timeout 60 --endpoint 127.0.0.1:" + std::to_string(server_->tcp_port());
  EXPECT_EQ(ctl(tcp + " info").code, 4);                             // no token
  EXPECT_EQ(ctl(tcp + " --token wrong info").code, 4);
  EXPECT_EQ(ctl(tcp + " --token tok info").code, 0);
  EXPECT_EQ(ctl(tcp + " info", "GPUSOCK_TOKEN=tok").code, 0);

  // close: the kernel sees ECONNABORTED.
  r = ctl(ep + " close " + std::to_string(socks.sockets(0).fd()));
  EXPECT_EQ(r.code, 0);
  EXPECT_TRUE(eventually([&] { return Box(kAborted) == 1; }));
  ::close(c);

  // watch: --count ends it; events are JSON lines. Connections come and go until the
  // watcher has seen two events (it may take a while to start on a loaded machine).
  CtlRun watched;
  std::atomic<bool> watch_done{false};
  std::thread watcher([&] {
    watched = ctl(ep + " watch --json --count 2 --duration-ms 60000");
    watch_done = true;
  });
  while (!watch_done) {
    int e = connect_to(port_);
    if (e >= 0) {
      echo(e, "w");
      ::close(e);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  watcher.join();
  EXPECT_EQ(watched.code, 0);
  size_t lines = 0;
  for (size_t pos = 0; (pos = watched.out.find('\n', pos)) != std::string::npos; ++pos) ++lines;
  EXPECT_EQ(lines, 2u) << watched.out;
  for (size_t pos = 0, next; (next = watched.out.find('\n', pos)) != std::string::npos; pos = next + 1) {
    v1::Event ev;
    EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(watched.out.substr(pos, next - pos), &ev).ok()) << watched.out;
    EXPECT_TRUE(ev.has_socket());
  }

  // drain with a live connection and a short deadline: 6.
  int d = connect_to(port_);
  ASSERT_GE(d, 0);
  ASSERT_TRUE(echo(d, "x"));
  r = ctl(ep + " drain --deadline-ms 100 --json");
  EXPECT_EQ(r.code, 6);
  v1::DrainResponse dr;
  EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(r.out, &dr).ok()) << r.out;
  EXPECT_FALSE(dr.drained());
  const std::string d_peer = "127.0.0.1:" + std::to_string(local_port(d));
  EXPECT_TRUE(std::any_of(dr.left().begin(), dr.left().end(), [&](const v1::SocketInfo& x) { return x.peer() == d_peer; }))
      << r.out;
  ::close(d);
  // drain again, nothing left: 0.
  EXPECT_TRUE(eventually([&] { return ctl(ep + " drain --deadline-ms 5000").code == 0; }));
  ASSERT_TRUE(kernel_->wait_for(std::chrono::seconds(30)));
  kernel_.reset();

  // Two live runtimes in the directory: discovery refuses to guess (3).
  int fake = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  const std::string other = dir_ + "/gpusock-1.sock";  // pid 1 is alive
  std::snprintf(un.sun_path, sizeof un.sun_path, "%s", other.c_str());
  ASSERT_EQ(::bind(fake, reinterpret_cast<sockaddr*>(&un), sizeof un), 0);
  r = ctl("info");
  EXPECT_EQ(r.code, 3);
  ::close(fake);
  ::unlink(other.c_str());
  // None at all: 3.
  server_->stop();
  EXPECT_EQ(ctl("info").code, 3);
}

}  // namespace
