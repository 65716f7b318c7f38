// Transport policy rules: parsing and choosing, for every direction and address form.
#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <cstring>

#include "gpusock/rdma/policy.hpp"

namespace {

using gpusock::rdma::Direction;
using gpusock::rdma::Policy;
using gpusock::rdma::Transport;

sockaddr_in v4(const char* ip, uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  inet_pton(AF_INET, ip, &a.sin_addr);
  return a;
}
Transport choose(const Policy& p, const char* ip, uint16_t port, Direction d) {
  sockaddr_in a = v4(ip, port);
  return p.choose(reinterpret_cast<sockaddr*>(&a), sizeof a, d);
}

TEST(RdmaPolicy, NoRulesMeansTcp) {
  Policy p;
  EXPECT_EQ(choose(p, "10.0.0.1", 80, Direction::kConnect), Transport::kTcp);
}

TEST(RdmaPolicy, FirstMatchingRuleWins) {
  auto p = Policy::parse("tcp connect 10.77.0.9; rdma connect 10.77.0.0/16:7000-7999\n tcp *");
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_EQ(choose(*p, "10.77.3.4", 7000, Direction::kConnect), Transport::kRdma);
  EXPECT_EQ(choose(*p, "10.77.3.4", 7999, Direction::kConnect), Transport::kRdma);
  EXPECT_EQ(choose(*p, "10.77.3.4", 8000, Direction::kConnect), Transport::kTcp);   // port out of range
  EXPECT_EQ(choose(*p, "10.78.0.1", 7000, Direction::kConnect), Transport::kTcp);   // outside the /16
  EXPECT_EQ(choose(*p, "10.77.0.9", 7000, Direction::kConnect), Transport::kTcp);   // the earlier rule
  EXPECT_EQ(choose(*p, "10.77.3.4", 7000, Direction::kListen), Transport::kTcp);    // connect rules only
}

TEST(RdmaPolicy, ListenRulesMatchTheBoundAddress) {
  auto p = Policy::parse("rdma listen *:9000");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(choose(*p, "0.0.0.0", 9000, Direction::kListen), Transport::kRdma);
  EXPECT_EQ(choose(*p, "0.0.0.0", 9001, Direction::kListen), Transport::kTcp);
  EXPECT_EQ(choose(*p, "10.1.1.1", 9000, Direction::kConnect), Transport::kTcp);
}

TEST(RdmaPolicy, WildcardCoversIpv6AndPrefixesCoverMappedIpv4) {
  auto p = Policy::parse("rdma 192.168.0.0/24; rdma any *:5000");
  ASSERT_TRUE(p.ok());
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_port = htons(5000);
  inet_pton(AF_INET6, "fe80::1", &a.sin6_addr);
  EXPECT_EQ(p->choose(reinterpret_cast<sockaddr*>(&a), sizeof a, Direction::kConnect), Transport::kRdma);
  a.sin6_port = htons(1);
  EXPECT_EQ(p->choose(reinterpret_cast<sockaddr*>(&a), sizeof a, Direction::kConnect), Transport::kTcp);
  inet_pton(AF_INET6, "::ffff:192.168.0.77", &a.sin6_addr);
  EXPECT_EQ(p->choose(reinterpret_cast<sockaddr*>(&a), sizeof a, Direction::kConnect), Transport::kRdma);
}

TEST(RdmaPolicy, PrefixLengthZeroAndThirtyTwo) {
  auto p = Policy::parse("rdma 10.0.0.1/32:1; rdma 0.0.0.0/0:2");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(choose(*p, "10.0.0.1", 1, Direction::kConnect), Transport::kRdma);
  EXPECT_EQ(choose(*p, "10.0.0.2", 1, Direction::kConnect), Transport::kTcp);
  EXPECT_EQ(choose(*p, "203.0.113.5", 2, Direction::kConnect), Transport::kRdma);
}

TEST(RdmaPolicy, OtherFamiliesAndShortAddressesAreTcp) {
  auto p = Policy::parse("rdma *");
  ASSERT_TRUE(p.ok());
  sockaddr_in a = v4("10.0.0.1", 1);
  EXPECT_EQ(p->choose(reinterpret_cast<sockaddr*>(&a), 4, Direction::kConnect), Transport::kTcp);
  sockaddr un{};
  un.sa_family = AF_UNIX;
  EXPECT_EQ(p->choose(&un, sizeof un, Direction::kConnect), Transport::kTcp);
  EXPECT_EQ(p->choose(nullptr, 0, Direction::kConnect), Transport::kTcp);
}

TEST(RdmaPolicy, BadRulesAreRefusedWithTheRuleNamed) {
  for (const char* bad : {"udp *", "rdma", "rdma sideways *", "rdma 10.0.0.1/33", "rdma 10.0.0/8",
                          "rdma *:70000", "rdma *:9-3", "rdma *:x", "rdma connect * extra"}) {
    auto p = Policy::parse(bad);
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.status().code(), EINVAL);
    EXPECT_NE(p.status().message().find(bad), std::string::npos) << p.status().message();
  }
}

TEST(RdmaPolicy, CommentsAndBlankRulesAreSkippedAndTextRoundTrips) {
  auto p = Policy::parse("# RDMA inside the rack\n\nrdma connect 10.77.0.0/16:7000-7999;;tcp listen *");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->rules().size(), 2u);
  EXPECT_EQ(p->to_string(), "rdma connect 10.77.0.0/16:7000-7999; tcp listen *");
  auto again = Policy::parse(p->to_string());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->to_string(), p->to_string());
}

}  // namespace
