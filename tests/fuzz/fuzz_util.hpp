// tests/fuzz/fuzz_util.hpp — what the fuzz targets share: FUZZ_CHECK, which aborts with the
// failed condition (libFuzzer then saves the input as a crash), and Reader, which takes
// fixed-size values off the front of the input and gives zeros once it runs out, so every
// input, however short, decodes to something.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define FUZZ_CHECK(c)                                                                  \
  do {                                                                                 \
    if (!(c)) {                                                                        \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c);      \
      std::abort();                                                                    \
    }                                                                                  \
  } while (0)

namespace gpusock::fuzz {

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), left_(size) {}
  // The next n bytes into out; bytes past the end of the input read as 0.
  void bytes(void* out, size_t n) {
    const size_t k = n < left_ ? n : left_;
    if (k > 0) std::memcpy(out, p_, k);
    if (n > k) std::memset(static_cast<uint8_t*>(out) + k, 0, n - k);
    p_ += k;
    left_ -= k;
  }
  template <typename T>
  T get() {
    T v;
    bytes(&v, sizeof v);
    return v;
  }
  uint8_t u8() { return get<uint8_t>(); }
  uint16_t u16() { return get<uint16_t>(); }
  uint32_t u32() { return get<uint32_t>(); }
  uint64_t u64() { return get<uint64_t>(); }
  const uint8_t* rest() const { return p_; }
  size_t left() const { return left_; }

 private:
  const uint8_t* p_;
  size_t left_;
};

}  // namespace gpusock::fuzz
