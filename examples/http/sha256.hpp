// examples/http/sha256.hpp — SHA-256 (FIPS 180-4), incremental, for kernels and the host.
//
//   gpusock::http::Sha256 h;                 // initialised
//   h.update(bytes, n);                      // any number of times, any piece sizes
//   char hex[64];
//   h.finish_hex(hex);                       // 64 lower-case hex digits, no NUL
//
// The server hashes the bodies of POST /sha256 with this. SHA-256 chains its 64-byte
// blocks (each block's compression starts from the previous one's result), so one digest
// is sequential work; the server's warp parallelism is across bodies: each lane hashes the
// bodies of its own connections, and lanes that received body bytes in the same round run
// these compression rounds side by side (see server.hpp and docs/architecture.md 16.5).
#pragma once

#include <cstdint>

#include "gpusock/hostcall/platform.hpp"

namespace gpusock::http {

namespace internal {
GPUSOCK_HD inline uint32_t rotr(uint32_t x, uint32_t n) { return (x >> n) | (x << (32 - n)); }
}  // namespace internal

struct Sha256 {
  uint32_t state[8];
  uint64_t total;    // bytes hashed
  uint32_t fill;     // bytes waiting in block
  uint8_t block[64];

  GPUSOCK_HD Sha256() { reset(); }

  GPUSOCK_HD void reset() {
    state[0] = 0x6a09e667u;
    state[1] = 0xbb67ae85u;
    state[2] = 0x3c6ef372u;
    state[3] = 0xa54ff53au;
    state[4] = 0x510e527fu;
    state[5] = 0x9b05688cu;
    state[6] = 0x1f83d9abu;
    state[7] = 0x5be0cd19u;
    total = 0;
    fill = 0;
  }

  GPUSOCK_HD void compress(const uint8_t* b) {
    // The round constants live in the function so the header needs no device globals.
    const uint32_t k[64] = {
        0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
        0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
        0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
        0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
        0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
        0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
        0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
        0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};
    using internal::rotr;
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = (uint32_t(b[4 * i]) << 24) | (uint32_t(b[4 * i + 1]) << 16) | (uint32_t(b[4 * i + 2]) << 8) |
             uint32_t(b[4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state[0], b2 = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b2) ^ (a & c) ^ (b2 & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b2;
      b2 = a;
      a = t1 + t2;
    }
    state[0] += a;
    state[1] += b2;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
  }

  GPUSOCK_HD void update(const uint8_t* p, uint64_t n) {
    total += n;
    if (fill > 0) {
      while (n > 0 && fill < 64) {
        block[fill++] = *p++;
        --n;
      }
      if (fill < 64) return;
      compress(block);
      fill = 0;
    }
    for (; n >= 64; n -= 64, p += 64) compress(p);
    while (n > 0) {
      block[fill++] = *p++;
      --n;
    }
  }

  // Writes the 32-byte digest; the object must be reset() before it is used again.
  GPUSOCK_HD void finish(uint8_t out[32]) {
    const uint64_t bits = total * 8;
    block[fill++] = 0x80;
    if (fill > 56) {
      while (fill < 64) block[fill++] = 0;
      compress(block);
      fill = 0;
    }
    while (fill < 56) block[fill++] = 0;
    for (int i = 0; i < 8; ++i) block[56 + i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
    compress(block);
    for (int i = 0; i < 8; ++i) {
      out[4 * i] = static_cast<uint8_t>(state[i] >> 24);
      out[4 * i + 1] = static_cast<uint8_t>(state[i] >> 16);
      out[4 * i + 2] = static_cast<uint8_t>(state[i] >> 8);
      out[4 * i + 3] = static_cast<uint8_t>(state[i]);
    }
  }

  GPUSOCK_HD void finish_hex(char out[64]) {
    uint8_t d[32];
    finish(d);
    const char* digits = "0123456789abcdef";
    for (int i = 0; i < 32; ++i) {
      out[2 * i] = digits[d[i] >> 4];
      out[2 * i + 1] = digits[d[i] & 15];
    }
  }
};

}  // namespace gpusock::http
