// examples/http/server.hpp — the HTTP/1.1 server kernel: every warp serves its own
// connections from one shared listening socket.
//
//   gpusock::http::ServerConfig cfg = ...;   // limits, buffers, files (main.cu fills it)
//   gpusock::launch(rt, {grid}, {32 * warps}, gpusock::http::Server{}, cfg);
//
// One turn of a warp's loop (docs/architecture.md section 16):
//   1. lane 0 reads the stop word the host sets on SIGINT/SIGTERM; every lane checks its
//      own connections for the request (408) and keep-alive timeouts;
//   2. every lane writes its connections into the warp's pollfd array, lane 0 adds the
//      listener while the warp has a free slot, and lane 0 makes ONE poll() call for all
//      of them (short timeout, so the stop word is seen);
//   3. rounds of non-blocking recv: in each round every lane with a readable connection
//      receives from one of them. The lanes call recv together, so a round is one
//      hostcall, and none of them blocks: readiness was established by the poll. Each
//      lane then parses what it got, runs the route (SHA-256 of a body, a static file)
//      and sends its responses, again together with the lanes that have some;
//   4. if the listener was readable, every lane with a free slot calls accept4 once on
//      the non-blocking listener (one hostcall; lanes that find nothing get EAGAIN).
// Lanes never block individually in recv: lanes of a warp that make a blocking call
// together share one slot and are all answered when the last one is.
#pragma once

#include <cstdint>

#include "gpusock/hostcall/io.hpp"
#include "gpusock/hostcall/warp.hpp"
#include "gpusock/net/socket.hpp"
#include "parser.hpp"
#include "sha256.hpp"
#include "date.hpp"

namespace gpusock::http {

inline constexpr uint32_t kMaxConnsPerLane = 32;
inline constexpr uint32_t kMaxTypeLen = 64;
// How long a connection the server ends is drained before it is closed (16.2).
inline constexpr uint64_t kLingerNs = 2000000000ull;
// The Server header's value (a macro: device code cannot read a host pointer constant).
#define GPUSOCK_HTTP_SERVER_NAME "gpusock-http/0.1"

// A static file: its bytes are blob[offset, offset + size) in device memory.
struct FileEntry {
  uint64_t offset;
  uint64_t size;
  uint32_t path_len;
  uint32_t type_len;
  char path[kMaxPath];
  char type[kMaxTypeLen];
};

// Files by path: open addressing over `slots` (entry index + 1; 0 is empty).
struct FileTable {
  const FileEntry* entries = nullptr;
  uint32_t count = 0;
  const uint32_t* slots = nullptr;
  uint32_t slot_mask = 0;  // slot count - 1 (a power of two)
  const uint8_t* blob = nullptr;
};

// FNV-1a: the same on host (building the table) and device (looking up).
GPUSOCK_HD inline uint64_t path_hash(const char* p, uint32_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint32_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 0x100000001b3ull;
  return h;
}

GPUSOCK_HD inline const FileEntry* find_file(const FileTable& t, const char* p, uint32_t n) {
  if (t.count == 0) return nullptr;
  uint32_t i = static_cast<uint32_t>(path_hash(p, n)) & t.slot_mask;
  for (uint32_t probes = 0; probes <= t.slot_mask; ++probes, i = (i + 1) & t.slot_mask) {
    const uint32_t s = t.slots[i];
    if (s == 0) return nullptr;
    const FileEntry& e = t.entries[s - 1];
    if (e.path_len != n) continue;
    bool same = true;
    for (uint32_t k = 0; k < n && same; ++k) same = e.path[k] == p[k];
    if (same) return &e;
  }
  return nullptr;
}

enum class Route : uint8_t { kNone, kHealth, kSha, kFile };

// One connection slot. Owned by one lane; nobody else touches it.
struct Conn {
  int fd;               // -1: free
  uint32_t used;        // bytes waiting in the slot's input buffer
  uint64_t last_ns;     // last bytes received (keep-alive timeout)
  uint64_t request_ns;  // when the request now being read began (request timeout)
  uint64_t linger_ns;   // != 0: answered and shut down for writing, draining until EOF
  Route route;
  uint16_t reject;      // 404 or 405 decided at the head; the body is read and dropped
  const FileEntry* file;
  Parser parser;
  Sha256 sha;
};

// Per lane, written only by its lane; the host sums them after the kernel ends.
struct LaneStats {
  uint64_t accepted;
  uint64_t rejected;    // over max_connections: answered 503 and closed
  uint64_t requests;    // responses sent, errors included
  uint64_t bytes_in;
  uint64_t bytes_out;
  uint64_t status_2xx;
  uint64_t status_4xx;
  uint64_t status_5xx;
  uint64_t timeouts;    // 408s
};

// Device memory shared by the warps (zeroed at start).
struct Shared {
  int listener;
  uint32_t ready;       // 0 starting, 1 listening, 2 failed (device scope, release/acquire)
  uint32_t open;        // open connections, against max_connections
  uint32_t warps_done;  // the last warp out closes the listener
};

// Mapped memory: what the host and the kernel tell each other.
struct Control {
  uint32_t stop;        // host -> kernel: leave (set on SIGINT/SIGTERM)
  uint32_t state;       // kernel -> host: 1 listening, 2 failed
  uint32_t port;        // the bound port (useful with --port 0)
  int32_t error;        // errno of the failed step
  uint32_t failed_step; // 1 socket, 2 setsockopt, 3 bind, 4 listen, 5 getsockname
};

struct ServerConfig {
  Limits limits;
  uint32_t max_connections;
  uint32_t conns_per_lane;   // K: a warp owns 32 * K connection slots
  uint32_t out_bytes;        // per-connection output buffer (>= 4096)
  uint32_t backlog;
  uint64_t request_timeout_ns;
  uint64_t keepalive_timeout_ns;
  int poll_timeout_ms;
  uint32_t addr_len;
  uint8_t addr[28];          // sockaddr_in or sockaddr_in6
  FileTable files;
  Conn* conns;               // warps * 32 * K
  uint8_t* in;               // one max_header_bytes buffer per slot
  uint8_t* out;              // one out_bytes buffer per slot
  pollfd* polls;             // warps * (1 + 32 * K)
  LaneStats* stats;          // warps * 32
  Shared* shared;
  Control* control;          // mapped
};

namespace internal {

GPUSOCK_HD inline void copy_bytes(uint8_t* dst, const uint8_t* src, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) dst[i] = src[i];
}

GPUSOCK_HD inline uint32_t str_len(const char* s) {
  uint32_t n = 0;
  while (s[n] != '\0') ++n;
  return n;
}

GPUSOCK_HD inline const char* reason(uint16_t status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Error";
  }
}

// A connection's output: responses collect here and go out in one send per turn.
struct Out {
  uint8_t* buf;
  uint32_t cap;
  uint32_t n;
  int fd;
  bool ok;          // false once a send failed: the connection is closed
  uint64_t sent;

  GPUSOCK_HD void flush() {
    if (n == 0 || !ok) {
      n = 0;
      return;
    }
    const int64_t r = gpusock::send(fd, buf, n, 0);
    if (r != static_cast<int64_t>(n)) ok = false;
    if (r > 0) sent += static_cast<uint64_t>(r);
    n = 0;
  }
  GPUSOCK_HD void put(const void* p, uint64_t len) {
    const uint8_t* s = static_cast<const uint8_t*>(p);
    if (len > cap - n) flush();
    if (len > cap) {  // a large body goes straight from where it lives
      if (!ok) return;
      const int64_t r = gpusock::send(fd, s, len, 0);
      if (r != static_cast<int64_t>(len)) ok = false;
      if (r > 0) sent += static_cast<uint64_t>(r);
      return;
    }
    copy_bytes(buf + n, s, len);
    n += static_cast<uint32_t>(len);
  }
  GPUSOCK_HD void put(const char* s) { put(s, str_len(s)); }
  GPUSOCK_HD void put_u64(uint64_t v) {
    char tmp[20];
    uint32_t k = 0;
    do {
      tmp[19 - k++] = static_cast<char>('0' + v % 10);
      v /= 10;
    } while (v != 0);
    put(tmp + 20 - k, k);
  }
};

GPUSOCK_HD inline void response_head(Out& o, uint16_t status, const char* date, const char* type, uint32_t type_len,
                                     uint64_t length, bool keep_alive, bool http10, const char* extra) {
  o.put("HTTP/1.1 ");
  o.put_u64(status);
  o.put(" ");
  o.put(reason(status));
  o.put("\r\nServer: ");
  o.put(GPUSOCK_HTTP_SERVER_NAME);
  o.put("\r\nDate: ");
  o.put(date, kDateLen);
  o.put("\r\nContent-Type: ");
  o.put(type, type_len);
  o.put("\r\nContent-Length: ");
  o.put_u64(length);
  if (!keep_alive) {
    o.put("\r\nConnection: close");
  } else if (http10) {
    o.put("\r\nConnection: keep-alive");
  }
  if (extra != nullptr) o.put(extra);
  o.put("\r\n\r\n");
}

// A short text/plain answer: "<status> <reason>\n".
GPUSOCK_HD inline void status_response(Out& o, uint16_t status, const char* date, bool keep_alive, bool http10,
                                       const char* extra, bool body) {
  const char* r = reason(status);
  const uint64_t len = 4 + str_len(r) + 1;
  response_head(o, status, date, "text/plain", 10, len, keep_alive, http10, extra);
  if (!body) return;
  o.put_u64(status);
  o.put(" ");
  o.put(r);
  o.put("\n");
}

GPUSOCK_HD inline void count_status(LaneStats& st, uint16_t status) {
  ++st.requests;
  if (status < 300) {
    ++st.status_2xx;
  } else if (status < 500) {
    ++st.status_4xx;
  } else {
    ++st.status_5xx;
  }
}

GPUSOCK_HD inline void close_conn(const ServerConfig& cfg, Conn& c) {
  gpusock::close(c.fd);
  c.fd = -1;
  c.used = 0;
  // Device scope: the counter is shared by every warp of this GPU; the host never reads it.
  AtomicRef<uint32_t, Scope::kDevice>(cfg.shared->open).fetch_sub(1, Order::kRelaxed);
}

// Ends a connection after its last response without losing that response: closing a
// socket with unread input makes the kernel send a reset, which can destroy the response
// before the client reads it (a client still uploading a body it was refused, say). So
// the sending side is shut down, and the input is read and dropped until the client
// closes or kLingerNs passes.
GPUSOCK_HD inline void begin_linger(Conn& c, uint64_t now) {
  gpusock::shutdown(c.fd, SHUT_WR);
  c.linger_ns = now;
  c.used = 0;
}

GPUSOCK_HD inline bool str_eq(const char* a, uint32_t n, const char* lit) {
  uint32_t i = 0;
  for (; i < n; ++i) {
    if (lit[i] == '\0' || a[i] != lit[i]) return false;
  }
  return lit[i] == '\0';
}

// Chooses the route once the head is known; the response goes out at kDone.
GPUSOCK_HD inline void on_head(const ServerConfig& cfg, Conn& c) {
  const RequestHead& h = c.parser.head;
  c.file = nullptr;
  c.reject = 0;
  bool get_like = h.method == Method::kGet || h.method == Method::kHead;
  if (str_eq(h.path, h.path_len, "/healthz")) {
    c.route = Route::kHealth;
    if (!get_like) c.reject = 405;
  } else if (str_eq(h.path, h.path_len, "/sha256")) {
    c.route = Route::kSha;
    if (h.method != Method::kPost) c.reject = 405;
    c.sha.reset();
  } else {
    c.file = str_eq(h.path, h.path_len, "/") ? find_file(cfg.files, "/index.html", 11)
                                             : find_file(cfg.files, h.path, h.path_len);
    c.route = c.file != nullptr ? Route::kFile : Route::kNone;
    if (c.file == nullptr) {
      c.reject = 404;
    } else if (!get_like) {
      c.reject = 405;
    }
  }
}

GPUSOCK_HD inline void respond(const ServerConfig& cfg, Conn& c, Out& o, const char* date, LaneStats& st) {
  const RequestHead& h = c.parser.head;
  const bool head_only = h.method == Method::kHead;
  const bool http10 = h.version_minor == 0;
  if (c.reject != 0) {
    const char* allow = c.reject != 405 ? nullptr : (c.route == Route::kSha ? "\r\nAllow: POST" : "\r\nAllow: GET, HEAD");
    status_response(o, c.reject, date, h.keep_alive, http10, allow, !head_only);
    count_status(st, c.reject);
    return;
  }
  switch (c.route) {
    case Route::kHealth:
      response_head(o, 200, date, "text/plain", 10, 3, h.keep_alive, http10, nullptr);
      if (!head_only) o.put("ok\n", 3);
      break;
    case Route::kSha: {
      char hex[65];
      c.sha.finish_hex(hex);
      hex[64] = '\n';
      response_head(o, 200, date, "text/plain", 10, 65, h.keep_alive, http10, nullptr);
      o.put(hex, 65);
      break;
    }
    case Route::kFile:
      response_head(o, 200, date, c.file->type, c.file->type_len, c.file->size, h.keep_alive, http10, nullptr);
      if (!head_only) o.put(cfg.files.blob + c.file->offset, c.file->size);
      break;
    case Route::kNone:
      break;
  }
  count_status(st, 200);
}

GPUSOCK_HD inline void current_date(char* date) {
  timespec ts{};
  gpusock::clock_gettime(CLOCK_REALTIME, &ts);
  format_date(static_cast<int64_t>(ts.tv_sec), date);
}

// Answers an error and marks the connection for closing (the request stream can no
// longer be trusted to be in step).
GPUSOCK_HD inline void fail_request(Out& o, uint16_t status, const char* date, LaneStats& st) {
  status_response(o, status, date, false, false, nullptr, true);
  count_status(st, status);
}

// Parses what the connection holds and answers every complete request. Returns false
// when the connection must be closed.
GPUSOCK_HD inline bool process(const ServerConfig& cfg, Conn& c, uint8_t* in, uint8_t* out, LaneStats& st,
                               uint64_t now, bool& sent) {
  Out o{out, cfg.out_bytes, 0, c.fd, true, 0};
  char date[kDateLen];
  current_date(date);
  uint32_t off = 0;
  bool keep = true;
  for (;;) {
    const uint8_t* at = in + off;
    const Event ev = step(c.parser, cfg.limits, at, c.used - off);
    off += ev.consumed;
    if (ev.kind == EventKind::kNeedMore) {
      if (ev.consumed == 0) break;
      continue;
    }
    if (ev.kind == EventKind::kHead) {
      on_head(cfg, c);
      const RequestHead& h = c.parser.head;
      const bool body = h.chunked || h.content_length > 0;
      if (h.expect_continue && body && c.reject == 0 && h.version_minor == 1) {
        o.put("HTTP/1.1 100 Continue\r\n\r\n");
        o.flush();
      }
      continue;
    }
    if (ev.kind == EventKind::kBody) {
      if (c.route == Route::kSha && c.reject == 0) c.sha.update(at + ev.body_offset, ev.body_len);
      continue;
    }
    if (ev.kind == EventKind::kDone) {
      respond(cfg, c, o, date, st);
      c.request_ns = now;
      if (!c.parser.head.keep_alive) {
        keep = false;
        break;
      }
      continue;
    }
    fail_request(o, ev.status, date, st);  // kError
    keep = false;
    break;
  }
  if (keep) {
    // Keep the unparsed tail (a partial request) at the front of the buffer.
    for (uint32_t i = off; i < c.used; ++i) in[i - off] = in[i];
    c.used -= off;
  }
  o.flush();
  st.bytes_out += o.sent;
  sent = o.ok;
  return keep && o.ok;
}

GPUSOCK_HD inline void serve_readable(const ServerConfig& cfg, Conn& c, uint8_t* in, uint8_t* out, LaneStats& st,
                                      uint64_t now) {
  if (c.linger_ns != 0) {
    const int64_t n = gpusock::recv(c.fd, in, cfg.limits.max_header_bytes, MSG_DONTWAIT);
    if (n < 0 && gpusock::errno_value() == EAGAIN) return;
    if (n <= 0) {
      close_conn(cfg, c);
    } else {
      st.bytes_in += static_cast<uint64_t>(n);
    }
    return;
  }
  const uint32_t room = cfg.limits.max_header_bytes - c.used;
  if (room == 0) {  // the parser answers 431 before this can happen; never recv 0 bytes
    close_conn(cfg, c);
    return;
  }
  const int64_t n = gpusock::recv(c.fd, in + c.used, room, MSG_DONTWAIT);
  if (n < 0 && gpusock::errno_value() == EAGAIN) return;
  if (n <= 0) {  // end of stream or an error
    close_conn(cfg, c);
    return;
  }
  st.bytes_in += static_cast<uint64_t>(n);
  // The request timeout runs from a request's first byte until its head is complete;
  // while a body arrives, it runs from the last receive, so a slow upload that keeps
  // moving is not cut off.
  if (!in_request(c.parser, c.used) || c.parser.phase != Phase::kHead) c.request_ns = now;
  c.used += static_cast<uint32_t>(n);
  c.last_ns = now;
  bool sent = true;
  if (!process(cfg, c, in, out, st, now, sent)) {
    if (sent) {
      begin_linger(c, now);
    } else {
      close_conn(cfg, c);  // the peer is gone or broken: nothing to protect
    }
  }
}

// Warp 0, lane 0: opens the listener every warp polls and publishes it.
GPUSOCK_HD inline void open_listener(const ServerConfig& cfg) {
  Control& ctl = *cfg.control;
  const sockaddr* a = reinterpret_cast<const sockaddr*>(cfg.addr);
  uint32_t step = 1;
  int fd = gpusock::socket(a->sa_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int one = 1;
  if (fd >= 0) {
    step = 2;
    if (gpusock::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0) {
      step = 3;
      if (gpusock::bind(fd, a, cfg.addr_len) == 0) {
        step = 4;
        if (gpusock::listen(fd, static_cast<int>(cfg.backlog)) == 0) step = 5;
      }
    }
  }
  sockaddr_in6 bound{};
  socklen_t len = sizeof bound;
  if (step == 5 && gpusock::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
    ctl.port = gpusock::ntohs(bound.sin6_port);  // sin_port and sin6_port share the offset
    cfg.shared->listener = fd;
    // Device scope release: the warps that acquire `ready` see `listener`.
    AtomicRef<uint32_t, Scope::kDevice>(cfg.shared->ready).store(1, Order::kRelease);
    // System scope release: the host that sees state 1 sees the port.
    AtomicRef<uint32_t, Scope::kSystem>(ctl.state).store(1, Order::kRelease);
    return;
  }
  ctl.error = gpusock::errno_value();
  ctl.failed_step = step;
  if (fd >= 0) gpusock::close(fd);
  AtomicRef<uint32_t, Scope::kDevice>(cfg.shared->ready).store(2, Order::kRelease);
  AtomicRef<uint32_t, Scope::kSystem>(ctl.state).store(2, Order::kRelease);
}

GPUSOCK_HD inline bool stop_requested(const ServerConfig& cfg) {
  // Acquire, system scope: the host's store is the only thing this orders after.
  return AtomicRef<uint32_t, Scope::kSystem>(cfg.control->stop).load(Order::kAcquire) != 0;
}

}  // namespace internal

struct Server {
  GPUSOCK_HD void operator()(ServerConfig cfg) const {
    using namespace internal;
    const uint32_t lane = warp::lane_id();
    const uint32_t full = warp::existing_mask();
    const uint64_t w = global_warp_id();
    const uint32_t K = cfg.conns_per_lane;
    const uint64_t first = w * 32 * K + lane * K;  // this lane's first slot
    Conn* conns = cfg.conns + first;
    uint8_t* in = cfg.in + first * cfg.limits.max_header_bytes;
    uint8_t* out = cfg.out + first * cfg.out_bytes;
    pollfd* fds = cfg.polls + w * (1 + 32 * K);
    pollfd* mine = fds + 1 + lane * K;
    LaneStats& st = cfg.stats[w * 32 + lane];
    for (uint32_t k = 0; k < K; ++k) conns[k].fd = -1;

    if (w == 0 && lane == 0) open_listener(cfg);
    uint32_t ready = 0;
    if (lane == 0) {
      AtomicRef<uint32_t, Scope::kDevice> r(cfg.shared->ready);
      for (uint32_t i = 0; (ready = r.load(Order::kAcquire)) == 0; ++i) {
        if (stop_requested(cfg)) break;
        backoff(i);
      }
    }
    ready = warp::shfl(full, ready, 0);
    warp::sync(full);  // orders lane 0's acquire before the other lanes read `listener`
    const int listener = ready == 1 ? cfg.shared->listener : -1;

    uint32_t poll_errors = 0;
    while (ready == 1) {
      const uint32_t stop = warp::shfl(full, lane == 0 && stop_requested(cfg) ? 1u : 0u, 0);
      if (stop != 0) break;
      const uint64_t now = globaltimer_ns();
      // Timeouts, then this lane's part of the poll array.
      uint32_t free_slots = 0;
      for (uint32_t k = 0; k < K; ++k) {
        Conn& c = conns[k];
        if (c.fd >= 0 && c.linger_ns != 0) {
          if (now - c.linger_ns > kLingerNs) close_conn(cfg, c);
        } else if (c.fd >= 0) {
          if (in_request(c.parser, c.used)) {
            if (now - c.request_ns > cfg.request_timeout_ns) {
              char date[kDateLen];
              current_date(date);
              Out o{out + k * cfg.out_bytes, cfg.out_bytes, 0, c.fd, true, 0};
              fail_request(o, 408, date, st);
              o.flush();
              st.bytes_out += o.sent;
              ++st.timeouts;
              if (o.ok) {
                begin_linger(c, now);
              } else {
                close_conn(cfg, c);
              }
            }
          } else if (now - c.last_ns > cfg.keepalive_timeout_ns) {
            close_conn(cfg, c);
          }
        }
        free_slots += c.fd < 0 ? 1 : 0;
        mine[k] = pollfd{c.fd, POLLIN, 0};
      }
      const bool any_free = warp::ballot(full, free_slots > 0) != 0;
      int r = 0;
      if (lane == 0) {
        const uint32_t open = AtomicRef<uint32_t, Scope::kDevice>(cfg.shared->open).load(Order::kRelaxed);
        // Past max_connections the listener stays in the poll: new clients get a 503.
        fds[0] = pollfd{any_free || open >= cfg.max_connections ? listener : -1, POLLIN, 0};
      }
      warp::sync(full);  // every lane's entries are written before lane 0 polls them
      if (lane == 0) {
        r = gpusock::poll(fds, 1 + 32 * K, cfg.poll_timeout_ms);
        if (r < 0) r = -gpusock::errno_value();
      }
      r = warp::shfl(full, r, 0);
      warp::sync(full);  // lane 0's revents are visible to every lane
      if (r == -ESHUTDOWN || r == -ECANCELED) break;
      if (r < 0) {  // not expected; back off rather than spin on a failing poll
        backoff(poll_errors++);
        continue;
      }
      poll_errors = 0;
      if (r == 0) continue;

      const uint64_t t = globaltimer_ns();
      uint32_t todo = 0;
      for (uint32_t k = 0; k < K; ++k) {
        if (conns[k].fd >= 0 && (mine[k].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) != 0) todo |= 1u << k;
      }
      // Rounds: each lane with readable connections serves one of them per round.
      while (warp::ballot(full, todo != 0) != 0) {
        if (todo != 0) {
          const uint32_t k = lowest_bit(todo);
          todo &= todo - 1;
          serve_readable(cfg, conns[k], in + k * cfg.limits.max_header_bytes, out + k * cfg.out_bytes, st, t);
        }
      }
      if ((fds[0].revents & POLLIN) == 0) continue;
      // Accept: one non-blocking accept4 per lane with a free slot, in one hostcall.
      int slot = -1;
      for (uint32_t k = 0; k < K && slot < 0; ++k) {
        if (conns[k].fd < 0) slot = static_cast<int>(k);
      }
      const bool over = AtomicRef<uint32_t, Scope::kDevice>(cfg.shared->open).load(Order::kRelaxed) >=
                        cfg.max_connections;
      if (slot < 0 && !(over && lane == 0)) continue;
      const int fd = gpusock::accept4(listener, nullptr, nullptr, 0);
      if (fd < 0) continue;
      const uint32_t before = AtomicRef<uint32_t, Scope::kDevice>(cfg.shared->open).fetch_add(1, Order::kRelaxed);
      if (before >= cfg.max_connections || slot < 0) {
        char date[kDateLen];
        current_date(date);
        uint8_t buf[512];
        Out o{buf, sizeof buf, 0, fd, true, 0};
        status_response(o, 503, date, false, false, nullptr, true);
        o.flush();
        st.bytes_out += o.sent;
        ++st.rejected;
        // Take what the client sent already, so the close does not reset the connection
        // under the 503 (see begin_linger); this connection has no slot to linger in.
        gpusock::shutdown(fd, SHUT_WR);
        gpusock::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        gpusock::close(fd);
        AtomicRef<uint32_t, Scope::kDevice>(cfg.shared->open).fetch_sub(1, Order::kRelaxed);
        continue;
      }
      int one = 1;
      gpusock::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      Conn& c = conns[slot];
      c.fd = fd;
      c.used = 0;
      c.last_ns = t;
      c.request_ns = t;
      c.linger_ns = 0;
      c.parser = Parser{};
      ++st.accepted;
    }

    // Leave: close what this lane owns; the last warp out closes the listener.
    for (uint32_t k = 0; k < K; ++k) {
      if (conns[k].fd >= 0) close_conn(cfg, conns[k]);
    }
    warp::sync(full);
    if (lane == 0 && listener >= 0) {
      const uint32_t warps = static_cast<uint32_t>(grid_dim().x * grid_dim().y * grid_dim().z) *
                             ((block_threads() + 31) / 32);
      if (AtomicRef<uint32_t, Scope::kDevice>(cfg.shared->warps_done).fetch_add(1, Order::kAcqRel) + 1 == warps) {
        gpusock::close(listener);
      }
    }
  }
};

}  // namespace gpusock::http
