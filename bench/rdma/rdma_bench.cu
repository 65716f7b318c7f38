// bench/rdma: gpusock sockets over RDMA beside perftest on the same device, in one run.
//   round trip: a kernel echo server, the host peer (gpusock::rdma::Peer) pinging 64 B;
//               baseline ib_send_lat (its t_typical is half a round trip, so it is doubled)
//   bandwidth:  a kernel streaming with warp_send to the host peer, 64 KiB messages on the
//               wire; baseline ib_send_bw -s 65536. The sending group is the whole warp on
//               a GPU and one lane on the cpu device (--lanes N sets it): there every lane
//               is a thread, and a 32-thread warp's collective copy on the VM's two vCPUs
//               measures thread hand-offs, not the transport (bench/RESULTS.md has both)
// Needs an RDMA device and perftest; scripts/rdma-vm.sh runs it against soft-RoCE:
//   scripts/rdma-vm.sh --bin build/cpu/bench/rdma/rdma_bench
//     --run 'bench=rdma_bench --json /out/rdma-bench.json' --out bench/rdma
// Extra arguments: --addr A (default $GPUSOCK_RDMA_ADDR or 10.77.0.1), --ibdev NAME (rxe0),
// --gid N (1: rxe's IPv4-mapped RoCE v2 entry), --lanes N (1..32: the sending group).
#include <arpa/inet.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/bench_util.hpp"
#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/net/socket.hpp"
#include "gpusock/rdma/backend.hpp"
#include "gpusock/rdma/peer.hpp"

namespace {

namespace raw = gpusock::raw;
using Clock = std::chrono::steady_clock;

GPUSOCK_HD inline sockaddr_in addr4(uint32_t ip, uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = gpusock::htons(port);
  a.sin_addr.s_addr = gpusock::htonl(ip);
  return a;
}

GPUSOCK_HD inline void publish(uint32_t* box, uint32_t v) {
  gpusock::AtomicRef<uint32_t, gpusock::Scope::kSystem>(box[0]).store(v, gpusock::Order::kRelease);
}

// Lane 0: listen on ip:0 (port to box[0]), accept one, echo `size`-byte messages until EOF.
struct EchoServer {
  GPUSOCK_HD void operator()(uint32_t* box, uint32_t ip, uint32_t size, uint8_t* buf) const {
    if (gpusock::warp::lane_id() != 0) return;
    int lfd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = addr4(ip, 0);
    int r = lfd < 0 ? lfd : raw::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    if (r == 0) r = raw::listen(lfd, 4);
    socklen_t len = sizeof a;
    if (r == 0) r = raw::getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len);
    publish(box, r < 0 ? 0xffffffffu : gpusock::ntohs(a.sin_port));
    int c = r < 0 ? r : raw::accept(lfd, nullptr, nullptr);
    if (c >= 0) {
      while (raw::recv(c, buf, size, MSG_WAITALL) == static_cast<int64_t>(size)) {
        if (raw::send(c, buf, size, 0) != static_cast<int64_t>(size)) break;
      }
      raw::close(c);
    }
    if (lfd >= 0) raw::close(lfd);
  }
};

// The lanes of `mask` (the block): connect to ip:port, send `total` bytes from `chunk`
// with warp_send.
struct Streamer {
  GPUSOCK_HD void operator()(uint32_t ip, uint16_t port, uint64_t total, uint8_t* chunk, uint32_t chunk_bytes,
                             int64_t* out, uint32_t mask) const {
    const uint32_t lane = gpusock::warp::lane_id();
    int fd = -1;
    if (lane == 0) {
      fd = raw::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a = addr4(ip, port);
      int r = fd < 0 ? fd : raw::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
      if (r < 0) fd = r;
    }
    fd = gpusock::warp::shfl(mask, fd, 0);
    if (fd < 0) {
      if (lane == 0) out[0] = fd;
      return;
    }
    uint64_t off = 0;
    while (off < total) {
      const uint32_t n = static_cast<uint32_t>(total - off < chunk_bytes ? total - off : chunk_bytes);
      if (raw::warp_send(mask, fd, chunk, n, 0) != static_cast<int64_t>(n)) break;
      off += n;
    }
    if (lane == 0) {
      raw::close(fd);
      out[0] = static_cast<int64_t>(off);
    }
  }
};

// Runs a perftest pair (server in the background, client to addr) and returns the
// client's output, "" when it failed.
std::string perftest(const std::string& tool, const std::string& args, const std::string& addr) {
  const std::string server = tool + " " + args + " >/tmp/perftest-server.txt 2>&1 &";
  if (std::system(server.c_str()) != 0) return "";
  std::this_thread::sleep_for(std::chrono::seconds(1));
  FILE* p = popen((tool + " " + args + " " + addr + " 2>&1").c_str(), "r");
  if (p == nullptr) return "";
  std::string out;
  char line[512];
  while (std::fgets(line, sizeof line, p)) out += line;
  const int rc = pclose(p);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  return rc == 0 ? out : "";
}

// The numbers of the result row that starts with `bytes` (perftest prints one).
std::vector<double> perftest_row(const std::string& out, uint32_t bytes) {
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream l(line);
    double first = 0;
    if (!(l >> first) || first != bytes) continue;
    std::vector<double> v{first};
    double x;
    while (l >> x) v.push_back(x);
    if (v.size() >= 4) return v;
  }
  return {};
}

}  // namespace

int main(int argc, char** argv) {
  std::string addr = std::getenv("GPUSOCK_RDMA_ADDR") ? std::getenv("GPUSOCK_RDMA_ADDR") : "10.77.0.1";
  std::string ibdev = "rxe0", gid = "1";
  uint32_t lanes = 0;  // 0: 32 on a GPU, 1 on the cpu device
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--addr" && i + 1 < argc) addr = argv[++i];
    else if (a == "--ibdev" && i + 1 < argc) ibdev = argv[++i];
    else if (a == "--gid" && i + 1 < argc) gid = argv[++i];
    else if (a == "--lanes" && i + 1 < argc) lanes = static_cast<uint32_t>(std::atoi(argv[++i]));
    else rest.push_back(argv[i]);
  }
  gpusock::bench::BenchArgs args;
  if (!gpusock::bench::parse_bench_args(static_cast<int>(rest.size()), rest.data(), &args)) return 2;
  if (!gpusock::rdma::device_present()) {
    std::fprintf(stderr, "rdma_bench: no RDMA device (run it through scripts/rdma-vm.sh)\n");
    return 1;
  }
  in_addr ia{};
  inet_pton(AF_INET, addr.c_str(), &ia);
  const uint32_t ip = ntohl(ia.s_addr);
  const int rounds = args.quick ? 500 : 5000;
  const uint64_t bulk = args.quick ? (16ull << 20) : (128ull << 20);

  // ---- baselines: perftest on the same device --------------------------------------------
  const std::string common = "-d " + ibdev + " -x " + gid + " -F";
  const auto lat_row = perftest_row(perftest("ib_send_lat", common + " -s 64 -n " + std::to_string(rounds), addr), 64);
  const auto bw_row = perftest_row(perftest("ib_send_bw", common + " -s 65536 -n 2000", addr), 65536);
  // ib_send_lat: #bytes #iterations t_min t_max t_typical t_avg ...; one-way (half RTT).
  const double ib_rtt_us = lat_row.size() > 4 ? 2 * lat_row[4] : 0;
  // ib_send_bw: #bytes #iterations BW-peak BW-average MsgRate; MB/s with MB = 2^20.
  const double ib_bw = bw_row.size() > 3 ? bw_row[3] : 0;
  if (ib_rtt_us == 0 || ib_bw == 0) {
    std::fprintf(stderr, "rdma_bench: a perftest baseline did not run (ib_send_lat %s, ib_send_bw %s); its ratio is 0\n",
                 ib_rtt_us ? "ok" : "failed", ib_bw ? "ok" : "failed");
  }

  // ---- gpusock -------------------------------------------------------------------------
  gpusock::RuntimeOptions ro;
  ro.device = args.device == gpusock::DeviceKind::kAuto ? gpusock::DeviceKind::kCpu : args.device;
  if (lanes == 0) lanes = ro.device == gpusock::DeviceKind::kCuda ? 32 : 1;
  if (lanes > 32) {
    std::fprintf(stderr, "rdma_bench: --lanes must be 1..32\n");
    return 2;
  }
  const uint32_t mask = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  auto rt = gpusock::Runtime::create(ro);
  if (!rt.ok()) return std::fprintf(stderr, "%s\n", rt.status().to_string().c_str()), 1;
  if (auto s = gpusock::rdma::enable(**rt); !s.ok()) return std::fprintf(stderr, "%s\n", s.to_string().c_str()), 1;
  auto peer = gpusock::rdma::Peer::create();
  if (!peer.ok()) return std::fprintf(stderr, "%s\n", peer.status().to_string().c_str()), 1;
  auto box = (*rt)->mapped_alloc(4096);
  auto* box_host = static_cast<uint32_t*>(box->host);

  // Round trip.
  auto buf = gpusock::DeviceBuffer<uint8_t>::create(**rt, 64);
  auto k = gpusock::launch(**rt, {1}, {32}, EchoServer{}, static_cast<uint32_t*>(box->device), ip, 64u, buf->data());
  uint32_t port = 0;
  for (int i = 0; i < 60000 && (port = std::atomic_ref<uint32_t>(box_host[0]).load()) == 0; ++i) usleep(1000);
  std::vector<int64_t> rtt;
  if (port != 0 && port != 0xffffffffu) {
    int fd = (*peer)->connect(addr, static_cast<uint16_t>(port));
    uint8_t msg[64] = {};
    for (int i = 0; fd >= 0 && i < rounds + rounds / 10; ++i) {
      const auto t0 = Clock::now();
      if ((*peer)->send(fd, msg, 64) != 64 || (*peer)->recv(fd, msg, 64, true, 10000) != 64) break;
      if (i >= rounds / 10) rtt.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
    }
    if (fd >= 0) (*peer)->close(fd);
  }
  k->wait();
  const auto p = gpusock::bench::percentiles(rtt);

  // Bandwidth: kernel -> peer.
  uint16_t lport = 0;
  int lfd = (*peer)->listen(addr, 0, 4, &lport);
  constexpr uint32_t kChunk = 256 * 1024;
  auto chunk = gpusock::DeviceBuffer<uint8_t>::create(**rt, kChunk);
  auto out = gpusock::DeviceBuffer<int64_t>::create(**rt, 1);
  uint64_t got = 0;
  double secs = 0;
  std::thread sink([&] {
    int c = (*peer)->accept(lfd, 60000);
    std::vector<uint8_t> b(1 << 20);
    Clock::time_point t0{};
    for (int64_t r; c >= 0 && (r = (*peer)->recv(c, b.data(), b.size())) > 0;) {
      if (got == 0) t0 = Clock::now();
      got += static_cast<uint64_t>(r);
    }
    secs = std::chrono::duration<double>(Clock::now() - t0).count();
    if (c >= 0) (*peer)->close(c);
  });
  auto k2 = gpusock::launch(**rt, {1}, {lanes}, Streamer{}, ip, lport, bulk, chunk->data(), kChunk, out->data(), mask);
  k2->wait();
  sink.join();
  const double bw = secs > 0 ? got / secs / (1 << 20) : 0;

  std::printf("bench/rdma on %s (%s device; software RDMA: rdma_rxe)\n", ibdev.c_str(), gpusock::to_string(ro.device));
  std::printf("round trip 64 B  gpusock p50 %.2f us p99 %.2f us (n=%zu) | ib_send_lat 2 x t_typical %.2f us | ratio %.2f\n",
              p.p50, p.p99, p.n, ib_rtt_us, ib_rtt_us > 0 ? p.p50 / ib_rtt_us : 0);
  std::printf("bandwidth        gpusock %.1f MiB/s (%llu MiB kernel->peer, %u sending lanes) | ib_send_bw 64 KiB %.1f MiB/s | "
              "ratio %.2f\n",
              bw, static_cast<unsigned long long>(got >> 20), lanes, ib_bw, ib_bw > 0 ? bw / ib_bw : 0);
  if (!args.json_path.empty()) {
    FILE* f = std::fopen(args.json_path.c_str(), "w");
    if (f) {
      std::fprintf(f,
                   "{\n  \"device\": \"%s\", \"gpusock_device\": \"%s\", \"software_rdma\": true,\n"
                   "  \"rtt_64B_us\": {\"gpusock_p50\": %.3f, \"gpusock_p99\": %.3f, \"samples\": %zu, "
                   "\"ib_send_lat_2x_typical\": %.3f, \"ratio_p50\": %.3f},\n"
                   "  \"bandwidth_MiBps\": {\"gpusock\": %.1f, \"bytes\": %llu, \"sending_lanes\": %u, \"ib_send_bw_64KiB\": %.1f, "
                   "\"ratio\": %.3f}\n}\n",
                   ibdev.c_str(), gpusock::to_string(ro.device), p.p50, p.p99, p.n, ib_rtt_us,
                   ib_rtt_us > 0 ? p.p50 / ib_rtt_us : 0, bw, static_cast<unsigned long long>(got), lanes, ib_bw,
                   ib_bw > 0 ? bw / ib_bw : 0);
      std::fclose(f);
    }
  }
  (*rt)->mapped_free(box->host);
  return (p.n > 0 && got == bulk) ? 0 : 1;
}
