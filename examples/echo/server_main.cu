// gpusock-echo — a TCP echo server whose every connection is served by a kernel.
//
//   gpusock-echo [--device cpu|cuda] [--port 7777] [--address 0.0.0.0] [--blocks N]
//                [--warps-per-block N] [--conns-per-warp N] [--buffer BYTES] [--duration S]
//                [--service-threads N] [--spin-passes N] [--poll device|host]
//                [--copy-help-max-conns N] [--copy-help-bytes B]
//
// --poll device polls the connections on the device, from the host's readiness words
// (docs 12.9a), instead of with a poll hostcall (the default, faster on the H100 so far).
// --copy-help-max-conns N: while a warp holds at most N connections, its idle lanes join
// the recv and send calls to help copy (default 4; 0: never), when a lane has at least
// --copy-help-bytes (512) to move.
// Runs until SIGINT or SIGTERM (or --duration seconds), then prints a summary:
// connections, bytes, receives and receives per second. Prints "listening on ..." once
// every warp has its listener. Exit status: 0 after a clean stop, 1 when the server could
// not start or a warp failed, 2 for a bad command line.
#include <arpa/inet.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "echo_server.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/backend.hpp"

namespace {

volatile sig_atomic_t g_signal = 0;
void on_signal(int sig) { g_signal = sig; }

int usage(const char* why) {
  std::fprintf(stderr,
               "gpusock-echo: %s\n"
               "usage: gpusock-echo [--device cpu|cuda] [--port P] [--address A] [--blocks N]\n"
               "                    [--warps-per-block N] [--conns-per-warp N] [--buffer BYTES] [--duration S]\n"
               "                    [--service-threads N] [--spin-passes N] [--poll device|host]\n"
               "                    [--copy-help-max-conns N] [--copy-help-bytes B]\n",
               why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using gpusock::examples::EchoConfig;
  EchoConfig cfg;
  std::string device;
  std::string address = "0.0.0.0";
  long blocks = -1, wpb = 1;
  double duration = 0;
  long service_threads = 1;
  bool cpw_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    if (a == "--help" || a == "-h") return usage("help"), 0;
    if ((v = value()) == nullptr) return usage(("missing value for " + a).c_str());
    char* end = nullptr;
    long n = std::strtol(v, &end, 10);
    bool num = end != v && *end == '\0';
    if (a == "--device") device = v;
    else if (a == "--address") address = v;
    else if (a == "--port" && num && n > 0 && n < 65536) cfg.port = static_cast<uint16_t>(n);
    else if (a == "--blocks" && num && n > 0) blocks = n;
    else if (a == "--warps-per-block" && num && n > 0 && n <= 32) wpb = n;
    else if (a == "--conns-per-warp" && num && n > 0 && n <= static_cast<long>(gpusock::examples::kMaxConnsPerWarp)) {
      cfg.conns_per_warp = static_cast<uint32_t>(n);
      cpw_given = true;
    }
    else if (a == "--buffer" && num && n >= 64 && n <= (1 << 20)) cfg.buffer_bytes = static_cast<uint32_t>(n);
    else if (a == "--duration") duration = std::atof(v);
    else if (a == "--spin-passes" && num && n >= 0 && n <= 1000000) cfg.spin_passes = static_cast<uint32_t>(n);
    else if (a == "--poll" && (std::strcmp(v, "device") == 0 || std::strcmp(v, "host") == 0)) cfg.device_poll = v[0] == 'd';
    else if (a == "--copy-help-bytes" && num && n >= 0) cfg.copy_help_bytes = static_cast<uint32_t>(n);
    else if (a == "--copy-help-max-conns" && num && n >= 0) cfg.copy_help_max_conns = static_cast<uint32_t>(n);
    else if (a == "--service-threads" && num && n > 0 && n <= 64) service_threads = n;
    else return usage(("bad option or value: " + a + " " + v).c_str());
  }
  in_addr ia{};
  if (inet_pton(AF_INET, address.c_str(), &ia) != 1) return usage("--address wants an IPv4 address");
  cfg.addr_be = ia.s_addr;

  gpusock::RuntimeOptions opts;
  if (device == "cpu") opts.device = gpusock::DeviceKind::kCpu;
  else if (device == "cuda") opts.device = gpusock::DeviceKind::kCuda;
  else if (!device.empty()) return usage("--device is cpu or cuda");
  opts.service_threads = static_cast<uint32_t>(service_threads);
  auto rt = gpusock::Runtime::create(opts);
  if (!rt.ok()) {
    std::fprintf(stderr, "gpusock-echo: %s\n", rt.status().to_string().c_str());
    return 1;
  }
  auto backend = gpusock::iouring::create_backend(**rt);
  if (!backend.ok()) {
    std::fprintf(stderr, "gpusock-echo: io_uring backend: %s\n", backend.status().to_string().c_str());
    return 1;
  }
  if (auto s = gpusock::net::attach(**rt, *backend); !s.ok()) {
    std::fprintf(stderr, "gpusock-echo: %s\n", s.to_string().c_str());
    return 1;
  }
  const bool gpu = (*rt)->device() == gpusock::DeviceKind::kCuda;
  // Defaults measured on an H100 (bench/RESULTS.md): 16 warps of 256 connection slots
  // served 64..256 connections better than one warp per SM; on the cpu device every lane
  // is a host thread, so two warps.
  if (blocks < 0) blocks = gpu ? 16 : 2;
  if (gpu && !cpw_given) cfg.conns_per_warp = 256;
  const uint32_t nwarps = static_cast<uint32_t>(blocks * wpb);
  auto state = gpusock::examples::EchoState::create(**rt, nwarps, cfg);
  if (!state.ok()) {
    std::fprintf(stderr, "gpusock-echo: %s\n", state.status().to_string().c_str());
    return 1;
  }

  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  auto k = gpusock::launch(**rt, {static_cast<uint32_t>(blocks)}, {static_cast<uint32_t>(32 * wpb)},
                           gpusock::examples::EchoServer{}, (*state)->view());
  if (!k.ok()) {
    std::fprintf(stderr, "gpusock-echo: launch: %s\n", k.status().to_string().c_str());
    return 1;
  }
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  bool announced = false;
  int status = 0;
  while (g_signal == 0 && (duration <= 0 || elapsed() < duration)) {
    if (!announced) {
      int l = (*state)->listening();
      if (l < 0) {
        std::fprintf(stderr, "gpusock-echo: a warp could not listen on %s:%u: %s\n", address.c_str(), cfg.port,
                     std::strerror(-l));
        status = 1;
        break;
      }
      if (l > 0) {
        std::printf("gpusock-echo: listening on %s:%u (%s, %u warps x %u connections, polling %s)\n", address.c_str(),
                    cfg.port, (*rt)->device_name().c_str(), nwarps, cfg.conns_per_warp,
                    (*state)->polls_on_device() ? "on the device" : "through the host");
        std::fflush(stdout);
        announced = true;
      }
    }
    if (k->wait_for(std::chrono::milliseconds(20))) break;  // the kernel ended by itself
  }
  const double secs = elapsed();
  (*state)->request_stop();
  if (!k->wait_for(std::chrono::seconds(10))) {
    std::fprintf(stderr, "gpusock-echo: the kernel did not stop within 10 s; shutting the runtime down\n");
    (*rt)->shutdown();
    status = 1;
  }
  if (auto s = k->wait(); !s.ok()) {
    std::fprintf(stderr, "gpusock-echo: kernel: %s\n", s.to_string().c_str());
    status = 1;
  }
  gpusock::examples::EchoCounters t;
  for (const auto& c : (*state)->counters()) {
    t.accepted += c.accepted;
    t.closed += c.closed;
    t.bytes_in += c.bytes_in;
    t.bytes_out += c.bytes_out;
    t.reads += c.reads;
    t.passes += c.passes;
    t.open += c.open;
    if (c.error != 0 && t.error == 0) t.error = c.error;
  }
  std::printf(
      "gpusock-echo: summary: %.2f s, connections %llu accepted / %llu closed by clients / %lld open at stop, "
      "bytes %llu in / %llu out, %llu receives (%.0f/s), %llu loop passes\n",
      secs, static_cast<unsigned long long>(t.accepted), static_cast<unsigned long long>(t.closed),
      static_cast<long long>(t.open), static_cast<unsigned long long>(t.bytes_in),
      static_cast<unsigned long long>(t.bytes_out), static_cast<unsigned long long>(t.reads),
      secs > 0 ? static_cast<double>(t.reads) / secs : 0.0, static_cast<unsigned long long>(t.passes));
  if (t.error != 0) {
    std::fprintf(stderr, "gpusock-echo: a warp failed: %s\n", std::strerror(static_cast<int>(-t.error)));
    status = 1;
  }
  return status;
}
