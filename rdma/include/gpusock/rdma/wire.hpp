// gpusock/rdma/wire.hpp — gpusock's RDMA stream protocol on the wire: what two ends put in
// rdma_cm private data and in the immediate data of each RC SEND. Both the runtime's
// backend and the host-side peer library (peer.hpp) speak it; neither verbs nor rdma_cm
// headers are needed to read it. Host-only.
//
//   uint8_t pd[wire::kHelloBytes];
//   wire::encode_hello({.recv_buffers = 16, .recv_buffer_bytes = 65536}, pd);   // rdma_connect
//   wire::Hello h;
//   if (int e = wire::decode_hello(event_private_data, len, &h); e < 0) reject(...);
//
// A connection is one reliable-connected QP. Every message is one IBV_WR_SEND_WITH_IMM;
// its immediate data says what it is (type, bits 31..30) and hands back receive credits
// (bits 23..0). A data message carries 1..recv_buffer_bytes stream bytes; a credit or FIN
// message carries none. Each message the sender posts consumes one receive buffer of the
// peer, so the sender may post only while it holds credits: it starts with the peer's
// `recv_buffers` (from the peer's Hello) minus kReservedCredits and earns one back for each
// buffer the peer returns in an immediate. docs/architecture.md, section 14, is the prose.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gpusock::rdma::wire {

// "GSRD" — the first four bytes of every Hello and Reject, so a connection from something
// that is not gpusock is told apart from a version mismatch.
inline constexpr uint32_t kMagic = 0x47535244u;
inline constexpr uint16_t kVersion = 1;

// Hello: the private data of rdma_connect() (active side) and rdma_accept() (passive side).
// 16 bytes, every field big-endian (network order), so the two ends need not agree on a
// host byte order. RC connect private data may hold 56 bytes; 16 leave room to grow.
//
//   offset size field              meaning
//   0      4    magic              kMagic
//   4      2    version            kVersion; a passive side rejects other versions
//   6      2    flags              0 (reserved: a receiver ignores bits it does not know)
//   8      4    recv_buffers       receive WRs the sender of this Hello keeps posted (>= 2)
//   12     4    recv_buffer_bytes  bytes of each; the peer never sends a message longer
inline constexpr size_t kHelloBytes = 16;
struct Hello {
  uint16_t version = kVersion;
  uint16_t flags = 0;
  uint32_t recv_buffers = 0;
  uint32_t recv_buffer_bytes = 0;
};
// Smallest sane values a Hello may announce (decode_hello rejects less).
inline constexpr uint32_t kMinRecvBuffers = 2;
inline constexpr uint32_t kMinRecvBufferBytes = 64;
inline constexpr uint32_t kMaxRecvBuffers = 1u << 16;

// Writes `h` (with kMagic) into out[0..16).
void encode_hello(const Hello& h, uint8_t* out);
// Reads a Hello from private data. Returns 0, or -EPROTO (too short, wrong magic, or
// buffer counts/sizes out of range) or -EPROTONOSUPPORT (another version).
int decode_hello(const void* data, size_t len, Hello* h);

// Reject: the private data of rdma_reject() when a gpusock listener turns a request away.
// 8 bytes, big-endian: magic (4), reason (4). A REJ without it (no listener on the port:
// the CM answers "invalid service ID") is the same to the connecting socket: ECONNREFUSED.
inline constexpr size_t kRejectBytes = 8;
enum class RejectReason : uint32_t {
  kBacklogFull = 1,   // the listener's queue of unaccepted connections is full
  kBadHello = 2,      // the request's private data is not a valid Hello
  kNoResources = 3,   // the listener could not make a QP or receive buffers
};
void encode_reject(RejectReason r, uint8_t* out);
// Returns the reason, or 0 when `data` is not a gpusock Reject.
uint32_t decode_reject(const void* data, size_t len);

// Immediate data (32 bits, carried big-endian by the verbs: encode_imm's value goes into
// ibv_send_wr::imm_data through htonl, decode_imm takes ntohl(wc.imm_data)).
//
//   bits 31..30  type      0 data, 1 credit, 2 FIN, 3 reserved (a receiver resets the
//                          connection: ECONNRESET)
//   bits 29..24  0         reserved, must be zero
//   bits 23..0   credits   receive buffers the sender has reposted since its last message
enum class MsgType : uint32_t { kData = 0, kCredit = 1, kFin = 2 };
inline constexpr uint32_t kMaxCreditsPerImm = (1u << 24) - 1;
// Credits a sender keeps back from data: a credit or FIN message may use the last one, so
// two ends that each used up the other's buffers can always hand credits back.
inline constexpr uint32_t kReservedCredits = 1;

struct Imm {
  MsgType type = MsgType::kData;
  uint32_t credits = 0;
};
// Credits above kMaxCreditsPerImm are cut to it (the rest rides on the next message).
uint32_t encode_imm(MsgType type, uint32_t credits);
// Returns 0, or -EPROTO for the reserved type or non-zero reserved bits.
int decode_imm(uint32_t imm, Imm* out);

// A data message's largest payload toward a peer whose Hello said `peer_buffer_bytes`.
inline uint32_t max_message(uint32_t peer_buffer_bytes) { return peer_buffer_bytes; }

}  // namespace gpusock::rdma::wire
