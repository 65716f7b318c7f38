// bench/net/baseline — see baseline.hpp.
#include "baseline.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstring>
#include <exception>

// liburing 2.3's bundled uapi header predates these (kernel 6.2); the values are ABI.
#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)
#endif

namespace gpusock::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Every blocking wait in this file is bounded by this, so stop flags are seen promptly.
constexpr int kWaitMs = 50;
// No completion for this long means the peer is gone or wedged; fail instead of hanging.
constexpr auto kIdleLimit = std::chrono::seconds(10);
// Largest piece checked/sent against the pattern table in one go.
constexpr size_t kMaxPiece = size_t{1} << 20;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

double secs_since(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::string errno_msg(const std::string& what, int err) {
  if (err < 0) err = -err;
  return what + ": " + std::strerror(err);
}

void set_err(std::string* out, const std::string& msg) {
  if (out) *out = msg;
}

bool make_addr(const std::string& addr, uint16_t port, sockaddr_in* sa) {
  std::memset(sa, 0, sizeof(*sa));
  sa->sin_family = AF_INET;
  sa->sin_port = htons(port);
  return inet_pton(AF_INET, addr.c_str(), &sa->sin_addr) == 1;
}

__kernel_timespec wait_ts() {
  __kernel_timespec ts{};
  ts.tv_sec = 0;
  ts.tv_nsec = static_cast<long long>(kWaitMs) * 1000000;
  return ts;
}

// The flags the fastest servers use, falling back on kernels that refuse them (EINVAL).
// SINGLE_ISSUER binds the ring to the calling thread, so call this from the thread that
// will submit. Returns 0 and writes the flags used, or -errno.
int setup_ring(unsigned entries, unsigned cq_entries, io_uring* ring, unsigned* flags_used) {
  const unsigned kTries[] = {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
                             IORING_SETUP_COOP_TASKRUN, 0u};
  int ret = -EINVAL;
  for (unsigned flags : kTries) {
    io_uring_params p{};
    p.flags = flags | IORING_SETUP_CQSIZE;
    p.cq_entries = cq_entries;
    ret = io_uring_queue_init_params(entries, ring, &p);
    if (ret == 0) {
      if (flags_used) *flags_used = flags;
      return 0;
    }
    if (ret != -EINVAL) return ret;
  }
  return ret;
}

// Submits what is queued and waits up to kWaitMs for one completion. Returns 0, or the
// -errno of a real failure (timeouts and interrupts are not failures).
int submit_and_wait(io_uring* ring) {
  __kernel_timespec ts = wait_ts();
  io_uring_cqe* cqe = nullptr;
  int ret = io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, nullptr);
  if (ret >= 0 || ret == -ETIME || ret == -EINTR || ret == -EAGAIN || ret == -EBUSY) return 0;
  return ret;
}

// A free SQE, flushing the queue to the kernel once if it is full. Returns null only if
// that submit failed.
io_uring_sqe* get_sqe(io_uring* ring) {
  io_uring_sqe* sqe = io_uring_get_sqe(ring);
  if (!sqe) {
    io_uring_submit(ring);
    sqe = io_uring_get_sqe(ring);
  }
  return sqe;
}

// 3 MiB of pattern: one 2 MiB period plus room for a kMaxPiece window starting anywhere
// in it, so any stream range of <= kMaxPiece bytes is one contiguous slice.
const uint8_t* pattern_table() {
  static const std::vector<uint8_t> table = [] {
    std::vector<uint8_t> t(kPatternPeriod + kMaxPiece);
    fill_pattern(t.data(), 0, t.size());
    return t;
  }();
  return table.data();
}

}  // namespace

// ---------------------------------------------------------------------------------------

double percentile_us(std::vector<uint64_t>& ns, double p) {
  if (ns.empty()) return 0;
  std::sort(ns.begin(), ns.end());
  const double n = static_cast<double>(ns.size());
  double rank = std::ceil(p / 100.0 * n);
  if (rank < 1) rank = 1;
  if (rank > n) rank = n;
  return static_cast<double>(ns[static_cast<size_t>(rank) - 1]) / 1000.0;
}

int tcp_listen(const std::string& addr, uint16_t* port, bool reuse_port, int backlog) {
  sockaddr_in sa;
  if (!make_addr(addr, port ? *port : 0, &sa)) return -EINVAL;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  int one = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
      (reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) ||
      bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 || listen(fd, backlog) != 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  socklen_t len = sizeof(sa);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) != 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  if (port) *port = ntohs(sa.sin_port);
  return fd;
}

int tcp_connect(const std::string& addr, uint16_t port, int timeout_ms, bool nonblocking,
                const std::atomic<bool>* stop) {
  sockaddr_in sa;
  if (!make_addr(addr, port, &sa)) return -EINVAL;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  auto stopped = [&] { return stop && stop->load(std::memory_order_relaxed); };
  auto retryable = [](int e) {
    return e == ECONNREFUSED || e == EAGAIN || e == ETIMEDOUT || e == ECONNRESET;
  };
  int last = -ETIMEDOUT;
  constexpr int kAttempts = 6;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    if (attempt > 0) {
      // Short, growing pauses: a full accept queue drains in well under a millisecond.
      std::this_thread::sleep_for(std::chrono::milliseconds(5 * attempt));
    }
    if (stopped()) return -ECANCELED;
    if (Clock::now() >= deadline) return last;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int e = 0;
    if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      e = errno;
      if (e == EINPROGRESS) {
        e = ETIMEDOUT;
        while (!stopped()) {
          auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline -
                                                                            Clock::now())
                          .count();
          if (left <= 0) break;
          pollfd pfd{fd, POLLOUT, 0};
          int r = poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left, 100)));
          if (r < 0 && errno != EINTR) {
            e = errno;
            break;
          }
          if (r > 0) {
            int so = 0;
            socklen_t sl = sizeof(so);
            e = getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl) != 0 ? errno : so;
            break;
          }
        }
        if (stopped()) {
          close(fd);
          return -ECANCELED;
        }
      }
    }
    if (e == 0) {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      if (!nonblocking) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
          e = errno;
          close(fd);
          return -e;
        }
      }
      return fd;
    }
    close(fd);
    last = -e;
    if (!retryable(e)) return last;
  }
  return last;
}

// ---------------------------------------------------------------------------------------
// CpuEchoServer

namespace {

// Operation kinds in the upper half of user_data; the fd is in the lower half. An fd is
// closed only after its last operation completed, so a reused fd never sees stale CQEs.
enum : uint64_t { kOpAccept = 1, kOpRecv = 2, kOpSend = 3 };

uint64_t make_ud(uint64_t op, int fd) { return (op << 32) | static_cast<uint32_t>(fd); }

struct EchoConn {
  int fd = -1;
  std::unique_ptr<uint8_t[]> rx;  // bytes received, not yet echoed (may hold > 1 request)
  size_t rx_len = 0, rx_cap = 0;
  std::unique_ptr<uint8_t[]> tx;  // the request being echoed; stable while the send flies
  size_t tx_sent = 0;
  bool send_inflight = false;
  bool recv_armed = false;
  bool rearm_pending = false;      // queued for re-arm after -ENOBUFS
  bool closing = false;
  bool shut = false;
};

constexpr unsigned kBufEntries = 1024;  // provided buffers per ring (power of two)
constexpr int kBufGroup = 0;
constexpr size_t kMaxRxBacklog = size_t{64} << 20;  // a client pipelining more is dropped

}  // namespace

struct CpuEchoServer::Worker {
  int listen_fd = -1;
  size_t req = 0;
  int max_conns = 0;
  const std::atomic<bool>* stop = nullptr;
  std::atomic<int>* open_conns = nullptr;

  alignas(64) std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> bytes_in{0};
  std::atomic<uint64_t> bytes_out{0};
  std::atomic<uint64_t> connections{0};
  std::atomic<uint64_t> resets{0};
  std::atomic<uint64_t> errors{0};
  std::atomic<unsigned> ring_flags{0};

  // 0 = setting up, 1 = accepting, -1 = failed (setup_err written before the store).
  alignas(64) std::atomic<int> setup_state{0};
  std::string setup_err;

  // Owned by the worker thread only.
  io_uring ring{};
  io_uring_buf_ring* br = nullptr;
  size_t br_bytes = 0;
  std::unique_ptr<uint8_t[]> bufs;
  size_t buf_size = 0;
  int returned = 0;  // buffers re-added this pass, published by one advance
  std::vector<std::unique_ptr<EchoConn>> conns;  // indexed by fd
  std::vector<int> rearm;

  void run() {
    try {
      run_inner();
    } catch (const std::exception& e) {
      fail_setup(std::string("worker: ") + e.what());
    }
  }

  void fail_setup(const std::string& msg) {
    if (setup_state.load(std::memory_order_acquire) == 0) {
      setup_err = msg;
      setup_state.store(-1, std::memory_order_release);
    } else {
      errors.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void count_error() { errors.fetch_add(1, std::memory_order_relaxed); }
  // A client going away mid-request is a reset, not a server failure.
  void count_failure(int res) {
    if (res == -ECONNRESET || res == -EPIPE) {
      resets.fetch_add(1, std::memory_order_relaxed);
    } else {
      count_error();
    }
  }

  bool arm_accept() {
    io_uring_sqe* sqe = get_sqe(&ring);
    if (!sqe) return false;
    io_uring_prep_multishot_accept(sqe, listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, make_ud(kOpAccept, listen_fd));
    return true;
  }

  bool arm_recv(EchoConn* c) {
    io_uring_sqe* sqe = get_sqe(&ring);
    if (!sqe) return false;
    io_uring_prep_recv_multishot(sqe, c->fd, nullptr, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = kBufGroup;
    io_uring_sqe_set_data64(sqe, make_ud(kOpRecv, c->fd));
    c->recv_armed = true;
    return true;
  }

  void issue_send(EchoConn* c) {
    io_uring_sqe* sqe = get_sqe(&ring);
    if (!sqe) {
      count_error();
      begin_close(c);
      return;
    }
    io_uring_prep_send(sqe, c->fd, c->tx.get() + c->tx_sent, req - c->tx_sent, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, make_ud(kOpSend, c->fd));
    c->send_inflight = true;
  }

  // Starts echoing the next complete request if the connection is idle.
  void try_start_send(EchoConn* c) {
    if (c->send_inflight || c->closing || c->rx_len < req) return;
    std::memcpy(c->tx.get(), c->rx.get(), req);
    c->rx_len -= req;
    if (c->rx_len) std::memmove(c->rx.get(), c->rx.get() + req, c->rx_len);
    c->tx_sent = 0;
    issue_send(c);
  }

  // Marks the connection for closing; a recv still armed is ended by shutdown(), which
  // makes the multishot recv post its final CQE.
  void begin_close(EchoConn* c) {
    c->closing = true;
    if (c->recv_armed && !c->shut) {
      c->shut = true;
      shutdown(c->fd, SHUT_RDWR);
    }
  }

  void maybe_close(EchoConn* c) {
    if (!c->closing || c->recv_armed || c->send_inflight || c->rearm_pending) return;
    int fd = c->fd;
    close(fd);
    conns[static_cast<size_t>(fd)].reset();
    open_conns->fetch_sub(1, std::memory_order_relaxed);
  }

  EchoConn* conn_of(int fd) {
    if (fd < 0 || static_cast<size_t>(fd) >= conns.size()) return nullptr;
    return conns[static_cast<size_t>(fd)].get();
  }

  void on_accept(int fd) {
    if (open_conns->fetch_add(1, std::memory_order_relaxed) >= max_conns) {
      open_conns->fetch_sub(1, std::memory_order_relaxed);
      close(fd);
      count_error();
      return;
    }
    connections.fetch_add(1, std::memory_order_relaxed);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (static_cast<size_t>(fd) >= conns.size()) conns.resize(static_cast<size_t>(fd) * 2 + 64);
    auto c = std::make_unique<EchoConn>();
    c->fd = fd;
    c->rx_cap = 2 * req;
    c->rx = std::make_unique<uint8_t[]>(c->rx_cap);
    c->tx = std::make_unique<uint8_t[]>(req);
    EchoConn* cp = c.get();
    conns[static_cast<size_t>(fd)] = std::move(c);
    if (!arm_recv(cp)) {
      count_error();
      cp->closing = true;
      maybe_close(cp);
    }
  }

  void on_data(EchoConn* c, const uint8_t* p, size_t n) {
    bytes_in.fetch_add(n, std::memory_order_relaxed);
    if (c->closing) return;
    if (c->rx_len + n > c->rx_cap) {
      size_t cap = std::max(c->rx_cap * 2, c->rx_len + n);
      if (cap > kMaxRxBacklog) {
        count_error();
        begin_close(c);
        return;
      }
      auto grown = std::make_unique<uint8_t[]>(cap);
      std::memcpy(grown.get(), c->rx.get(), c->rx_len);
      c->rx = std::move(grown);
      c->rx_cap = cap;
    }
    std::memcpy(c->rx.get() + c->rx_len, p, n);
    c->rx_len += n;
    try_start_send(c);
  }

  void return_buffer(unsigned bid) {
    io_uring_buf_ring_add(br, bufs.get() + static_cast<size_t>(bid) * buf_size,
                          static_cast<unsigned>(buf_size), static_cast<unsigned short>(bid),
                          io_uring_buf_ring_mask(kBufEntries), returned);
    ++returned;
  }

  void handle(const io_uring_cqe* cqe) {
    const uint64_t ud = io_uring_cqe_get_data64(cqe);
    const uint64_t op = ud >> 32;
    const int fd = static_cast<int>(static_cast<uint32_t>(ud));
    const int res = cqe->res;
    const bool more = (cqe->flags & IORING_CQE_F_MORE) != 0;
    switch (op) {
      case kOpAccept: {
        if (res >= 0) {
          on_accept(res);
        } else if (res != -ECANCELED) {
          count_error();
        }
        // A multishot accept ends on errors (EMFILE, ...) or overflow; keep accepting
        // unless the listener itself is unusable.
        if (!more && res != -EBADF && res != -EINVAL && res != -ECANCELED &&
            !stop->load(std::memory_order_relaxed)) {
          if (!arm_accept()) count_error();
        }
        break;
      }
      case kOpRecv: {
        EchoConn* c = conn_of(fd);
        if (cqe->flags & IORING_CQE_F_BUFFER) {
          const unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
          if (c && res > 0) on_data(c, bufs.get() + static_cast<size_t>(bid) * buf_size,
                                    static_cast<size_t>(res));
          return_buffer(bid);
        }
        if (!c) {
          count_error();
          break;
        }
        if (!more) c->recv_armed = false;
        if (res > 0) {
          // The kernel may end a multishot recv early (CQ pressure); just re-arm.
          if (!more && !c->closing && !arm_recv(c)) {
            count_error();
            begin_close(c);
          }
        } else if (res == 0) {
          begin_close(c);  // client closed
        } else if (res == -ENOBUFS) {
          // All provided buffers are out; re-arm once this pass has returned some.
          if (!c->closing) {
            c->rearm_pending = true;
            rearm.push_back(fd);
          }
        } else {
          count_failure(res);
          begin_close(c);
        }
        maybe_close(c);
        break;
      }
      case kOpSend: {
        EchoConn* c = conn_of(fd);
        if (!c) {
          count_error();
          break;
        }
        c->send_inflight = false;
        if (res < 0) {
          count_failure(res);
          begin_close(c);
        } else {
          bytes_out.fetch_add(static_cast<uint64_t>(res), std::memory_order_relaxed);
          c->tx_sent += static_cast<size_t>(res);
          if (c->tx_sent < req) {
            if (!c->closing) issue_send(c);  // short send: the rest goes next
          } else {
            requests.fetch_add(1, std::memory_order_relaxed);
            try_start_send(c);
          }
        }
        maybe_close(c);
        break;
      }
      default:
        count_error();
    }
  }

  void run_inner() {
    unsigned flags = 0;
    // CQ sized so a pass over 4096 connections (a recv and a send each) rarely overflows;
    // the kernel keeps overflowed CQEs anyway (IORING_FEAT_NODROP).
    int ret = setup_ring(1024, 16384, &ring, &flags);
    if (ret < 0) {
      fail_setup(errno_msg("io_uring_queue_init_params", ret));
      return;
    }
    ring_flags.store(flags, std::memory_order_relaxed);
    // One buffer holds one recv; small requests need only small ones, big ones are split
    // across several completions, which the echo path handles anyway.
    buf_size = req <= 4096 ? 4096 : 16384;
    br_bytes = kBufEntries * sizeof(io_uring_buf);
    void* mem = mmap(nullptr, br_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (mem == MAP_FAILED) {
      fail_setup(errno_msg("mmap buffer ring", errno));
      io_uring_queue_exit(&ring);
      return;
    }
    br = static_cast<io_uring_buf_ring*>(mem);
    io_uring_buf_ring_init(br);
    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<uint64_t>(br);
    reg.ring_entries = kBufEntries;
    reg.bgid = kBufGroup;
    ret = io_uring_register_buf_ring(&ring, &reg, 0);
    if (ret < 0) {
      fail_setup(errno_msg("io_uring_register_buf_ring", ret));
      io_uring_queue_exit(&ring);
      munmap(br, br_bytes);
      return;
    }
    bufs = std::make_unique<uint8_t[]>(kBufEntries * buf_size);
    returned = 0;
    for (unsigned i = 0; i < kBufEntries; ++i) return_buffer(i);
    io_uring_buf_ring_advance(br, returned);
    returned = 0;
    if (!arm_accept() || io_uring_submit(&ring) < 0) {
      fail_setup("arming multishot accept failed");
      io_uring_queue_exit(&ring);
      munmap(br, br_bytes);
      return;
    }
    setup_state.store(1, std::memory_order_release);

    while (!stop->load(std::memory_order_relaxed)) {
      ret = submit_and_wait(&ring);
      if (ret < 0) {
        count_error();
        break;
      }
      unsigned head;
      unsigned n = 0;
      io_uring_cqe* cqe;
      returned = 0;
      io_uring_for_each_cqe(&ring, head, cqe) {
        handle(cqe);
        ++n;
      }
      io_uring_cq_advance(&ring, n);
      if (returned) io_uring_buf_ring_advance(br, returned);
      returned = 0;
      if (!rearm.empty()) {
        std::vector<int> todo;
        todo.swap(rearm);
        for (int fd : todo) {
          EchoConn* c = conn_of(fd);
          if (!c) continue;
          c->rearm_pending = false;
          if (!c->closing && !arm_recv(c)) {
            count_error();
            c->closing = true;
          }
          maybe_close(c);
        }
      }
    }

    // Tear down: the ring first (cancels and waits for its requests), then the sockets.
    io_uring_queue_exit(&ring);
    munmap(br, br_bytes);
    for (auto& c : conns) {
      if (c) {
        close(c->fd);
        open_conns->fetch_sub(1, std::memory_order_relaxed);
        c.reset();
      }
    }
  }
};

std::unique_ptr<CpuEchoServer> CpuEchoServer::start(const EchoServerOptions& opt,
                                                    std::string* err) {
  if (opt.threads < 1 || opt.threads > 256) {
    set_err(err, "threads must be 1..256");
    return nullptr;
  }
  if (opt.request_bytes < 1 || opt.request_bytes > (size_t{16} << 20)) {
    set_err(err, "request_bytes must be 1..16 MiB");
    return nullptr;
  }
  if (opt.max_connections < 1) {
    set_err(err, "max_connections must be >= 1");
    return nullptr;
  }
  std::unique_ptr<CpuEchoServer> s(new CpuEchoServer());
  s->opt_ = opt;
  uint16_t port = opt.port;
  std::vector<int> fds;
  for (int i = 0; i < opt.threads; ++i) {
    // The first bind picks the port (when 0); the rest share it through SO_REUSEPORT.
    int fd = tcp_listen(opt.address, &port, true, 4096);
    if (fd < 0) {
      for (int f : fds) close(f);
      set_err(err, errno_msg("listen on " + opt.address + ":" + std::to_string(port), fd));
      return nullptr;
    }
    fds.push_back(fd);
  }
  s->port_ = port;
  for (int i = 0; i < opt.threads; ++i) {
    auto w = std::make_unique<Worker>();
    w->listen_fd = fds[static_cast<size_t>(i)];
    w->req = opt.request_bytes;
    w->max_conns = opt.max_connections;
    w->stop = &s->stop_;
    w->open_conns = &s->open_conns_;
    s->workers_.push_back(std::move(w));
  }
  for (auto& w : s->workers_) {
    Worker* wp = w.get();
    s->threads_.emplace_back([wp] {
      wp->run();
      close(wp->listen_fd);  // the worker owns its listener, whatever happened
    });
  }
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  for (auto& w : s->workers_) {
    int st;
    while ((st = w->setup_state.load(std::memory_order_acquire)) == 0 &&
           Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (st != 1) {
      set_err(err, st == 0 ? std::string("worker setup timed out") : w->setup_err);
      s->stop();
      return nullptr;
    }
  }
  return s;
}

CpuEchoServer::~CpuEchoServer() { stop(); }

void CpuEchoServer::stop() {
  stop_.store(true, std::memory_order_relaxed);
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

EchoServerStats CpuEchoServer::stats() const {
  EchoServerStats s;
  for (const auto& w : workers_) {
    s.requests += w->requests.load(std::memory_order_relaxed);
    s.bytes_in += w->bytes_in.load(std::memory_order_relaxed);
    s.bytes_out += w->bytes_out.load(std::memory_order_relaxed);
    s.connections += w->connections.load(std::memory_order_relaxed);
    s.resets += w->resets.load(std::memory_order_relaxed);
    s.errors += w->errors.load(std::memory_order_relaxed);
    s.ring_flags = w->ring_flags.load(std::memory_order_relaxed);
  }
  return s;
}

// ---------------------------------------------------------------------------------------
// LoadClient

namespace {

struct ClientConn {
  int fd = -1;
  uint32_t id = 0;
  uint64_t seq = 0;
  std::unique_ptr<uint8_t[]> tx, rx;
  size_t sent = 0, rcvd = 0;
  int64_t t0 = 0;
  bool receiving = false;
  bool dead = false;
  ClientConn() = default;
  ClientConn(const ClientConn&) = delete;
  ClientConn& operator=(const ClientConn&) = delete;
  ~ClientConn() {
    if (fd >= 0) close(fd);  // only reached with fd open if the thread unwound
  }
};

struct ClientShared {
  LoadOptions opt;
  std::atomic<int> ready{0};
  std::atomic<int> go{0};  // 0 wait, 1 run, -1 abort
  std::atomic<int64_t> measure_start{0};
  std::atomic<int64_t> measure_end{0};
};

struct ClientThread {
  std::vector<int> conn_ids;
  std::vector<uint64_t> samples;
  uint64_t requests = 0, connect_failures = 0, resets = 0, mismatches = 0;
  int connected = 0;
  std::string error;
};

// Distinct per (connection, request), so a reply delivered to the wrong connection or
// a stale one is caught by the byte comparison.
void fill_request(uint8_t* p, size_t n, uint32_t id, uint64_t seq) {
  uint64_t w = (static_cast<uint64_t>(id) << 40) ^ (seq * 0x9E3779B97F4A7C15ull) ^ 0x5bd1e995ull;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::memcpy(p + i, &w, 8);
    w = w * 6364136223846793005ull + 1442695040888963407ull;
  }
  for (; i < n; ++i) p[i] = static_cast<uint8_t>(w >> (8 * (i & 7)));
}

void client_thread_inner(ClientShared* sh, ClientThread* ct, bool* counted_ready) {
  const LoadOptions& opt = sh->opt;
  const size_t req = opt.request_bytes;
  auto stopped = [&] { return opt.stop && opt.stop->load(std::memory_order_relaxed); };
  std::vector<ClientConn> conns(ct->conn_ids.size());
  for (size_t i = 0; i < conns.size(); ++i) {
    ClientConn& c = conns[i];
    c.id = static_cast<uint32_t>(ct->conn_ids[i]);
    int fd = tcp_connect(opt.address, opt.port, opt.connect_timeout_ms, true, opt.stop);
    if (fd < 0) {
      ++ct->connect_failures;
      if (ct->error.empty()) ct->error = errno_msg("connect", fd);
      c.dead = true;
      continue;
    }
    c.fd = fd;
    c.tx = std::make_unique<uint8_t[]>(req);
    c.rx = std::make_unique<uint8_t[]>(req);
    ++ct->connected;
  }
  sh->ready.fetch_add(1, std::memory_order_acq_rel);
  *counted_ready = true;
  int go;
  while ((go = sh->go.load(std::memory_order_acquire)) == 0 && !stopped()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const int64_t t_meas0 = sh->measure_start.load(std::memory_order_relaxed);
  const int64_t t_end = sh->measure_end.load(std::memory_order_relaxed);

  int ep = -1;
  if (go == 1) {
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0 && ct->error.empty()) ct->error = errno_msg("epoll_create1", errno);
  }
  auto kill = [&](ClientConn& c) {
    c.dead = true;
    ++ct->resets;
    if (c.fd >= 0) {
      close(c.fd);  // also drops it from the epoll set
      c.fd = -1;
    }
  };
  auto start_request = [&](ClientConn& c) {
    ++c.seq;
    fill_request(c.tx.get(), req, c.id, c.seq);
    c.sent = c.rcvd = 0;
    c.receiving = false;
    c.t0 = now_ns();
  };
  // Sends/receives until the socket would block (edge-triggered epoll needs that) or the
  // run is over.
  auto progress = [&](ClientConn& c) {
    while (!c.dead) {
      if (!c.receiving) {
        ssize_t n = send(c.fd, c.tx.get() + c.sent, req - c.sent, MSG_NOSIGNAL);
        if (n > 0) {
          c.sent += static_cast<size_t>(n);
          if (c.sent == req) c.receiving = true;
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        kill(c);
        return;
      }
      ssize_t n = recv(c.fd, c.rx.get() + c.rcvd, req - c.rcvd, 0);
      if (n > 0) {
        c.rcvd += static_cast<size_t>(n);
        if (c.rcvd < req) continue;
        const int64_t t1 = now_ns();
        if (std::memcmp(c.tx.get(), c.rx.get(), req) != 0) ++ct->mismatches;
        if (t1 >= t_meas0 && t1 < t_end) {
          ct->samples.push_back(static_cast<uint64_t>(t1 - c.t0));
          ++ct->requests;
        }
        if (t1 >= t_end) return;
        start_request(c);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return;
      kill(c);  // EOF or error mid-run: the server dropped us
      return;
    }
  };

  if (ep >= 0) {
    for (size_t i = 0; i < conns.size(); ++i) {
      ClientConn& c = conns[i];
      if (c.dead) continue;
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP;
      ev.data.u64 = i;
      if (epoll_ctl(ep, EPOLL_CTL_ADD, c.fd, &ev) != 0) {
        if (ct->error.empty()) ct->error = errno_msg("epoll_ctl", errno);
        kill(c);
        continue;
      }
      start_request(c);
      progress(c);
    }
    std::vector<epoll_event> evs(512);
    for (;;) {
      const int64_t now = now_ns();
      if (now >= t_end || stopped()) break;
      // Wake at the window end at the latest, and every 100 ms to see the stop flag.
      int64_t wait_ms = std::min<int64_t>((t_end - now) / 1000000 + 1, 100);
      int n = epoll_wait(ep, evs.data(), static_cast<int>(evs.size()), static_cast<int>(wait_ms));
      if (n < 0) {
        if (errno == EINTR) continue;
        if (ct->error.empty()) ct->error = errno_msg("epoll_wait", errno);
        break;
      }
      for (int k = 0; k < n; ++k) progress(conns[evs[static_cast<size_t>(k)].data.u64]);
    }
    close(ep);
  }
  for (auto& c : conns) {
    if (c.fd >= 0) close(c.fd);
    c.fd = -1;
  }
}

// Keeps exceptions (allocation failure) on this thread, and always reports ready so the
// coordinator never waits on a thread that died.
void client_thread(ClientShared* sh, ClientThread* ct) {
  bool counted_ready = false;
  try {
    client_thread_inner(sh, ct, &counted_ready);
  } catch (const std::exception& e) {
    ct->error = std::string("client thread: ") + e.what();
  }
  if (!counted_ready) sh->ready.fetch_add(1, std::memory_order_acq_rel);
}

}  // namespace

LoadResult LoadClient::run(const LoadOptions& opt) {
  LoadResult r;
  if (opt.connections < 1 || opt.connections > 4096) {
    r.error = "connections must be 1..4096";
    return r;
  }
  if (opt.threads < 1 || opt.request_bytes < 1 || opt.duration.count() <= 0) {
    r.error = "threads, request_bytes and duration must be positive";
    return r;
  }
  const int nthreads = std::min(opt.threads, opt.connections);
  ClientShared sh;
  sh.opt = opt;
  std::vector<ClientThread> cts(static_cast<size_t>(nthreads));
  for (int i = 0; i < opt.connections; ++i) {
    cts[static_cast<size_t>(i % nthreads)].conn_ids.push_back(i);
  }
  // Every measured sample is kept; size for ~1M req/s per thread so the hot path never
  // reallocates in practice (it still grows correctly if a machine is faster).
  const double dur_s = std::chrono::duration<double>(opt.duration).count();
  const size_t reserve = static_cast<size_t>(std::min(dur_s * 1.0e6 + 4096.0, 1.0e8));
  for (auto& ct : cts) ct.samples.reserve(reserve);

  std::vector<std::thread> threads;
  threads.reserve(cts.size());
  for (auto& ct : cts) threads.emplace_back(client_thread, &sh, &ct);
  auto stopped = [&] { return opt.stop && opt.stop->load(std::memory_order_relaxed); };
  while (sh.ready.load(std::memory_order_acquire) < nthreads && !stopped()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const int64_t t0 = now_ns();
  const int64_t warm = std::chrono::duration_cast<std::chrono::nanoseconds>(opt.warmup).count();
  const int64_t dur = std::chrono::duration_cast<std::chrono::nanoseconds>(opt.duration).count();
  sh.measure_start.store(t0 + warm, std::memory_order_relaxed);
  sh.measure_end.store(t0 + warm + dur, std::memory_order_relaxed);
  sh.go.store(stopped() ? -1 : 1, std::memory_order_release);
  for (auto& t : threads) t.join();
  const int64_t t_stop = now_ns();

  std::vector<uint64_t> all;
  size_t total = 0;
  for (auto& ct : cts) total += ct.samples.size();
  all.reserve(total);
  for (auto& ct : cts) {
    all.insert(all.end(), ct.samples.begin(), ct.samples.end());
    r.requests += ct.requests;
    r.connected += ct.connected;
    r.connect_failures += ct.connect_failures;
    r.resets += ct.resets;
    r.mismatches += ct.mismatches;
    if (r.error.empty() && !ct.error.empty()) r.error = ct.error;
  }
  // An early stop shortens the window; report the part that actually ran.
  const int64_t meas_end = std::min(t0 + warm + dur, t_stop);
  r.seconds = std::max<double>(0.0, static_cast<double>(meas_end - (t0 + warm)) / 1e9);
  r.req_per_s = r.seconds > 0 ? static_cast<double>(r.requests) / r.seconds : 0;
  r.p50_us = percentile_us(all, 50);
  r.p90_us = percentile_us(all, 90);
  r.p99_us = percentile_us(all, 99);
  r.p999_us = percentile_us(all, 99.9);
  r.errors = r.connect_failures + r.resets + r.mismatches;
  if (r.connect_failures) {
    r.error = std::to_string(r.connect_failures) + " of " + std::to_string(opt.connections) +
              " connections failed (" + r.error + ")";
  } else if (r.errors && r.error.empty()) {
    r.error = std::to_string(r.resets) + " resets, " + std::to_string(r.mismatches) +
              " mismatched replies";
  }
  if (stopped() && r.error.empty()) r.error = "stopped early";
  return r;
}

// ---------------------------------------------------------------------------------------
// BulkSink / BulkSource

namespace {

// Waits (in kWaitMs steps) for one connection on listen_fd. Returns the blocking fd,
// -ECANCELED when *stop turned true, or -errno.
int accept_one(int listen_fd, const std::atomic<bool>* stop) {
  while (!stop->load(std::memory_order_relaxed)) {
    pollfd pfd{listen_fd, POLLIN, 0};
    int r = poll(&pfd, 1, kWaitMs);
    if (r < 0 && errno != EINTR) return -errno;
    if (r <= 0) continue;
    int fd = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) return fd;
    if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) return -errno;
  }
  return -ECANCELED;
}

// Blocking calls on fd return after at most kWaitMs with EAGAIN, so loops see stop.
void set_io_timeouts(int fd) {
  timeval tv{};
  tv.tv_usec = kWaitMs * 1000;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

void finish_result(BulkResult* r, uint64_t bytes, double seconds) {
  r->bytes = bytes;
  r->seconds = seconds;
  r->gbps = seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0;
}

}  // namespace

std::unique_ptr<BulkSink> BulkSink::start(const BulkSinkOptions& opt, std::string* err) {
  if (opt.recv_bytes == 0) {
    set_err(err, "recv_bytes must be > 0");
    return nullptr;
  }
  std::unique_ptr<BulkSink> s(new BulkSink());
  s->opt_ = opt;
  uint16_t port = opt.port;
  int fd = tcp_listen(opt.address, &port, false, 16);
  if (fd < 0) {
    set_err(err, errno_msg("BulkSink listen", fd));
    return nullptr;
  }
  s->listen_fd_ = fd;
  s->port_ = port;
  s->thread_ = std::thread([p = s.get()] { p->run(); });
  return s;
}

void BulkSink::run() {
  BulkResult r;
  uint64_t h = kFnvOffset;
  uint64_t bytes = 0;
  Clock::time_point t_first{}, t_end{};
  try {
    std::vector<uint8_t> buf(opt_.recv_bytes);  // before accept: nothing to leak if it throws
    int fd = accept_one(listen_fd_, &stop_);
    if (fd < 0) {
      r.error = errno_msg("BulkSink accept", fd);
    } else {
      set_io_timeouts(fd);
      while (true) {
        ssize_t n = recv(fd, buf.data(), buf.size(), 0);
        if (n > 0) {
          if (bytes == 0) t_first = Clock::now();
          bytes += static_cast<uint64_t>(n);
          if (opt_.checksum) h = fnv1a_update(h, buf.data(), static_cast<size_t>(n));
          continue;
        }
        if (n == 0) {
          t_end = Clock::now();
          break;
        }
        if (errno == EAGAIN || errno == EINTR) {
          if (stop_.load(std::memory_order_relaxed)) {
            r.error = "BulkSink stopped before EOF";
            t_end = Clock::now();
            break;
          }
          continue;
        }
        r.error = errno_msg("BulkSink recv", errno);
        t_end = Clock::now();
        break;
      }
      close(fd);
    }
  } catch (const std::exception& e) {
    r.error = std::string("BulkSink: ") + e.what();
  }
  finish_result(&r, bytes, bytes ? secs_since(t_first, t_end) : 0);
  result_ = r;
  fnv_ = h;
  done_.store(true, std::memory_order_release);
}

bool BulkSink::wait(int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!done_.load(std::memory_order_acquire)) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

BulkResult BulkSink::result() const {
  if (!done_.load(std::memory_order_acquire)) {
    BulkResult r;
    r.error = "BulkSink still running";
    return r;
  }
  return result_;
}

uint64_t BulkSink::checksum() const {
  return done_.load(std::memory_order_acquire) ? fnv_ : kFnvOffset;
}

void BulkSink::stop() {
  stop_.store(true, std::memory_order_relaxed);
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    listen_fd_ = -1;
  }
}

BulkSink::~BulkSink() { stop(); }

std::unique_ptr<BulkSource> BulkSource::start(const BulkSourceOptions& opt, std::string* err) {
  if (opt.chunk_bytes == 0 || opt.chunk_bytes > kMaxPiece) {
    set_err(err, "chunk_bytes must be 1..1 MiB");
    return nullptr;
  }
  std::unique_ptr<BulkSource> s(new BulkSource());
  s->opt_ = opt;
  uint16_t port = opt.port;
  int fd = tcp_listen(opt.address, &port, false, 16);
  if (fd < 0) {
    set_err(err, errno_msg("BulkSource listen", fd));
    return nullptr;
  }
  s->listen_fd_ = fd;
  s->port_ = port;
  pattern_table();  // build it here, not inside the timed send loop
  s->thread_ = std::thread([p = s.get()] { p->run(); });
  return s;
}

void BulkSource::run() {
  BulkResult r;
  uint64_t sent = 0;
  Clock::time_point t0{}, t1{};
  try {
    const uint8_t* table = pattern_table();
    int fd = accept_one(listen_fd_, &stop_);
    if (fd < 0) {
      r.error = errno_msg("BulkSource accept", fd);
    } else {
      set_io_timeouts(fd);
      t0 = Clock::now();
      while (sent < opt_.total_bytes) {
        const size_t len = static_cast<size_t>(
            std::min<uint64_t>(opt_.chunk_bytes, opt_.total_bytes - sent));
        ssize_t n = send(fd, table + (sent % kPatternPeriod), len, MSG_NOSIGNAL);
        if (n > 0) {
          sent += static_cast<uint64_t>(n);
          continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
          if (stop_.load(std::memory_order_relaxed)) {
            r.error = "BulkSource stopped early";
            break;
          }
          continue;
        }
        r.error = errno_msg("BulkSource send", n < 0 ? errno : EPIPE);
        break;
      }
      t1 = Clock::now();
      shutdown(fd, SHUT_WR);
      close(fd);
    }
  } catch (const std::exception& e) {
    r.error = std::string("BulkSource: ") + e.what();
  }
  finish_result(&r, sent, sent ? secs_since(t0, t1) : 0);
  result_ = r;
  done_.store(true, std::memory_order_release);
}

bool BulkSource::wait(int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!done_.load(std::memory_order_acquire)) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

BulkResult BulkSource::result() const {
  if (!done_.load(std::memory_order_acquire)) {
    BulkResult r;
    r.error = "BulkSource still running";
    return r;
  }
  return result_;
}

void BulkSource::stop() {
  stop_.store(true, std::memory_order_relaxed);
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    listen_fd_ = -1;
  }
}

BulkSource::~BulkSource() { stop(); }

// ---------------------------------------------------------------------------------------
// cpu_send / cpu_recv

namespace {

// Ring + socket owned by one call; closing them on every exit path.
struct RingSocket {
  io_uring ring{};
  bool ring_ok = false;
  int fd = -1;
  ~RingSocket() {
    if (ring_ok) io_uring_queue_exit(&ring);
    if (fd >= 0) close(fd);
  }
};

}  // namespace

BulkResult cpu_send_ex(const std::string& addr, uint16_t port, uint64_t total_bytes,
                       size_t chunk_bytes, const uint8_t* src, size_t src_len,
                       bool use_send_zc, const std::atomic<bool>* stop, SendStats* stats) {
  BulkResult r;
  if (!src || src_len == 0 || chunk_bytes == 0 || chunk_bytes > (size_t{1} << 30)) {
    r.error = "cpu_send: need src, src_len > 0 and chunk_bytes 1..1 GiB";
    return r;
  }
  RingSocket rs;
  rs.fd = tcp_connect(addr, port, 5000, false, stop);
  if (rs.fd < 0) {
    r.error = errno_msg("cpu_send connect", rs.fd);
    return r;
  }
  int ret = setup_ring(64, 256, &rs.ring, nullptr);
  if (ret < 0) {
    r.error = errno_msg("cpu_send io_uring setup", ret);
    return r;
  }
  rs.ring_ok = true;

  constexpr int kChain = 4;
  // zc sends whose notification has not arrived: their src range must not be resent.
  // Bounded so the kernel never pins an unbounded amount of memory for us.
  constexpr size_t kMaxPendingNotif = 256;
  struct Region {
    uint64_t seq, off, len;
  };
  struct Slot {
    uint64_t seq = 0, len = 0;
    int res = 0;
  };
  std::vector<Region> pending;
  Slot chain[kChain];
  int chain_n = 0, chain_left = 0;
  uint64_t pos = 0;  // bytes confirmed sent, in stream order
  uint64_t next_seq = 1;
  SendStats st;
  const int msg_flags = MSG_NOSIGNAL | MSG_WAITALL;  // WAITALL: no short sends in a link
  auto overlaps = [&](uint64_t off, uint64_t len) {
    for (const Region& g : pending) {
      if (off < g.off + g.len && g.off < off + len) return true;
    }
    return false;
  };

  const auto t0 = Clock::now();
  auto last_progress = t0;
  while (pos < total_bytes || chain_left > 0 || !pending.empty()) {
    if (stop && stop->load(std::memory_order_relaxed)) {
      r.error = "cpu_send stopped";
      break;
    }
    if (chain_left == 0 && pos < total_bytes) {
      // Queue the next linked chain. Unlinked sends on one stream socket may interleave
      // their bytes once they wait for socket space, so each chain starts only after the
      // previous one completed.
      uint64_t p = pos;
      io_uring_sqe* last = nullptr;
      while (chain_n < kChain && p < total_bytes) {
        const uint64_t off = p % src_len;
        const uint64_t len = std::min<uint64_t>({chunk_bytes, src_len - off, total_bytes - p});
        if (use_send_zc && (pending.size() >= kMaxPendingNotif || overlaps(off, len))) break;
        io_uring_sqe* sqe = get_sqe(&rs.ring);
        if (!sqe) break;
        if (use_send_zc) {
          io_uring_prep_send_zc(sqe, rs.fd, src + off, static_cast<size_t>(len), msg_flags,
                                IORING_SEND_ZC_REPORT_USAGE);
          pending.push_back({next_seq, off, len});
        } else {
          io_uring_prep_send(sqe, rs.fd, src + off, static_cast<size_t>(len), msg_flags);
        }
        sqe->flags |= IOSQE_IO_LINK;
        io_uring_sqe_set_data64(sqe, next_seq);
        chain[chain_n++] = Slot{next_seq, len, INT_MIN};
        ++next_seq;
        p += len;
        last = sqe;
      }
      if (last) last->flags &= static_cast<uint8_t>(~IOSQE_IO_LINK);
      chain_left = chain_n;
    }
    ret = submit_and_wait(&rs.ring);
    if (ret < 0) {
      r.error = errno_msg("cpu_send submit", ret);
      break;
    }
    unsigned head, n = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&rs.ring, head, cqe) {
      ++n;
      const uint64_t seq = io_uring_cqe_get_data64(cqe);
      if (cqe->flags & IORING_CQE_F_NOTIF) {
        ++st.notifications;
        if (static_cast<uint32_t>(cqe->res) & IORING_NOTIF_USAGE_ZC_COPIED) ++st.zc_copied;
        pending.erase(std::remove_if(pending.begin(), pending.end(),
                                     [&](const Region& g) { return g.seq == seq; }),
                      pending.end());
        continue;
      }
      for (int i = 0; i < chain_n; ++i) {
        if (chain[i].seq == seq) {
          chain[i].res = cqe->res;
          --chain_left;
        }
      }
      // Without F_MORE no notification follows, so the region is free now.
      if (use_send_zc && !(cqe->flags & IORING_CQE_F_MORE)) {
        pending.erase(std::remove_if(pending.begin(), pending.end(),
                                     [&](const Region& g) { return g.seq == seq; }),
                      pending.end());
      }
    }
    io_uring_cq_advance(&rs.ring, n);
    if (n) last_progress = Clock::now();
    if (chain_n > 0 && chain_left == 0) {
      // Walk the chain in order: full sends advance pos; a short one (only on error with
      // WAITALL) advances by what went and cancels the rest, which the next chain resends.
      bool broken = false;
      for (int i = 0; i < chain_n && r.error.empty(); ++i) {
        const Slot& s = chain[i];
        if (broken) {
          if (s.res != -ECANCELED && s.res != 0) r.error = "cpu_send: send after a broken link";
          continue;
        }
        if (s.res >= 0 && static_cast<uint64_t>(s.res) == s.len) {
          pos += s.len;
        } else if (s.res > 0) {
          pos += static_cast<uint64_t>(s.res);
          broken = true;
        } else {
          r.error = errno_msg(use_send_zc ? "cpu_send send_zc" : "cpu_send send",
                              s.res == 0 ? EPIPE : s.res);
        }
      }
      chain_n = 0;
      if (!r.error.empty()) break;
    }
    if (Clock::now() - last_progress > kIdleLimit) {
      r.error = "cpu_send: no progress for 10 s";
      break;
    }
  }
  const auto t1 = Clock::now();
  finish_result(&r, pos, secs_since(t0, t1));
  if (stats) *stats = st;
  return r;  // RingSocket closes the ring (waiting out requests) and then the socket
}

BulkResult cpu_send(const std::string& addr, uint16_t port, uint64_t total_bytes,
                    size_t chunk_bytes, const uint8_t* src, size_t src_len, bool use_send_zc,
                    const std::atomic<bool>* stop) {
  return cpu_send_ex(addr, port, total_bytes, chunk_bytes, src, src_len, use_send_zc, stop,
                     nullptr);
}

BulkResult cpu_recv(const std::string& addr, uint16_t port, uint64_t total_bytes,
                    uint8_t* dst, size_t dst_len, const std::atomic<bool>* stop) {
  BulkResult r;
  if (!dst || dst_len == 0) {
    r.error = "cpu_recv: need dst and dst_len > 0";
    return r;
  }
  const uint8_t* table = pattern_table();
  RingSocket rs;
  rs.fd = tcp_connect(addr, port, 5000, false, stop);
  if (rs.fd < 0) {
    r.error = errno_msg("cpu_recv connect", rs.fd);
    return r;
  }
  int ret = setup_ring(8, 64, &rs.ring, nullptr);
  if (ret < 0) {
    r.error = errno_msg("cpu_recv io_uring setup", ret);
    return r;
  }
  rs.ring_ok = true;

  // One recv in flight: overlapping recvs on a stream socket may complete out of order.
  constexpr size_t kRecvMax = size_t{4} << 20;
  uint64_t pos = 0, mismatches = 0, first_bad = UINT64_MAX;
  bool inflight = false, eof = false;
  size_t cur_off = 0;
  Clock::time_point t_first{}, t_end{};
  auto last_progress = Clock::now();
  auto check = [&](const uint8_t* p, uint64_t stream_off, size_t n) {
    while (n > 0) {
      const size_t k = std::min(n, kMaxPiece);
      const uint8_t* want = table + (stream_off % kPatternPeriod);
      if (std::memcmp(p, want, k) != 0) {
        for (size_t j = 0; j < k; ++j) {
          if (p[j] != want[j]) {
            if (first_bad == UINT64_MAX) first_bad = stream_off + j;
            ++mismatches;
          }
        }
      }
      p += k;
      stream_off += k;
      n -= k;
    }
  };
  while (!eof) {
    if (stop && stop->load(std::memory_order_relaxed)) {
      r.error = "cpu_recv stopped";
      break;
    }
    if (!inflight) {
      cur_off = static_cast<size_t>(pos % dst_len);
      const size_t len = std::min(dst_len - cur_off, kRecvMax);
      io_uring_sqe* sqe = get_sqe(&rs.ring);
      if (!sqe) {
        r.error = "cpu_recv: no SQE";
        break;
      }
      io_uring_prep_recv(sqe, rs.fd, dst + cur_off, len, 0);
      io_uring_sqe_set_data64(sqe, 1);
      inflight = true;
    }
    ret = submit_and_wait(&rs.ring);
    if (ret < 0) {
      r.error = errno_msg("cpu_recv submit", ret);
      break;
    }
    unsigned head, n = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&rs.ring, head, cqe) {
      ++n;
      inflight = false;
      const int res = cqe->res;
      if (res > 0) {
        if (pos == 0) t_first = Clock::now();
        check(dst + cur_off, pos, static_cast<size_t>(res));
        pos += static_cast<uint64_t>(res);
      } else if (res == 0) {
        t_end = Clock::now();
        eof = true;
      } else if (res != -EINTR && res != -EAGAIN) {
        r.error = errno_msg("cpu_recv recv", res);
        eof = true;
        t_end = Clock::now();
      }
    }
    io_uring_cq_advance(&rs.ring, n);
    if (n) last_progress = Clock::now();
    if (!eof && Clock::now() - last_progress > kIdleLimit) {
      r.error = "cpu_recv: no progress for 10 s";
      break;
    }
  }
  if (t_end == Clock::time_point{}) t_end = Clock::now();
  finish_result(&r, pos, pos ? secs_since(t_first, t_end) : 0);
  if (r.error.empty() && mismatches) {
    r.error = "cpu_recv: " + std::to_string(mismatches) + " bytes differ from the pattern, first at offset " +
              std::to_string(first_bad);
  }
  if (r.error.empty() && pos != total_bytes) {
    r.error = "cpu_recv: got " + std::to_string(pos) + " bytes, expected " +
              std::to_string(total_bytes);
  }
  return r;
}

// ---------------------------------------------------------------------------------------

std::vector<SendZcPoint> sweep_send_zc(const std::vector<size_t>& sizes,
                                       uint64_t bytes_per_size) {
  std::vector<SendZcPoint> out;
  size_t max_size = 0;
  for (size_t s : sizes) max_size = std::max(max_size, s);
  // Room for many chunks so zc sends rarely wait on a notification before wrapping.
  std::vector<uint8_t> src(std::max<size_t>(size_t{16} << 20, 8 * max_size));
  fill_pattern(src.data(), 0, src.size());
  for (size_t size : sizes) {
    SendZcPoint pt;
    pt.chunk_bytes = size;
    for (int zc = 0; zc < 2; ++zc) {
      std::string err;
      BulkSinkOptions so;
      so.checksum = false;
      auto sink = BulkSink::start(so, &err);
      if (!sink) {
        pt.error = err;
        break;
      }
      SendStats st;
      BulkResult s = cpu_send_ex("127.0.0.1", sink->port(), bytes_per_size, size, src.data(),
                                 src.size(), zc == 1, nullptr, &st);
      if (!sink->wait(15000)) {
        if (pt.error.empty()) pt.error = "sink did not see EOF";
      }
      sink->stop();
      BulkResult k = sink->result();
      const char* mode = zc ? "send_zc" : "send";
      if (!s.error.empty() && pt.error.empty()) pt.error = std::string(mode) + ": " + s.error;
      if (!k.error.empty() && pt.error.empty()) pt.error = std::string(mode) + " sink: " + k.error;
      if (s.error.empty() && k.bytes != bytes_per_size && pt.error.empty()) {
        pt.error = std::string(mode) + ": sink got " + std::to_string(k.bytes) + " bytes";
      }
      if (zc) {
        pt.send_zc_gbps = s.gbps;
        pt.sink_send_zc_gbps = k.gbps;
        pt.zc_copied = st.zc_copied;
        pt.zc_notifications = st.notifications;
      } else {
        pt.send_gbps = s.gbps;
        pt.sink_send_gbps = k.gbps;
      }
    }
    out.push_back(pt);
  }
  return out;
}

}  // namespace gpusock::bench
