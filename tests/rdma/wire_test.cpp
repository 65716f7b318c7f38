// gpusock's RDMA wire protocol: Hello, Reject and immediate data, byte for byte.
#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>

#include "gpusock/rdma/wire.hpp"

namespace wire = gpusock::rdma::wire;

TEST(RdmaWire, HelloIsSixteenBigEndianBytes) {
  uint8_t b[wire::kHelloBytes];
  wire::encode_hello({wire::kVersion, 0, 16, 65536}, b);
  const uint8_t want[16] = {'G', 'S', 'R', 'D', 0, 1, 0, 0, 0, 0, 0, 16, 0, 1, 0, 0};
  EXPECT_EQ(std::memcmp(b, want, 16), 0);
}

TEST(RdmaWire, HelloRoundTrips) {
  uint8_t b[wire::kHelloBytes];
  wire::encode_hello({wire::kVersion, 0x8001, 1024, 1u << 20}, b);
  wire::Hello h;
  ASSERT_EQ(wire::decode_hello(b, sizeof b, &h), 0);
  EXPECT_EQ(h.version, wire::kVersion);
  EXPECT_EQ(h.flags, 0x8001);  // unknown flag bits are kept, not refused
  EXPECT_EQ(h.recv_buffers, 1024u);
  EXPECT_EQ(h.recv_buffer_bytes, 1u << 20);
}

TEST(RdmaWire, HelloFromSomethingElseIsRefused) {
  uint8_t b[wire::kHelloBytes];
  wire::Hello h;
  wire::encode_hello({wire::kVersion, 0, 16, 4096}, b);
  EXPECT_EQ(wire::decode_hello(b, 15, &h), -EPROTO);       // short
  EXPECT_EQ(wire::decode_hello(nullptr, 0, &h), -EPROTO);  // none (a plain rdma_cm client)
  b[0] = 'X';
  EXPECT_EQ(wire::decode_hello(b, sizeof b, &h), -EPROTO);  // wrong magic
}

TEST(RdmaWire, AnotherVersionIsNotSupported) {
  uint8_t b[wire::kHelloBytes];
  wire::encode_hello({2, 0, 16, 4096}, b);
  wire::Hello h;
  EXPECT_EQ(wire::decode_hello(b, sizeof b, &h), -EPROTONOSUPPORT);
}

TEST(RdmaWire, HelloWithImpossibleBuffersIsRefused) {
  uint8_t b[wire::kHelloBytes];
  wire::Hello h;
  wire::encode_hello({wire::kVersion, 0, 1, 4096}, b);  // one buffer: no room for credits
  EXPECT_EQ(wire::decode_hello(b, sizeof b, &h), -EPROTO);
  wire::encode_hello({wire::kVersion, 0, 16, 8}, b);  // 8-byte buffers
  EXPECT_EQ(wire::decode_hello(b, sizeof b, &h), -EPROTO);
  wire::encode_hello({wire::kVersion, 0, wire::kMaxRecvBuffers + 1, 4096}, b);
  EXPECT_EQ(wire::decode_hello(b, sizeof b, &h), -EPROTO);
}

TEST(RdmaWire, RejectCarriesItsReason) {
  uint8_t b[wire::kRejectBytes];
  wire::encode_reject(wire::RejectReason::kBacklogFull, b);
  const uint8_t want[8] = {'G', 'S', 'R', 'D', 0, 0, 0, 1};
  EXPECT_EQ(std::memcmp(b, want, 8), 0);
  EXPECT_EQ(wire::decode_reject(b, sizeof b), 1u);
  EXPECT_EQ(wire::decode_reject(b, 4), 0u);
  b[1] = 0;
  EXPECT_EQ(wire::decode_reject(b, sizeof b), 0u);
}

TEST(RdmaWire, ImmediateDataPacksTypeAndCredits) {
  EXPECT_EQ(wire::encode_imm(wire::MsgType::kData, 0), 0u);
  EXPECT_EQ(wire::encode_imm(wire::MsgType::kData, 5), 5u);
  EXPECT_EQ(wire::encode_imm(wire::MsgType::kCredit, 3), 0x40000003u);
  EXPECT_EQ(wire::encode_imm(wire::MsgType::kFin, 0), 0x80000000u);
  // Too many credits for one message: cut, never spilling into the type bits.
  EXPECT_EQ(wire::encode_imm(wire::MsgType::kData, 1u << 30), wire::kMaxCreditsPerImm);
  for (auto t : {wire::MsgType::kData, wire::MsgType::kCredit, wire::MsgType::kFin}) {
    for (uint32_t c : {0u, 1u, 77u, wire::kMaxCreditsPerImm}) {
      wire::Imm imm;
      ASSERT_EQ(wire::decode_imm(wire::encode_imm(t, c), &imm), 0);
      EXPECT_EQ(imm.type, t);
      EXPECT_EQ(imm.credits, c);
    }
  }
}

TEST(RdmaWire, ReservedImmediateBitsResetTheConnection) {
  wire::Imm imm;
  EXPECT_EQ(wire::decode_imm(0xc0000000u, &imm), -EPROTO);  // type 3
  EXPECT_EQ(wire::decode_imm(0x01000000u, &imm), -EPROTO);  // bit 24
  EXPECT_EQ(wire::decode_imm(0x20000001u, &imm), -EPROTO);  // bit 29
}
