// libFuzzer target for address text: the device-side ld_pton/ld_ntop (localdevice.hpp,
// GPUSOCK_HD code compiled for the host) and the host's resolve_address /
// address_to_string (net/src/address.cpp), docs section 13.1.
//
// Input: byte 0 is the ld_ntop buffer size (0..47), bytes 1..2 the family and 3..6 the port
// for ld_ntop; the whole input is also the text. Checked:
//  - ld_pton accepts exactly "localdevice:N" with N canonical decimal 0..65535 (a model
//    written here), leaves the address alone otherwise, and ld_ntop of what it parsed
//    gives back the same text;
//  - ld_ntop writes "localdevice:<port>" when it fits, fails with ENOSPC when size is one
//    short of it, EAFNOSUPPORT for another family, and never writes a byte past size
//    (nor any byte when it fails);
//  - resolve_address fails only with EINVAL and a message quoting the text; when it
//    succeeds, the family and length agree, the text has the form of that family
//    (localdevice:N, a.b.c.d:port or [a.b.c.d]:port, [v6]:port) with nothing after
//    it (no NUL), and address_to_string of the result resolves to the same bytes.
#include <arpa/inet.h>
#include <netinet/in.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "fuzz_util.hpp"
#include "gpusock/net/localdevice.hpp"
#include "gpusock/net/localdevice_host.hpp"

namespace {

using gpusock::sockaddr_ld;

bool all_digits(std::string_view s) {
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

// What section 13.1 calls the text form: prefix, then a port 0..65535 written the way
// std::to_string writes it (so no sign, no spaces, no leading zeros).
bool is_ld_text(std::string_view t) {
  constexpr std::string_view prefix = "localdevice:";
  if (!t.starts_with(prefix)) return false;
  const std::string_view n = t.substr(prefix.size());
  if (n.empty() || n.size() > 5 || !all_digits(n)) return false;
  const unsigned long v = std::stoul(std::string(n));
  return v <= 65535 && std::to_string(v) == n;
}

void check_pton(std::string_view text) {
  // The device sees a C string: the text up to its first NUL.
  const std::string c(text.substr(0, text.find('\0')));
  sockaddr_ld a{0x1234, 0xfeedbeef};
  const int r = gpusock::ld_pton(c.c_str(), &a);
  FUZZ_CHECK(r == 0 || r == 1);
  FUZZ_CHECK((r == 1) == is_ld_text(c));
  if (r == 0) {
    FUZZ_CHECK(a.sld_family == 0x1234 && a.sld_port == 0xfeedbeef);
    return;
  }
  FUZZ_CHECK(a.sld_family == AF_LOCALDEVICE && a.sld_port <= 65535);
  char buf[gpusock::kLdAddrStrLen];
  FUZZ_CHECK(gpusock::ld_ntop(&a, buf, sizeof buf) == buf);
  FUZZ_CHECK(c == buf);
}

void check_ntop(uint32_t size, uint16_t family, uint32_t port) {
  constexpr uint32_t kBuf = 48;
  constexpr uint8_t kFill = 0xa5;
  char dst[kBuf];
  std::memset(dst, kFill, sizeof dst);
  // One family in four is the right one, so the formatting is reached often.
  sockaddr_ld a{static_cast<sa_family_t>((family & 3) == 0 ? AF_LOCALDEVICE : family), port};
  int err = 0;
  const char* r = gpusock::ld_ntop(&a, dst, size, &err);
  const std::string want = "localdevice:" + std::to_string(port);
  if (a.sld_family != AF_LOCALDEVICE) {
    FUZZ_CHECK(r == nullptr && err == EAFNOSUPPORT);
  } else if (size < want.size() + 1) {
    FUZZ_CHECK(r == nullptr && err == ENOSPC);
  } else {
    FUZZ_CHECK(r == dst);
    FUZZ_CHECK(want == dst);
    FUZZ_CHECK(want.size() + 1 <= gpusock::kLdAddrStrLen);
    sockaddr_ld back{};
    FUZZ_CHECK(gpusock::ld_pton(dst, &back) == (port <= 65535 ? 1 : 0));
    if (port <= 65535) FUZZ_CHECK(back.sld_port == port);
  }
  // Nothing past `size` is written, and nothing at all on failure.
  const uint32_t written = r == nullptr ? 0 : static_cast<uint32_t>(want.size() + 1);
  for (uint32_t i = written; i < kBuf; ++i) FUZZ_CHECK(static_cast<uint8_t>(dst[i]) == kFill);
}

void check_resolve(std::string_view text) {
  auto r = gpusock::net::resolve_address(text);
  if (!r.ok()) {
    FUZZ_CHECK(r.status().code() == EINVAL);
    FUZZ_CHECK(r.status().message().find(std::string(text)) != std::string::npos);
    if (text.starts_with("localdevice:")) FUZZ_CHECK(!is_ld_text(text));
    return;
  }
  // Configuration text is text: a NUL ends nothing early.
  FUZZ_CHECK(text.find('\0') == std::string_view::npos);
  const gpusock::net::ResolvedAddress& a = *r;
  FUZZ_CHECK(a.addr.ss_family == a.family);
  const size_t colon = text.rfind(':');
  FUZZ_CHECK(colon != std::string_view::npos);
  if (a.family == AF_LOCALDEVICE) {
    FUZZ_CHECK(a.len == sizeof(sockaddr_ld));
    FUZZ_CHECK(is_ld_text(text));
  } else if (a.family == AF_INET) {
    FUZZ_CHECK(a.len == sizeof(sockaddr_in));
    // "[a.b.c.d]:port" is taken as a.b.c.d:port too: the same address either way.
    if (text.front() == '[') FUZZ_CHECK(text[colon - 1] == ']');
    const auto* in = reinterpret_cast<const sockaddr_in*>(&a.addr);
    FUZZ_CHECK(std::stoul(std::string(text.substr(colon + 1))) == ntohs(in->sin_port));
  } else {
    FUZZ_CHECK(a.family == AF_INET6);
    FUZZ_CHECK(a.len == sizeof(sockaddr_in6));
    FUZZ_CHECK(text.front() == '[' && text[colon - 1] == ']');
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&a.addr);
    FUZZ_CHECK(std::stoul(std::string(text.substr(colon + 1))) == ntohs(in6->sin6_port));
  }
  FUZZ_CHECK(all_digits(text.substr(colon + 1)));
  // The printed form names the same address.
  const std::string printed = gpusock::net::address_to_string(reinterpret_cast<const sockaddr*>(&a.addr), a.len);
  auto again = gpusock::net::resolve_address(printed);
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(again->family == a.family && again->len == a.len);
  FUZZ_CHECK(std::memcmp(&again->addr, &a.addr, a.len) == 0);
  FUZZ_CHECK(gpusock::net::address_to_string(reinterpret_cast<const sockaddr*>(&again->addr), again->len) == printed);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 512) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  check_pton(text);
  check_resolve(text);
  gpusock::fuzz::Reader in(data, size);
  const uint32_t ntop_size = in.u8() % 48;
  const uint16_t family = in.u16();
  const uint32_t port = in.u32();
  check_ntop(ntop_size, family, port);
  return 0;
}
