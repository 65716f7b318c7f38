// The control server: gpusock.control.v1.Control on gRPC's synchronous server. Every RPC
// runs on a gRPC thread; none runs on a hostcall service thread. What it reads:
//   - Runtime::stats(): relaxed loads of counters the service threads keep (no lock the
//     hot path takes), plus a diagnostic look at slot and staging occupancy;
//   - Backend::list_sockets(): the backend's table under the mutex its lookups take;
//   - LocalDevice::snapshot(): a copy of the localdevice table from device memory.
// Socket events reach it through net::SocketObserver on the thread where they happen; the
// EventHub queues them per watcher, and each WatchEvents call writes its queue out.
#include "gpusock/control/server.hpp"

#include <arpa/inet.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/auth_metadata_processor.h>
#include <netinet/in.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "gpusock/control/v1/control.grpc.pb.h"
#include "internal/common.hpp"

#ifndef GPUSOCK_VERSION
#define GPUSOCK_VERSION "unknown"
#endif

namespace gpusock::control {

namespace v1 = ::gpusock::control::v1;
using internal::family_name;
using internal::type_name;

namespace {

int64_t unix_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Log levels, lowest first.
int level_of(const std::string& s) {
  if (s == "error") return 0;
  if (s == "warn") return 1;
  if (s == "info") return 2;
  if (s == "debug") return 3;
  return -1;
}
const char* level_name(int l) {
  static const char* names[] = {"error", "warn", "info", "debug"};
  return l >= 0 && l <= 3 ? names[l] : "?";
}

// Compares without an early exit, so the time taken says nothing about where a guess
// went wrong (only whether its length was right).
bool equal_constant_time(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char d = 0;
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

// Whether "host:port" names a loopback address (127.0.0.0/8, ::1, localhost).
bool is_loopback_address(const std::string& hostport) {
  std::string host = hostport;
  if (!host.empty() && host.front() == '[') {
    host = host.substr(1, host.find(']') == std::string::npos ? std::string::npos : host.find(']') - 1);
  } else if (auto c = host.rfind(':'); c != std::string::npos) {
    host = host.substr(0, c);
  }
  if (host == "localhost") return true;
  in_addr a4{};
  if (::inet_pton(AF_INET, host.c_str(), &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  in6_addr a6{};
  if (::inet_pton(AF_INET6, host.c_str(), &a6) == 1) return IN6_IS_ADDR_LOOPBACK(&a6);
  return false;
}

// One WatchEvents call's queue.
struct Watcher {
  std::deque<v1::Event> queue;
  bool overflow = false;
};

}  // namespace

// Socket events from the backends and drain progress, numbered in the order they were
// published, fanned out to every watcher.
class EventHub : public net::SocketObserver {
 public:
  explicit EventHub(uint32_t cap) : cap_(cap) {}

  void on_socket_event(const net::SocketEvent& e) override {
    // A service thread: return at once when nobody watches.
    if (watchers_.load(std::memory_order_acquire) == 0) return;
    v1::Event ev;
    auto* s = ev.mutable_socket();
    s->set_what(net::to_string(e.kind));
    s->set_fd(e.fd);
    s->set_family(family_name(e.family));
    s->set_type(type_name(e.type));
    s->set_error(e.error);
    s->set_backend(e.backend);
    publish(std::move(ev));
  }

  void publish(v1::Event ev) {
    std::lock_guard<std::mutex> lock(mu_);
    ev.set_seq(++seq_);
    ev.set_unix_ns(unix_now_ns());
    for (Watcher* w : list_) {
      if (w->queue.size() >= cap_) {
        w->overflow = true;
      } else {
        w->queue.push_back(ev);
      }
    }
    cv_.notify_all();
  }

  void add(Watcher* w) {
    std::lock_guard<std::mutex> lock(mu_);
    list_.push_back(w);
    watchers_.fetch_add(1, std::memory_order_release);
  }
  void remove(Watcher* w) {
    std::lock_guard<std::mutex> lock(mu_);
    list_.erase(std::remove(list_.begin(), list_.end(), w), list_.end());
    watchers_.fetch_sub(1, std::memory_order_release);
  }
  // Waits up to `max` for events for `w` (or stop); moves them to `out`.
  void wait(Watcher* w, std::chrono::milliseconds max, std::vector<v1::Event>& out, bool& overflow) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, max, [&] { return !w->queue.empty() || w->overflow || stopping_; });
    while (!w->queue.empty()) {
      out.push_back(std::move(w->queue.front()));
      w->queue.pop_front();
    }
    overflow = w->overflow;
  }
  void stop() {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    cv_.notify_all();
  }
  bool stopping() {
    std::lock_guard<std::mutex> lock(mu_);
    return stopping_;
  }

 private:
  const size_t cap_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Watcher*> list_;
  std::atomic<int> watchers_{0};
  uint64_t seq_ = 0;
  bool stopping_ = false;
};

namespace {

// Refuses TCP calls without the token, before any service (reflection included) sees
// them. Installed on the TCP port's credentials only; the unix socket is guarded by its
// file mode.
class TokenProcessor : public grpc::AuthMetadataProcessor {
 public:
  explicit TokenProcessor(std::string token) : token_(std::move(token)) {}
  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata& md, grpc::AuthContext*, OutputMetadata*, OutputMetadata*) override {
    auto it = md.find("authorization");
    if (it == md.end()) return {grpc::StatusCode::UNAUTHENTICATED, "missing bearer token (authorization metadata)"};
    std::string v(it->second.data(), it->second.size());
    if (!equal_constant_time(v, "Bearer " + token_)) return {grpc::StatusCode::UNAUTHENTICATED, "bad bearer token"};
    return grpc::Status::OK;
  }

 private:
  std::string token_;
};

}  // namespace

struct ControlServer::Impl final : public v1::Control::Service {
  Runtime& rt;
  Sources src;
  ServerOptions opt;
  std::shared_ptr<EventHub> hub;
  std::unique_ptr<grpc::Server> server;
  std::string unix_path;
  int tcp_port = 0;
  int64_t started_ns = unix_now_ns();
  std::atomic<int> log_level{1};
  std::atomic<bool> stopping{false};
  std::atomic<bool> draining{false};
  std::once_flag stop_once;

  Impl(Runtime& r, Sources s, ServerOptions o)
      : rt(r), src(std::move(s)), opt(std::move(o)), hub(std::make_shared<EventHub>(opt.watch_queue)) {}

  void log(int level, const std::string& msg) {
    if (level <= log_level.load(std::memory_order_relaxed)) {
      std::fprintf(stderr, "gpusock-control [%s] %s\n", level_name(level), msg.c_str());
    }
  }

  // Every call over TCP carries the token (the TCP credentials' processor checked it
  // already where gRPC runs one; checked here again so no configuration serves without).
  grpc::Status authorize(grpc::ServerContext* ctx) {
    const std::string peer = ctx->peer();
    if (peer.rfind("unix:", 0) == 0) return grpc::Status::OK;
    auto md = ctx->client_metadata();
    auto it = md.find("authorization");
    if (opt.token.empty() || it == md.end() ||
        !equal_constant_time(std::string(it->second.data(), it->second.size()), "Bearer " + opt.token)) {
      log(1, "refused a call from " + peer + ": no valid bearer token");
      return {grpc::StatusCode::UNAUTHENTICATED, "a bearer token is required over TCP"};
    }
    return grpc::Status::OK;
  }

  std::vector<net::SocketInfo> all_sockets() {
    std::vector<net::SocketInfo> all;
    for (auto& b : src.backends) {
      auto v = b->list_sockets();
      all.insert(all.end(), std::make_move_iterator(v.begin()), std::make_move_iterator(v.end()));
    }
    std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.fd < b.fd; });
    return all;
  }

  static void fill(v1::SocketInfo* o, const net::SocketInfo& i) {
    o->set_fd(i.fd);
    o->set_family(family_name(i.family));
    o->set_type(type_name(i.type));
    o->set_local(i.local_len ? net::address_to_string(reinterpret_cast<const sockaddr*>(&i.local), i.local_len) : "");
    o->set_peer(i.peer_len ? net::address_to_string(reinterpret_cast<const sockaddr*>(&i.peer), i.peer_len) : "");
    o->set_state(i.state);
    o->set_bytes_in(i.bytes_in);
    o->set_bytes_out(i.bytes_out);
    o->set_backend(i.backend);
  }

  // ---- RPCs ----
  grpc::Status GetInfo(grpc::ServerContext* ctx, const v1::GetInfoRequest*, v1::Info* out) override {
    if (auto s = authorize(ctx); !s.ok()) return s;
    out->set_version(GPUSOCK_VERSION);
    out->set_device(to_string(rt.device()));
    out->set_device_name(rt.device_name());
    for (auto& b : src.backends) {
      auto* o = out->add_backends();
      o->set_name(b->name());
      o->set_description(b->describe());
    }
    auto& cfg = *out->mutable_config();
    cfg["service_threads"] = std::to_string(rt.service_threads());
    cfg["slots"] = std::to_string(rt.slot_count());
    cfg["max_resident_warps"] = std::to_string(rt.max_resident_warps());
    cfg["staging_bytes"] = std::to_string(rt.staging_size());
    if (src.localdevice) {
      cfg["localdevice.max_sockets"] = std::to_string(src.localdevice->options().max_sockets);
      cfg["localdevice.ring_bytes"] = std::to_string(src.localdevice->options().ring_bytes);
    }
    for (const auto& [k, v] : src.config) cfg[k] = v;
    out->set_pid(::getpid());
    out->set_started_unix_ns(started_ns);
    out->set_localdevice(src.localdevice != nullptr);
    return grpc::Status::OK;
  }

  grpc::Status GetStats(grpc::ServerContext* ctx, const v1::GetStatsRequest*, v1::Stats* out) override {
    if (auto s = authorize(ctx); !s.ok()) return s;
    RuntimeStats st = rt.stats();
    for (const auto& o : st.by_opcode) {
      auto* p = out->add_opcodes();
      p->set_opcode(o.opcode);
      p->set_name(o.name);
      p->set_calls(o.calls);
      p->set_lanes(o.lanes);
      p->set_errors(o.errors);
      p->set_latency_p50_ns(o.latency.quantile_ns(0.50));
      p->set_latency_p90_ns(o.latency.quantile_ns(0.90));
      p->set_latency_p99_ns(o.latency.quantile_ns(0.99));
      p->set_latency_max_ns(o.latency.quantile_ns(1.0));
      p->set_latency_sum_ns(o.latency.sum_ns);
      uint32_t last = 0;
      for (uint32_t b = 0; b < LatencyHistogram::kBuckets; ++b) {
        if (o.latency.buckets[b] != 0) last = b + 1;
      }
      for (uint32_t b = 0; b < last; ++b) p->add_latency_buckets(o.latency.buckets[b]);
    }
    out->set_calls(st.calls);
    out->set_lanes(st.lanes);
    out->set_errors(st.errors);
    out->set_rejected(st.rejected);
    out->set_handler_exceptions(st.handler_exceptions);
    out->set_foreign_lanes(st.foreign_lanes);
    out->set_stale_headers(st.stale_headers);
    out->set_doorbells(st.doorbells);
    out->set_swept(st.swept);
    out->set_parks(st.parks);
    out->set_slots(st.slots);
    out->set_slots_owned(st.slots_owned);
    out->set_calls_in_flight(st.calls_in_flight);
    out->set_staging_bytes(uint64_t{st.staging_pages} * hostcall::kStagingPageBytes);
    out->set_staging_bytes_used(uint64_t{st.staging_pages_used} * hostcall::kStagingPageBytes);
    out->set_deliveries(st.deliveries);
    out->set_delivered_bytes(st.delivered_bytes);
    out->set_fetches(st.fetches);
    out->set_fetched_bytes(st.fetched_bytes);
    std::map<std::tuple<std::string, std::string, std::string>, uint32_t> counts;
    uint64_t in = 0, outb = 0;
    for (const auto& i : all_sockets()) {
      counts[{family_name(i.family), type_name(i.type), i.state}]++;
      in += i.bytes_in;
      outb += i.bytes_out;
    }
    if (src.localdevice) {
      auto snap = src.localdevice->snapshot();
      if (snap.ok()) {
        for (const auto& l : snap->sockets) counts[{"localdevice", type_name(l.type), l.state}]++;
        out->set_localdevice_listeners(snap->listeners);
        out->set_localdevice_connected(snap->connected);
        out->set_localdevice_queued_bytes(snap->queued_bytes);
      }
    }
    for (const auto& [k, n] : counts) {
      auto* c = out->add_sockets();
      c->set_family(std::get<0>(k));
      c->set_type(std::get<1>(k));
      c->set_state(std::get<2>(k));
      c->set_count(n);
    }
    out->set_bytes_in(in);
    out->set_bytes_out(outb);
    out->set_draining(draining.load(std::memory_order_relaxed));
    return grpc::Status::OK;
  }

  grpc::Status ListSockets(grpc::ServerContext* ctx, const v1::ListSocketsRequest* req, v1::ListSocketsResponse* out) override {
    if (auto s = authorize(ctx); !s.ok()) return s;
    if (!req->family().empty() && req->family() != "inet" && req->family() != "inet6") {
      return {grpc::StatusCode::INVALID_ARGUMENT, "family must be inet or inet6"};
    }
    if (!req->state().empty() && req->state() != "open" && req->state() != "listening" &&
        req->state() != "connected" && req->state() != "aborted") {
      return {grpc::StatusCode::INVALID_ARGUMENT, "state must be open, listening, connected or aborted"};
    }
    // The page token is the last descriptor of the previous page: stable while sockets
    // come and go between pages (a socket opened behind the cursor is not shown).
    long after = -1;
    if (!req->page_token().empty()) {
      char* end = nullptr;
      after = std::strtol(req->page_token().c_str(), &end, 10);
      if (end == nullptr || *end != '\0' || after < 0) return {grpc::StatusCode::INVALID_ARGUMENT, "bad page_token"};
    }
    const uint32_t size = req->page_size() == 0 ? 100 : std::min<uint32_t>(req->page_size(), 1000);
    uint32_t total = 0;
    for (const auto& i : all_sockets()) {
      if (!req->family().empty() && req->family() != family_name(i.family)) continue;
      if (!req->state().empty() && req->state() != i.state) continue;
      ++total;
      if (i.fd <= after) continue;
      if (static_cast<uint32_t>(out->sockets_size()) == size) {
        out->set_next_page_token(std::to_string(out->sockets(out->sockets_size() - 1).fd()));
        continue;
      }
      fill(out->add_sockets(), i);
    }
    out->set_total(total);
    return grpc::Status::OK;
  }

  grpc::Status ListLocalDevice(grpc::ServerContext* ctx, const v1::ListLocalDeviceRequest*, v1::LocalDeviceState* out) override {
    if (auto s = authorize(ctx); !s.ok()) return s;
    if (!src.localdevice) {
      out->set_enabled(false);
      return grpc::Status::OK;
    }
    auto snap = src.localdevice->snapshot();
    if (!snap.ok()) return {grpc::StatusCode::INTERNAL, snap.status().to_string()};
    out->set_enabled(true);
    out->set_max_sockets(snap->max_sockets);
    out->set_ring_bytes(snap->ring_bytes);
    out->set_listeners(snap->listeners);
    out->set_connected(snap->connected);
    out->set_queued_bytes(snap->queued_bytes);
    for (const auto& l : snap->sockets) {
      auto* o = out->add_sockets();
      o->set_fd(l.fd);
      o->set_type(type_name(l.type));
      o->set_state(l.state);
      o->set_closed(l.closed);
      o->set_port(l.port);
      o->set_peer_port(l.peer_port);
      o->set_queued(l.queued);
      o->set_backlog(l.backlog);
      o->set_bytes_in(l.bytes_in);
      o->set_bytes_out(l.bytes_out);
      o->set_bytes_direct(l.bytes_direct);
    }
    return grpc::Status::OK;
  }

  grpc::Status CloseSocket(grpc::ServerContext* ctx, const v1::CloseSocketRequest* req, v1::CloseSocketResponse* out) override {
    if (auto s = authorize(ctx); !s.ok()) return s;
    if (req->fd() >= net::kDeviceFdFirst) {
      return {grpc::StatusCode::UNIMPLEMENTED, "localdevice sockets live in device memory and cannot be aborted from the host"};
    }
    bool unsupported = false;
    for (auto& b : src.backends) {
      int r = b->abort_socket(req->fd());
      if (r == 0) {
        out->set_backend(b->name());
        log(2, "aborted socket " + std::to_string(req->fd()) + " (" + b->name() + ")");
        return grpc::Status::OK;
      }
      unsupported |= r == -ENOTSUP;
    }
    if (unsupported && src.backends.size() == 1) {
      return {grpc::StatusCode::UNIMPLEMENTED, "the backend cannot abort sockets"};
    }
    return {grpc::StatusCode::NOT_FOUND, "no socket with descriptor " + std::to_string(req->fd())};
  }

  static uint32_t connections(const std::vector<net::SocketInfo>& v) {
    uint32_t n = 0;
    for (const auto& i : v) n += !i.listener;
    return n;
  }

  uint32_t local_connections() {
    if (!src.localdevice) return 0;
    auto snap = src.localdevice->snapshot();
    return snap.ok() ? snap->connected : 0;
  }

  void progress(const char* phase, uint32_t left, uint32_t stopped) {
    v1::Event ev;
    auto* d = ev.mutable_drain();
    d->set_phase(phase);
    d->set_connections_left(left);
    d->set_listeners_stopped(stopped);
    hub->publish(std::move(ev));
  }

  grpc::Status Drain(grpc::ServerContext* ctx, const v1::DrainRequest* req, v1::DrainResponse* out) override {
    if (auto s = authorize(ctx); !s.ok()) return s;
    const auto t0 = std::chrono::steady_clock::now();
    draining.store(true, std::memory_order_relaxed);
    uint32_t stopped = 0;
    for (auto& b : src.backends) {
      int r = b->stop_accepting();
      if (r > 0) stopped += static_cast<uint32_t>(r);
    }
    log(2, "drain: " + std::to_string(stopped) + " listeners stopped, waiting up to " +
               std::to_string(req->deadline_ms()) + " ms");
    auto socks = all_sockets();
    uint32_t left = connections(socks);
    progress("started", left, stopped);
    const auto deadline = t0 + std::chrono::milliseconds(req->deadline_ms());
    uint32_t reported = left;
    while (left > 0 && std::chrono::steady_clock::now() < deadline && !ctx->IsCancelled() &&
           !stopping.load(std::memory_order_relaxed)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      socks = all_sockets();
      left = connections(socks);
      if (left != reported) {
        progress("waiting", left, stopped);
        reported = left;
      }
    }
    out->set_listeners_stopped(stopped);
    out->set_drained(left == 0);
    for (const auto& i : socks) {
      if (!i.listener) fill(out->add_left(), i);
    }
    out->set_localdevice_left(local_connections());
    out->set_waited_ms(static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count()));
    progress("done", left, stopped);
    return grpc::Status::OK;
  }

  grpc::Status SetLogLevel(grpc::ServerContext* ctx, const v1::SetLogLevelRequest* req, v1::SetLogLevelResponse* out) override {
    if (auto s = authorize(ctx); !s.ok()) return s;
    int l = level_of(req->level());
    if (l < 0) return {grpc::StatusCode::INVALID_ARGUMENT, "level must be error, warn, info or debug"};
    out->set_previous(level_name(log_level.exchange(l)));
    log(2, std::string("log level set to ") + level_name(l));
    return grpc::Status::OK;
  }

  grpc::Status WatchEvents(grpc::ServerContext* ctx, const v1::WatchEventsRequest*, grpc::ServerWriter<v1::Event>* w) override {
    if (auto s = authorize(ctx); !s.ok()) return s;
    Watcher me;
    hub->add(&me);
    // The headers go out once the watcher is registered: a client that waits for them
    // knows that every event from then on reaches it.
    w->SendInitialMetadata();
    grpc::Status result = grpc::Status::OK;
    std::vector<v1::Event> batch;
    while (!ctx->IsCancelled() && !stopping.load(std::memory_order_relaxed)) {
      bool overflow = false;
      batch.clear();
      hub->wait(&me, std::chrono::milliseconds(100), batch, overflow);
      bool broken = false;
      for (auto& ev : batch) {
        if (!w->Write(ev)) {
          broken = true;
          break;
        }
      }
      if (broken) break;
      if (overflow) {
        result = {grpc::StatusCode::RESOURCE_EXHAUSTED, "the client fell behind; events were dropped"};
        break;
      }
    }
    hub->remove(&me);
    return result;
  }

  void stop() {
    std::call_once(stop_once, [this] {
      stopping.store(true, std::memory_order_relaxed);
      hub->stop();
      for (auto& b : src.backends) b->set_observer(nullptr);
      if (server) {
        server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
        server->Wait();
      }
      if (!unix_path.empty()) ::unlink(unix_path.c_str());
    });
  }
};

std::string default_unix_path(long pid) {
  const char* dir = std::getenv("XDG_RUNTIME_DIR");
  std::string d = dir != nullptr && dir[0] != '\0' ? dir : "/tmp";
  return d + "/gpusock-" + std::to_string(pid) + ".sock";
}

Result<std::unique_ptr<ControlServer>> ControlServer::start(Runtime& rt, Sources sources, ServerOptions options) {
  if (!options.unix_socket && options.tcp_address.empty()) return Status(EINVAL, "control: no unix socket and no TCP address");
  if (!options.tcp_address.empty()) {
    if (options.token.empty()) return Status(EINVAL, "control: a TCP listener needs a bearer token");
    if (!is_loopback_address(options.tcp_address) && !options.allow_non_loopback) {
      return Status(EINVAL, "control: " + options.tcp_address + " is not a loopback address (set allow_non_loopback)");
    }
  }
  if (level_of(options.log_level) < 0) return Status(EINVAL, "control: log_level must be error, warn, info or debug");
  if (options.watch_queue == 0) return Status(EINVAL, "control: watch_queue must be at least 1");
  for (auto& b : sources.backends) {
    if (b == nullptr) return Status(EINVAL, "control: null backend");
  }
  auto impl = std::make_unique<Impl>(rt, std::move(sources), options);
  impl->log_level.store(level_of(options.log_level));

  static std::once_flag reflection_once;
  std::call_once(reflection_once, [] { grpc::reflection::InitProtoReflectionServerBuilderPlugin(); });
  grpc::ServerBuilder builder;
  // The unix socket is bound in a private directory (mode 0700), given mode 0600, then
  // renamed into place: nobody else can connect in between.
  std::string tmpdir, tmp_sock;
  if (options.unix_socket) {
    impl->unix_path = options.unix_path.empty() ? default_unix_path(::getpid()) : options.unix_path;
    if (impl->unix_path.size() > 107) return Status(ENAMETOOLONG, "control: unix socket path too long: " + impl->unix_path);
    std::string dir = impl->unix_path.substr(0, impl->unix_path.rfind('/') + 1);
    std::string tmpl = (dir.empty() ? std::string("./") : dir) + ".gpusock-ctl-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr) return Status(errno, "control: mkdtemp in " + dir + ": " + std::strerror(errno));
    tmpdir = buf.data();
    tmp_sock = tmpdir + "/s";
    if (tmp_sock.size() > 107) {
      ::rmdir(tmpdir.c_str());
      return Status(ENAMETOOLONG, "control: unix socket directory path too long: " + tmpdir);
    }
    builder.AddListeningPort("unix:" + tmp_sock, grpc::InsecureServerCredentials());
  }
  int port = 0;
  if (!options.tcp_address.empty()) {
    std::shared_ptr<grpc::ServerCredentials> creds;
    if (is_loopback_address(options.tcp_address)) {
      // Local credentials accept loopback peers only and run the token processor on every
      // call, reflection included.
      creds = grpc::experimental::LocalServerCredentials(LOCAL_TCP);
      creds->SetAuthMetadataProcessor(std::make_shared<TokenProcessor>(options.token));
    } else {
      creds = grpc::InsecureServerCredentials();  // each Control RPC checks the token itself
    }
    builder.AddListeningPort(options.tcp_address, creds, &port);
  }
  builder.RegisterService(impl.get());
  impl->server = builder.BuildAndStart();
  auto cleanup_tmp = [&] {
    if (!tmp_sock.empty()) ::unlink(tmp_sock.c_str());
    if (!tmpdir.empty()) ::rmdir(tmpdir.c_str());
  };
  if (!impl->server) {
    cleanup_tmp();
    impl->unix_path.clear();
    return Status(EADDRINUSE, "control: gRPC could not listen on " +
                                  (options.unix_socket ? "unix:" + tmp_sock + " " : std::string()) + options.tcp_address);
  }
  if (!options.tcp_address.empty() && port == 0) {
    impl->server->Shutdown();
    cleanup_tmp();
    impl->unix_path.clear();
    return Status(EADDRINUSE, "control: could not listen on " + options.tcp_address);
  }
  impl->tcp_port = port;
  if (options.unix_socket) {
    if (::chmod(tmp_sock.c_str(), 0600) != 0 || ::rename(tmp_sock.c_str(), impl->unix_path.c_str()) != 0) {
      int e = errno;
      impl->server->Shutdown();
      cleanup_tmp();
      impl->unix_path.clear();
      return Status(e, std::string("control: cannot place the unix socket: ") + std::strerror(e));
    }
    ::rmdir(tmpdir.c_str());
  }
  for (auto& b : impl->src.backends) b->set_observer(impl->hub);
  impl->log(2, "serving on " + (impl->unix_path.empty() ? std::string() : "unix:" + impl->unix_path + " ") +
                   (port ? "tcp port " + std::to_string(port) : std::string()));
  return std::unique_ptr<ControlServer>(new ControlServer(std::move(impl)));
}

ControlServer::ControlServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ControlServer::~ControlServer() { stop(); }
void ControlServer::stop() { impl_->stop(); }
std::string ControlServer::unix_path() const { return impl_->unix_path; }
int ControlServer::tcp_port() const { return impl_->tcp_port; }
std::string ControlServer::endpoint() const {
  if (!impl_->unix_path.empty()) return "unix:" + impl_->unix_path;
  std::string host = impl_->opt.tcp_address.substr(0, impl_->opt.tcp_address.rfind(':'));
  return host + ":" + std::to_string(impl_->tcp_port);
}

}  // namespace gpusock::control
