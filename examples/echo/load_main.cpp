// gpusock-echo-bench — a load generator for echo servers (gpusock's or any other).
//
//   gpusock-echo-bench [--host 127.0.0.1] [--port 7777] [--connections 64] [--size 64]
//                      [--depth 1] [--duration 5] [--warmup 1] [--threads N] [--json FILE]
//                      [--label NAME]
//
// Opens N connections spread over T threads (epoll each). Every connection keeps `depth`
// messages of `size` bytes in flight: it sends a message, and sends the next one each time
// a whole message has come back. Every byte that comes back is checked against what was
// sent (each message carries its connection, sequence number and a pattern), so a lost,
// duplicated or reordered byte is an error, not a faster figure. A request's latency is the
// time from writing its first byte to reading its last.
//
// Prints requests/s and latency percentiles; --json writes the same as one JSON object.
// Exit status: 0 when every connection worked and no byte was wrong, 1 otherwise (connect
// failures, resets, mismatches), 2 for a bad command line.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string host = "127.0.0.1";
  int port = 7777;
  int connections = 64;
  int size = 64;
  int depth = 1;
  double duration = 5;
  double warmup = 1;
  int threads = 0;
  std::string json;
  std::string label = "echo";
};

// The byte at offset `i` of message `seq` on connection `conn`: a pattern no two nearby
// messages share, so a misplaced byte shows.
inline uint8_t pattern(uint32_t conn, uint64_t seq, uint32_t i) {
  uint64_t x = (uint64_t{conn} << 40) ^ (seq << 12) ^ i;
  x ^= x >> 17;
  x *= 0x9E3779B97F4A7C15ull;
  return static_cast<uint8_t>(x >> 56);
}

struct Conn {
  int fd = -1;
  uint32_t id = 0;
  uint64_t next_send_seq = 0;  // next message to write
  uint32_t send_off = 0;       // bytes of that message already written
  uint64_t recv_seq = 0;       // message being read back
  uint32_t recv_off = 0;
  std::deque<Clock::time_point> sent_at;  // first-byte times of messages in flight
  bool want_out = false;
};

struct Totals {
  uint64_t requests = 0;   // messages fully echoed inside the measured window
  uint64_t bytes = 0;
  uint64_t errors = 0;     // connect failures, resets, EOFs, mismatches
  uint64_t mismatches = 0;
  std::vector<double> lat_us;
  std::string first_error;
};

struct Worker {
  const Options* o;
  std::vector<Conn> conns;
  Totals t;
  std::vector<uint8_t> msg, in;
  Clock::time_point measure_from, measure_to;

  void error(const std::string& what) {
    ++t.errors;
    if (t.first_error.empty()) t.first_error = what;
  }

  // Writes as much of the in-flight window as the socket takes.
  bool pump_out(Conn& c) {
    const uint32_t size = static_cast<uint32_t>(o->size);
    while (c.sent_at.size() < static_cast<size_t>(o->depth) || c.send_off > 0) {
      if (c.send_off == 0) {
        for (uint32_t i = 0; i < size; ++i) msg[i] = pattern(c.id, c.next_send_seq, i);
        c.sent_at.push_back(Clock::now());
      } else {
        for (uint32_t i = 0; i < size; ++i) msg[i] = pattern(c.id, c.next_send_seq, i);
      }
      ssize_t n = ::send(c.fd, msg.data() + c.send_off, size - c.send_off, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          c.want_out = true;
          return true;
        }
        error(std::string("send: ") + std::strerror(errno));
        return false;
      }
      c.send_off += static_cast<uint32_t>(n);
      if (c.send_off == size) {
        c.send_off = 0;
        ++c.next_send_seq;
      }
    }
    c.want_out = false;
    return true;
  }

  bool pump_in(Conn& c, Clock::time_point now) {
    const uint32_t size = static_cast<uint32_t>(o->size);
    for (;;) {
      ssize_t n = ::recv(c.fd, in.data(), in.size(), 0);
      if (n == 0) {
        error("the server closed a connection");
        return false;
      }
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
        error(std::string("recv: ") + std::strerror(errno));
        return false;
      }
      for (ssize_t k = 0; k < n; ++k) {
        if (c.recv_seq >= c.next_send_seq + (c.send_off > 0 ? 1 : 0)) {
          ++t.mismatches;
          error("the server sent bytes nobody sent it");
          return false;
        }
        if (in[k] != pattern(c.id, c.recv_seq, c.recv_off)) {
          ++t.mismatches;
          error("a byte came back wrong (message " + std::to_string(c.recv_seq) + ", offset " +
                std::to_string(c.recv_off) + ")");
          return false;
        }
        if (++c.recv_off == size) {
          Clock::time_point sent = c.sent_at.front();
          c.sent_at.pop_front();
          if (sent >= measure_from && now <= measure_to) {
            ++t.requests;
            t.bytes += size;
            t.lat_us.push_back(std::chrono::duration<double, std::micro>(now - sent).count());
          }
          c.recv_off = 0;
          ++c.recv_seq;
        }
      }
    }
  }

  void run(sockaddr_in addr, Clock::time_point start) {
    msg.resize(static_cast<size_t>(o->size));
    in.resize(std::max<size_t>(65536, static_cast<size_t>(o->size)));
    measure_from = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o->warmup));
    measure_to = measure_from + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o->duration));
    int ep = epoll_create1(0);
    size_t live = 0;
    for (size_t i = 0; i < conns.size(); ++i) {
      Conn& c = conns[i];
      c.fd = ::socket(AF_INET, SOCK_STREAM, 0);
      int one = 1;
      setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      if (::connect(c.fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        error(std::string("connect: ") + std::strerror(errno));
        ::close(c.fd);
        c.fd = -1;
        continue;
      }
      fcntl(c.fd, F_SETFL, O_NONBLOCK);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = i;
      epoll_ctl(ep, EPOLL_CTL_ADD, c.fd, &ev);
      ++live;
    }
    for (Conn& c : conns) {
      if (c.fd >= 0 && !pump_out(c)) {
        ::close(c.fd);
        c.fd = -1;
        --live;
      }
    }
    std::vector<epoll_event> evs(256);
    while (live > 0 && Clock::now() < measure_to) {
      int n = epoll_wait(ep, evs.data(), static_cast<int>(evs.size()), 100);
      const Clock::time_point now = Clock::now();
      for (int k = 0; k < n; ++k) {
        Conn& c = conns[evs[k].data.u64];
        if (c.fd < 0) continue;
        bool ok = true;
        if (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) ok = pump_in(c, now);
        if (ok) {
          const bool was = c.want_out;
          ok = pump_out(c);
          if (ok && was != c.want_out) {
            epoll_event ev{};
            ev.events = EPOLLIN | (c.want_out ? EPOLLOUT : 0u);
            ev.data.u64 = evs[k].data.u64;
            epoll_ctl(ep, EPOLL_CTL_MOD, c.fd, &ev);
          }
        }
        if (!ok) {
          ::close(c.fd);
          c.fd = -1;
          --live;
        }
      }
    }
    for (Conn& c : conns) {
      if (c.fd >= 0) ::close(c.fd);
    }
    ::close(ep);
  }
};

double pct(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  size_t k = static_cast<size_t>(p / 100.0 * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(k, v.size() - 1)];
}

int usage(const char* why) {
  std::fprintf(stderr,
               "gpusock-echo-bench: %s\n"
               "usage: gpusock-echo-bench [--host H] [--port P] [--connections N] [--size BYTES] [--depth D]\n"
               "                          [--duration S] [--warmup S] [--threads T] [--json FILE] [--label NAME]\n",
               why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") return usage("help"), 0;
    if (i + 1 >= argc) return usage(("missing value for " + a).c_str());
    std::string v = argv[++i];
    char* end = nullptr;
    const double d = std::strtod(v.c_str(), &end);
    const bool num = end != v.c_str() && *end == '\0';
    if (a == "--host") o.host = v;
    else if (a == "--json") o.json = v;
    else if (a == "--label") o.label = v;
    else if (!num) return usage(("not a number: " + a + " " + v).c_str());
    else if (a == "--port" && d > 0 && d < 65536) o.port = static_cast<int>(d);
    else if (a == "--connections" && d >= 1 && d <= 100000) o.connections = static_cast<int>(d);
    else if (a == "--size" && d >= 1 && d <= (1 << 20)) o.size = static_cast<int>(d);
    else if (a == "--depth" && d >= 1 && d <= 1024) o.depth = static_cast<int>(d);
    else if (a == "--duration" && d > 0) o.duration = d;
    else if (a == "--warmup" && d >= 0) o.warmup = d;
    else if (a == "--threads" && d >= 1 && d <= 256) o.threads = static_cast<int>(d);
    else return usage(("bad option or value: " + a + " " + v).c_str());
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(o.port));
  if (inet_pton(AF_INET, o.host.c_str(), &addr.sin_addr) != 1) return usage("--host wants an IPv4 address");
  if (o.threads == 0) o.threads = std::min(o.connections, std::max(1, static_cast<int>(std::thread::hardware_concurrency() / 4)));
  o.threads = std::min(o.threads, o.connections);

  std::vector<Worker> workers(static_cast<size_t>(o.threads));
  for (int c = 0; c < o.connections; ++c) {
    Conn conn;
    conn.id = static_cast<uint32_t>(c);
    workers[static_cast<size_t>(c % o.threads)].conns.push_back(std::move(conn));
  }
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> threads;
  for (Worker& w : workers) {
    w.o = &o;
    threads.emplace_back([&w, addr, start] { w.run(addr, start); });
  }
  for (auto& t : threads) t.join();

  Totals all;
  for (Worker& w : workers) {
    all.requests += w.t.requests;
    all.bytes += w.t.bytes;
    all.errors += w.t.errors;
    all.mismatches += w.t.mismatches;
    all.lat_us.insert(all.lat_us.end(), w.t.lat_us.begin(), w.t.lat_us.end());
    if (all.first_error.empty()) all.first_error = w.t.first_error;
  }
  std::sort(all.lat_us.begin(), all.lat_us.end());
  const double rps = static_cast<double>(all.requests) / o.duration;
  const double p50 = pct(all.lat_us, 50), p90 = pct(all.lat_us, 90), p99 = pct(all.lat_us, 99),
               p999 = pct(all.lat_us, 99.9);
  std::printf(
      "%s: %d connections x depth %d, %d B: %.0f req/s, %.1f MB/s each way; latency us p50 %.1f p90 %.1f p99 %.1f "
      "p99.9 %.1f; errors %llu\n",
      o.label.c_str(), o.connections, o.depth, o.size, rps, rps * o.size / 1e6, p50, p90, p99, p999,
      static_cast<unsigned long long>(all.errors));
  if (!all.first_error.empty()) std::printf("first error: %s\n", all.first_error.c_str());
  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "gpusock-echo-bench: cannot write %s: %s\n", o.json.c_str(), std::strerror(errno));
      return 1;
    }
    std::fprintf(f,
                 "{\"label\":\"%s\",\"connections\":%d,\"depth\":%d,\"size\":%d,\"duration_s\":%.3f,"
                 "\"requests\":%llu,\"req_per_s\":%.1f,\"p50_us\":%.2f,\"p90_us\":%.2f,\"p99_us\":%.2f,"
                 "\"p999_us\":%.2f,\"errors\":%llu,\"mismatches\":%llu}\n",
                 o.label.c_str(), o.connections, o.depth, o.size, o.duration,
                 static_cast<unsigned long long>(all.requests), rps, p50, p90, p99, p999,
                 static_cast<unsigned long long>(all.errors), static_cast<unsigned long long>(all.mismatches));
    std::fclose(f);
  }
  return (all.errors == 0 && all.requests > 0) ? 0 : 1;
}
