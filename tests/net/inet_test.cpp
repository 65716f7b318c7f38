// gpusock/net/inet.hpp on the host, checked against glibc: every answer and every byte of
// text must be what ::inet_pton and ::inet_ntop give, since programs ported to kernels
// compare and log these strings.
#include "gpusock/net/inet.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpusock/hostcall/io.hpp"

namespace {

using Bytes16 = std::array<uint8_t, 16>;

// Compile-time checks: the byte order functions are usable in constant expressions.
static_assert(gpusock::htons(0x1234) == 0x3412);
static_assert(gpusock::ntohs(0xabcd) == 0xcdab);
static_assert(gpusock::htonl(0x01020304u) == 0x04030201u);
static_assert(gpusock::ntohl(0xa1b2c3d4u) == 0xd4c3b2a1u);
static_assert(gpusock::kInetAddrStrLen == INET_ADDRSTRLEN);
static_assert(gpusock::kInet6AddrStrLen == INET6_ADDRSTRLEN);

// What glibc and gpusock answer for one string and family: the return value, and the
// address bytes when the answer is 1.
struct PtonResult {
  int ret;
  Bytes16 bytes;
};

PtonResult glibc_pton(int af, const std::string& s) {
  PtonResult r{};
  r.ret = ::inet_pton(af, s.c_str(), r.bytes.data());
  if (r.ret != 1) r.bytes = {};
  return r;
}

PtonResult gpusock_pton(int af, const std::string& s) {
  PtonResult r{};
  r.ret = gpusock::inet_pton(af, s.c_str(), r.bytes.data());
  if (r.ret != 1) r.bytes = {};
  return r;
}

// Both families for one string must agree with glibc, return value and bytes.
void expect_pton_matches_glibc(const std::string& s) {
  for (int af : {AF_INET, AF_INET6}) {
    const PtonResult want = glibc_pton(af, s);
    const PtonResult got = gpusock_pton(af, s);
    EXPECT_EQ(got.ret, want.ret) << "af=" << af << " text=\"" << s << "\"";
    EXPECT_EQ(got.bytes, want.bytes) << "af=" << af << " text=\"" << s << "\"";
  }
}

std::string glibc_ntop(int af, const void* src) {
  char buf[INET6_ADDRSTRLEN];
  const char* r = ::inet_ntop(af, src, buf, sizeof buf);
  return r == nullptr ? std::string("<null>") : std::string(r);
}

std::string gpusock_ntop(int af, const void* src) {
  char buf[gpusock::kInet6AddrStrLen];
  const char* r = gpusock::inet_ntop(af, src, buf, sizeof buf);
  if (r == nullptr) return "<null>";
  EXPECT_EQ(r, buf) << "inet_ntop must return dst";
  return std::string(r);
}

// Hand-written text, valid and invalid; each is tried as both AF_INET and AF_INET6.
const char* const kHandWritten[] = {
    // IPv4 forms.
    "",
    "0.0.0.0",
    "1.2.3.4",
    "255.255.255.255",
    "127.0.0.1",
    "1.2.3",
    "1.2.3.4.5",
    "256.1.1.1",
    "1.256.1.1",
    "1.1.1.256",
    "999.1.1.1",
    " 1.2.3.4",
    "1.2.3.4 ",
    "1.2.3.4\n",
    "+1.2.3.4",
    "1.+2.3.4",
    "-1.2.3.4",
    "01.2.3.4",
    "1.02.3.4",
    "1.2.3.00",
    "00.0.0.0",
    "0.0.0.09",
    "1..2.3",
    ".1.2.3.4",
    "1.2.3.4.",
    "1.2.3.",
    "1.2.3.4..",
    "0x1.2.3.4",
    "1.2.3.a",
    "1",
    "16909060",
    "1.2.3.4/24",
    "0255.1.1.1",
    "2555.1.1.1",
    // IPv6 forms.
    ":",
    "::",
    ":::",
    "::1",
    "1::",
    "1::2",
    "::1:2",
    "1:2::",
    "::0",
    "0::",
    ":1",
    "1:",
    ":1::",
    "::1:",
    "1::2::3",
    "1:::2",
    "12345::",
    "::12345",
    "1:2:3:4:5:6:7:8",
    "1:2:3:4:5:6:7::",
    "::2:3:4:5:6:7:8",
    "1::3:4:5:6:7:8",
    "1:2:3:4:5:6:7:8:9",
    "1:2:3:4:5:6:7:8::",
    "::1:2:3:4:5:6:7:8",
    "1:2:3:4::5:6:7:8",
    "1:2:3:4:5:6:7",
    "0:0:0:0:0:0:0:0",
    "0000:0000:0000:0000:0000:0000:0000:0000",
    "00000::",
    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF",
    "AbCd:eF01::1",
    "2001:DB8::1",
    "2001:db8:0:0:1:0:0:1",
    "fe80::1%eth0",
    "g::1",
    "1:2:3:4:5:6:7:8 ",
    " ::1",
    "[::1]",
    "::ffff:1.2.3.4",
    "::FFFF:1.2.3.4",
    "ffff::ffff:1.2.3.4",
    "::ffff:1.2.3",
    "::ffff:1.2.3.4.5",
    "::ffff:01.2.3.4",
    "::ffff:256.2.3.4",
    "::ffff:1.2.3.4:5",
    "::ffff:1.2.3.4::",
    "::1.2.3.4",
    "::0.0.0.1",
    "::0.0.0.0",
    "1.2.3.4::",
    "64:ff9b::192.0.2.33",
    "1:2:3:4:5:6:1.2.3.4",
    "1:2:3:4:5:6:7:1.2.3.4",
    "1:2:3:4:5::1.2.3.4",
    "1:2:3:4:5:6::1.2.3.4",
    "::1:2:3:4:5:6:1.2.3.4",
    "::ffff:a.2.3.4",
    "::ffff:1234.2.3.4",
    "::ffff:.1.2.3",
    "::ffff:1.2.3.4 ",
    "1:2:3:4:5:6:7:8:",
    ":1:2:3:4:5:6:7:8",
    "1:2:3:4:5:6:7:00008",
    "0001:0002:0003:0004:0005:0006:0007:0008",
    "::ffff",
    "ffff::",
    "1:2:3:4:5:6:7:8.",
};

TEST(InetPton, HandWrittenTableMatchesGlibcForBothFamilies) {
  static_assert(sizeof kHandWritten / sizeof kHandWritten[0] >= 60);
  int accepted = 0;
  for (const char* s : kHandWritten) {
    expect_pton_matches_glibc(s);
    accepted += glibc_pton(AF_INET, s).ret + glibc_pton(AF_INET6, s).ret;
  }
  // The table exercises both outcomes, not just rejections.
  EXPECT_GT(accepted, 20);
}

TEST(InetPton, DecodesKnownAddressesToNetworkOrderBytes) {
  uint8_t v4[4];
  ASSERT_EQ(gpusock::inet_pton(AF_INET, "192.0.2.33", v4), 1);
  EXPECT_EQ(v4[0], 192);
  EXPECT_EQ(v4[1], 0);
  EXPECT_EQ(v4[2], 2);
  EXPECT_EQ(v4[3], 33);

  Bytes16 v6{};
  ASSERT_EQ(gpusock::inet_pton(AF_INET6, "64:ff9b::192.0.2.33", v6.data()), 1);
  const Bytes16 want = {0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, 192, 0, 2, 33};
  EXPECT_EQ(v6, want);
}

TEST(InetPton, WritesNothingPastFourBytesForIpv4) {
  std::array<uint8_t, 16> buf;
  buf.fill(0xee);
  ASSERT_EQ(gpusock::inet_pton(AF_INET, "1.2.3.4", buf.data()), 1);
  for (size_t i = 4; i < buf.size(); ++i) EXPECT_EQ(buf[i], 0xee) << i;
}

TEST(InetPton, LeavesDstUntouchedOnInvalidText) {
  for (int af : {AF_INET, AF_INET6}) {
    for (const char* s : kHandWritten) {
      std::array<uint8_t, 16> buf;
      buf.fill(0xee);
      if (gpusock::inet_pton(af, s, buf.data()) == 1) continue;
      for (size_t i = 0; i < buf.size(); ++i) EXPECT_EQ(buf[i], 0xee) << s;
    }
  }
}

// Every string of up to 5 characters over an alphabet that holds every kind of character
// the parsers treat specially: glibc is the oracle for all of them.
TEST(InetPton, MatchesGlibcOnEveryShortStringOverAddressAlphabet) {
  const std::string alphabet = "0129afF:.g ";
  std::vector<std::string> level = {""};
  size_t checked = 0;
  for (int len = 0; len <= 5; ++len) {
    std::vector<std::string> next;
    for (const std::string& s : level) {
      expect_pton_matches_glibc(s);
      ++checked;
      if (len < 5) {
        for (char c : alphabet) next.push_back(s + c);
      }
    }
    level.swap(next);
  }
  EXPECT_GT(checked, 170000u);
}

// Random strings built from address-like pieces, longer than the exhaustive test reaches:
// groups of 0-5 hex digits, colons, dotted parts and the odd stray character.
TEST(InetPton, MatchesGlibcOnRandomAddressLikeText) {
  std::mt19937_64 rng(0x5eed'1e7f'0000'0001ull);
  const char* const pieces[] = {":", "::", ".", "0", "00", "1", "ff", "FFFF", "abcd", "12345",
                                "255", "256", "01", "1.2.3.4", "ffff:", ":ffff", "9", "x", " "};
  constexpr size_t kPieces = sizeof pieces / sizeof pieces[0];
  for (int iter = 0; iter < 300000; ++iter) {
    std::string s;
    const int n = static_cast<int>(rng() % 14);
    for (int i = 0; i < n; ++i) s += pieces[rng() % kPieces];
    expect_pton_matches_glibc(s);
    if (::testing::Test::HasFailure()) return;
  }
}

// Addresses drawn so that the formatter's special cases come up often: long and tied zero
// runs, single zero groups, ::/96 (IPv4-compatible) and ::ffff:0:0/96 (IPv4-mapped).
Bytes16 random_ipv6(std::mt19937_64& rng) {
  Bytes16 a{};
  uint16_t w[8];
  const uint64_t kind = rng() % 8;
  for (uint16_t& x : w) {
    switch (rng() % 4) {
      case 0: x = 0; break;
      case 1: x = static_cast<uint16_t>(rng() % 16); break;
      default: x = static_cast<uint16_t>(rng()); break;
    }
    if (kind == 1 && rng() % 2 == 0) x = 0;  // zero-heavy
  }
  if (kind == 2 || kind == 3) {  // ::/96 with a random, often small, IPv4 part
    for (int i = 0; i < 6; ++i) w[i] = 0;
    if (kind == 3) w[5] = 0xffff;  // ::ffff:0:0/96
    if (rng() % 4 == 0) w[6] = 0;
    if (rng() % 4 == 0) w[7] = static_cast<uint16_t>(rng() % 3);
  }
  if (kind == 4) {  // 0:0:0:0:0:ffff-like prefixes that are not quite mapped
    for (int i = 0; i < 5; ++i) w[i] = 0;
    w[5] = static_cast<uint16_t>(0xfffe + rng() % 3);
    if (rng() % 2 == 0) w[rng() % 5] = 1;
  }
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = static_cast<uint8_t>(w[i] >> 8);
    a[2 * i + 1] = static_cast<uint8_t>(w[i]);
  }
  return a;
}

TEST(InetNtop, MatchesGlibcAndRoundTripsOnRandomIpv6) {
  std::mt19937_64 rng(0x1e7f'6a11'c0de'0006ull);
  for (int iter = 0; iter < 250000; ++iter) {
    const Bytes16 a = random_ipv6(rng);
    const std::string want = glibc_ntop(AF_INET6, a.data());
    const std::string got = gpusock_ntop(AF_INET6, a.data());
    ASSERT_EQ(got, want) << "iteration " << iter;
    Bytes16 back{};
    ASSERT_EQ(gpusock::inet_pton(AF_INET6, want.c_str(), back.data()), 1) << want;
    ASSERT_EQ(back, a) << want;
  }
}

// Every address whose groups are each 0, 1 or ffff: all 3^8 zero-run layouts, including
// ties and the mapped and compatible prefixes with small IPv4 parts.
TEST(InetNtop, MatchesGlibcOnEveryZeroRunLayout) {
  const uint16_t values[3] = {0, 1, 0xffff};
  for (int code = 0; code < 6561; ++code) {
    Bytes16 a{};
    int c = code;
    for (int i = 0; i < 8; ++i, c /= 3) {
      a[2 * i] = static_cast<uint8_t>(values[c % 3] >> 8);
      a[2 * i + 1] = static_cast<uint8_t>(values[c % 3]);
    }
    ASSERT_EQ(gpusock_ntop(AF_INET6, a.data()), glibc_ntop(AF_INET6, a.data())) << code;
  }
}

TEST(InetNtop, MatchesGlibcAndRoundTripsOnRandomIpv4) {
  std::mt19937_64 rng(0x1e7f'6a11'c0de'0004ull);
  for (int iter = 0; iter < 150000; ++iter) {
    uint8_t a[4];
    const uint64_t r = rng();
    for (int i = 0; i < 4; ++i) {
      // Every third byte is small so that one- and two-digit parts are common.
      a[i] = static_cast<uint8_t>(r % 3 == 0 ? (r >> (8 * i + 8)) % 12 : r >> (8 * i + 8));
    }
    const std::string want = glibc_ntop(AF_INET, a);
    ASSERT_EQ(gpusock_ntop(AF_INET, a), want) << "iteration " << iter;
    uint8_t back[4] = {};
    ASSERT_EQ(gpusock::inet_pton(AF_INET, want.c_str(), back), 1) << want;
    ASSERT_EQ(std::memcmp(back, a, 4), 0) << want;
  }
}

// Text forms glibc never prints (leading zeros, uppercase, no compression) still parse
// to the same bytes as glibc reads from them.
TEST(InetPton, MatchesGlibcOnNonCanonicalIpv6Text) {
  std::mt19937_64 rng(0x1e7f'6a11'c0de'0007ull);
  for (int iter = 0; iter < 50000; ++iter) {
    const Bytes16 a = random_ipv6(rng);
    std::string s;
    const bool dotted = rng() % 4 == 0;
    const int groups = dotted ? 6 : 8;
    for (int i = 0; i < groups; ++i) {
      if (i > 0) s += ':';
      char buf[8];
      const unsigned w = (static_cast<unsigned>(a[2 * i]) << 8) | a[2 * i + 1];
      std::snprintf(buf, sizeof buf, rng() % 2 ? "%04X" : "%x", w);
      s += buf;
    }
    if (dotted) {
      char buf[20];
      std::snprintf(buf, sizeof buf, ":%u.%u.%u.%u", a[12], a[13], a[14], a[15]);
      s += buf;
    }
    const PtonResult want = glibc_pton(AF_INET6, s);
    ASSERT_EQ(want.ret, 1) << s;
    ASSERT_EQ(want.bytes, a) << s;
    const PtonResult got = gpusock_pton(AF_INET6, s);
    ASSERT_EQ(got.ret, 1) << s;
    ASSERT_EQ(got.bytes, a) << s;
  }
}

TEST(InetNtop, PrintsGlibcTextForKnownAddresses) {
  struct Case {
    const char* in;
    const char* out;
  };
  const Case cases[] = {
      {"::", "::"},
      {"::1", "::1"},
      {"::0.0.0.1", "::1"},           // a run of seven zero groups is not "::a.b.c.d"
      {"::0.1.0.0", "::0.1.0.0"},     // six zero groups and a non-zero seventh: dotted
      {"::1.2.3.4", "::1.2.3.4"},
      {"::ffff:0:0", "::ffff:0.0.0.0"},
      {"::ffff:1.2.3.4", "::ffff:1.2.3.4"},
      {"0:0:0:0:1:ffff:1.2.3.4", "::1:ffff:102:304"},
      {"64:ff9b::192.0.2.33", "64:ff9b::c000:221"},
      {"1:0:0:2:0:0:3:4", "1::2:0:0:3:4"},  // a tie goes to the first run
      {"1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"},  // one zero group stays
      {"1:2:3:4:5:6:7:0", "1:2:3:4:5:6:7:0"},
      {"1:2:3:4:5:6:0:0", "1:2:3:4:5:6::"},
      {"FFFF:ABCD::", "ffff:abcd::"},
  };
  for (const Case& c : cases) {
    Bytes16 a{};
    ASSERT_EQ(::inet_pton(AF_INET6, c.in, a.data()), 1) << c.in;
    EXPECT_EQ(glibc_ntop(AF_INET6, a.data()), c.out) << c.in;
    EXPECT_EQ(gpusock_ntop(AF_INET6, a.data()), c.out) << c.in;
  }
}

// For each address, every size short of text plus NUL fails with ENOSPC and leaves dst
// untouched; the exact size succeeds.
void expect_enospc_below_exact_size(int af, const void* src) {
  const std::string text = glibc_ntop(af, src);
  const uint32_t need = static_cast<uint32_t>(text.size()) + 1;
  for (uint32_t size = 0; size <= need; ++size) {
    char buf[64];
    std::memset(buf, 0x7e, sizeof buf);
    gpusock::hostcall::errno_ref() = 0;
    const char* r = gpusock::inet_ntop(af, src, buf, size);
    char raw_buf[64];
    std::memset(raw_buf, 0x7e, sizeof raw_buf);
    const int raw_r = gpusock::raw::inet_ntop(af, src, raw_buf, size);
    if (size < need) {
      EXPECT_EQ(r, nullptr) << text << " size " << size;
      EXPECT_EQ(gpusock::errno_value(), ENOSPC) << text << " size " << size;
      EXPECT_EQ(raw_r, -ENOSPC) << text << " size " << size;
      for (size_t i = 0; i < sizeof buf; ++i) {
        ASSERT_EQ(buf[i], 0x7e) << text << " size " << size;
        ASSERT_EQ(raw_buf[i], 0x7e) << text << " size " << size;
      }
      // glibc agrees that this size is too small.
      char g[64];
      errno = 0;
      EXPECT_EQ(::inet_ntop(af, src, g, size), nullptr);
      EXPECT_EQ(errno, ENOSPC);
    } else {
      ASSERT_EQ(r, buf) << text;
      EXPECT_EQ(std::string(buf), text);
      EXPECT_EQ(raw_r, static_cast<int>(text.size()));
      EXPECT_EQ(std::string(raw_buf), text);
      EXPECT_EQ(buf[need], 0x7e) << "wrote past the NUL";
      EXPECT_EQ(raw_buf[need], 0x7e) << "wrote past the NUL";
    }
  }
}

TEST(InetNtop, FailsWithEnospcForEverySizeBelowNeededAndSucceedsAtExactSize) {
  const char* const v6[] = {"::", "::1", "1::", "::ffff:255.255.255.255", "::1.2.3.4",
                            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db8::8:800:200c:417a",
                            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"};
  for (const char* s : v6) {
    Bytes16 a{};
    ASSERT_EQ(::inet_pton(AF_INET6, s, a.data()), 1) << s;
    expect_enospc_below_exact_size(AF_INET6, a.data());
  }
  const char* const v4[] = {"0.0.0.0", "1.2.3.4", "10.20.30.40", "255.255.255.255"};
  for (const char* s : v4) {
    uint8_t a[4];
    ASSERT_EQ(::inet_pton(AF_INET, s, a), 1) << s;
    expect_enospc_below_exact_size(AF_INET, a);
  }
}

// The widest address fits a kInet6AddrStrLen buffer.
TEST(InetNtop, WidestIpv6TextFitsInet6AddrStrLen) {
  Bytes16 a{};
  ASSERT_EQ(::inet_pton(AF_INET6, "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", a.data()), 1);
  char buf[gpusock::kInet6AddrStrLen];
  // glibc prints this address in hex, 39 characters; the 45-character bound is reached
  // only by dotted forms it never prints, so the buffer always suffices.
  ASSERT_NE(gpusock::inet_ntop(AF_INET6, a.data(), buf, sizeof buf), nullptr);
  EXPECT_STREQ(buf, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
}

// errno_ref() is an ordinary thread_local outside a GPU, so the POSIX-shaped layer can be
// checked here through errno_value().
TEST(InetPton, FailsWithEafnosupportForAfUnix) {
  uint8_t buf[16];
  gpusock::hostcall::errno_ref() = 0;
  EXPECT_EQ(gpusock::inet_pton(AF_UNIX, "1.2.3.4", buf), -1);
  EXPECT_EQ(gpusock::errno_value(), EAFNOSUPPORT);
  EXPECT_EQ(gpusock::raw::inet_pton(AF_UNIX, "1.2.3.4", buf), -EAFNOSUPPORT);
  errno = 0;
  EXPECT_EQ(::inet_pton(AF_UNIX, "1.2.3.4", buf), -1);
  EXPECT_EQ(errno, EAFNOSUPPORT);
}

TEST(InetNtop, FailsWithEafnosupportForAfUnix) {
  const uint8_t a[16] = {1, 2, 3, 4};
  char buf[64];
  gpusock::hostcall::errno_ref() = 0;
  EXPECT_EQ(gpusock::inet_ntop(AF_UNIX, a, buf, sizeof buf), nullptr);
  EXPECT_EQ(gpusock::errno_value(), EAFNOSUPPORT);
  EXPECT_EQ(gpusock::raw::inet_ntop(AF_UNIX, a, buf, sizeof buf), -EAFNOSUPPORT);
  errno = 0;
  EXPECT_EQ(::inet_ntop(AF_UNIX, a, buf, sizeof buf), nullptr);
  EXPECT_EQ(errno, EAFNOSUPPORT);
}

TEST(InetPton, SuccessAndRejectionLeaveErrnoAlone) {
  uint8_t buf[16];
  gpusock::hostcall::errno_ref() = 12345;
  EXPECT_EQ(gpusock::inet_pton(AF_INET6, "::1", buf), 1);
  EXPECT_EQ(gpusock::inet_pton(AF_INET6, "::1::", buf), 0);
  EXPECT_EQ(gpusock::errno_value(), 12345);
}

TEST(ByteOrder, MatchesGlibcForEvery16BitValue) {
  for (uint32_t v = 0; v <= 0xffff; ++v) {
    const auto x = static_cast<uint16_t>(v);
    ASSERT_EQ(gpusock::htons(x), ::htons(x)) << v;
    ASSERT_EQ(gpusock::ntohs(x), ::ntohs(x)) << v;
  }
}

TEST(ByteOrder, MatchesGlibcFor32BitValues) {
  std::mt19937_64 rng(0x1e7f'6a11'c0de'0032ull);
  for (int i = 0; i < 1000000; ++i) {
    const auto x = static_cast<uint32_t>(i < 65536 ? i * 65537u : rng());
    ASSERT_EQ(gpusock::htonl(x), ::htonl(x)) << x;
    ASSERT_EQ(gpusock::ntohl(x), ::ntohl(x)) << x;
  }
  for (uint32_t x : {0u, 1u, 0xffu, 0xff00u, 0xff0000u, 0xff000000u, 0xffffffffu}) {
    EXPECT_EQ(gpusock::htonl(x), ::htonl(x)) << x;
  }
}

}  // namespace
