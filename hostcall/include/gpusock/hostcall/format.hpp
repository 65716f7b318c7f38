// gpusock/hostcall/format.hpp — building text in kernels, where there is no printf that
// reaches a file descriptor.
//
//   gpusock::Line<128> line;
//   line.add("warp ").add(gpusock::global_warp_id()).add(": ").add(-3).add('\n');
//   gpusock::write(1, line.data(), line.size());
#pragma once

#include <cstdint>

#include "gpusock/hostcall/platform.hpp"

namespace gpusock {

// A fixed-capacity character buffer. Appends past capacity are dropped and set
// truncated(); the buffer is never overrun.
template <uint32_t N>
class Line {
 public:
  GPUSOCK_HD Line& add(char c) {
    if (n_ < N) {
      buf_[n_++] = c;
    } else {
      truncated_ = true;
    }
    return *this;
  }
  GPUSOCK_HD Line& add(const char* s) {
    while (*s != '\0') add(*s++);
    return *this;
  }
  GPUSOCK_HD Line& add(const char* s, uint32_t len) {
    for (uint32_t i = 0; i < len; ++i) add(s[i]);
    return *this;
  }
  GPUSOCK_HD Line& add(uint64_t v) {
    char tmp[20];
    int k = 0;
    do {
      tmp[k++] = static_cast<char>('0' + v % 10);
      v /= 10;
    } while (v != 0);
    while (k > 0) add(tmp[--k]);
    return *this;
  }
  GPUSOCK_HD Line& add(int64_t v) {
    if (v < 0) {
      add('-');
      return add(static_cast<uint64_t>(0) - static_cast<uint64_t>(v));
    }
    return add(static_cast<uint64_t>(v));
  }
  GPUSOCK_HD Line& add(uint32_t v) { return add(static_cast<uint64_t>(v)); }
  GPUSOCK_HD Line& add(int32_t v) { return add(static_cast<int64_t>(v)); }

  GPUSOCK_HD const char* data() const { return buf_; }
  GPUSOCK_HD uint32_t size() const { return n_; }
  GPUSOCK_HD bool truncated() const { return truncated_; }
  GPUSOCK_HD void clear() {
    n_ = 0;
    truncated_ = false;
  }

 private:
  char buf_[N];
  uint32_t n_ = 0;
  bool truncated_ = false;
};

}  // namespace gpusock
