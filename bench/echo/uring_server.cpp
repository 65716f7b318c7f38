// echo-uring-server — the CPU baseline of bench/echo: the plain host io_uring echo server
// of bench/net (per thread: one ring, a SO_REUSEPORT listener, multishot accept, multishot
// recv into a provided-buffer ring, send), as a process the same load generator drives.
//
//   echo-uring-server --port P [--address A] [--threads N] [--size BYTES]
//
// Replies in units of --size bytes (the load's message size). Prints "listening on" when
// ready and its counters when SIGINT/SIGTERM stops it. Exit status 0, 1 when it could not
// start, 2 for a bad command line.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "net/baseline.hpp"

namespace {
volatile sig_atomic_t g_signal = 0;
void on_signal(int sig) { g_signal = sig; }
}  // namespace

int main(int argc, char** argv) {
  gpusock::bench::EchoServerOptions o;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    const char* v = argv[i + 1];
    if (a == "--port") o.port = static_cast<uint16_t>(std::atoi(v));
    else if (a == "--address") o.address = v;
    else if (a == "--threads") o.threads = std::atoi(v);
    else if (a == "--size") o.request_bytes = static_cast<size_t>(std::atol(v));
    else {
      std::fprintf(stderr, "usage: echo-uring-server --port P [--address A] [--threads N] [--size BYTES]\n");
      return 2;
    }
  }
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  std::string err;
  auto server = gpusock::bench::CpuEchoServer::start(o, &err);
  if (!server) {
    std::fprintf(stderr, "echo-uring-server: %s\n", err.c_str());
    return 1;
  }
  std::printf("echo-uring-server: listening on %s:%u (%d threads)\n", o.address.c_str(), server->port(), o.threads);
  std::fflush(stdout);
  while (g_signal == 0) pause();
  server->stop();
  auto s = server->stats();
  std::printf("echo-uring-server: summary: %llu connections, %llu replies, %llu bytes in, %llu out, %llu errors\n",
              static_cast<unsigned long long>(s.connections), static_cast<unsigned long long>(s.requests),
              static_cast<unsigned long long>(s.bytes_in), static_cast<unsigned long long>(s.bytes_out),
              static_cast<unsigned long long>(s.errors));
  return 0;
}
