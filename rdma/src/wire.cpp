#include "gpusock/rdma/wire.hpp"

#include <cerrno>

namespace gpusock::rdma::wire {
namespace {

void put32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}
void put16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
uint32_t get32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
uint16_t get16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }

}  // namespace

void encode_hello(const Hello& h, uint8_t* out) {
  put32(out, kMagic);
  put16(out + 4, h.version);
  put16(out + 6, h.flags);
  put32(out + 8, h.recv_buffers);
  put32(out + 12, h.recv_buffer_bytes);
}

int decode_hello(const void* data, size_t len, Hello* h) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (p == nullptr || len < kHelloBytes || get32(p) != kMagic) return -EPROTO;
  Hello v;
  v.version = get16(p + 4);
  v.flags = get16(p + 6);
  v.recv_buffers = get32(p + 8);
  v.recv_buffer_bytes = get32(p + 12);
  if (v.version != kVersion) return -EPROTONOSUPPORT;
  if (v.recv_buffers < kMinRecvBuffers || v.recv_buffers > kMaxRecvBuffers ||
      v.recv_buffer_bytes < kMinRecvBufferBytes) {
    return -EPROTO;
  }
  *h = v;
  return 0;
}

void encode_reject(RejectReason r, uint8_t* out) {
  put32(out, kMagic);
  put32(out + 4, static_cast<uint32_t>(r));
}

uint32_t decode_reject(const void* data, size_t len) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (p == nullptr || len < kRejectBytes || get32(p) != kMagic) return 0;
  return get32(p + 4);
}

uint32_t encode_imm(MsgType type, uint32_t credits) {
  if (credits > kMaxCreditsPerImm) credits = kMaxCreditsPerImm;
  return (static_cast<uint32_t>(type) << 30) | credits;
}

int decode_imm(uint32_t imm, Imm* out) {
  const uint32_t type = imm >> 30;
  if (type == 3 || ((imm >> 24) & 0x3f) != 0) return -EPROTO;
  out->type = static_cast<MsgType>(type);
  out->credits = imm & kMaxCreditsPerImm;
  return 0;
}

}  // namespace gpusock::rdma::wire
