// bench/localdevice — warp-to-warp sockets, each figure beside its baselines measured in
// the same run.
//
//   latency: round trip of 64 B between lane 0 of two warps in different blocks over a
//            localdevice stream, beside the null hostcall round trip (one lane) and a TCP
//            round trip over loopback through the host (two warps, io_uring backend).
//            p50/p99 in us; ratio = localdevice / null hostcall. The localdevice round
//            trip runs with the 64 B buffers on the lanes' stacks and in device memory,
//            the latter with hand-off (a waiting recv's buffer filled by the sender) on
//            and off.
//   stream:  64 KiB messages from sender warps to receiver warps (warp_send/warp_recv, one
//            connection per pair), 1..N pairs at once, beside device-to-device cudaMemcpy
//            of a 256 MiB buffer (memcpy on the cpu device). GB/s of payload; ratio =
//            localdevice / memcpy. Every ring size runs with hand-off on and off (off:
//            every byte copied into the ring and out again); "on/off" is their ratio.
//
// Usage: localdevice_bench [--device cpu|cuda] [--json FILE] [--quick]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/localdevice_host.hpp"
#include "gpusock/net/socket.hpp"
#include "common/bench_util.hpp"

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

namespace {

namespace raw = gpusock::raw;
namespace warp = gpusock::warp;
namespace hc = gpusock::hostcall;
using gpusock::sockaddr_ld;

GPUSOCK_HD inline sockaddr_ld ld_addr(uint32_t port) {
  sockaddr_ld a{};
  a.sld_family = AF_LOCALDEVICE;
  a.sld_port = port;
  return a;
}

GPUSOCK_HD inline int ld_connect(uint32_t port) {
  int fd = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
  sockaddr_ld a = ld_addr(port);
  for (uint32_t i = 0;; ++i) {
    int r = raw::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    if (r != -ECONNREFUSED) return r == 0 ? fd : r;
    gpusock::backoff(i);
  }
}
GPUSOCK_HD inline int ld_listen(uint32_t port) {
  int fd = raw::socket(AF_LOCALDEVICE, SOCK_STREAM, 0);
  sockaddr_ld a = ld_addr(port);
  raw::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  raw::listen(fd, 64);
  return fd;
}

// Warp 0 (block 0) echoes, warp 1 (block 1) times `iters` round trips (after `warm`).
// tcp: the same over 127.0.0.1 through the host. kStack: the two warps' buffers are
// local arrays on each lane's stack (a kernel of its own, so the compiler sees them as
// local memory); else gbuf, 128 bytes of device memory.
template <bool kStack>
struct PingPong {
  GPUSOCK_HD void operator()(bool tcp, int warm, int iters, uint32_t* port_box, int64_t* lat, int64_t* parts,
                             char* gbuf) const {
    if (warp::lane_id() != 0) return;
    char local[kStack ? 64 : 1] = {};
    char* buf = kStack ? local : gbuf + 64 * gpusock::global_warp_id();
    const int total = warm + iters;
    if (gpusock::global_warp_id() == 0) {
      int l, c;
      if (tcp) {
        l = raw::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
        raw::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a);
        raw::listen(l, 4);
        socklen_t len = sizeof a;
        raw::getsockname(l, reinterpret_cast<sockaddr*>(&a), &len);
        gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(*port_box).store(gpusock::ntohs(a.sin_port),
                                                                             gpusock::Order::kRelease);
      } else {
        l = ld_listen(7000);
      }
      c = raw::accept(l, nullptr, nullptr);
      int one = 1;
      if (tcp) raw::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      for (int i = 0; i < total; ++i) {
        if (raw::recv(c, buf, 64, MSG_WAITALL) != 64) break;
        const uint64_t t0 = gpusock::globaltimer_ns();
        if (raw::send(c, buf, 64, 0) != 64) break;
        if (i >= warm) parts[3 * (i - warm) + 2] = static_cast<int64_t>(gpusock::globaltimer_ns() - t0);
      }
      raw::close(c);
      raw::close(l);
    } else {
      int c;
      if (tcp) {
        uint32_t port = 0;
        for (uint32_t i = 0;
             (port = gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(*port_box).load(gpusock::Order::kAcquire)) == 0;
             ++i) {
          gpusock::backoff(i);
        }
        c = raw::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_port = gpusock::htons(static_cast<uint16_t>(port));
        a.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
        raw::connect(c, reinterpret_cast<sockaddr*>(&a), sizeof a);
        int one = 1;
        raw::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      } else {
        c = ld_connect(7000);
      }
      for (int i = 0; i < total; ++i) {
        const uint64_t t0 = gpusock::globaltimer_ns();
        const bool sent = raw::send(c, buf, 64, 0) == 64;
        const uint64_t t1 = gpusock::globaltimer_ns();
        if (!sent || raw::recv(c, buf, 64, MSG_WAITALL) != 64) {
          lat[i < warm ? 0 : i - warm] = -1;
          break;
        }
        const uint64_t t2 = gpusock::globaltimer_ns();
        if (i >= warm) {
          lat[i - warm] = static_cast<int64_t>(t2 - t0);
          parts[3 * (i - warm)] = static_cast<int64_t>(t1 - t0);
        }
      }
      raw::close(c);
    }
  }
};

// The floor: a flag ping-pong between lane 0 of two warps in different blocks through
// device memory (release store, acquire polling), nothing else.
struct FlagPingPong {
  GPUSOCK_HD void operator()(int warm, int iters, uint32_t* flags, int64_t* lat) const {
    if (warp::lane_id() != 0) return;
    using A = gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>;
    const bool a = gpusock::global_warp_id() == 0;
    A mine(flags[a ? 0 : 32]), theirs(flags[a ? 32 : 0]);
    for (int i = 1; i <= warm + iters; ++i) {
      const uint64_t t0 = gpusock::globaltimer_ns();
      if (a) {
        theirs.store(static_cast<uint32_t>(i), gpusock::Order::kRelease);
        while (mine.load(gpusock::Order::kAcquire) != static_cast<uint32_t>(i)) {
        }
        if (i > warm) lat[i - 1 - warm] = static_cast<int64_t>(gpusock::globaltimer_ns() - t0);
      } else {
        while (mine.load(gpusock::Order::kAcquire) != static_cast<uint32_t>(i)) {
        }
        theirs.store(static_cast<uint32_t>(i), gpusock::Order::kRelease);
      }
    }
  }
};

struct NullLatency {
  GPUSOCK_HD void operator()(int warm, int iters, int64_t* lat) const {
    if (warp::lane_id() != 0) return;
    for (int i = 0; i < warm + iters; ++i) {
      const uint64_t t0 = gpusock::globaltimer_ns();
      hc::call(hc::op::kNull);
      if (i >= warm) lat[i - warm] = static_cast<int64_t>(gpusock::globaltimer_ns() - t0);
    }
  }
};

// Warps [0, pairs) receive on port 8000 + w; warps [pairs, 2 pairs) send `msgs` messages
// of `msg` bytes each to their partner. t[2w], t[2w+1]: start and end on the device clock;
// got[w]: bytes a receiver received.
struct Streams {
  GPUSOCK_HD void operator()(uint32_t pairs, uint32_t msgs, uint32_t msg, uint8_t* bufs, int64_t* t, int64_t* got) const {
    const uint32_t all = 0xffffffffu;
    const uint32_t w = static_cast<uint32_t>(gpusock::global_warp_id());
    const uint32_t lane = warp::lane_id();
    uint8_t* buf = bufs + uint64_t{w} * msg;
    if (w < pairs) {
      int l = lane == 0 ? ld_listen(8000 + w) : 0;
      l = warp::shfl(all, l, 0);
      int c = lane == 0 ? raw::accept(l, nullptr, nullptr) : 0;
      c = warp::shfl(all, c, 0);
      const uint64_t t0 = gpusock::globaltimer_ns();
      int64_t total = 0, r;
      while ((r = raw::warp_recv(all, c, buf, msg, 0)) > 0) total += r;
      const uint64_t t1 = gpusock::globaltimer_ns();
      if (lane == 0) {
        raw::close(c);
        raw::close(l);
        got[w] = total;
        t[2 * w] = static_cast<int64_t>(t0);
        t[2 * w + 1] = static_cast<int64_t>(t1);
      }
    } else {
      int c = lane == 0 ? ld_connect(8000 + (w - pairs)) : 0;
      c = warp::shfl(all, c, 0);
      const uint64_t t0 = gpusock::globaltimer_ns();
      for (uint32_t i = 0; i < msgs; ++i) {
        if (raw::warp_send(all, c, buf, msg, 0) != msg) break;
      }
      const uint64_t t1 = gpusock::globaltimer_ns();
      if (lane == 0) {
        raw::close(c);
        t[2 * w] = static_cast<int64_t>(t0);
        t[2 * w + 1] = static_cast<int64_t>(t1);
      }
    }
  }
};

using gpusock::bench::Percentiles;
using gpusock::bench::percentiles;

template <typename K, typename... A>
bool run(gpusock::Runtime& rt, gpusock::Dim3 grid, gpusock::Dim3 block, K k, A... a) {
  auto l = gpusock::launch(rt, grid, block, k, a...);
  if (!l.ok()) {
    std::fprintf(stderr, "launch: %s\n", l.status().to_string().c_str());
    return false;
  }
  if (!l->wait_for(std::chrono::seconds(120))) {
    std::fprintf(stderr, "kernel did not finish in 120 s\n");
    return false;
  }
  return l->wait().ok();
}

// Device-to-device copy bandwidth of `bytes` (bytes copied per second).
double memcpy_gbs(gpusock::Runtime& rt, size_t bytes) {
  auto a = rt.device_alloc(bytes);
  auto b = rt.device_alloc(bytes);
  double best = 0;
  if (rt.device() == gpusock::DeviceKind::kCuda) {
#ifdef __CUDACC__
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int i = 0; i < 6; ++i) {
      cudaEventRecord(e0);
      cudaMemcpy(*b, *a, bytes, cudaMemcpyDeviceToDevice);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      if (i > 0) best = std::max(best, bytes / (ms * 1e-3) / 1e9);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
#endif
  } else {
    for (int i = 0; i < 4; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      std::memcpy(*b, *a, bytes);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (i > 0) best = std::max(best, bytes / s / 1e9);
    }
  }
  rt.device_free(*a);
  rt.device_free(*b);
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  gpusock::bench::BenchArgs args;
  if (!gpusock::bench::parse_bench_args(argc, argv, &args)) return 2;
  gpusock::RuntimeOptions opts;
  opts.device = args.device;
  const std::string json_path = args.json_path;
  const bool quick = args.quick;
  opts.service_threads = 1;
  auto rtr = gpusock::Runtime::create(opts);
  if (!rtr.ok()) {
    std::fprintf(stderr, "runtime: %s\n", rtr.status().to_string().c_str());
    return 1;
  }
  auto& rt = **rtr;
  const bool gpu = rt.device() == gpusock::DeviceKind::kCuda;
  const uint32_t max_pairs = quick ? 4 : (gpu ? 1024 : 16);
  gpusock::net::LocalDeviceOptions lo;
  lo.max_sockets = 3 * max_pairs + 16;
  lo.ring_bytes = 256u << 10;
  auto ld = gpusock::net::enable_localdevice(rt, lo);
  gpusock::Status io = gpusock::iouring::enable(rt);
  if (!ld.ok() || !io.ok()) {
    std::fprintf(stderr, "setup: %s %s\n", ld.ok() ? "" : ld.status().to_string().c_str(), io.to_string().c_str());
    return 1;
  }
  std::printf("device: %s\n", rt.device_name().c_str());
  const int warm = quick ? 100 : 1000;
  const int iters = quick ? 1000 : (gpu ? 20000 : 5000);
  auto lat = gpusock::DeviceBuffer<int64_t>::create(rt, iters);
  auto box = gpusock::DeviceBuffer<uint32_t>::create(rt, 1);
  if (!lat.ok() || !box.ok()) return 1;

  auto parts = gpusock::DeviceBuffer<int64_t>::create(rt, 3 * iters);
  auto gbuf = gpusock::DeviceBuffer<char>::create(rt, 128);
  if (!parts.ok() || !gbuf.ok()) return 1;
  // A localdevice round trip on runtime r: its p50/p99, and the parts of the call.
  auto ld_rtt = [&](gpusock::Runtime& r, char* g, const char* what) {
    std::vector<int64_t> zero(iters, 0);
    (void)lat->from_host(zero);
    const bool ok = g == nullptr
                        ? run(r, {2}, {32}, PingPong<true>{}, false, warm, iters, box->data(), lat->data(), parts->data(), g)
                        : run(r, {2}, {32}, PingPong<false>{}, false, warm, iters, box->data(), lat->data(), parts->data(), g);
    if (!ok) return Percentiles{};
    const Percentiles p = percentiles(lat->to_host());
    // Where a round trip goes: the client's send() call, the server's send() call.
    auto pv = parts->to_host();
    std::vector<int64_t> cs, ss;
    for (int i = 0; i < iters; ++i) {
      cs.push_back(pv[3 * i]);
      ss.push_back(pv[3 * i + 2]);
    }
    std::printf("localdevice round trip (%s): client send() p50 %.2f us, server send() p50 %.2f us\n", what,
                percentiles(cs).p50, percentiles(ss).p50);
    return p;
  };
  const Percentiles local = ld_rtt(rt, nullptr, "stack buffers");
  const Percentiles local_g = ld_rtt(rt, gbuf->data(), "device-memory buffers, hand-off on");
  Percentiles local_g_off;
  {
    auto r_off = gpusock::Runtime::create(opts);
    if (!r_off.ok()) return 1;
    gpusock::net::LocalDeviceOptions lo_off = lo;
    lo_off.hand_off = false;
    if (!gpusock::net::enable_localdevice(**r_off, lo_off).ok()) return 1;
    local_g_off = ld_rtt(**r_off, gbuf->data(), "device-memory buffers, hand-off off");
  }
  Percentiles floor;
  if (gpu) {  // on the cpu device two spinning threads say nothing about the design
    auto flags = gpusock::DeviceBuffer<uint32_t>::create(rt, 64);
    run(rt, {2}, {32}, FlagPingPong{}, warm, iters, flags->data(), lat->data());
    floor = percentiles(lat->to_host());
  }
  run(rt, {1}, {32}, NullLatency{}, warm, iters, lat->data());
  const Percentiles null = percentiles(lat->to_host());
  const int tcp_iters = std::min(iters, 5000);
  std::vector<int64_t> zero(iters, 0);
  (void)lat->from_host(zero);
  run(rt, {2}, {32}, PingPong<true>{}, true, warm, tcp_iters, box->data(), lat->data(), parts->data(), static_cast<char*>(nullptr));
  auto tv = lat->to_host();
  tv.resize(tcp_iters);
  const Percentiles tcp = percentiles(tv);
  std::printf("\nround trip of 64 B (us)                              p50      p99       n\n");
  std::printf("localdevice, two warps, stack buffers           %8.2f %8.2f %7zu\n", local.p50, local.p99, local.n);
  std::printf("localdevice, device-memory buffers, hand-off on %8.2f %8.2f %7zu\n", local_g.p50, local_g.p99, local_g.n);
  std::printf("localdevice, device-memory buffers, hand-off off%8.2f %8.2f %7zu\n", local_g_off.p50, local_g_off.p99,
              local_g_off.n);
  std::printf("null hostcall, one lane                         %8.2f %8.2f %7zu\n", null.p50, null.p99, null.n);
  std::printf("floor: flag ping-pong, 2 warps                  %8.2f %8.2f %7zu\n", floor.p50, floor.p99, floor.n);
  std::printf("TCP loopback through the host                   %8.2f %8.2f %7zu\n", tcp.p50, tcp.p99, tcp.n);
  const double best_p50 = std::min(local.p50, local_g.p50);
  std::printf("ratio localdevice / null hostcall: p50 %.3f  p99 %.3f (stack); best p50 %.3f   (targets: p50 <= 1 us, <= 0.2x)\n",
              local.p50 / null.p50, local.p99 / null.p99, best_p50 / null.p50);

  // ---- streaming ----
  const uint32_t msg = 64u << 10;
  const size_t copy_bytes = quick ? (16u << 20) : (256u << 20);
  const double base = memcpy_gbs(rt, copy_bytes);
  std::printf("\nstream of 64 KiB messages   ring KiB  pairs   hand-off on GB/s  off GB/s  on/off  memcpy GB/s   ratio (on)\n");
  std::string rows = "[";
  double best = 0, best_off = 0;
  // The ring size is the family's configuration (one per runtime): each size, with
  // hand-off on and off, gets a runtime of its own.
  for (uint32_t ring_kib : {64u, 256u, 1024u}) {
    std::unique_ptr<gpusock::Runtime> rts[2];
    for (int h = 0; h < 2; ++h) {
      auto r = gpusock::Runtime::create(opts);
      if (!r.ok()) return 1;
      rts[h] = std::move(r.value());
      gpusock::net::LocalDeviceOptions lo2;
      lo2.max_sockets = 3 * max_pairs + 16;
      lo2.ring_bytes = ring_kib << 10;
      lo2.hand_off = h == 0;
      if (!gpusock::net::enable_localdevice(*rts[h], lo2).ok()) return 1;
    }
    for (uint32_t pairs : {1u, 8u, 64u, 256u, 512u, 1024u}) {
      if (pairs > max_pairs) continue;
      const uint64_t per_pair = quick ? (4u << 20) : (gpu ? (256ull << 20) / std::max(1u, pairs / 8) : (64u << 20));
      const uint32_t msgs = static_cast<uint32_t>(per_pair / msg);
      double gbs[2] = {0, 0};
      bool whole = true;
      for (int h = 0; h < 2; ++h) {
        gpusock::Runtime& rt2 = *rts[h];
        auto bufs = gpusock::DeviceBuffer<uint8_t>::create(rt2, uint64_t{2 * pairs} * msg);
        auto t = gpusock::DeviceBuffer<int64_t>::create(rt2, 4 * pairs);
        auto got = gpusock::DeviceBuffer<int64_t>::create(rt2, pairs);
        if (!bufs.ok() || !t.ok() || !got.ok()) return 1;
        if (!run(rt2, {2 * pairs}, {32}, Streams{}, pairs, msgs, msg, bufs->data(), t->data(), got->data())) return 1;
        auto tt = t->to_host();
        auto g = got->to_host();
        int64_t start = INT64_MAX, end = 0, bytes = 0;
        for (uint32_t i = 0; i < 2 * pairs; ++i) {
          start = std::min(start, tt[2 * i]);
          end = std::max(end, tt[2 * i + 1]);
        }
        for (uint32_t i = 0; i < pairs; ++i) bytes += g[i];
        whole = whole && bytes == static_cast<int64_t>(uint64_t{pairs} * msgs * msg);
        gbs[h] = bytes / ((end - start) * 1e-9) / 1e9;
      }
      best = std::max(best, gbs[0]);
      best_off = std::max(best_off, gbs[1]);
      std::printf("                            %8u %6u %17.2f %9.2f %7.3f %12.2f %7.3f%s\n", ring_kib, pairs, gbs[0], gbs[1],
                  gbs[0] / gbs[1], base, gbs[0] / base, whole ? "" : "  (bytes missing!)");
      char row[320];
      std::snprintf(row, sizeof row,
                    "%s{\"ring_kib\": %u, \"pairs\": %u, \"gbs\": %.4g, \"gbs_hand_off_off\": %.4g, \"memcpy_gbs\": %.4g, "
                    "\"ratio\": %.4g, \"whole\": %s}",
                    rows.size() > 1 ? ", " : "", ring_kib, pairs, gbs[0], gbs[1], base, gbs[0] / base, whole ? "true" : "false");
      rows += row;
    }
  }
  rows += "]";
  std::printf("best ratio localdevice / memcpy: %.3f   (target >= 0.5); hand-off off: %.3f\n", best / base,
              best_off / base);
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << "{\n  \"device\": \"" << rt.device_name() << "\",\n"
      << "  \"rtt_us\": {\"localdevice\": {\"p50\": " << local.p50 << ", \"p99\": " << local.p99 << "}, "
      << "\"localdevice_device_buffers\": {\"p50\": " << local_g.p50 << ", \"p99\": " << local_g.p99 << "}, "
      << "\"localdevice_device_buffers_hand_off_off\": {\"p50\": " << local_g_off.p50 << ", \"p99\": " << local_g_off.p99
      << "}, "
      << "\"null_hostcall\": {\"p50\": " << null.p50 << ", \"p99\": " << null.p99 << "}, "
      << "\"tcp_loopback\": {\"p50\": " << tcp.p50 << ", \"p99\": " << tcp.p99 << "}, "
      << "\"flag_floor\": {\"p50\": " << floor.p50 << ", \"p99\": " << floor.p99 << "}},\n"
      << "  \"rtt_ratio_p50\": " << local.p50 / null.p50 << ",\n"
      << "  \"stream\": " << rows << ",\n  \"stream_best_ratio\": " << best / base
      << ",\n  \"stream_best_ratio_hand_off_off\": " << best_off / base << "\n}\n";
  }
  return 0;
}
