// What every benchmark binary shares: its command line and latency percentiles.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "gpusock/hostcall/runtime.hpp"

namespace gpusock::bench {

// [--device cpu|cuda] [--json FILE] [--quick]
struct BenchArgs {
  DeviceKind device = DeviceKind::kAuto;
  std::string json_path;
  bool quick = false;
};

// Fills *out; on anything else prints the usage and returns false (exit with 2).
inline bool parse_bench_args(int argc, char** argv, BenchArgs* out) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--device" && i + 1 < argc) {
      out->device = std::string(argv[++i]) == "cpu" ? DeviceKind::kCpu : DeviceKind::kCuda;
    } else if (a == "--json" && i + 1 < argc) {
      out->json_path = argv[++i];
    } else if (a == "--quick") {
      out->quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--device cpu|cuda] [--json FILE] [--quick]\n", argv[0]);
      return false;
    }
  }
  return true;
}

// Percentiles in microseconds of samples in nanoseconds. Samples <= 0 were not taken (a
// failed or unwritten slot) and are left out.
struct Percentiles {
  double p50 = 0, p99 = 0, p999 = 0, min = 0, max = 0;
  size_t n = 0;
};

inline Percentiles percentiles(std::vector<int64_t> v) {
  v.erase(std::remove_if(v.begin(), v.end(), [](int64_t x) { return x <= 0; }), v.end());
  Percentiles p;
  p.n = v.size();
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  auto at = [&](double q) { return v[std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5))] / 1000.0; };
  p.p50 = at(0.5);
  p.p99 = at(0.99);
  p.p999 = at(0.999);
  p.min = v.front() / 1000.0;
  p.max = v.back() / 1000.0;
  return p;
}

}  // namespace gpusock::bench
