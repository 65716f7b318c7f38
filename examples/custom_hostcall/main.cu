// examples/custom_hostcall — how to give kernels a call of your own.
//
// The host keeps a price table; kernels look items up in it with a hostcall that this
// program defines: an opcode in the user range, a handler on the host, and a typed stub
// on the device. Every lane asks for its own item; a warp's 32 questions travel in one
// slot and come back in one reply. Each warp then reports with write(1, ...) and times
// itself with clock_gettime(), which never leaves the device.
//
//   custom_hostcall [--device cpu|cuda] [--blocks N] [--threads N]
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <unordered_map>

#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/format.hpp"
#include "gpusock/hostcall/io.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/opcodes.hpp"
#include "gpusock/hostcall/runtime.hpp"

// 1. An opcode from the user range.
constexpr uint32_t kOpPriceLookup = gpusock::hostcall::kUserFirst + 1;

// 2. The typed device stub: what kernel code calls. Returns the price in cents, or
//    -ENOENT for an unknown item.
GPUSOCK_HD inline int64_t price_lookup(uint64_t item) {
  return gpusock::hostcall::call(kOpPriceLookup, item);
}

struct PriceKernel {
  GPUSOCK_HD void operator()(uint64_t catalogue_size, int64_t* totals) const {
    timespec t0, t1;
    gpusock::clock_gettime(CLOCK_MONOTONIC, &t0);
    const uint64_t tid = gpusock::global_thread_id();
    // Every lane asks for a different item; some items do not exist.
    const uint64_t item = (tid * 7) % (catalogue_size + catalogue_size / 4);
    const int64_t price = price_lookup(item);
    gpusock::clock_gettime(CLOCK_MONOTONIC, &t1);

    // Warp-wide sums with shuffles over every lane of the warp, then one lane reports.
    // (Not active_mask(): lanes need not still be converged after a call.)
    const uint32_t mask = gpusock::warp::existing_mask();
    int64_t sum = price > 0 ? price : 0;
    int64_t misses = price == -ENOENT ? 1 : 0;
    int64_t total = 0, total_misses = 0;
    for (uint32_t m = mask; m != 0; m &= m - 1) {
      uint32_t l = gpusock::lowest_bit(m);
      total += gpusock::warp::shfl(mask, sum, l);
      total_misses += gpusock::warp::shfl(mask, misses, l);
    }
    if (gpusock::warp::lane_id() == gpusock::warp::leader(mask)) {
      const int64_t ns = (t1.tv_sec - t0.tv_sec) * 1000000000ll + (t1.tv_nsec - t0.tv_nsec);
      gpusock::Line<128> line;
      line.add("warp ").add(gpusock::global_warp_id()).add(": ").add(gpusock::popcount(mask)).add(" lookups, total ")
          .add(total).add(" cents, ").add(total_misses).add(" unknown, ").add(ns / 1000).add(" us\n");
      gpusock::write(1, line.data(), line.size());
      totals[gpusock::global_warp_id()] = total;
    }
  }
};

int main(int argc, char** argv) {
  gpusock::RuntimeOptions opts;
  uint32_t blocks = 4, threads = 64;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--device" && i + 1 < argc) {
      opts.device = std::strcmp(argv[++i], "cpu") == 0 ? gpusock::DeviceKind::kCpu : gpusock::DeviceKind::kCuda;
    } else if (a == "--blocks" && i + 1 < argc) {
      blocks = static_cast<uint32_t>(std::stoul(argv[++i]));
    } else if (a == "--threads" && i + 1 < argc) {
      threads = static_cast<uint32_t>(std::stoul(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--device cpu|cuda] [--blocks N] [--threads N]\n", argv[0]);
      return 2;
    }
  }
  auto rt = gpusock::Runtime::create(opts);
  if (!rt.ok()) {
    std::fprintf(stderr, "gpusock: %s\n", rt.status().to_string().c_str());
    return 1;
  }
  std::printf("gpusock runtime on %s: %s\n", gpusock::to_string((*rt)->device()), (*rt)->device_name().c_str());

  // 3. The host handler: one call carries up to 32 lanes, each with its own item.
  std::unordered_map<uint64_t, int64_t> prices;
  const uint64_t catalogue = 400;
  for (uint64_t i = 0; i < catalogue; ++i) prices[i] = 100 + static_cast<int64_t>(i % 97) * 5;
  gpusock::Status s = (*rt)->register_handler(kOpPriceLookup, "price-lookup", [&prices](gpusock::hostcall::Call& call) {
    call.for_each_lane([&](uint32_t lane) {
      auto it = prices.find(call.arg(lane, 0));
      call.set_result(lane, it == prices.end() ? -ENOENT : it->second);
    });
  });
  if (!s.ok()) {
    std::fprintf(stderr, "register_handler: %s\n", s.to_string().c_str());
    return 1;
  }

  const uint32_t warps = blocks * ((threads + 31) / 32);
  auto totals = gpusock::DeviceBuffer<int64_t>::create(**rt, warps);
  if (!totals.ok()) return 1;
  std::fflush(stdout);
  auto k = gpusock::launch(**rt, {blocks}, {threads}, PriceKernel{}, catalogue, totals->data());
  if (!k.ok()) {
    std::fprintf(stderr, "launch: %s\n", k.status().to_string().c_str());
    return 1;
  }
  s = k->wait();
  if (!s.ok()) {
    std::fprintf(stderr, "kernel: %s\n", s.to_string().c_str());
    return 1;
  }

  // Check the kernel's sums against the table, on the host.
  int64_t want = 0, got = 0;
  for (uint64_t tid = 0; tid < uint64_t{blocks} * threads; ++tid) {
    auto it = prices.find((tid * 7) % (catalogue + catalogue / 4));
    if (it != prices.end()) want += it->second;
  }
  for (int64_t v : totals->to_host()) got += v;
  auto st = (*rt)->stats();
  std::printf("\nhost: %llu hostcalls served (", static_cast<unsigned long long>(st.calls));
  for (const auto& o : st.by_opcode) {
    if (o.calls != 0) {
      std::printf(" %s: %llu slots / %llu lanes", o.name.c_str(), static_cast<unsigned long long>(o.calls),
                  static_cast<unsigned long long>(o.lanes));
    }
  }
  std::printf(" )\nsum of all prices looked up: %lld cents (host check: %lld) %s\n", static_cast<long long>(got),
              static_cast<long long>(want), got == want ? "OK" : "MISMATCH");
  return got == want ? 0 : 1;
}
