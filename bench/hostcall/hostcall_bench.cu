// bench/hostcall — hostcall round trip and throughput, each beside its baseline from the
// same run.
//
//   latency:    null hostcall round trip (one lane, one host thread) vs the physical
//               floor: one device thread and one host thread ping-ponging a flag in the
//               same kind of mapped pinned memory. Ratio = hostcall / floor.
//   throughput: null calls/s (warp slots and lane calls) for 1..all resident warps and
//               1..4 host service threads, synchronous and with 4 calls in flight per lane.
//   wake-up:    round trip of a call that arrives after the service thread parked,
//               beside the configured park interval.
//
// Usage: hostcall_bench [--device cpu|cuda] [--json FILE] [--quick]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/opcodes.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "common/bench_util.hpp"

namespace {

using gpusock::AtomicRef;
using gpusock::Order;
using gpusock::Scope;
namespace hc = gpusock::hostcall;

// Device thread 0 writes 2i+1, the host answers 2i+2; each round trip is timed on the
// device clock. `ordered` = 1 publishes with a system-scope release and polls with
// acquire (what a call carrying data needs); 0 uses relaxed accesses (the bare flag).
// A round that spins for more than 2 s gives up (-1).
struct FloorPingPong {
  GPUSOCK_HD void operator()(uint32_t* flag, int64_t* lat, int iters, int ordered) const {
    if (gpusock::global_thread_id() != 0) return;
    AtomicRef<uint32_t, Scope::kSystem> f(*flag);
    const Order st = ordered ? Order::kRelease : Order::kRelaxed;
    const Order ld = ordered ? Order::kAcquire : Order::kRelaxed;
    for (int i = 0; i < iters; ++i) {
      uint64_t t0 = gpusock::globaltimer_ns();
      f.store(static_cast<uint32_t>(2 * i + 1), st);
      bool ok = false;
      while (gpusock::globaltimer_ns() - t0 < 2000000000ull) {
        if (f.load(ld) == static_cast<uint32_t>(2 * i + 2)) {
          ok = true;
          break;
        }
      }
      lat[i] = ok ? static_cast<int64_t>(gpusock::globaltimer_ns() - t0) : -1;
      if (!ok) return;
    }
  }
};

struct NullLatency {
  GPUSOCK_HD void operator()(int64_t* lat, int iters, uint64_t gap_ns) const {
    if (gpusock::global_thread_id() != 0) return;
    for (int i = 0; i < iters; ++i) {
      if (gap_ns != 0) {
        uint64_t until = gpusock::globaltimer_ns() + gap_ns;
        while (gpusock::globaltimer_ns() < until) {
        }
      }
      uint64_t t0 = gpusock::globaltimer_ns();
      int64_t r = hc::call(hc::op::kNull);
      lat[i] = r == 0 ? static_cast<int64_t>(gpusock::globaltimer_ns() - t0) : -1;
    }
  }
};

// The null call's steps, timed one by one on the device clock: the two allocation atomics,
// the header stores plus the system-scope release of the state, and the wait from the
// doorbell to the reply. Uses the client's internals exactly as submit/wait do.
struct NullBreakdown {
  GPUSOCK_HD void operator()(int64_t* t, int iters) const {
    if (gpusock::global_thread_id() != 0) return;
    const hc::DeviceContext* c = hc::context();
    for (int i = 0; i < iters; ++i) {
      uint64_t t0 = gpusock::globaltimer_ns();
      uint32_t pos = hc::internal::take_ring_position(c);
      uint32_t slot = 0;
      if (!hc::internal::try_home_slot(c, 0, &slot) && hc::internal::acquire_slot(c, 0, &slot) != 0) return;
      uint64_t t1 = gpusock::globaltimer_ns();
      hc::Slot* s = c->slots + slot;
      uint32_t seq = pos & hc::kSeqMask;
      s->tag[0] = hc::request_tag(seq);
      hc::internal::write_request(s->hdr, hc::op::kNull, 1, 0, 0, 0, seq, 0);
      AtomicRef<uint64_t, Scope::kSystem>(s->hdr.state).store(hc::make_state(seq, hc::kRequest), Order::kRelease);
      uint64_t t2 = gpusock::globaltimer_ns();
      hc::internal::ring_doorbell(c, pos, slot, seq);
      AtomicRef<uint64_t, Scope::kSystem> st(s->hdr.state);
      while (hc::state_phase(st.load(Order::kRelaxed)) < hc::kReply) {
      }
      uint64_t t3 = gpusock::globaltimer_ns();
      hc::internal::release_slot(c, slot);
      uint64_t t4 = gpusock::globaltimer_ns();
      t[i * 4 + 0] = static_cast<int64_t>(t1 - t0);
      t[i * 4 + 1] = static_cast<int64_t>(t2 - t1);
      t[i * 4 + 2] = static_cast<int64_t>(t3 - t2);
      t[i * 4 + 3] = static_cast<int64_t>(t4 - t3);
    }
  }
};

struct NullThroughput {
  GPUSOCK_HD void operator()(int64_t* bad, int iters, int depth) const {
    int64_t wrong = 0;
    if (depth <= 1) {
      for (int i = 0; i < iters; ++i) wrong += hc::call(hc::op::kNull) != 0;
    } else {
      hc::Ticket t[4];
      for (int i = 0; i < iters; i += depth) {
        for (int d = 0; d < depth; ++d) t[d] = hc::submit(hc::op::kNull);
        for (int d = 0; d < depth; ++d) wrong += hc::wait(t[d]) != 0;
      }
    }
    if (wrong != 0) gpusock::AtomicRef<int64_t, Scope::kDevice>(*bad).fetch_add(wrong, Order::kRelaxed);
  }
};

using gpusock::bench::Percentiles;
using gpusock::bench::percentiles;

std::unique_ptr<gpusock::Runtime> make_runtime(gpusock::DeviceKind device, uint32_t threads, uint32_t slots_per_warp,
                                               std::chrono::nanoseconds spin = std::chrono::milliseconds(50),
                                               std::chrono::nanoseconds park = std::chrono::microseconds(50)) {
  gpusock::RuntimeOptions o;
  o.device = device;
  o.service_threads = threads;
  o.slots_per_warp = slots_per_warp;
  o.spin_time = spin;
  o.park_interval = park;
  o.cpu_resident_warps = 16;
  auto rt = gpusock::Runtime::create(o);
  if (!rt.ok()) {
    std::fprintf(stderr, "runtime: %s\n", rt.status().to_string().c_str());
    std::exit(1);
  }
  return std::move(rt.value());
}

template <typename K, typename... A>
double run_timed(gpusock::Runtime& rt, gpusock::Dim3 grid, gpusock::Dim3 block, K k, A... a) {
  auto t0 = std::chrono::steady_clock::now();
  auto l = gpusock::launch(rt, grid, block, k, a...);
  if (!l.ok()) {
    std::fprintf(stderr, "launch: %s\n", l.status().to_string().c_str());
    std::exit(1);
  }
  gpusock::Status s = l->wait();
  auto t1 = std::chrono::steady_clock::now();
  if (!s.ok()) {
    std::fprintf(stderr, "kernel: %s\n", s.to_string().c_str());
    std::exit(1);
  }
  return std::chrono::duration<double>(t1 - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  gpusock::bench::BenchArgs args;
  if (!gpusock::bench::parse_bench_args(argc, argv, &args)) return 2;
  gpusock::DeviceKind device = args.device;
  const std::string json_path = args.json_path;
  bool quick = args.quick;
  if (device == gpusock::DeviceKind::kAuto) device = gpusock::detect_device();
  if (device == gpusock::DeviceKind::kCpu) quick = true;
  std::string json = "{\n";

  // ---- latency: floor and null call, same runtime, same memory kind ----
  auto rt = make_runtime(device, 1, 2);
  std::printf("device: %s\n", rt->device_name().c_str());
  json += "  \"device\": \"" + rt->device_name() + "\",\n";
  const int lat_iters = quick ? 2000 : 20000;
  Percentiles floor_p, floor_relaxed_p, null_p;
  {
    auto lat = gpusock::DeviceBuffer<int64_t>::create(*rt, lat_iters);
    if (!lat.ok()) return 1;
    for (int ordered : {1, 0}) {
      auto flag = rt->mapped_alloc(64);
      if (!flag.ok()) return 1;
      auto* hflag = static_cast<uint32_t*>(flag->host);
      std::atomic<bool> stop{false};
      std::thread host([&] {
        std::atomic_ref<uint32_t> f(*hflag);
        for (int i = 0; i < lat_iters && !stop.load(std::memory_order_relaxed); ++i) {
          while (f.load(std::memory_order_acquire) != static_cast<uint32_t>(2 * i + 1)) {
            if (stop.load(std::memory_order_relaxed)) return;
          }
          f.store(static_cast<uint32_t>(2 * i + 2), std::memory_order_release);
        }
      });
      run_timed(*rt, {1}, {1}, FloorPingPong{}, static_cast<uint32_t*>(flag->device), lat->data(), lat_iters,
                ordered);
      stop = true;
      host.join();
      (ordered ? floor_p : floor_relaxed_p) = percentiles(lat->to_host());
      rt->mapped_free(flag->host);
    }
    run_timed(*rt, {1}, {1}, NullLatency{}, lat->data(), lat_iters, uint64_t{0});
    null_p = percentiles(lat->to_host());
  }
  std::printf("\nround trip (us)                 p50      p99    p99.9      min    n\n");
  std::printf("floor, release/acquire flag    %7.2f  %7.2f  %7.2f  %7.2f  %zu\n", floor_p.p50, floor_p.p99, floor_p.p999,
              floor_p.min, floor_p.n);
  std::printf("floor, relaxed flag            %7.2f  %7.2f  %7.2f  %7.2f  %zu\n", floor_relaxed_p.p50,
              floor_relaxed_p.p99, floor_relaxed_p.p999, floor_relaxed_p.min, floor_relaxed_p.n);
  std::printf("null hostcall                  %7.2f  %7.2f  %7.2f  %7.2f  %zu\n", null_p.p50, null_p.p99, null_p.p999,
              null_p.min, null_p.n);
  std::printf("ratio hostcall/floor (rel/acq) %7.3f  %7.3f  %7.3f\n", null_p.p50 / floor_p.p50, null_p.p99 / floor_p.p99,
              null_p.p999 / floor_p.p999);
  std::printf("ratio hostcall/floor (relaxed) %7.3f  %7.3f  %7.3f\n", null_p.p50 / floor_relaxed_p.p50,
              null_p.p99 / floor_relaxed_p.p99, null_p.p999 / floor_relaxed_p.p999);
  auto pj = [](const Percentiles& p) {
    char b[256];
    std::snprintf(b, sizeof b, "{\"p50_us\": %.3f, \"p99_us\": %.3f, \"p999_us\": %.3f, \"min_us\": %.3f, \"n\": %zu}", p.p50,
                  p.p99, p.p999, p.min, p.n);
    return std::string(b);
  };
  json += "  \"latency\": {\"floor_release_acquire\": " + pj(floor_p) + ", \"floor_relaxed\": " + pj(floor_relaxed_p) +
          ", \"null_call\": " + pj(null_p) + ", \"ratio_p50\": " + std::to_string(null_p.p50 / floor_p.p50) +
          ", \"ratio_p50_relaxed_floor\": " + std::to_string(null_p.p50 / floor_relaxed_p.p50) + "},\n";

  // ---- where the null call's time goes ----
  {
    const int n = quick ? 500 : 5000;
    auto t = gpusock::DeviceBuffer<int64_t>::create(*rt, size_t(n) * 4);
    if (!t.ok()) return 1;
    run_timed(*rt, {1}, {1}, NullBreakdown{}, t->data(), n);
    auto h = t->to_host();
    const char* names[4] = {"ring position + home slot atomics", "header + system release of state",
                            "doorbell to reply seen", "slot release"};
    std::printf("\nnull call, step by step (p50 us):");
    json += "  \"breakdown_p50_us\": {";
    for (int k = 0; k < 4; ++k) {
      std::vector<int64_t> v;
      for (int i = 0; i < n; ++i) v.push_back(h[i * 4 + k]);
      Percentiles p = percentiles(v);
      std::printf("\n  %-36s %7.2f", names[k], p.p50);
      json += std::string(k ? ", " : "") + "\"" + names[k] + "\": " + std::to_string(p.p50);
    }
    std::printf("\n");
    json += "},\n";
  }

  // ---- wake-up after park ----
  {
    auto park_rt = make_runtime(device, 1, 2, std::chrono::microseconds(100), std::chrono::microseconds(50));
    const int n = quick ? 30 : 200;
    auto lat = gpusock::DeviceBuffer<int64_t>::create(*park_rt, n);
    if (!lat.ok()) return 1;
    run_timed(*park_rt, {1}, {1}, NullLatency{}, lat->data(), n, uint64_t{2000000});  // 2 ms gaps: host parks
    Percentiles w = percentiles(lat->to_host());
    std::printf("\nwake-up after park (park interval 50 us, spin 100 us): p50 %.1f us, p99 %.1f us, max %.1f us (n=%zu)\n",
                w.p50, w.p99, w.max, w.n);
    json += "  \"wakeup_after_park\": {\"park_interval_us\": 50, \"result\": " + pj(w) + "},\n";
  }

  // ---- throughput ----
  const uint32_t all = rt->max_resident_warps();
  rt.reset();
  std::vector<uint32_t> warp_counts = {1, 4, 16, 64, 256, 1024};
  warp_counts.erase(std::remove_if(warp_counts.begin(), warp_counts.end(), [&](uint32_t w) { return w >= all; }),
                    warp_counts.end());
  warp_counts.push_back(all);
  std::printf("\nthroughput: null calls (M/s)       lane-calls  warp-slots   per lane in flight\n");
  std::printf("%8s %8s %6s %14s %12s\n", "warps", "threads", "depth", "lane-calls/s", "slots/s");
  json += "  \"throughput\": [\n";
  bool first = true;
  for (int depth : {1, 4}) {
    for (uint32_t threads : {1u, 2u, 4u}) {
      auto trt = make_runtime(device, threads, depth == 1 ? 2 : 5);
      for (uint32_t warps : warp_counts) {
        uint32_t block_warps = std::min<uint32_t>(warps, device == gpusock::DeviceKind::kCpu ? 4 : 8);
        uint32_t grid = (warps + block_warps - 1) / block_warps;
        uint64_t budget = quick ? 20000 : 2000000;  // warp-slot calls per configuration
        int iters = static_cast<int>(std::clamp<uint64_t>(budget / warps, quick ? 8 : 100, quick ? 200 : 4000));
        iters = (iters + 3) / 4 * 4;
        auto bad = gpusock::DeviceBuffer<int64_t>::create(*trt, 1);
        if (!bad.ok()) return 1;
        double secs = run_timed(*trt, {grid}, {block_warps * 32}, NullThroughput{}, bad->data(), iters, depth);
        if (bad->to_host()[0] != 0) {
          std::fprintf(stderr, "wrong replies\n");
          return 1;
        }
        double lanes = double(grid) * block_warps * 32 * iters;
        double slots = double(grid) * block_warps * iters;
        auto st = trt->stats();
        std::printf("%8u %8u %6d %14.2f %12.3f   early doorbells %llu, swept %llu\n", grid * block_warps, threads, depth,
                    lanes / secs / 1e6, slots / secs / 1e6, static_cast<unsigned long long>(st.early_doorbells),
                    static_cast<unsigned long long>(st.swept));
        char b[256];
        std::snprintf(b, sizeof b,
                      "%s    {\"warps\": %u, \"host_threads\": %u, \"depth\": %d, \"lane_calls_per_s\": %.0f, "
                      "\"slots_per_s\": %.0f, \"seconds\": %.4f}",
                      first ? "" : ",\n", grid * block_warps, threads, depth, lanes / secs, slots / secs, secs);
        json += b;
        first = false;
      }
    }
  }
  json += "\n  ]\n}\n";
  if (!json_path.empty()) {
    std::ofstream(json_path) << json;
    std::printf("\nwrote %s\n", json_path.c_str());
  }
  return 0;
}
