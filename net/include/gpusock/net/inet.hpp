// gpusock/net/inet.hpp — address text and byte order for kernels: inet_pton, inet_ntop,
// htons and friends, giving the same answers and the same text as glibc.
//
//   sockaddr_in6 sa{};
//   sa.sin6_family = AF_INET6;
//   sa.sin6_port = gpusock::htons(8080);
//   if (gpusock::inet_pton(AF_INET6, "::ffff:10.0.0.1", &sa.sin6_addr) != 1) return;
//   char text[gpusock::kInet6AddrStrLen];
//   gpusock::inet_ntop(AF_INET6, &sa.sin6_addr, text, sizeof text);  // "::ffff:10.0.0.1"
//
// Everything here is computed on the calling thread; no function issues a hostcall.
#pragma once

// The system headers come first, for AF_INET, AF_INET6, socklen_t and the in_addr types
// callers pass in.
#include <arpa/inet.h>
#include <netinet/in.h>

#include <cerrno>
#include <cstdint>

#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/platform.hpp"

// glibc's <netinet/in.h> defines htons, ntohs, htonl and ntohl as function-like macros
// when compiling with optimization (__OPTIMIZE__). A macro would rewrite the qualified
// name gpusock::htons(x) into gpusock::__bswap_16(x), which does not exist. Without the
// macros, ::htons and friends remain declared as ordinary libc functions.
#undef htons
#undef ntohs
#undef htonl
#undef ntohl

namespace gpusock {

// Buffer sizes, NUL included, that hold any address inet_ntop prints: INET_ADDRSTRLEN
// and INET6_ADDRSTRLEN.
inline constexpr uint32_t kInetAddrStrLen = 16;
inline constexpr uint32_t kInet6AddrStrLen = 46;

// Byte order conversions between host and network (big-endian) order. Every supported
// host, x86-64 and NVIDIA GPUs, is little-endian, so each is a byte swap. Each returns
// its argument with the bytes reversed.
GPUSOCK_HD constexpr uint16_t htons(uint16_t v) {
  return static_cast<uint16_t>((v >> 8) | (v << 8));
}
GPUSOCK_HD constexpr uint16_t ntohs(uint16_t v) { return htons(v); }
GPUSOCK_HD constexpr uint32_t htonl(uint32_t v) {
  return (v >> 24) | ((v >> 8) & 0x0000ff00u) | ((v << 8) & 0x00ff0000u) | (v << 24);
}
GPUSOCK_HD constexpr uint32_t ntohl(uint32_t v) { return htonl(v); }

namespace internal {

// The value of a hex digit of either case, or -1 for any other character.
GPUSOCK_HD constexpr int hex_digit_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Parses dotted-quad text that runs to the NUL: exactly four decimal parts of 0-255.
// Like glibc, a part may not start with 0 unless it is "0": "01.2.3.4" is refused, since
// other parsers read a leading zero as octal. Returns true and writes 4 bytes to out on
// success; writes nothing on failure.
GPUSOCK_HD inline bool parse_ipv4(const char* s, uint8_t* out) {
  uint8_t parts[4] = {0, 0, 0, 0};
  int count = 0;       // parts started so far
  bool in_part = false;
  for (; *s != '\0'; ++s) {
    const char c = *s;
    if (c >= '0' && c <= '9') {
      if (!in_part) {
        if (count == 4) return false;
        ++count;
        in_part = true;
      } else if (parts[count - 1] == 0) {
        return false;  // a leading zero
      }
      const uint32_t v = parts[count - 1] * 10u + static_cast<uint32_t>(c - '0');
      if (v > 255) return false;
      parts[count - 1] = static_cast<uint8_t>(v);
    } else if (c == '.' && in_part && count < 4) {
      in_part = false;
    } else {
      return false;
    }
  }
  if (count < 4 || !in_part) return false;
  for (int i = 0; i < 4; ++i) out[i] = parts[i];
  return true;
}

// Parses RFC 4291 text to the NUL, accepting exactly what glibc accepts: groups of 1-4
// hex digits, at most one "::" that stands for at least one zero group, and dotted IPv4
// text in place of the last two groups. Returns true and writes 16 bytes to out on
// success; writes nothing on failure.
GPUSOCK_HD inline bool parse_ipv6(const char* s, uint8_t* out) {
  uint8_t bytes[16] = {};
  int n = 0;         // bytes filled, counting from the front
  int gap = -1;      // where "::" stands, as a byte offset; -1 while none was seen
  // A leading ':' must be the first of "::"; skipping it lets the second one be handled
  // like any other colon that follows an empty group.
  if (*s == ':') {
    ++s;
    if (*s != ':') return false;
  }
  const char* group = s;  // start of the current group, for the dotted IPv4 tail
  uint32_t value = 0;
  int digits = 0;
  for (;;) {
    const char c = *s;
    const int d = hex_digit_value(c);
    if (d >= 0) {
      if (digits == 4) return false;
      value = (value << 4) | static_cast<uint32_t>(d);
      ++digits;
      ++s;
    } else if (c == ':') {
      ++s;
      group = s;
      if (digits == 0) {  // an empty group: the second colon of "::"
        if (gap >= 0) return false;
        gap = n;
        continue;
      }
      if (*s == '\0' || n + 2 > 16) return false;  // a trailing ':' or a ninth group
      bytes[n++] = static_cast<uint8_t>(value >> 8);
      bytes[n++] = static_cast<uint8_t>(value);
      value = 0;
      digits = 0;
    } else if (c == '.') {
      // The hex digits read so far were the first part of an IPv4 address, which must
      // then run to the end of the text.
      if (n + 4 > 16 || !parse_ipv4(group, bytes + n)) return false;
      n += 4;
      digits = 0;
      break;
    } else if (c == '\0') {
      break;
    } else {
      return false;
    }
  }
  if (digits > 0) {
    if (n + 2 > 16) return false;
    bytes[n++] = static_cast<uint8_t>(value >> 8);
    bytes[n++] = static_cast<uint8_t>(value);
  }
  if (gap >= 0) {
    if (n == 16) return false;  // "::" would stand for no group at all
    const int tail = n - gap;   // bytes after "::", moved to the end
    for (int i = 1; i <= tail; ++i) bytes[16 - i] = bytes[n - i];
    for (int i = gap; i < 16 - tail; ++i) bytes[i] = 0;
    n = 16;
  }
  if (n != 16) return false;
  for (int i = 0; i < 16; ++i) out[i] = bytes[i];
  return true;
}

// Appends the decimal text of v at p and returns the new end.
GPUSOCK_HD inline char* put_decimal(char* p, uint32_t v) {
  if (v >= 100) *p++ = static_cast<char>('0' + v / 100);
  if (v >= 10) *p++ = static_cast<char>('0' + v / 10 % 10);
  *p++ = static_cast<char>('0' + v % 10);
  return p;
}

// Appends "a.b.c.d" for 4 bytes at p and returns the new end; at most 15 characters.
GPUSOCK_HD inline char* put_ipv4(char* p, const uint8_t* a) {
  for (int i = 0; i < 4; ++i) {
    if (i > 0) *p++ = '.';
    p = put_decimal(p, a[i]);
  }
  return p;
}

// Appends lowercase hex without leading zeros, as printf's "%x" does.
GPUSOCK_HD inline char* put_hex(char* p, uint32_t v) {
  bool started = false;
  for (int shift = 12; shift >= 0; shift -= 4) {
    const uint32_t d = (v >> shift) & 0xfu;
    if (d == 0 && !started && shift > 0) continue;
    started = true;
    *p++ = "0123456789abcdef"[d];
  }
  return p;
}

// Appends glibc's text for 16 bytes at p and returns the new end; at most 45 characters.
// The longest run of two or more zero groups becomes "::", the first one on a tie. An
// address with 96 zero bits then a non-zero last-but-one group ("::a.b.c.d") or with
// ::ffff:0:0/96 ("::ffff:a.b.c.d") ends in dotted IPv4; "::1" and "::ffff:0:0" do not
// count as the former, since there the zero run is longer than six groups.
GPUSOCK_HD inline char* put_ipv6(char* p, const uint8_t* a) {
  uint32_t words[8];
  for (int i = 0; i < 8; ++i) words[i] = (static_cast<uint32_t>(a[2 * i]) << 8) | a[2 * i + 1];
  int best = -1, best_len = 0;
  for (int i = 0; i < 8;) {
    if (words[i] != 0) {
      ++i;
      continue;
    }
    int j = i;
    while (j < 8 && words[j] == 0) ++j;
    if (j - i > best_len) {
      best = i;
      best_len = j - i;
    }
    i = j;
  }
  if (best_len < 2) best = -1;
  for (int i = 0; i < 8; ++i) {
    if (best >= 0 && i >= best && i < best + best_len) {
      if (i == best) *p++ = ':';
      continue;
    }
    if (i != 0) *p++ = ':';
    if (i == 6 && best == 0 && (best_len == 6 || (best_len == 5 && words[5] == 0xffff))) {
      return put_ipv4(p, a + 12);
    }
    p = put_hex(p, words[i]);
  }
  if (best >= 0 && best + best_len == 8) *p++ = ':';
  return p;
}

}  // namespace internal

namespace raw {

// inet_pton without errno. Returns 1 and writes the address in network byte order to
// dst (4 bytes for AF_INET, 16 for AF_INET6); 0 if src is not valid text for af, with
// dst untouched; -EAFNOSUPPORT for any other af.
GPUSOCK_HD inline int inet_pton(int af, const char* src, void* dst) {
  uint8_t* out = static_cast<uint8_t*>(dst);
  if (af == AF_INET) return internal::parse_ipv4(src, out) ? 1 : 0;
  if (af == AF_INET6) return internal::parse_ipv6(src, out) ? 1 : 0;
  return -EAFNOSUPPORT;
}

// inet_ntop without errno. Returns the text's length (NUL excluded) after writing it and
// its NUL to dst; -ENOSPC, with dst untouched, if size cannot hold text and NUL;
// -EAFNOSUPPORT for an af other than AF_INET and AF_INET6.
GPUSOCK_HD inline int inet_ntop(int af, const void* src, char* dst, uint32_t size) {
  const uint8_t* a = static_cast<const uint8_t*>(src);
  char text[kInet6AddrStrLen];
  char* end;
  if (af == AF_INET) {
    end = internal::put_ipv4(text, a);
  } else if (af == AF_INET6) {
    end = internal::put_ipv6(text, a);
  } else {
    return -EAFNOSUPPORT;
  }
  const uint32_t len = static_cast<uint32_t>(end - text);
  if (len >= size) return -ENOSPC;
  for (uint32_t i = 0; i < len; ++i) dst[i] = text[i];
  dst[len] = '\0';
  return static_cast<int>(len);
}

}  // namespace raw

// POSIX inet_pton. Returns 1 on success, with dst as in raw::inet_pton; 0 if src is not
// valid text for af; -1 with errno_value() == EAFNOSUPPORT for an unsupported af.
GPUSOCK_HD inline int inet_pton(int af, const char* src, void* dst) {
  const int r = raw::inet_pton(af, src, dst);
  if (r < 0) {
    hostcall::errno_ref() = -r;
    return -1;
  }
  return r;
}

// POSIX inet_ntop. Returns dst holding the NUL-terminated text, or nullptr with
// errno_value() == ENOSPC (size too small, dst untouched) or EAFNOSUPPORT.
GPUSOCK_HD inline const char* inet_ntop(int af, const void* src, char* dst, socklen_t size) {
  const int r = raw::inet_ntop(af, src, dst, static_cast<uint32_t>(size));
  if (r < 0) {
    hostcall::errno_ref() = -r;
    return nullptr;
  }
  return dst;
}

}  // namespace gpusock
