// gpusock-rdma-peer: a CPU end of gpusock's RDMA stream protocol, for talking to kernels
// (and for tests and benchmarks). Prints one result line: "RESULT bytes=N hash=0x..."
// where hash is the order-sensitive stream hash sum(mix64(offset << 8 | byte)).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gpusock/rdma/peer.hpp"

namespace {

uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
uint8_t pattern_byte(uint64_t i) { return static_cast<uint8_t>((i * 2654435761u) >> 13); }

int usage() {
  std::fprintf(stderr,
               "usage: gpusock-rdma-peer connect|listen HOST PORT [options]\n"
               "  --send N        send N pattern bytes (byte i = (i * 2654435761) >> 13)\n"
               "  --recv N        receive N bytes (0: until the stream ends), hashing them\n"
               "  --echo          send back everything received, until the stream ends\n"
               "  --pingpong N S  N round trips of S bytes (connect side sends first); prints latency\n"
               "  --die-after N   with --send: exit abruptly (no close) after N bytes\n"
               "  --slow-us U     with --recv: sleep U microseconds after each receive\n"
               "  --connections C listen: serve C connections one after another (default 1)\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) return usage();
  const std::string mode = argv[1], host = argv[2];
  const auto port = static_cast<uint16_t>(std::atoi(argv[3]));
  uint64_t send_n = 0, recv_n = 0, die_after = 0, slow_us = 0, pp_n = 0, pp_s = 0;
  bool do_send = false, do_recv = false, echo = false;
  int connections = 1;
  for (int i = 4; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> uint64_t { return i + 1 < argc ? std::strtoull(argv[++i], nullptr, 0) : 0; };
    if (a == "--send") do_send = true, send_n = next();
    else if (a == "--recv") do_recv = true, recv_n = next();
    else if (a == "--echo") echo = true;
    else if (a == "--die-after") die_after = next();
    else if (a == "--slow-us") slow_us = next();
    else if (a == "--connections") connections = static_cast<int>(next());
    else if (a == "--pingpong") pp_n = next(), pp_s = next();
    else return usage();
  }
  auto peer = gpusock::rdma::Peer::create();
  if (!peer.ok()) {
    std::fprintf(stderr, "gpusock-rdma-peer: %s\n", peer.status().to_string().c_str());
    return 1;
  }
  gpusock::rdma::Peer& p = **peer;
  int listener = -1;
  if (mode == "listen") {
    uint16_t bound = 0;
    listener = p.listen(host, port, 128, &bound);
    if (listener < 0) {
      std::fprintf(stderr, "gpusock-rdma-peer: listen: %s\n", std::strerror(-listener));
      return 1;
    }
    std::printf("LISTENING port=%u\n", bound);
    std::fflush(stdout);
  } else if (mode != "connect") {
    return usage();
  }
  int rc = 0;
  for (int c = 0; c < connections; ++c) {
    const int fd = listener >= 0 ? p.accept(listener) : p.connect(host, port);
    if (fd < 0) {
      std::printf("ERROR op=%s errno=%d (%s)\n", listener >= 0 ? "accept" : "connect", -fd, std::strerror(-fd));
      return 1;
    }
    uint64_t bytes = 0, hash = 0;
    std::vector<uint8_t> buf(1 << 20);
    if (do_send) {
      const uint64_t limit = die_after ? die_after : send_n;
      for (uint64_t off = 0; off < limit;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), limit - off));
        for (size_t i = 0; i < n; ++i) {
          buf[i] = pattern_byte(off + i);
          hash += mix64(((off + i) << 8) | buf[i]);
        }
        const int64_t r = p.send(fd, buf.data(), n);
        if (r < 0) {
          std::printf("ERROR op=send errno=%d (%s)\n", static_cast<int>(-r), std::strerror(static_cast<int>(-r)));
          return 1;
        }
        off += static_cast<uint64_t>(r);
        bytes = off;
      }
      if (die_after) {
        std::printf("DYING bytes=%" PRIu64 "\n", bytes);
        std::fflush(stdout);
        _exit(3);  // no close, no FIN: the kernel tears the QP down
      }
    }
    if (do_recv || echo) {
      for (;;) {
        size_t want = buf.size();
        if (do_recv && recv_n) want = static_cast<size_t>(std::min<uint64_t>(want, recv_n - bytes));
        if (want == 0) break;
        const int64_t r = p.recv(fd, buf.data(), want);
        if (r < 0) {
          std::printf("ERROR op=recv errno=%d (%s) bytes=%" PRIu64 "\n", static_cast<int>(-r), std::strerror(static_cast<int>(-r)), bytes);
          rc = 1;
          break;
        }
        if (r == 0) break;
        for (int64_t i = 0; i < r; ++i) hash += mix64(((bytes + i) << 8) | buf[i]);
        if (echo && p.send(fd, buf.data(), static_cast<size_t>(r)) != r) {
          rc = 1;
          break;
        }
        bytes += static_cast<uint64_t>(r);
        if (slow_us) usleep(static_cast<useconds_t>(slow_us));
      }
    }
    if (pp_n) {
      std::vector<double> us;
      std::vector<uint8_t> msg(pp_s, 0x5a);
      for (uint64_t i = 0; i < pp_n; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        if (listener < 0 && p.send(fd, msg.data(), msg.size()) != static_cast<int64_t>(msg.size())) return 1;
        if (p.recv(fd, msg.data(), msg.size(), true) != static_cast<int64_t>(msg.size())) return 1;
        if (listener >= 0 && p.send(fd, msg.data(), msg.size()) != static_cast<int64_t>(msg.size())) return 1;
        us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(us.begin(), us.end());
      if (listener < 0) std::printf("PINGPONG n=%" PRIu64 " size=%" PRIu64 " p50_us=%.2f p99_us=%.2f\n", pp_n, pp_s, us[us.size() / 2], us[us.size() * 99 / 100]);
    }
    std::printf("RESULT bytes=%" PRIu64 " hash=0x%016" PRIx64 "\n", bytes, hash);
    std::fflush(stdout);
    p.close(fd);
  }
  p.drain(1000);
  return rc;
}
