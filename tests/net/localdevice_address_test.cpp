// localdevice address text (device-side ld_pton/ld_ntop, run here on the host) and the
// host resolver for configuration text.
#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <string_view>

#include "gpusock/net/localdevice.hpp"
#include "gpusock/net/localdevice_host.hpp"

namespace {

using gpusock::sockaddr_ld;

TEST(LdPton, ParsesEveryPortAndRoundTripsThroughNtop) {
  for (uint32_t port = 0; port <= 65535; ++port) {
    const std::string text = "localdevice:" + std::to_string(port);
    sockaddr_ld a{};
    ASSERT_EQ(gpusock::ld_pton(text.c_str(), &a), 1) << text;
    EXPECT_EQ(a.sld_family, AF_LOCALDEVICE);
    ASSERT_EQ(a.sld_port, port);
    char buf[gpusock::kLdAddrStrLen];
    ASSERT_NE(gpusock::ld_ntop(&a, buf, sizeof buf), nullptr);
    ASSERT_EQ(text, buf);
  }
}

TEST(LdPton, RejectsEverythingElseAndLeavesTheAddressAlone) {
  for (const char* bad : {"", "localdevice:", "localdevice:65536", "localdevice:-1", "localdevice:+1",
                          "localdevice:01", "localdevice: 1", "localdevice:1 ", "localdevice:1x", "LOCALDEVICE:1",
                          "localdevice:99999999999", "localdevice:4294967338", "localdevice 1", "tcp:1"}) {
    sockaddr_ld a{7, 9};
    EXPECT_EQ(gpusock::ld_pton(bad, &a), 0) << "'" << bad << "'";
    EXPECT_EQ(a.sld_family, 7);
    EXPECT_EQ(a.sld_port, 9u);
  }
  EXPECT_EQ(gpusock::ld_pton(nullptr, nullptr), 0);
}

TEST(LdNtop, ReportsTooSmallAndWrongFamily) {
  sockaddr_ld a{AF_LOCALDEVICE, 4242};
  char buf[32];
  int err = 0;
  EXPECT_EQ(gpusock::ld_ntop(&a, buf, 16, &err), nullptr);  // "localdevice:4242" needs 17
  EXPECT_EQ(err, ENOSPC);
  EXPECT_NE(gpusock::ld_ntop(&a, buf, 17, &err), nullptr);
  EXPECT_STREQ(buf, "localdevice:4242");
  a.sld_family = AF_INET;
  EXPECT_EQ(gpusock::ld_ntop(&a, buf, sizeof buf, &err), nullptr);
  EXPECT_EQ(err, EAFNOSUPPORT);
}

TEST(ResolveAddress, UnderstandsLocaldeviceIpv4AndIpv6) {
  auto ld = gpusock::net::resolve_address("localdevice:42");
  ASSERT_TRUE(ld.ok());
  EXPECT_EQ(ld->family, AF_LOCALDEVICE);
  EXPECT_EQ(ld->len, sizeof(sockaddr_ld));
  EXPECT_EQ(reinterpret_cast<const sockaddr_ld*>(&ld->addr)->sld_port, 42u);
  auto v4 = gpusock::net::resolve_address("10.1.2.3:8080");
  ASSERT_TRUE(v4.ok());
  const auto* in = reinterpret_cast<const sockaddr_in*>(&v4->addr);
  EXPECT_EQ(ntohs(in->sin_port), 8080);
  EXPECT_EQ(ntohl(in->sin_addr.s_addr), 0x0a010203u);
  auto v6 = gpusock::net::resolve_address("[::1]:443");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->family, AF_INET6);
  for (const char* text : {"localdevice:42", "10.1.2.3:8080", "[::1]:443"}) {
    auto r = gpusock::net::resolve_address(text);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(gpusock::net::address_to_string(reinterpret_cast<const sockaddr*>(&r->addr), r->len), text);
  }
}

TEST(ResolveAddress, RefusesWhatItCannotParseWithAReason) {
  for (const char* bad : {"localdevice:70000", "example.com:80", "10.0.0.1", "10.0.0.1:", "10.0.0.1:65536",
                          "[::1]", "[::1]80", "::1:80", "10.0.0.1:8o"}) {
    auto r = gpusock::net::resolve_address(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), EINVAL) << bad;
    EXPECT_NE(r.status().message().find(bad), std::string::npos) << r.status().message();
  }
}

// Found by tests/fuzz/address_fuzz.cpp (corpus/address/ld_nul_then_more): the parsers
// read C strings, so text after a NUL went unread and "localdevice:1\0junk" resolved as
// localdevice:1.
TEST(ResolveAddress, RefusesTextWithANulByteInsteadOfIgnoringWhatFollowsIt) {
  using namespace std::string_view_literals;
  for (std::string_view bad : {"localdevice:1\0001:1"sv, "10.0.0.1\0x:80"sv, "[::1\0junk]:80"sv, "10.0.0.1:80\0"sv}) {
    auto r = gpusock::net::resolve_address(bad);
    EXPECT_FALSE(r.ok()) << "NUL at " << bad.find('\0');
    EXPECT_EQ(r.status().code(), EINVAL);
  }
  // The same text without the NUL and what follows it still resolves.
  EXPECT_TRUE(gpusock::net::resolve_address("localdevice:1").ok());
  EXPECT_TRUE(gpusock::net::resolve_address("10.0.0.1:80").ok());
}

}  // namespace
