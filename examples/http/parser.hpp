// examples/http/parser.hpp — an incremental HTTP/1.1 request parser for kernels.
//
//   gpusock::http::Parser p;                     // one per connection, zero state
//   gpusock::http::Limits lim;                   // header and body limits
//   uint32_t off = 0;
//   for (;;) {
//     gpusock::http::Event ev = gpusock::http::step(p, lim, buf + off, used - off);
//     const uint8_t* at = buf + off;             // body pieces are relative to this
//     off += ev.consumed;
//     if (ev.kind == EventKind::kNeedMore && ev.consumed == 0) break;   // recv more
//     ...                                        // kHead: p.head is ready; kBody: at + ev.body_offset;
//   }                                            // kDone: the request is complete; kError: ev.status
//   // keep buf[off, used): the parser resumes there after the next recv.
//
// Every function is GPUSOCK_HD: the server runs it on the GPU (or the cpu device) and the
// tests and the fuzzer run the very same code on the host. It uses no libc, allocates
// nothing, never throws, and every loop is bounded by the bytes it was given. The head
// (request line and header fields) must arrive whole in the caller's buffer, which is
// what bounds its size (431 past Limits::max_header_bytes); the body is streamed through
// in pieces of whatever the caller received, so a body never needs to fit anywhere.
//
// What it accepts (RFC 9112): origin-form targets, HTTP/1.0 and 1.1, CRLF line ends, at
// most one empty line before a request line, Content-Length or chunked bodies (chunk
// extensions and trailer fields are read and dropped). What it rejects, with the status
// the server answers: anything malformed (400), a body longer than the limit (413), a
// head longer than the limit or with too many fields (431), a target path over kMaxPath
// bytes (414), a transfer coding other than chunked (501), HTTP major version other
// than 1 (505).
#pragma once

#include <cstdint>

#include "gpusock/hostcall/platform.hpp"

namespace gpusock::http {

enum class Method : uint8_t { kOther, kGet, kHead, kPost };

inline constexpr uint32_t kMaxPath = 256;      // bytes of the path, query excluded, plus NUL
inline constexpr uint32_t kMaxFields = 100;    // header fields per request
inline constexpr uint32_t kMaxChunkExt = 1024; // bytes of extensions per chunk-size line

// What a complete head says. Filled at kHead and kept until the next head starts.
struct RequestHead {
  Method method;
  uint8_t version_minor;    // 0 (HTTP/1.0) or 1 (1.1 and later 1.x)
  bool keep_alive;          // after the connection's defaults and its Connection field
  bool chunked;             // Transfer-Encoding: chunked
  bool has_length;          // Content-Length was given
  bool expect_continue;     // Expect: 100-continue
  uint64_t content_length;
  uint32_t path_len;
  char path[kMaxPath];      // the target up to '?', NUL-terminated, not decoded
};

struct Limits {
  uint32_t max_header_bytes = 8192;   // request line + fields + the blank line
  uint64_t max_body_bytes = 1u << 20; // Content-Length, or the sum of chunk sizes
};

enum class EventKind : uint8_t {
  kNeedMore,  // consumed bytes (maybe 0) and needs more input to say anything more
  kHead,      // a head was parsed: Parser::head holds it
  kBody,      // body bytes at [body_offset, body_offset + body_len) of the input given
  kDone,      // the request (head and body) is complete; the next one may follow
  kError,     // the request is bad; status says how. Every later step says the same.
};

struct Event {
  EventKind kind;
  uint32_t consumed;     // input bytes the caller may drop now
  uint32_t body_offset;  // kBody only
  uint32_t body_len;     // kBody only
  uint16_t status;       // kError only: 400, 413, 414, 431, 501 or 505
};

enum class Phase : uint8_t {
  kHead,
  kLength,        // Content-Length body: `remaining` bytes to go
  kChunkSize,     // hex digits of a chunk size
  kChunkExt,      // ";ext..." up to CR
  kChunkSizeLf,   // the LF after a chunk-size line
  kChunkData,     // `remaining` bytes of chunk data
  kChunkDataCr,   // the CRLF after chunk data
  kChunkDataLf,
  kTrailerStart,  // start of a trailer line (or of the final CRLF)
  kTrailerLine,   // inside a trailer line
  kTrailerLf,     // LF ending a trailer line
  kTrailerEndLf,  // LF of the final empty line
  kDone,          // report kDone, then start over
  kError,
};

struct Parser {
  Phase phase = Phase::kHead;
  uint16_t error_status = 0;
  uint32_t scan = 0;          // kHead: bytes already searched for the blank line; trailers: bytes seen
  uint32_t digits = 0;        // chunk-size digits, or chunk-extension bytes
  uint64_t remaining = 0;
  uint64_t body_total = 0;    // body bytes of this request so far
  RequestHead head{};
};

namespace internal {

GPUSOCK_HD inline bool is_tchar(uint8_t c) {
  if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
  switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
    case '-': case '.': case '^': case '_': case '`': case '|': case '~':
      return true;
    default:
      return false;
  }
}

GPUSOCK_HD inline uint8_t lower(uint8_t c) { return (c >= 'A' && c <= 'Z') ? static_cast<uint8_t>(c + 32) : c; }

// Case-insensitive comparison of [p, p + n) with a lower-case literal.
GPUSOCK_HD inline bool iequals(const uint8_t* p, uint32_t n, const char* lit) {
  uint32_t i = 0;
  for (; i < n; ++i) {
    if (lit[i] == '\0' || lower(p[i]) != static_cast<uint8_t>(lit[i])) return false;
  }
  return lit[i] == '\0';
}

GPUSOCK_HD inline bool equals(const uint8_t* p, uint32_t n, const char* lit) {
  uint32_t i = 0;
  for (; i < n; ++i) {
    if (lit[i] == '\0' || p[i] != static_cast<uint8_t>(lit[i])) return false;
  }
  return lit[i] == '\0';
}

GPUSOCK_HD inline int hex_value(uint8_t c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

GPUSOCK_HD inline Event error(Parser& p, uint16_t status, uint32_t consumed = 0) {
  p.phase = Phase::kError;
  p.error_status = status;
  return Event{EventKind::kError, consumed, 0, 0, status};
}

// Walks a comma-separated list of tokens in a Connection field value.
GPUSOCK_HD inline void connection_tokens(const uint8_t* v, uint32_t n, bool& close, bool& keep) {
  uint32_t i = 0;
  while (i < n) {
    while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) ++i;
    const uint32_t s = i;
    while (i < n && v[i] != ',' && v[i] != ' ' && v[i] != '\t') ++i;
    if (iequals(v + s, i - s, "close")) close = true;
    if (iequals(v + s, i - s, "keep-alive")) keep = true;
  }
}

// Parses a complete head in [d, d + n) (it ends with CRLF CRLF). Returns 0 or a status.
GPUSOCK_HD inline uint16_t parse_head(const uint8_t* d, uint32_t n, RequestHead& h) {
  h = RequestHead{};
  uint32_t i = 0;
  // Method.
  while (i < n && is_tchar(d[i])) ++i;
  if (i == 0 || i > 16 || i >= n || d[i] != ' ') return 400;
  if (equals(d, i, "GET")) {
    h.method = Method::kGet;
  } else if (equals(d, i, "HEAD")) {
    h.method = Method::kHead;
  } else if (equals(d, i, "POST")) {
    h.method = Method::kPost;
  } else {
    h.method = Method::kOther;
  }
  ++i;
  // Target: origin-form only ("/path?query"), visible ASCII.
  const uint32_t t = i;
  while (i < n && d[i] > 0x20 && d[i] < 0x7f) ++i;
  if (i == t || i >= n || d[i] != ' ' || d[t] != '/') return 400;
  uint32_t path_end = t;
  while (path_end < i && d[path_end] != '?' && d[path_end] != '#') ++path_end;
  if (path_end - t >= kMaxPath) return 414;
  h.path_len = path_end - t;
  for (uint32_t k = 0; k < h.path_len; ++k) h.path[k] = static_cast<char>(d[t + k]);
  h.path[h.path_len] = '\0';
  ++i;
  // Version: HTTP/D.D CRLF.
  if (n - i < 10 || !equals(d + i, 5, "HTTP/")) return 400;
  const uint8_t major = d[i + 5], minor = d[i + 7];
  if (major < '0' || major > '9' || d[i + 6] != '.' || minor < '0' || minor > '9') return 400;
  if (d[i + 8] != '\r' || d[i + 9] != '\n') return 400;
  if (major != '1') return 505;
  h.version_minor = minor == '0' ? 0 : 1;
  i += 10;
  // Fields, up to the empty line.
  bool close = false, keep = false, te = false;
  uint32_t hosts = 0, fields = 0;
  while (i + 1 < n) {
    if (d[i] == '\r') {
      if (d[i + 1] != '\n') return 400;
      break;  // the empty line: end of head
    }
    if (++fields > kMaxFields) return 431;
    const uint32_t ns = i;
    while (i < n && is_tchar(d[i])) ++i;
    if (i == ns || i >= n || d[i] != ':') return 400;  // empty name, obs-fold, space before ':'
    const uint32_t nlen = i - ns;
    ++i;
    while (i < n && (d[i] == ' ' || d[i] == '\t')) ++i;
    const uint32_t vs = i;
    while (i < n && d[i] != '\r') {
      const uint8_t c = d[i];
      if ((c < 0x20 && c != '\t') || c == 0x7f) return 400;  // control characters, bare LF
      ++i;
    }
    if (i + 1 >= n || d[i + 1] != '\n') return 400;
    uint32_t ve = i;
    while (ve > vs && (d[ve - 1] == ' ' || d[ve - 1] == '\t')) --ve;
    const uint8_t* name = d + ns;
    const uint8_t* v = d + vs;
    const uint32_t vlen = ve - vs;
    if (iequals(name, nlen, "content-length")) {
      if (vlen == 0 || vlen > 18) return vlen > 18 ? 413 : 400;  // 18 digits cannot overflow
      uint64_t x = 0;
      for (uint32_t k = 0; k < vlen; ++k) {
        if (v[k] < '0' || v[k] > '9') return 400;
        x = x * 10 + (v[k] - '0');
      }
      if (h.has_length && x != h.content_length) return 400;
      h.has_length = true;
      h.content_length = x;
    } else if (iequals(name, nlen, "transfer-encoding")) {
      if (te || !iequals(v, vlen, "chunked")) return 501;
      te = true;
    } else if (iequals(name, nlen, "connection")) {
      connection_tokens(v, vlen, close, keep);
    } else if (iequals(name, nlen, "host")) {
      ++hosts;
    } else if (iequals(name, nlen, "expect")) {
      if (iequals(v, vlen, "100-continue")) h.expect_continue = true;
    }
    i += 2;
  }
  if (te && h.has_length) return 400;  // request smuggling: never guess which one wins
  if (h.version_minor == 1 && hosts != 1) return 400;
  if (h.version_minor == 0 && hosts > 1) return 400;
  h.chunked = te;
  h.keep_alive = h.version_minor == 1 ? !close : (keep && !close);
  return 0;
}

}  // namespace internal

// Consumes a prefix of [data, data + len) and says what it found. The caller drops
// `consumed` bytes, keeps the rest and calls again with them first (plus newly received
// bytes) until kNeedMore with consumed == 0. Returns each request's kHead, its kBody
// pieces and kDone in order, or kError (after which it answers kError forever).
GPUSOCK_HD inline Event step(Parser& p, const Limits& lim, const uint8_t* data, uint32_t len) {
  using internal::error;
  switch (p.phase) {
    case Phase::kError:
      return Event{EventKind::kError, 0, 0, 0, p.error_status};
    case Phase::kDone:
      p.phase = Phase::kHead;
      p.scan = 0;
      return Event{EventKind::kDone, 0, 0, 0, 0};
    case Phase::kHead: {
      if (len == 0) return Event{EventKind::kNeedMore, 0, 0, 0, 0};
      // One empty line before a request line is allowed (RFC 9112 2.2).
      if (p.scan == 0 && data[0] == '\r') {
        if (len < 2) return Event{EventKind::kNeedMore, 0, 0, 0, 0};
        if (data[1] != '\n') return error(p, 400);
        return Event{EventKind::kNeedMore, 2, 0, 0, 0};
      }
      uint32_t i = p.scan;
      const uint32_t stop = len < lim.max_header_bytes ? len : lim.max_header_bytes;
      for (; i < stop; ++i) {
        if (data[i] != '\n') continue;
        if (i == 0 || data[i - 1] != '\r') return error(p, 400);  // bare LF
        if (i >= 3 && data[i - 2] == '\n') {
          const uint32_t end = i + 1;
          p.scan = 0;
          const uint16_t s = internal::parse_head(data, end, p.head);
          if (s != 0) return error(p, s);
          if (p.head.has_length && p.head.content_length > lim.max_body_bytes) return error(p, 413);
          p.body_total = 0;
          p.remaining = 0;
          p.digits = 0;
          if (p.head.chunked) {
            p.phase = Phase::kChunkSize;
          } else if (p.head.content_length > 0) {
            p.phase = Phase::kLength;
            p.remaining = p.head.content_length;
          } else {
            p.phase = Phase::kDone;
          }
          return Event{EventKind::kHead, end, 0, 0, 0};
        }
      }
      if (stop == lim.max_header_bytes && len >= lim.max_header_bytes) return error(p, 431);
      p.scan = i;
      return Event{EventKind::kNeedMore, 0, 0, 0, 0};
    }
    case Phase::kLength: {
      const uint32_t n = p.remaining < len ? static_cast<uint32_t>(p.remaining) : len;
      if (n == 0) return Event{EventKind::kNeedMore, 0, 0, 0, 0};
      p.remaining -= n;
      p.body_total += n;
      if (p.remaining == 0) p.phase = Phase::kDone;
      return Event{EventKind::kBody, n, 0, n, 0};
    }
    default:
      break;
  }
  // Chunked framing, byte by byte; data pieces are handed out whole.
  uint32_t i = 0;
  while (i < len) {
    const uint8_t c = data[i];
    switch (p.phase) {
      case Phase::kChunkSize: {
        const int h = internal::hex_value(c);
        if (h >= 0) {
          if (++p.digits > 15) return error(p, 413, i);
          p.remaining = p.remaining * 16 + static_cast<uint64_t>(h);
          ++i;
          break;
        }
        if (p.digits == 0) return error(p, 400, i);
        if (c == '\r') {
          p.phase = Phase::kChunkSizeLf;
        } else if (c == ';' || c == ' ' || c == '\t') {
          p.phase = Phase::kChunkExt;
          p.digits = 0;
        } else {
          return error(p, 400, i);
        }
        ++i;
        break;
      }
      case Phase::kChunkExt:
        if (c == '\r') {
          p.phase = Phase::kChunkSizeLf;
        } else if (c == '\n' || ++p.digits > kMaxChunkExt) {
          return error(p, 400, i);
        }
        ++i;
        break;
      case Phase::kChunkSizeLf:
        if (c != '\n') return error(p, 400, i);
        ++i;
        p.digits = 0;
        if (p.remaining == 0) {
          p.phase = Phase::kTrailerStart;
          p.scan = 0;
        } else {
          if (p.remaining > lim.max_body_bytes - p.body_total) return error(p, 413, i);
          p.phase = Phase::kChunkData;
        }
        break;
      case Phase::kChunkData: {
        const uint32_t left = len - i;
        const uint32_t n = p.remaining < left ? static_cast<uint32_t>(p.remaining) : left;
        p.remaining -= n;
        p.body_total += n;
        if (p.remaining == 0) p.phase = Phase::kChunkDataCr;
        return Event{EventKind::kBody, i + n, i, n, 0};
      }
      case Phase::kChunkDataCr:
        if (c != '\r') return error(p, 400, i);
        p.phase = Phase::kChunkDataLf;
        ++i;
        break;
      case Phase::kChunkDataLf:
        if (c != '\n') return error(p, 400, i);
        p.phase = Phase::kChunkSize;
        p.remaining = 0;
        p.digits = 0;
        ++i;
        break;
      case Phase::kTrailerStart:
        p.phase = c == '\r' ? Phase::kTrailerEndLf : Phase::kTrailerLine;
        if (c == '\n') return error(p, 400, i);
        if (++p.scan > lim.max_header_bytes) return error(p, 431, i);
        ++i;
        break;
      case Phase::kTrailerLine:
        if (c == '\n') return error(p, 400, i);
        if (c == '\r') p.phase = Phase::kTrailerLf;
        if (++p.scan > lim.max_header_bytes) return error(p, 431, i);
        ++i;
        break;
      case Phase::kTrailerLf:
        if (c != '\n') return error(p, 400, i);
        p.phase = Phase::kTrailerStart;
        ++i;
        break;
      case Phase::kTrailerEndLf:
        if (c != '\n') return error(p, 400, i);
        p.phase = Phase::kHead;
        p.scan = 0;
        return Event{EventKind::kDone, i + 1, 0, 0, 0};
      default:
        return error(p, 400, i);
    }
  }
  return Event{EventKind::kNeedMore, i, 0, 0, 0};
}

// True while a request has started and not ended: bytes of a head are waiting, or a body
// is being read. The server's request timeout (408) applies only then.
GPUSOCK_HD inline bool in_request(const Parser& p, uint32_t buffered) {
  return buffered > 0 || (p.phase != Phase::kHead && p.phase != Phase::kError);
}

}  // namespace gpusock::http
