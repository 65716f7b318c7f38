// libFuzzer target for examples/http/parser.hpp, the same GPUSOCK_HD code the server
// kernel runs. Input: byte 0 picks max_header_bytes (64 + 32 * b), byte 1 max_body_bytes
// (97 * b), byte 2 seeds the receive piece sizes; the rest is the byte stream a client
// sends. The stream is fed twice the way the server feeds it (a buffer of
// max_header_bytes, the unparsed tail kept): once in the largest pieces that fit and once
// in pseudo-random small pieces. Checked on every step: consumed bytes and body pieces lie
// inside the input, every step makes progress, bodies match their Content-Length and stay
// under the limit; and both runs must see the same requests, bodies and final error.
//
// Built with clang -fsanitize=fuzzer,address,undefined where clang is found; built with
// GPUSOCK_FUZZ_REPLAY (any compiler) it is a plain program that runs the files named on
// its command line (the seed corpus) through the same checks.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "parser.hpp"

namespace {

using namespace gpusock::http;

#define CHECK(c)                                                              \
  do {                                                                        \
    if (!(c)) {                                                               \
      std::fprintf(stderr, "parser_fuzz: check failed: %s (line %d)\n", #c, __LINE__); \
      std::abort();                                                           \
    }                                                                         \
  } while (0)

struct Result {
  std::string transcript;  // heads and bodies, in order
  int error = 0;
};

Result run(const uint8_t* data, size_t size, const Limits& lim, uint32_t seed, bool small) {
  Result res;
  std::vector<uint8_t> buf(lim.max_header_bytes);
  uint32_t used = 0;
  size_t pos = 0;
  Parser p;
  uint64_t body = 0;
  size_t steps = 0;
  uint32_t rng = seed * 2654435761u + 1;
  while (res.error == 0) {
    uint32_t piece = lim.max_header_bytes;
    if (small) {
      rng = rng * 1103515245u + 12345u;
      piece = 1 + (rng >> 16) % 17;
    }
    const uint32_t room = lim.max_header_bytes - used;
    uint32_t n = room < piece ? room : piece;
    if (n > size - pos) n = static_cast<uint32_t>(size - pos);
    if (n == 0) break;
    std::memcpy(buf.data() + used, data + pos, n);
    used += n;
    pos += n;
    uint32_t off = 0;
    for (;;) {
      CHECK(++steps < 16 * size + 64);  // progress: no step loops without consuming or finishing
      const uint32_t len = used - off;
      const Event ev = step(p, lim, buf.data() + off, len);
      CHECK(ev.consumed <= len);
      if (ev.kind == EventKind::kNeedMore) {
        off += ev.consumed;
        if (ev.consumed == 0) break;
        continue;
      }
      if (ev.kind == EventKind::kHead) {
        CHECK(ev.consumed > 0 && ev.consumed <= lim.max_header_bytes);
        CHECK(p.head.path_len < kMaxPath && p.head.path[p.head.path_len] == '\0' && p.head.path[0] == '/');
        CHECK(!(p.head.chunked && p.head.has_length));
        CHECK(p.head.content_length <= lim.max_body_bytes);
        body = 0;
        res.transcript += "H";
        res.transcript.append(p.head.path, p.head.path_len);
        res.transcript += static_cast<char>('0' + static_cast<int>(p.head.method));
        res.transcript += p.head.keep_alive ? "k" : "c";
        res.transcript += p.head.chunked ? "t" : "l";
        res.transcript += std::to_string(p.head.content_length);
        res.transcript += "|";
      } else if (ev.kind == EventKind::kBody) {
        CHECK(ev.body_len > 0);
        CHECK(uint64_t{ev.body_offset} + ev.body_len <= ev.consumed);
        body += ev.body_len;
        CHECK(body <= lim.max_body_bytes);
        res.transcript.append(reinterpret_cast<const char*>(buf.data() + off + ev.body_offset), ev.body_len);
      } else if (ev.kind == EventKind::kDone) {
        if (!p.head.chunked) CHECK(body == p.head.content_length);
        res.transcript += "|D";
      } else {
        CHECK(ev.status == 400 || ev.status == 413 || ev.status == 414 || ev.status == 431 || ev.status == 501 ||
              ev.status == 505);
        res.error = ev.status;
        // An error is final.
        const Event again = step(p, lim, buf.data(), used);
        CHECK(again.kind == EventKind::kError && again.status == ev.status);
        break;
      }
      off += ev.consumed;
    }
    std::memmove(buf.data(), buf.data() + off, used - off);
    used -= off;
  }
  return res;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3 || size > (1u << 16)) return 0;
  Limits lim;
  lim.max_header_bytes = 64 + 32u * data[0];
  lim.max_body_bytes = 97u * data[1];
  const uint32_t seed = data[2];
  data += 3;
  size -= 3;
  const Result big = run(data, size, lim, seed, false);
  const Result small = run(data, size, lim, seed, true);
  CHECK(big.error == small.error);
  CHECK(big.transcript == small.transcript);
  return 0;
}

#ifdef GPUSOCK_FUZZ_REPLAY
int main(int argc, char** argv) {
  int files = 0;
  for (int i = 1; i < argc; ++i) {
    FILE* f = std::fopen(argv[i], "rb");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot open %s\n", argv[i]);
      return 1;
    }
    std::vector<uint8_t> bytes;
    int c;
    while ((c = std::fgetc(f)) != EOF) bytes.push_back(static_cast<uint8_t>(c));
    std::fclose(f);
    LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
    ++files;
  }
  std::printf("replayed %d inputs\n", files);
  return files > 0 ? 0 : 1;
}
#endif
