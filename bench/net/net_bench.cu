// bench/net — sockets from kernels, each figure beside its CPU io_uring baseline measured in
// the same run with the same client and the same number of host threads.
//
//   rr:      request/response (64 B and 4 KiB), the kernel echo server of examples/echo
//            (4 warps x 256 connections, each warp a SO_REUSEPORT listener with a
//            poll/recv/send event loop; one hostcall service thread) vs CpuEchoServer (one
//            io_uring thread: multishot accept, provided-buffer multishot recv), both
//            driven by the same LoadClient. req/s and p50/p99; ratio = kernel / CPU.
//   bulk:    1 GiB GPU -> peer (a warp sends from device memory with warp_send, in sends
//            of --send-chunk-kib; the host takes them out of device memory by DMA unless
//            --no-pull) vs a CPU io_uring sender working from pinned memory with the same
//            send size, into the same sink; and peer ->
//            GPU (one warp's warp_recv of 2 MiB asks into device memory, every byte checked
//            by 16 blocks x 8 warps after each call) vs cpu_recv into pinned memory
//            (recvs of up to 4 MiB, every byte checked after each, one thread). GB/s;
//            ratio = kernel / CPU. Beside it, the same GPU receiver pipelined: the other
//            warps check one buffer while warp 0 receives into the other.
//   send_zc: io_uring send vs send_zc by chunk size on loopback (the SEND_ZC threshold).
//
// Usage: net_bench [--device cpu|cuda] [--json FILE] [--quick] [--bulk-only]
//                  [--recv-buffer-kib N] [--deliver-min-kib N] [--deliver-chunk-kib N]
//                  [--deliver-chunks N] [--gather-max-kib N] [--recv-ask-kib N]
//                  [--check-warps N] [--check-blocks N] [--send-chunk-kib N] [--no-pull] [--pull-chunk-kib N]
//                  [--pull-chunks N] [--pull-async 0|1]
//   --bulk-only: only the bulk part (for sweeps of the options below).
//   --recv-buffer-kib: the backend's receive buffer size (its default, 64, if not given);
//   one recv() returns at most one buffer, so it bounds how much a call can bring.
//   --deliver-min-kib: the backend's deliver_min_bytes in KiB (default 32): receives of at
//   least this much into device memory are copied there by the host; 0 lends every
//   buffer for the warp to copy out (the way before delivery).
//   --deliver-chunk-kib, --deliver-chunks, --gather-max-kib: the backend's
//   deliver_chunk_bytes, deliver_chunks and deliver_gather_max (defaults: the backend's).
//   --recv-ask-kib (default 2048), --check-warps (default 8), --check-blocks (default 16 on a
//   GPU, 1 on the cpu device): the peer -> GPU receiver's warp_recv size, and the blocks and
//   warps per block that check each call's bytes.
//   --send-chunk-kib (default 256): the size of each GPU -> peer send, kernel and CPU alike.
//   --no-pull: the backend's pull_sends off (the warp copies every send into staging);
//   --pull-chunk-kib, --pull-chunks: its pull_chunk_bytes and pull_chunks;
//   --pull-async: its pull_async_sends (default 1: taken bytes go out from io_uring's
//   workers; 0: inline on the service thread).
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "baseline.hpp"
#include "common/bench_util.hpp"
#include "echo/echo_server.hpp"
#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/socket.hpp"

namespace {

namespace raw = gpusock::raw;
namespace bn = gpusock::bench;

GPUSOCK_HD inline uint8_t pattern(uint64_t i) { return static_cast<uint8_t>((i * 2654435761u) >> 13); }

// A loopback port nothing listens on right now (the kernel server binds it next).
uint16_t free_loopback_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  uint16_t port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  ::close(fd);
  return port;
}

// Lane 0 connects to 127.0.0.1:port; every lane gets the descriptor (-1 on failure).
GPUSOCK_HD inline int warp_connect_loopback(uint16_t port) {
  int fd = -1;
  if (gpusock::warp::lane_id() == 0) {
    fd = raw::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = gpusock::htons(port);
    a.sin_addr.s_addr = gpusock::htonl(0x7f000001u);
    if (raw::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) fd = -1;
  }
  return gpusock::warp::shfl(0xffffffffu, fd, 0);
}

// One warp's copy of `n` bytes from device memory into mapped (pinned host) memory with
// the same warp-wide copy warp_send uses into staging, `reps` times, then a system-scope
// fence: the part of each GPU -> peer piece that the warp spends before its hostcall.
struct WarpStagingCopy {
  GPUSOCK_HD void operator()(uint8_t* pinned, const uint8_t* src, uint32_t n, uint32_t reps, int64_t* out) const {
    const int64_t t0 = static_cast<int64_t>(gpusock::globaltimer_ns());
    // Lane 0's buffer, copied by the whole warp (the other lanes bring no bytes of their own).
    const uint32_t mine = gpusock::warp::lane_id() == 0 ? n : 0;
    for (uint32_t i = 0; i < reps; ++i) gpusock::hostcall::internal::group_copy(0xffffffffu, pinned, src, mine);
    gpusock::fence<gpusock::Scope::kSystem>(gpusock::Order::kSeqCst);
    const int64_t t1 = static_cast<int64_t>(gpusock::globaltimer_ns());
    if (gpusock::warp::lane_id() == 0) out[0] = t1 - t0;
  }
};

struct WarpSender {
  GPUSOCK_HD void operator()(uint16_t port, uint64_t total, const uint8_t* src, uint32_t chunk, int64_t* out) const {
    const uint32_t lane = gpusock::warp::lane_id();
    const int fd = warp_connect_loopback(port);
    if (fd < 0) return;
    uint64_t off = 0;
    const int64_t t0 = static_cast<int64_t>(gpusock::globaltimer_ns());
    while (off < total) {
      const uint32_t n = static_cast<uint32_t>(total - off < chunk ? total - off : chunk);
      if (raw::warp_send(0xffffffffu, fd, src, n, 0) != n) break;
      off += n;
    }
    const int64_t t1 = static_cast<int64_t>(gpusock::globaltimer_ns());
    if (lane == 0) {
      raw::close(fd);
      out[0] = static_cast<int64_t>(off);
      out[1] = t1 - t0;
    }
  }
};

#if defined(__CUDA_ARCH__)
#define UNROLL _Pragma("unroll")
#else
#define UNROLL
#endif

// Mismatching bytes of dst[0, len) against the stream pattern from stream offset `off`,
// this lane's share of a warp-wide check. 16-byte loads, eight in flight per lane (one
// warp is bound by load latency, as its copies are), and the pattern in 32-bit arithmetic:
// only bits 0..20 of the offset matter (baseline.hpp), so this is pattern() exactly.
GPUSOCK_HD inline uint64_t check(const uint8_t* dst, uint32_t len, uint64_t off, uint32_t lane) {
  constexpr uint32_t kUnroll = 8, kStep = 32 * 16;
  const uint32_t whole = len & ~15u, base = static_cast<uint32_t>(off);
  uint64_t bad = 0;
  for (uint32_t start = lane * 16; start < whole; start += kStep * kUnroll) {
    uint32_t w[kUnroll][4];
    UNROLL
    for (uint32_t u = 0; u < kUnroll; ++u) {
      const uint32_t i = start + u * kStep;
      if (i >= whole) continue;
#if defined(__CUDA_ARCH__)
      // dst is 16-byte aligned; L1 bypassed, as the host rewrote the buffer since the last look
      const uint4 v = __ldcg(reinterpret_cast<const uint4*>(dst + i));
      w[u][0] = v.x, w[u][1] = v.y, w[u][2] = v.z, w[u][3] = v.w;
#else
      __builtin_memcpy(w[u], dst + i, 16);
#endif
    }
    UNROLL
    for (uint32_t u = 0; u < kUnroll; ++u) {
      const uint32_t i = start + u * kStep;
      if (i >= whole) break;
      uint32_t x = (base + i) * 2654435761u;
      UNROLL
      for (uint32_t k = 0; k < 16; ++k) {
        bad += static_cast<uint8_t>(w[u][k / 4] >> (8 * (k % 4))) != static_cast<uint8_t>(x >> 13);
        x += 2654435761u;
      }
    }
  }
  for (uint32_t i = whole + lane; i < len; i += 32) bad += dst[i] != pattern(off + i);
  return bad;
}

// Warp 0 of block 0 receives (warp_recv into device memory), then every warp of every
// block checks its share of the bytes, as an application spreads work on what it received
// over the GPU. One warp alone checks at about 3.4 GB/s on the H100 (bound by load
// latency) and the 16 warps of one block at about 21 GB/s, which measured the check
// beside the receive; `--check-blocks` (default 16 on a GPU) spreads it over SMs. The
// blocks meet in a grid barrier (grid_meet) after each call, so all of them must be
// resident at once: a few blocks on a GPU, one on the cpu device.
//
// Pipelined (`overlap`): dst holds two buffers of `chunk`; while warp 0 receives into one,
// the other warps check the other (what the call before brought), so the check runs
// beside the host's receiving instead of after it. The CPU receiver cannot do that on its
// one thread (its recv copies inline), so this figure is reported beside the serial one,
// not instead of it.
//
// out: [0] bytes, [1] ns from the first call to the end, [2] wrong bytes, [3] ns inside
// warp_recv, [4] and [5] call i's answer at [4 + i % 2], [6] the barrier's arrivals.
struct GridReceiver {
  GPUSOCK_HD void operator()(uint16_t port, uint8_t* dst, uint32_t chunk, int64_t* out, bool overlap) const {
    using A64 = gpusock::AtomicRef<int64_t, gpusock::Scope::kDevice>;
    const uint32_t lane = gpusock::warp::lane_id();
    const uint32_t t = gpusock::thread_idx().x, warps = gpusock::block_dim().x / 32;
    const uint32_t blocks = gpusock::grid_dim().x, gw = gpusock::block_idx().x * warps + t / 32;
    const uint32_t first_checker = overlap ? 1 : 0, checkers = blocks * warps - first_checker;
    // The k-th meeting of every block: the block's threads, then thread 0 arrives (release)
    // and waits (acquire) until every block has arrived k times, then the block again.
    int64_t meetings = 0;
    auto grid_meet = [&] {
      gpusock::sync_block();
      ++meetings;
      if (t == 0) {
        A64 arrived(out[6]);
        arrived.fetch_add(1, gpusock::Order::kAcqRel);
        for (uint32_t i = 0; arrived.load(gpusock::Order::kAcquire) < meetings * static_cast<int64_t>(blocks); ++i) {
          gpusock::spin_pause(i);
        }
      }
      gpusock::sync_block();
    };
    auto answer = [&](uint32_t i) { return A64(out[4 + (i & 1)]).load(gpusock::Order::kRelaxed); };
    int fd = -1;
    if (gw == 0) {
      fd = warp_connect_loopback(port);
      if (lane == 0) A64(out[4]).store(fd < 0 ? -1 : 0, gpusock::Order::kRelaxed);
    }
    grid_meet();
    if (answer(0) < 0 || checkers == 0) return;
    // Checks [0, n) of b, stream offset `at`: this warp's 16 KiB slices.
    auto check_share = [&](const uint8_t* b, int64_t n, uint64_t at) {
      uint64_t bad_here = 0;
      constexpr uint32_t kSlice = 16 * 1024;
      for (uint32_t s = (gw - first_checker) * kSlice; s < static_cast<uint32_t>(n); s += checkers * kSlice) {
        const uint32_t len = static_cast<uint32_t>(n) - s < kSlice ? static_cast<uint32_t>(n) - s : kSlice;
        bad_here += check(b + s, len, at + s, lane);
      }
      return bad_here;
    };
    uint64_t off = 0, bad = 0, prev_off = 0;
    int64_t t0 = 0, in_recv = 0, prev = 0;  // prev: bytes of the call before (pipelined)
    for (uint32_t i = 0;; ++i) {
      uint8_t* buf = dst + (overlap ? (i & 1) * static_cast<uint64_t>(chunk) : 0);
      if (gw == 0) {
        const int64_t r0 = static_cast<int64_t>(gpusock::globaltimer_ns());
        const int64_t n = raw::warp_recv(0xffffffffu, fd, buf, chunk, 0);
        const int64_t r1 = static_cast<int64_t>(gpusock::globaltimer_ns());
        if (i == 0) t0 = r0;
        in_recv += r1 - r0;
        if (lane == 0) A64(out[4 + (i & 1)]).store(n, gpusock::Order::kRelaxed);
      } else if (overlap && prev > 0) {
        bad += check_share(dst + ((i + 1) & 1) * static_cast<uint64_t>(chunk), prev, prev_off);
      }
      grid_meet();  // call i's answer is in (pipelined: the buffer checked is free)
      const int64_t n = answer(i);
      if (n <= 0) break;  // pipelined: the call before has just been checked
      if (overlap) {
        prev = n;
        prev_off = off;
      } else {
        bad += check_share(buf, n, off);
        grid_meet();  // everyone is done with buf before warp 0 receives into it again
      }
      off += static_cast<uint64_t>(n);
    }
    const int64_t t1 = static_cast<int64_t>(gpusock::globaltimer_ns());
    for (uint32_t d = 16; d > 0; d /= 2) bad += gpusock::warp::shfl(0xffffffffu, bad, (lane + d) % 32);
    if (lane == 0) A64(out[2]).fetch_add(static_cast<int64_t>(bad), gpusock::Order::kRelaxed);
    if (gw == 0 && lane == 0) {
      raw::close(fd);
      out[0] = static_cast<int64_t>(off);
      out[1] = t1 - t0;
      out[3] = in_recv;  // of out[1], the time inside warp_recv
    }
  }
};

struct Json {
  std::string s = "{\n";
  bool first = true;
  void add(const std::string& key, const std::string& raw_value) {
    s += (first ? "" : ",\n") + std::string("  \"") + key + "\": " + raw_value;
    first = false;
  }
};

// A launched kernel, or the launch's error and exit.
template <typename R>
R launched(R r, const char* what) {
  if (!r.ok()) {
    std::fprintf(stderr, "launch of the %s kernel: %s\n", what, r.status().to_string().c_str());
    std::exit(1);
  }
  return r;
}

std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.4g", v);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  gpusock::iouring::Options bopts;
  uint32_t recv_ask = 2u << 20, check_warps = 8, check_blocks = 0, send_chunk = 256u << 10, pull_async = 1;
  bool bulk_only = false, no_pull = false;
  // This program's own flags; the rest go to parse_bench_args.
  struct NumFlag {
    const char* name;
    long lo, hi, scale;
    uint32_t* out;
  };
  const NumFlag num_flags[] = {
      {"--recv-buffer-kib", 4, 4096, 1024, &bopts.recv_buffer_bytes},
      {"--deliver-min-kib", 0, 4096, 1024, &bopts.deliver_min_bytes},
      {"--deliver-chunk-kib", 4, 16384, 1024, &bopts.deliver_chunk_bytes},
      {"--deliver-chunks", 2, 8, 1, &bopts.deliver_chunks},
      {"--gather-max-kib", 64, 65536, 1024, &bopts.deliver_gather_max},
      {"--recv-ask-kib", 64, 16384, 1024, &recv_ask},
      {"--check-warps", 1, 32, 1, &check_warps},
      {"--check-blocks", 1, 64, 1, &check_blocks},
      {"--send-chunk-kib", 4, 65536, 1024, &send_chunk},
      {"--pull-chunk-kib", 4, 16384, 1024, &bopts.pull_chunk_bytes},
      {"--pull-chunks", 2, 8, 1, &bopts.pull_chunks},
      {"--pull-async", 0, 1, 1, &pull_async},
  };
  for (int i = 1; i < argc;) {
    const std::string flag = argv[i];
    int used = 0;
    if (flag == "--bulk-only" || flag == "--no-pull") {
      (flag == "--bulk-only" ? bulk_only : no_pull) = true;
      used = 1;
    }
    for (const NumFlag& f : num_flags) {
      if (flag != f.name) continue;
      const long v = i + 1 < argc ? std::atol(argv[i + 1]) : -1;
      if (v < f.lo || v > f.hi) {
        std::fprintf(stderr, "%s: %ld..%ld\n", f.name, f.lo, f.hi);
        return 2;
      }
      *f.out = static_cast<uint32_t>(v * f.scale);
      used = 2;
    }
    if (used == 0) {
      ++i;
      continue;
    }
    if (flag == "--recv-buffer-kib") {
      // The same pinned memory per thread as the default (256 x 64 KiB), at least 16 buffers.
      bopts.recv_buffers = std::max<uint32_t>(16, std::bit_floor((16u << 20) / bopts.recv_buffer_bytes));
    }
    for (int k = i; k + used < argc; ++k) argv[k] = argv[k + used];
    argc -= used;
  }
  bopts.pull_sends = !no_pull;
  bopts.pull_async_sends = pull_async != 0;
  gpusock::bench::BenchArgs args;
  if (!gpusock::bench::parse_bench_args(argc, argv, &args)) return 2;
  gpusock::RuntimeOptions opts;
  opts.device = args.device;
  const std::string json_path = args.json_path;
  const bool quick = args.quick;
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  opts.service_threads = 1;
  opts.cpu_resident_warps = 64;
  auto rtr = gpusock::Runtime::create(opts);
  if (!rtr.ok()) {
    std::fprintf(stderr, "runtime: %s\n", rtr.status().to_string().c_str());
    return 1;
  }
  auto& rt = **rtr;
  // The checking blocks meet after each call, so all must be resident: 16 of 8 warps on a
  // GPU (blocks of 512 threads need at most 128 registers a thread, which the receiver
  // passes), and on the cpu device (64 resident warps) one.
  if (check_blocks == 0) check_blocks = rt.device() == gpusock::DeviceKind::kCuda ? 16 : 1;
  if (check_blocks * check_warps > opts.cpu_resident_warps && rt.device() != gpusock::DeviceKind::kCuda) {
    std::fprintf(stderr, "--check-blocks x --check-warps: at most %u warps on the cpu device\n", opts.cpu_resident_warps);
    return 2;
  }
  auto be = gpusock::iouring::create_backend(rt, bopts);
  if (!be.ok() || !gpusock::net::attach(rt, *be).ok()) {
    std::fprintf(stderr, "io_uring backend: %s\n", be.ok() ? "attach failed" : be.status().to_string().c_str());
    return 1;
  }
  std::printf("device: %s\nbackend: %s\nreceive buffers: %u x %u KiB; delivery into device memory from %u KiB%s, "
              "%u pieces of %u KiB, up to %u KiB a call\n",
              rt.device_name().c_str(), (*be)->describe().c_str(), bopts.recv_buffers, bopts.recv_buffer_bytes / 1024,
              bopts.deliver_min_bytes / 1024, bopts.deliver_min_bytes == 0 ? " (off)" : "", bopts.deliver_chunks,
              bopts.deliver_chunk_bytes / 1024, bopts.deliver_gather_max / 1024);
  if (bopts.pull_sends) {
    std::printf("sends out of device memory taken by the host: %u pieces of %u KiB, sent %s\n", bopts.pull_chunks,
                bopts.pull_chunk_bytes / 1024, bopts.pull_async_sends ? "by io_uring workers" : "inline");
  } else {
    std::printf("sends out of device memory: copied into staging by the warp (--no-pull)\n");
  }
  Json js;
  js.add("device", "\"" + rt.device_name() + "\"");
  js.add("recv_buffer_bytes", std::to_string(bopts.recv_buffer_bytes));
  js.add("deliver_min_bytes", std::to_string(bopts.deliver_min_bytes));
  js.add("deliver_chunk_bytes", std::to_string(bopts.deliver_chunk_bytes));
  js.add("pull_sends", bopts.pull_sends ? "true" : "false");
  js.add("pull_chunk_bytes", std::to_string(bopts.pull_chunk_bytes));
  js.add("pull_chunks", std::to_string(bopts.pull_chunks));
  js.add("pull_async_sends", bopts.pull_async_sends ? "true" : "false");
  js.add("send_chunk_bytes", std::to_string(send_chunk));
  js.add("deliver_chunks", std::to_string(bopts.deliver_chunks));
  js.add("deliver_gather_max", std::to_string(bopts.deliver_gather_max));
  js.add("recv_ask_bytes", std::to_string(recv_ask));
  js.add("check_warps", std::to_string(check_warps));
  js.add("check_blocks", std::to_string(check_blocks));
  const auto duration = quick ? std::chrono::milliseconds(500) : std::chrono::milliseconds(3000);

  // ---- request/response ----
  std::string rr = "[";
  if (!bulk_only) {
    std::printf("\nrequest/response (1 host thread each side of the comparison, same client)\n");
    std::printf("%-8s %6s | %12s %9s %9s | %12s %9s %9s | %6s\n", "size", "conns", "kernel req/s", "p50 us", "p99 us",
                "cpu req/s", "p50 us", "p99 us", "ratio");
    for (uint32_t size : {64u, 4096u}) {
      for (int conns : {64, 256}) {
        if (quick && conns > 64) continue;
        bn::LoadOptions lo;
        lo.connections = conns;
        lo.threads = 4;
        lo.request_bytes = size;
        lo.duration = duration;
        // The kernel server: examples/echo's, on a port the host just saw free.
        gpusock::examples::EchoConfig ecfg;
        ecfg.port = free_loopback_port();
        ecfg.addr_be = htonl(INADDR_LOOPBACK);
        ecfg.conns_per_warp = 256;
        auto es = gpusock::examples::EchoState::create(rt, 4, ecfg);
        auto k = launched(gpusock::launch(rt, {4}, {32}, gpusock::examples::EchoServer{}, (*es)->view()), "echo server");
        for (int i = 0; i < 100000 && (*es)->listening() == 0; ++i) std::this_thread::sleep_for(std::chrono::microseconds(100));
        lo.port = (*es)->listening() > 0 ? ecfg.port : 0;
        bn::LoadResult g = bn::LoadClient::run(lo);
        (*es)->request_stop();
        k->wait_for(std::chrono::seconds(30));
        // The CPU io_uring server, same shape.
        bn::EchoServerOptions so;
        so.threads = 1;
        so.request_bytes = size;
        std::string err;
        auto cpu = bn::CpuEchoServer::start(so, &err);
        lo.port = cpu ? cpu->port() : 0;
        bn::LoadResult c = bn::LoadClient::run(lo);
        cpu.reset();
        const double ratio = c.req_per_s > 0 ? g.req_per_s / c.req_per_s : 0;
        std::printf("%-8u %6d | %12.0f %9.1f %9.1f | %12.0f %9.1f %9.1f | %6.2f%s%s\n", size, conns, g.req_per_s, g.p50_us,
                    g.p99_us, c.req_per_s, c.p50_us, c.p99_us, ratio, g.error.empty() ? "" : ("  kernel: " + g.error).c_str(),
                    c.error.empty() ? "" : ("  cpu: " + c.error).c_str());
        rr += std::string(rr.size() > 1 ? "," : "") + "{\"bytes\":" + std::to_string(size) + ",\"connections\":" +
              std::to_string(conns) + ",\"kernel_rps\":" + num(g.req_per_s) + ",\"kernel_p50_us\":" + num(g.p50_us) +
              ",\"kernel_p99_us\":" + num(g.p99_us) + ",\"kernel_errors\":" + std::to_string(g.errors + g.mismatches) +
              ",\"cpu_rps\":" + num(c.req_per_s) + ",\"cpu_p50_us\":" + num(c.p50_us) + ",\"cpu_p99_us\":" + num(c.p99_us) +
              ",\"ratio\":" + num(ratio) + "}";
      }
    }
  }
  js.add("request_response", rr + "]");

  // ---- bulk ----
  const uint64_t total = quick ? (256ull << 20) : (1ull << 30);
  constexpr uint32_t kChunk = 256 * 1024;
  std::printf("\nbulk, %llu MiB over one connection\n", static_cast<unsigned long long>(total >> 20));
  const uint32_t src_bytes = std::max(send_chunk, kChunk);
  auto src = gpusock::DeviceBuffer<uint8_t>::create(rt, src_bytes);
  {
    std::vector<uint8_t> h(src_bytes);
    for (uint32_t i = 0; i < src_bytes; ++i) h[i] = pattern(i);
    rt.copy_to_device(src->data(), h.data(), src_bytes);
  }
  auto out = gpusock::DeviceBuffer<int64_t>::create(rt, 4);
  // GPU -> peer.
  bn::BulkSinkOptions sk;
  sk.checksum = false;
  std::string err;
  auto sink = bn::BulkSink::start(sk, &err);
  const uint64_t fetched0 = rt.stats().fetched_bytes;
  auto k = launched(gpusock::launch(rt, {1}, {32}, WarpSender{}, sink->port(), total, src->data(), send_chunk, out->data()),
                    "sender");
  k->wait();
  sink->wait(60000);
  bn::BulkResult gs = sink->result();
  const uint64_t taken = rt.stats().fetched_bytes - fetched0;
  sink.reset();
  const uint32_t pin_bytes = std::max(4u << 20, send_chunk);
  auto pinned = rt.mapped_alloc(pin_bytes);
  uint8_t* pin = static_cast<uint8_t*>(pinned->host);
  bn::fill_pattern(pin, 0, pin_bytes);
  auto sink2 = bn::BulkSink::start(sk, &err);
  bn::BulkResult cs = bn::cpu_send("127.0.0.1", sink2->port(), total, send_chunk, pin, pin_bytes, false);
  sink2->wait(60000);
  bn::BulkResult cs_sink = sink2->result();
  sink2.reset();
  const double send_ratio = cs_sink.gbps > 0 ? gs.gbps / cs_sink.gbps : 0;
  std::printf("GPU -> peer, sends of %u KiB: kernel %.2f GB/s   cpu (pinned) %.2f GB/s   ratio %.2f   (as the sink "
              "measured both; %.0f%% of the kernel's bytes taken out of device memory by the host)\n",
              send_chunk / 1024, gs.gbps, cs_sink.gbps, send_ratio, 100.0 * static_cast<double>(taken) / static_cast<double>(total));
  // What a warp_send piece costs the warp before its hostcall: its copy into staging.
  constexpr uint32_t kCopyReps = 64;
  auto kc = launched(gpusock::launch(rt, {1}, {32}, WarpStagingCopy{}, static_cast<uint8_t*>(pinned->device), src->data(),
                                     kChunk, kCopyReps, out->data()),
                     "staging copy");
  kc->wait();
  const int64_t copy_ns = out->to_host()[0];
  const double copy_gbps = copy_ns > 0 ? static_cast<double>(kChunk) * kCopyReps / static_cast<double>(copy_ns) : 0;
  std::printf("one warp's copy of %u KiB device -> pinned (as into staging): %.2f GB/s, %.1f us a piece\n", kChunk / 1024,
              copy_gbps, copy_ns / 1e3 / kCopyReps);
  // peer -> GPU: the block receiver checking after each call (the CPU receiver's shape),
  // the CPU receiver, then the pipelined block receiver.
  auto dst = gpusock::DeviceBuffer<uint8_t>::create(rt, 2 * static_cast<size_t>(recv_ask));
  bn::BulkSourceOptions so;
  so.total_bytes = total;
  struct GpuRecv {
    double gbps = 0, share = 0, in_recv_gbps = 0;  // in_recv: bytes over the time inside warp_recv alone
    int64_t bytes = 0, wrong = 0;
  };
  auto gpu_receive = [&](bool overlap) {
    auto source = bn::BulkSource::start(so, &err);
    auto o2 = gpusock::DeviceBuffer<int64_t>::create(rt, 7);
    auto kr = launched(gpusock::launch(rt, {check_blocks}, {32 * check_warps}, GridReceiver{}, source->port(), dst->data(), recv_ask,
                                       o2->data(), overlap),
                       "receiver (fewer --check-warps or --check-blocks may fit)");
    kr->wait();
    source->wait(60000);
    auto o = o2->to_host();
    GpuRecv g;
    g.bytes = o[0];
    g.wrong = o[2];
    g.gbps = o[1] > 0 ? static_cast<double>(o[0]) / static_cast<double>(o[1]) : 0;  // bytes/ns = GB/s
    g.share = o[1] > 0 ? static_cast<double>(o[3]) / static_cast<double>(o[1]) : 0;
    g.in_recv_gbps = o[3] > 0 ? static_cast<double>(o[0]) / static_cast<double>(o[3]) : 0;
    return g;
  };
  const GpuRecv serial = gpu_receive(false);
  auto source2 = bn::BulkSource::start(so, &err);
  bn::BulkResult cr = bn::cpu_recv("127.0.0.1", source2->port(), total, pin, 4 << 20);
  source2->wait(60000);
  source2.reset();
  const GpuRecv piped = check_warps * check_blocks >= 2 ? gpu_receive(true) : GpuRecv{};
  const double recv_ratio = cr.gbps > 0 ? serial.gbps / cr.gbps : 0;
  const double piped_ratio = cr.gbps > 0 ? piped.gbps / cr.gbps : 0;
  std::printf("peer -> GPU: kernel %.2f GB/s (%lld bytes, %lld wrong; %.0f%% of the time inside warp_recv, %.2f GB/s "
              "there; the rest checking with %u blocks x %u warps)   cpu (pinned) %.2f GB/s%s   ratio %.2f\n",
              serial.gbps, static_cast<long long>(serial.bytes), static_cast<long long>(serial.wrong), 100.0 * serial.share,
              serial.in_recv_gbps, check_blocks, check_warps, cr.gbps, cr.error.empty() ? "" : (" [" + cr.error + "]").c_str(), recv_ratio);
  std::printf("peer -> GPU, checking while the next call runs: kernel %.2f GB/s (%lld bytes, %lld wrong; %u warps check)"
              "   ratio to the same cpu %.2f\n",
              piped.gbps, static_cast<long long>(piped.bytes), static_cast<long long>(piped.wrong),
              check_warps * check_blocks - 1, piped_ratio);
  js.add("bulk", "{\"bytes\":" + std::to_string(total) + ",\"gpu_to_peer_gbps\":" + num(gs.gbps) +
                     ",\"cpu_send_gbps\":" + num(cs_sink.gbps) + ",\"send_ratio\":" + num(send_ratio) + ",\"gpu_to_peer_taken_bytes\":" + std::to_string(taken) +
                     ",\"warp_staging_copy_gbps\":" + num(copy_gbps) + ",\"peer_to_gpu_gbps\":" + num(serial.gbps) +
                     ",\"peer_to_gpu_wrong_bytes\":" + std::to_string(serial.wrong) +
                     ",\"peer_to_gpu_recv_share\":" + num(serial.share) +
                     ",\"peer_to_gpu_in_recv_gbps\":" + num(serial.in_recv_gbps) + ",\"cpu_recv_gbps\":" + num(cr.gbps) +
                     ",\"recv_ratio\":" + num(recv_ratio) + ",\"peer_to_gpu_pipelined_gbps\":" + num(piped.gbps) +
                     ",\"peer_to_gpu_pipelined_wrong_bytes\":" + std::to_string(piped.wrong) +
                     ",\"pipelined_recv_ratio\":" + num(piped_ratio) + "}");

  // ---- SEND_ZC threshold ----
  if (!bulk_only) {
    std::printf("\nio_uring send vs send_zc on loopback, GB/s\n%-10s %8s %8s\n", "chunk", "send", "send_zc");
    auto pts = bn::sweep_send_zc({4096, 16384, 65536, 262144, 1 << 20}, quick ? (64ull << 20) : (512ull << 20));
    std::string zc = "[";
    for (auto& p : pts) {
      std::printf("%-10zu %8.2f %8.2f%s\n", p.chunk_bytes, p.send_gbps, p.send_zc_gbps, p.error.empty() ? "" : (" " + p.error).c_str());
      zc += std::string(zc.size() > 1 ? "," : "") + "{\"chunk\":" + std::to_string(p.chunk_bytes) + ",\"send_gbps\":" +
            num(p.send_gbps) + ",\"send_zc_gbps\":" + num(p.send_zc_gbps) + "}";
    }
    js.add("send_zc_sweep", zc + "]");
  }
  js.s += "\n}\n";
  if (!json_path.empty()) std::ofstream(json_path) << js.s;
  rt.mapped_free(pinned->host);
  return 0;
}
