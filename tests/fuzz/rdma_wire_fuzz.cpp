// libFuzzer target for the RDMA wire protocol (rdma/src/wire.cpp, docs section 14.2): what
// a peer puts in rdma_cm private data (Hello, Reject) and in a message's immediate data.
// wire.cpp needs neither verbs nor rdma_cm, so this builds where libibverbs is missing.
//
// The whole input is the private data, at its exact length. Checked:
//  - decode_hello answers 0, -EPROTO or -EPROTONOSUPPORT, exactly as the table in the
//    docs says (a model written here from the table), leaves *h alone when it fails, and
//    on success encode_hello(*h) gives back the 16 bytes it read;
//  - fields taken from the input, encoded and decoded, come back unchanged when they are
//    in range and are refused with the documented error when not;
//  - decode_reject gives the reason of any 8+ byte private data with the magic, 0
//    otherwise, and encode_reject/decode_reject round-trip every reason;
//  - every 32-bit window of the input as immediate data: decode_imm refuses type 3 and
//    reserved bits with -EPROTO and nothing else, and a decoded value re-encodes to itself;
//    encode_imm clips credits to 24 bits and decodes back to its type.
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "fuzz_util.hpp"
#include "gpusock/rdma/wire.hpp"

namespace {

namespace wire = gpusock::rdma::wire;

uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
uint16_t be16(const uint8_t* p) { return static_cast<uint16_t>((uint32_t{p[0]} << 8) | p[1]); }

// The Hello table of section 14.2, as a reader of the docs would check it.
int expected_hello(const uint8_t* p, size_t len) {
  if (len < 16 || be32(p) != 0x47535244u) return -EPROTO;
  if (be16(p + 4) != 1) return -EPROTONOSUPPORT;
  const uint32_t buffers = be32(p + 8);
  const uint32_t bytes = be32(p + 12);
  if (buffers < 2 || buffers > 65536 || bytes < 64) return -EPROTO;
  return 0;
}

void check_hello(const uint8_t* data, size_t size) {
  wire::Hello h{0xdead, 0xbeef, 0x12345678u, 0x9abcdef0u};
  const int r = wire::decode_hello(data, size, &h);
  FUZZ_CHECK(r == 0 || r == -EPROTO || r == -EPROTONOSUPPORT);
  FUZZ_CHECK(r == expected_hello(data, size));
  if (r != 0) {
    FUZZ_CHECK(h.version == 0xdead && h.flags == 0xbeef && h.recv_buffers == 0x12345678u &&
               h.recv_buffer_bytes == 0x9abcdef0u);
    return;
  }
  FUZZ_CHECK(h.version == wire::kVersion);
  FUZZ_CHECK(h.recv_buffers >= wire::kMinRecvBuffers && h.recv_buffers <= wire::kMaxRecvBuffers);
  FUZZ_CHECK(h.recv_buffer_bytes >= wire::kMinRecvBufferBytes);
  uint8_t again[wire::kHelloBytes];
  wire::encode_hello(h, again);
  FUZZ_CHECK(std::memcmp(again, data, wire::kHelloBytes) == 0);  // flags survive too
  // Trailing bytes (room to grow) never change the answer.
  FUZZ_CHECK(wire::decode_hello(data, wire::kHelloBytes, &h) == 0);
}

void check_hello_fields(gpusock::fuzz::Reader& in) {
  wire::Hello h;
  h.version = in.u16();
  h.flags = in.u16();
  h.recv_buffers = in.u32();
  h.recv_buffer_bytes = in.u32();
  uint8_t buf[wire::kHelloBytes];
  wire::encode_hello(h, buf);
  FUZZ_CHECK(be32(buf) == wire::kMagic);
  wire::Hello back;
  const int r = wire::decode_hello(buf, sizeof buf, &back);
  const bool in_range = h.recv_buffers >= 2 && h.recv_buffers <= 65536 && h.recv_buffer_bytes >= 64;
  if (h.version != 1) {
    FUZZ_CHECK(r == -EPROTONOSUPPORT);
  } else if (!in_range) {
    FUZZ_CHECK(r == -EPROTO);
  } else {
    FUZZ_CHECK(r == 0);
    FUZZ_CHECK(back.version == h.version && back.flags == h.flags && back.recv_buffers == h.recv_buffers &&
               back.recv_buffer_bytes == h.recv_buffer_bytes);
  }
  // Any shorter private data is refused, whatever it holds.
  for (size_t len = 0; len < wire::kHelloBytes; ++len) FUZZ_CHECK(wire::decode_hello(buf, len, &back) == -EPROTO);
}

void check_reject(const uint8_t* data, size_t size) {
  const uint32_t r = wire::decode_reject(data, size);
  if (size < 8 || be32(data) != wire::kMagic) {
    FUZZ_CHECK(r == 0);
  } else {
    FUZZ_CHECK(r == be32(data + 4));
  }
  if (size >= 8) {
    uint8_t buf[wire::kRejectBytes];
    const uint32_t reason = be32(data + 4);
    wire::encode_reject(static_cast<wire::RejectReason>(reason), buf);
    FUZZ_CHECK(wire::decode_reject(buf, sizeof buf) == reason);
    FUZZ_CHECK(wire::decode_reject(buf, sizeof buf - 1) == 0);
  }
}

void check_imm(uint32_t imm) {
  wire::Imm out{wire::MsgType::kFin, 77};
  const int r = wire::decode_imm(imm, &out);
  const uint32_t type = imm >> 30;
  const bool reserved_bits = (imm & 0x3f000000u) != 0;
  if (type == 3 || reserved_bits) {
    FUZZ_CHECK(r == -EPROTO);
  } else {
    FUZZ_CHECK(r == 0);
    FUZZ_CHECK(static_cast<uint32_t>(out.type) == type);
    FUZZ_CHECK(out.credits == (imm & 0xffffffu));
    FUZZ_CHECK(wire::encode_imm(out.type, out.credits) == imm);
  }
  // Encoding never sets reserved bits, clips credits, and decodes back.
  for (uint32_t t = 0; t < 3; ++t) {
    const uint32_t e = wire::encode_imm(static_cast<wire::MsgType>(t), imm);
    wire::Imm d;
    FUZZ_CHECK(wire::decode_imm(e, &d) == 0);
    FUZZ_CHECK(static_cast<uint32_t>(d.type) == t);
    FUZZ_CHECK(d.credits == (imm > wire::kMaxCreditsPerImm ? wire::kMaxCreditsPerImm : imm));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 4096) return 0;
  check_hello(data, size);
  check_reject(data, size);
  FUZZ_CHECK(wire::decode_hello(nullptr, size, nullptr) == -EPROTO);
  FUZZ_CHECK(wire::decode_reject(nullptr, size) == 0);
  gpusock::fuzz::Reader in(data, size);
  check_hello_fields(in);
  for (size_t i = 0; i + 4 <= size && i < 64; ++i) check_imm(be32(data + i));
  return 0;
}
