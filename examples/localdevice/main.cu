// examples/localdevice — warps of one GPU talking through sockets that never leave it.
//
// Warp 0 serves `localdevice:42`: it polls its listener and every open connection in one
// poll() call, reads each request to its end, and answers it in upper case. Every other
// warp is a client: it connects, sends one line, shuts down its sending side, and reads
// the answer to its end. None of that makes a hostcall; the clients' write(1, ...) of
// what they got back is the only traffic to the host.
//
//   localdevice [--device cpu|cuda] [--clients N]
#include <cstdio>
#include <cstring>
#include <string>

#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/format.hpp"
#include "gpusock/hostcall/io.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/net/localdevice_host.hpp"
#include "gpusock/net/socket.hpp"

namespace {

constexpr uint32_t kPort = 42;
constexpr int kMaxOpen = 64;  // connections the server keeps open at once

struct Connection {
  int fd;
  int used;
  char text[128];
};

// Warp 0, lane 0: the server. Ends after answering `clients` requests.
GPUSOCK_HD void serve(int clients, int* served) {
  int l = gpusock::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
  gpusock::sockaddr_ld addr{AF_LOCALDEVICE, kPort};
  if (gpusock::bind(l, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 || gpusock::listen(l, 256) < 0) {
    *served = -gpusock::errno_value();
    return;
  }
  Connection open[kMaxOpen];
  int n = 0;
  pollfd fds[kMaxOpen + 1];
  while (*served < clients) {
    fds[0] = {l, static_cast<short>(n < kMaxOpen ? POLLIN : 0), 0};
    for (int i = 0; i < n; ++i) fds[1 + i] = {open[i].fd, POLLIN, 0};
    if (gpusock::poll(fds, 1 + n, 5000) <= 0) break;  // nothing for 5 s: give up
    for (int i = n - 1; i >= 0; --i) {
      if (fds[1 + i].revents == 0) continue;
      Connection& c = open[i];
      int64_t r = gpusock::recv(c.fd, c.text + c.used, sizeof c.text - 1 - c.used, MSG_DONTWAIT);
      if (r > 0) {
        c.used += static_cast<int>(r);
        continue;
      }
      if (r < 0 && gpusock::errno_value() == EAGAIN) continue;
      // End of the request (or an error): answer, close, forget.
      for (int k = 0; k < c.used; ++k) {
        if (c.text[k] >= 'a' && c.text[k] <= 'z') c.text[k] = static_cast<char>(c.text[k] - 'a' + 'A');
      }
      gpusock::send(c.fd, c.text, c.used, 0);
      gpusock::close(c.fd);
      open[i] = open[--n];
      ++*served;
    }
    if ((fds[0].revents & POLLIN) != 0) {
      int c = gpusock::accept(l, nullptr, nullptr);
      if (c >= 0) open[n++] = {c, 0, {}};
    }
  }
  gpusock::close(l);
}

// Lane 0 of every other warp: one request, one answer.
GPUSOCK_HD void ask(uint64_t warp) {
  int fd = gpusock::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
  gpusock::sockaddr_ld addr{AF_LOCALDEVICE, kPort};
  // The server is another warp and may not be listening yet.
  for (uint32_t i = 0; gpusock::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0; ++i) {
    if (gpusock::errno_value() != ECONNREFUSED) return;
    gpusock::backoff(i);
  }
  gpusock::Line<64> line;
  line.add("hello from warp ").add(warp);
  gpusock::send(fd, line.data(), line.size(), 0);
  gpusock::shutdown(fd, SHUT_WR);  // end of request: the server sees end of stream
  char answer[128];
  int64_t got = 0, r;
  while ((r = gpusock::recv(fd, answer + got, sizeof answer - 1 - got, 0)) > 0) got += r;
  gpusock::close(fd);
  gpusock::Line<160> out;
  out.add("warp ").add(warp).add(" got back: ").add(answer, static_cast<uint32_t>(got)).add('\n');
  gpusock::write(1, out.data(), out.size());
}

struct Demo {
  GPUSOCK_HD void operator()(int clients, int* served) const {
    if (gpusock::warp::lane_id() != 0) return;
    const uint64_t w = gpusock::global_warp_id();
    if (w == 0) {
      serve(clients, served);
    } else {
      ask(w);
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  gpusock::RuntimeOptions opts;
  int clients = 8;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--device" && i + 1 < argc) {
      opts.device = std::string(argv[++i]) == "cpu" ? gpusock::DeviceKind::kCpu : gpusock::DeviceKind::kCuda;
    } else if (a == "--clients" && i + 1 < argc) {
      clients = std::stoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--device cpu|cuda] [--clients N]\n", argv[0]);
      return 2;
    }
  }
  auto rt = gpusock::Runtime::create(opts);
  if (!rt.ok()) {
    std::fprintf(stderr, "runtime: %s\n", rt.status().to_string().c_str());
    return 1;
  }
  // The family's state lives in device memory; enable it before launching kernels.
  auto ld = gpusock::net::enable_localdevice(**rt);
  if (!ld.ok()) {
    std::fprintf(stderr, "localdevice: %s\n", ld.status().to_string().c_str());
    return 1;
  }
  auto served = gpusock::DeviceBuffer<int>::create(**rt, 1);
  if (!served.ok()) return 1;
  std::printf("device: %s; %d client warps call localdevice:%u\n", (*rt)->device_name().c_str(), clients, kPort);
  std::fflush(stdout);
  auto k = gpusock::launch(**rt, {static_cast<uint32_t>(clients + 1)}, {32}, Demo{}, clients, served->data());
  if (!k.ok() || !k->wait().ok()) {
    std::fprintf(stderr, "kernel failed\n");
    return 1;
  }
  const int n = served->to_host()[0];
  uint64_t writes = 0, other = 0;
  for (const auto& o : (*rt)->stats().by_opcode) (o.name == "write" ? writes : other) += o.lanes;
  std::printf("server answered %d of %d; hostcalls: %llu write(1) lanes, %llu others\n", n, clients,
              static_cast<unsigned long long>(writes), static_cast<unsigned long long>(other));
  return n == clients ? 0 : 1;
}
