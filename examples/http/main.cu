// examples/http — an HTTP/1.1 server that runs in a kernel (on the GPU, or on the cpu
// device where there is none). The kernel owns its sockets: it opens the listener,
// accepts, polls, parses requests and answers them; the host only loads the files, starts
// the kernel and tells it when to stop.
//
//   http_server --root www --port 8080
//   curl -v http://127.0.0.1:8080/ http://127.0.0.1:8080/healthz
//   curl --data-binary @file http://127.0.0.1:8080/sha256
//
// Routes: GET/HEAD of the files under --root (loaded into device memory at start; "/"
// is /index.html), GET/HEAD /healthz, POST /sha256 (the hex SHA-256 of the body). SIGINT
// or SIGTERM stops it cleanly and prints a summary.
#include <arpa/inet.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "files.hpp"
#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/iouring/backend.hpp"
#include "server.hpp"

namespace {

using gpusock::http::ServerConfig;

std::atomic<int> g_signal{0};
void on_signal(int sig) { g_signal.store(sig); }

struct Args {
  std::string address = "0.0.0.0";
  int port = 8080;
  std::string root;
  uint32_t grid = 0;   // 0: a default for the device
  uint32_t warps = 0;  // per block
  uint32_t conns_per_lane = 4;
  uint32_t max_connections = 1024;
  uint32_t max_header_bytes = 8192;
  uint64_t max_body_bytes = 1u << 20;
  uint32_t out_bytes = 16384;
  uint64_t request_timeout_ms = 10000;
  uint64_t keepalive_timeout_ms = 60000;
  int poll_timeout_ms = 50;
  uint32_t service_threads = 1;
  uint32_t backlog = 1024;
  gpusock::DeviceKind device = gpusock::DeviceKind::kAuto;
};

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [options]\n"
               "  --address A             address to listen on (default 0.0.0.0; IPv6 allowed)\n"
               "  --port N                port (default 8080; 0 picks a free one)\n"
               "  --root DIR              serve the files under DIR (loaded into device memory)\n"
               "  --grid N --warps N      blocks, and warps per block (default: cuda 8 x 4, cpu 1 x 2)\n"
               "  --conns-per-lane N      connection slots per lane, 1..32 (default 4)\n"
               "  --max-connections N     open connections; more are answered 503 (default 1024)\n"
               "  --max-header-bytes N    request line + fields (default 8192; over: 431)\n"
               "  --max-body-bytes N      request body (default 1048576; over: 413)\n"
               "  --request-timeout-ms N  time to receive a head, and longest stall of a body (default 10000; over: 408)\n"
               "  --keepalive-timeout-ms N  idle keep-alive connections close after this (default 60000)\n"
               "  --poll-timeout-ms N     longest wait of one poll, how soon a stop is seen (default 50)\n"
               "  --service-threads N     host service threads (default 1)\n"
               "  --device cpu|cuda       default: a GPU when there is one\n",
               argv0);
}

bool parse(int argc, char** argv, Args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (i + 1 >= argc) return false;
    const std::string v = argv[++i];
    try {
      if (k == "--address") a.address = v;
      else if (k == "--port") a.port = std::stoi(v);
      else if (k == "--root") a.root = v;
      else if (k == "--grid") a.grid = std::stoul(v);
      else if (k == "--warps") a.warps = std::stoul(v);
      else if (k == "--conns-per-lane") a.conns_per_lane = std::stoul(v);
      else if (k == "--max-connections") a.max_connections = std::stoul(v);
      else if (k == "--max-header-bytes") a.max_header_bytes = std::stoul(v);
      else if (k == "--max-body-bytes") a.max_body_bytes = std::stoull(v);
      else if (k == "--request-timeout-ms") a.request_timeout_ms = std::stoull(v);
      else if (k == "--keepalive-timeout-ms") a.keepalive_timeout_ms = std::stoull(v);
      else if (k == "--poll-timeout-ms") a.poll_timeout_ms = std::stoi(v);
      else if (k == "--service-threads") a.service_threads = std::stoul(v);
      else if (k == "--device") a.device = v == "cpu" ? gpusock::DeviceKind::kCpu : gpusock::DeviceKind::kCuda;
      else return false;
    } catch (const std::exception&) {
      return false;
    }
  }
  return a.port >= 0 && a.port < 65536 && a.conns_per_lane >= 1 &&
         a.conns_per_lane <= gpusock::http::kMaxConnsPerLane && a.max_header_bytes >= 256 && a.max_connections >= 1 &&
         a.poll_timeout_ms >= 1;
}

template <typename T>
T* device_copy(gpusock::Runtime& rt, const std::vector<T>& v) {
  auto p = rt.device_alloc(v.size() * sizeof(T));
  if (!p.ok()) return nullptr;
  if (!rt.copy_to_device(p.value(), v.data(), v.size() * sizeof(T)).ok()) return nullptr;
  rt.device_free_at_exit(p.value());
  return static_cast<T*>(p.value());
}

void* device_zeroed(gpusock::Runtime& rt, size_t bytes) {
  auto p = rt.device_alloc(bytes);
  if (!p.ok()) return nullptr;
  rt.device_free_at_exit(p.value());
  return p.value();
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (!parse(argc, argv, a)) {
    usage(argv[0]);
    return 2;
  }
  ServerConfig cfg{};
  // Address.
  if (a.address.find(':') != std::string::npos) {
    sockaddr_in6 s{};
    s.sin6_family = AF_INET6;
    s.sin6_port = htons(static_cast<uint16_t>(a.port));
    if (inet_pton(AF_INET6, a.address.c_str(), &s.sin6_addr) != 1) {
      std::fprintf(stderr, "--address %s: not an IPv4 or IPv6 address\n", a.address.c_str());
      return 2;
    }
    std::memcpy(cfg.addr, &s, sizeof s);
    cfg.addr_len = sizeof s;
  } else {
    sockaddr_in s{};
    s.sin_family = AF_INET;
    s.sin_port = htons(static_cast<uint16_t>(a.port));
    if (inet_pton(AF_INET, a.address.c_str(), &s.sin_addr) != 1) {
      std::fprintf(stderr, "--address %s: not an IPv4 or IPv6 address\n", a.address.c_str());
      return 2;
    }
    std::memcpy(cfg.addr, &s, sizeof s);
    cfg.addr_len = sizeof s;
  }
  // Files.
  gpusock::http::StaticFiles files;
  if (!a.root.empty()) {
    std::string err = gpusock::http::load_directory(a.root, {}, files);
    if (!err.empty()) {
      std::fprintf(stderr, "%s\n", err.c_str());
      return 1;
    }
  }
  // Runtime and socket backend.
  gpusock::RuntimeOptions opts;
  opts.device = a.device;
  opts.service_threads = a.service_threads;
  auto rt = gpusock::Runtime::create(opts);
  if (!rt.ok()) {
    std::fprintf(stderr, "runtime: %s\n", rt.status().to_string().c_str());
    return 1;
  }
  gpusock::Runtime& r = **rt;
  if (auto s = gpusock::iouring::enable(r); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.to_string().c_str());
    return 1;
  }
  const bool cuda = r.device() == gpusock::DeviceKind::kCuda;
  const uint32_t grid = a.grid ? a.grid : (cuda ? 8 : 1);
  const uint32_t warps_per_block = a.warps ? a.warps : (cuda ? 4 : 2);
  const uint64_t warps = uint64_t{grid} * warps_per_block;
  const uint64_t slots = warps * 32 * a.conns_per_lane;

  cfg.limits.max_header_bytes = a.max_header_bytes;
  cfg.limits.max_body_bytes = a.max_body_bytes;
  // Past the slots a connection could not be served anyway: refuse it with a 503.
  cfg.max_connections = static_cast<uint32_t>(std::min<uint64_t>(a.max_connections, slots));
  cfg.conns_per_lane = a.conns_per_lane;
  cfg.out_bytes = a.out_bytes < 4096 ? 4096 : a.out_bytes;
  cfg.backlog = a.backlog;
  cfg.request_timeout_ns = a.request_timeout_ms * 1000000ull;
  cfg.keepalive_timeout_ns = a.keepalive_timeout_ms * 1000000ull;
  cfg.poll_timeout_ms = a.poll_timeout_ms;
  if (!files.entries.empty()) {
    cfg.files.entries = device_copy(r, files.entries);
    cfg.files.count = static_cast<uint32_t>(files.entries.size());
    cfg.files.slots = device_copy(r, files.slots);
    cfg.files.slot_mask = static_cast<uint32_t>(files.slots.size() - 1);
    cfg.files.blob = device_copy(r, files.blob);
    if (!cfg.files.entries || !cfg.files.slots || !cfg.files.blob) {
      std::fprintf(stderr, "cannot copy %zu bytes of files to the device\n", files.blob.size());
      return 1;
    }
  }
  cfg.conns = static_cast<gpusock::http::Conn*>(device_zeroed(r, slots * sizeof(gpusock::http::Conn)));
  cfg.in = static_cast<uint8_t*>(device_zeroed(r, slots * cfg.limits.max_header_bytes));
  cfg.out = static_cast<uint8_t*>(device_zeroed(r, slots * cfg.out_bytes));
  cfg.polls = static_cast<pollfd*>(device_zeroed(r, warps * (1 + 32 * a.conns_per_lane) * sizeof(pollfd)));
  cfg.stats = static_cast<gpusock::http::LaneStats*>(device_zeroed(r, warps * 32 * sizeof(gpusock::http::LaneStats)));
  cfg.shared = static_cast<gpusock::http::Shared*>(device_zeroed(r, sizeof(gpusock::http::Shared)));
  auto ctl = r.mapped_alloc(sizeof(gpusock::http::Control));
  if (!cfg.conns || !cfg.in || !cfg.out || !cfg.polls || !cfg.stats || !cfg.shared || !ctl.ok()) {
    std::fprintf(stderr, "cannot allocate the server's device memory (%llu connection slots)\n",
                 static_cast<unsigned long long>(slots));
    return 1;
  }
  r.mapped_free_at_exit(ctl->host);
  auto* control = static_cast<gpusock::http::Control*>(ctl->host);
  cfg.control = static_cast<gpusock::http::Control*>(ctl->device);

  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  auto k = gpusock::launch(r, {grid}, {32 * warps_per_block}, gpusock::http::Server{}, cfg);
  if (!k.ok()) {
    std::fprintf(stderr, "launch: %s\n", k.status().to_string().c_str());
    return 1;
  }
  auto state = [&] { return std::atomic_ref<uint32_t>(control->state).load(std::memory_order_acquire); };
  while (state() == 0 && g_signal.load() == 0 && !k->wait_for(std::chrono::milliseconds(10))) {
  }
  if (state() != 1) {
    std::atomic_ref<uint32_t>(control->stop).store(1, std::memory_order_release);
    static const char* kSteps[] = {"", "socket", "setsockopt", "bind", "listen", "getsockname"};
    const uint32_t step = control->failed_step < 6 ? control->failed_step : 0;
    std::fprintf(stderr, "cannot listen on %s:%d: %s: %s\n", a.address.c_str(), a.port, kSteps[step],
                 std::strerror(control->error));
    k->wait_for(std::chrono::seconds(10));
    return 1;
  }
  const auto start = std::chrono::steady_clock::now();
  std::printf("listening on %s port %u (device %s: %s, %u x %u warps, %llu connection slots, %zu files, %zu bytes)\n",
              a.address.c_str(), control->port, gpusock::to_string(r.device()), r.device_name().c_str(), grid, warps_per_block,
              static_cast<unsigned long long>(slots), files.entries.size(), files.entries.empty() ? 0 : files.blob.size());
  std::fflush(stdout);

  bool ended = false;
  while (g_signal.load() == 0) {
    if (k->wait_for(std::chrono::milliseconds(50))) {
      ended = true;
      break;
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // Release, system scope: the kernel's lane 0s acquire it at the top of every turn.
  std::atomic_ref<uint32_t>(control->stop).store(1, std::memory_order_release);
  if (!ended && !k->wait_for(std::chrono::seconds(10))) {
    std::fprintf(stderr, "the kernel did not stop within 10 s (a send blocked on a peer that reads nothing?); "
                         "shutting the runtime down\n");
    r.shutdown();
    k->wait_for(std::chrono::seconds(10));
  }
  gpusock::Status ks = k->wait();
  std::vector<gpusock::http::LaneStats> st(warps * 32);
  r.copy_from_device(st.data(), cfg.stats, st.size() * sizeof st[0]);
  gpusock::http::LaneStats sum{};
  for (const auto& s : st) {
    sum.accepted += s.accepted;
    sum.rejected += s.rejected;
    sum.requests += s.requests;
    sum.bytes_in += s.bytes_in;
    sum.bytes_out += s.bytes_out;
    sum.status_2xx += s.status_2xx;
    sum.status_4xx += s.status_4xx;
    sum.status_5xx += s.status_5xx;
    sum.timeouts += s.timeouts;
  }
  std::printf(
      "summary: %s; %llu connections (%llu refused with 503), %llu requests (2xx %llu, 4xx %llu, 5xx %llu, "
      "timeouts %llu), %llu bytes in, %llu bytes out, %.1f s, %.1f req/s\n",
      ended ? "the kernel ended by itself" : "stopped by signal", static_cast<unsigned long long>(sum.accepted),
      static_cast<unsigned long long>(sum.rejected), static_cast<unsigned long long>(sum.requests),
      static_cast<unsigned long long>(sum.status_2xx), static_cast<unsigned long long>(sum.status_4xx),
      static_cast<unsigned long long>(sum.status_5xx), static_cast<unsigned long long>(sum.timeouts),
      static_cast<unsigned long long>(sum.bytes_in), static_cast<unsigned long long>(sum.bytes_out), secs,
      secs > 0 ? static_cast<double>(sum.requests) / secs : 0.0);
  if (!ks.ok()) std::fprintf(stderr, "kernel: %s\n", ks.to_string().c_str());
  return ks.ok() && !ended ? 0 : 1;
}
