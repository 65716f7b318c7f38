// The io_uring backend: socket hostcalls fulfilled through liburing on the service threads.
//
// Threading: every service thread owns one Ring (made on first use by that thread, so
// IORING_SETUP_SINGLE_ISSUER holds). A socket's `home` is the ring of the thread that made
// or accepted it; every operation that touches a ring (accept, connect, send, recv,
// close) runs on the home ring, and a request that arrives on another service thread is
// posted to the home ring's inbox (so is a stream's shutdown for writing, which must follow
// bytes of taken sends still going out). Plain syscalls on the descriptor (bind, setsockopt,
// getsockname, ...) run on whichever thread got the call: the kernel serializes them.
//
// Every io_uring operation carries an Op (its user_data); the Op owns the lane's Reply and
// is freed after its last completion. Op lifetimes are tracked per ring so thread_stop()
// can free what the kernel never completed.
#include "gpusock/iouring/backend.hpp"

#include <fcntl.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "gpusock/hostcall/service_hook.hpp"

namespace gpusock::iouring {
namespace {

constexpr uint64_t kIgnore = 0;  // user_data of SQEs whose completions need nothing
constexpr uint16_t kBufGroup = 0;
constexpr uint32_t kMaxBouncePieces = 8;  // Options::deliver_chunks and pull_chunks at most

struct Sock;
struct Ring;
struct PollWait;

enum class Kind : uint8_t { kAccept, kConnect, kSend, kRecv, kPollArm, kPollTimer, kReady };

// A send whose bytes the host takes out of device memory (docs 12.4, send step 2a). Its
// bytes are copied into the ring's pull area piece after piece and sent from there; the
// lane is answered once all of them are in the area, before they are all sent.
struct Pull {
  const uint8_t* src = nullptr;  // the lane's bytes, in device memory
  uint64_t total = 0;
  uint64_t fetched = 0;          // bytes whose copies have started
  uint64_t sent = 0;             // bytes handed to the kernel
  uint64_t last_ticket = 0;      // the copy of its newest piece
  int error = 0;                 // why a copy could not start: no more of it is taken
  bool answered = false;
  // A zero-byte send(2) found the socket able to send when this send came to an empty area,
  // so it is answered once its bytes are in, without waiting for one of them to go out.
  bool vouched = false;
  bool taken_all() const { return fetched == total || error != 0; }
};

struct Op {
  Kind kind;
  Ring* ring = nullptr;
  std::shared_ptr<Sock> sock;
  net::Reply reply;
  // send
  const uint8_t* data = nullptr;
  uint32_t len = 0, done = 0;
  // recv: where the lane wants the bytes (net/protocol.hpp), 0: not said, and how many
  // it asked for. While the host delivers them there itself, `done` is the bytes so far.
  uint64_t dst = 0;
  uint32_t want = 0;
  int flags = 0;
  bool zc = false, zc_notif_pending = false;
  int64_t zc_result = 0;
  // send with a destination / datagram receive / connect
  msghdr msg{};
  iovec iov{};
  sockaddr_storage addr{};
  socklen_t addr_len = 0;
  // poll
  PollWait* wait = nullptr;
  uint32_t index = 0;
  // straggle() asked to let the lane go: its cancel is on the way, and the next
  // completion answers instead of submitting again.
  bool straggling = false;
  // A send out of device memory: `data`, `len` and `done` are the piece being sent.
  std::unique_ptr<Pull> pull;
  // A send that waits for the socket's taken bytes to go first (Sock::held).
  bool held = false;
};

struct PollWait {
  net::Reply reply;
  std::span<uint8_t> fds;       // the device's pollfd array in staging
  std::vector<pollfd> host;     // what poll(2) looks at (-1 for entries to skip)
  std::vector<short> nval;      // POLLNVAL for entries that are not our sockets
  uint32_t outstanding = 0;     // ops whose final completion has not arrived
  bool done = false;
  __kernel_timespec ts{};       // the timer's deadline, CLOCK_MONOTONIC (absolute)
};

struct Sock {
  int fd = -1;
  uint32_t home = 0;
  int fixed = -1;  // index in the home ring's fixed-file table, -1: use fd
  int domain = 0, type = 0;
  bool stream = false;
  std::atomic<bool> nonblock{false};
  bool closed = false;        // home thread only
  // An error a receive met after it had delivered bytes: that receive answers the bytes,
  // the next one answers this (home thread only).
  int pending_error = 0;
  // Aborted by the control plane (abort_socket): every call but close answers
  // -ECONNABORTED. Set by any thread; a relaxed load on the hot path.
  std::atomic<bool> aborted{false};
  // Bytes kernels received and sent; written only on the home thread, read by listings.
  std::atomic<uint64_t> bytes_in{0}, bytes_out{0};
  // Decides SEND_ZC. Set by connect (a non-blocking one runs on any service thread).
  std::atomic<bool> loopback_peer{false};
  uint32_t inflight = 0;      // home thread only: ops on this socket not yet completed
  // Taken sends (docs 12.4, send 2a), home thread only. An error one met after its lane
  // was answered, for the next send; sends that wait until the taken bytes are out; and a
  // shutdown (its `how`) or close the lane was answered for, done once they are out.
  int send_error = 0;
  std::deque<Op*> held;
  int shutdown_after = -1;
  bool closing = false;
  // Polled on the device (net::kSoPollOnDevice, docs 12.9a): the socket's readiness word
  // is the backend's to keep. Set and cleared on the home thread; read by getsockopt on
  // any thread. ready_op is the multishot poll that keeps the word (home thread only);
  // urgent: a POLLPRI was seen, so a short read no longer proves the socket empty.
  std::atomic<bool> ready{false};
  Op* ready_op = nullptr;
  bool urgent = false;
  // Listener state, home thread only (listening is also read by listings).
  std::atomic<bool> listening{false};
  bool accept_armed = false;
  uint32_t accept_cap = 0;
  std::deque<int> accepted;
  // Readable while `accepted` is not empty (a semaphore eventfd: one count per queued
  // connection). poll() watches it instead of the listening socket, whose own readiness
  // the multishot accept consumes. Set once by listen(); read by any thread's poll.
  std::atomic<int> accept_efd{-1};
  ~Sock() {
    const int e = accept_efd.load(std::memory_order_relaxed);
    if (e >= 0) ::close(e);
  }
  struct Waiter {
    net::Reply reply;
    int flags;
  };
  std::deque<Waiter> waiters;
};

int sock_err(int r) { return r < 0 ? -errno : r; }

bool is_loopback(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(&a);
    return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
  }
  if (a.ss_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(&a);
    if (IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr)) return true;
    if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) return in6->sin6_addr.s6_addr[12] == 127;
  }
  return false;
}

// The options a kernel may read or set: values only (no pointers the host kernel would
// follow, no filters), on the socket itself.
bool option_allowed(int level, int name, bool set) {
  switch (level) {
    case SOL_SOCKET:
      switch (name) {
        case SO_REUSEADDR: case SO_REUSEPORT: case SO_KEEPALIVE: case SO_RCVBUF: case SO_SNDBUF:
        case SO_LINGER: case SO_BROADCAST: case SO_RCVLOWAT: case SO_PRIORITY: case SO_OOBINLINE:
          return true;
        case SO_ERROR: case SO_TYPE: case SO_ACCEPTCONN: case SO_DOMAIN: case SO_PROTOCOL:
          return !set;
        default:
          return false;
      }
    case IPPROTO_TCP:
      switch (name) {
        case TCP_NODELAY: case TCP_CORK: case TCP_QUICKACK: case TCP_KEEPIDLE: case TCP_KEEPINTVL:
        case TCP_KEEPCNT: case TCP_USER_TIMEOUT: case TCP_MAXSEG:
          return true;
        default:
          return false;
      }
    case IPPROTO_IP:
      return name == IP_TOS || name == IP_TTL;
    case IPPROTO_IPV6:
      return name == IPV6_V6ONLY || name == IPV6_UNICAST_HOPS;
    default:
      return false;
  }
}

class IouringBackend;

struct Ring {
  IouringBackend* be = nullptr;
  uint32_t index = 0;
  io_uring ring{};
  bool ok = false;
  // Provided receive buffers: this ring's slice of the pool.
  io_uring_buf_ring* br = nullptr;
  size_t br_bytes = 0;
  uint32_t nbufs = 0, buf_bytes = 0;
  uint8_t* bufs_host = nullptr;
  uint64_t bufs_dev = 0;
  uint32_t* flags_host = nullptr;  // one lent flag per buffer, in mapped memory
  uint64_t flags_dev = 0;
  std::vector<uint32_t> lent;      // buffers the device holds
  uint8_t* bounce = nullptr;       // delivery's bounce area: bounce_pieces of bounce_piece bytes
  uint32_t bounce_piece = 0, bounce_pieces = 0;
  // The pull area (docs 12.4, send 2a): pieces of pinned memory that one socket's taken
  // sends fill, oldest first, and that go out in that order. Pieces in use are first,
  // first + 1, ... (mod pieces); `owner` is the send each holds. One send(2) takes a run
  // of pieces whose copies have ended (a span, which never wraps); `head_done` is how
  // much of piece `first` the kernel has taken so far.
  struct PullArea {
    uint8_t* base = nullptr;
    uint32_t piece = 0, pieces = 0;
    std::shared_ptr<Sock> sock;    // whose sends hold the area; null: free
    std::deque<Op*> ops;           // that socket's taken sends, oldest first
    uint32_t first = 0, count = 0, head_done = 0;
    uint32_t len[kMaxBouncePieces] = {};
    uint64_t ticket[kMaxBouncePieces] = {};
    Op* owner[kMaxBouncePieces] = {};
    bool sending = false;          // a span from piece `first` is in the kernel, carried by owner[first]
  } pull;
  std::vector<int> free_fixed;     // free fixed-file indices
  std::unordered_set<Op*> live;    // every Op whose last completion is outstanding
  std::unordered_set<PollWait*> polls;  // every PollWait that waits (for straggle())
  // Operations a FaultPlan failed at submission, with their result: completed on the next
  // pass, as the kernel would complete them (Options::faults).
  std::vector<std::pair<Op*, int>> injected;
  bool staging_registered = false;
  // Work posted by other service threads for sockets homed here.
  std::mutex inbox_mu;
  std::vector<std::function<void()>> inbox;
  std::atomic<bool> inbox_nonempty{false};

  io_uring_sqe* sqe() {
    io_uring_sqe* s = io_uring_get_sqe(&ring);
    if (s == nullptr) {
      io_uring_submit(&ring);
      s = io_uring_get_sqe(&ring);
    }
    return s;  // null only if the kernel took none of a full queue: callers answer -EBUSY
  }
  void post(std::function<void()> fn) {
    std::lock_guard<std::mutex> lock(inbox_mu);
    inbox.push_back(std::move(fn));
    inbox_nonempty.store(true, std::memory_order_release);
  }
};

class IouringBackend final : public net::Backend {
 public:
  IouringBackend(Runtime& rt, const Options& o, const KernelFeatures& f, unsigned setup_flags)
      : opt_(o), feat_(f), setup_flags_(setup_flags),
        deferred_taskrun_((setup_flags & (IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN)) != 0),
        rt_(&rt),
        staging_(rt.staging_host()),
        staging_bytes_(rt.staging_size()) {
    rings_.resize(rt.service_threads());
    faults_ = opt_.faults.get();
    set_straggler_wait(opt_.straggler_wait);
  }
  ~IouringBackend() override {
    for (auto& r : rings_) {
      if (r && r->ok) teardown(*r);
    }
  }

  Status init(Runtime& rt) {
    const size_t per_ring = static_cast<size_t>(opt_.recv_buffers) * opt_.recv_buffer_bytes;
    const size_t flags_bytes = static_cast<size_t>(opt_.recv_buffers) * sizeof(uint32_t);
    flags_span_ = (flags_bytes + 4095) & ~size_t{4095};
    // Delivery's bounce area (docs 12.4, receive 3a): deliver_chunks x deliver_chunk_bytes.
    // The pull area (docs 12.4, send 2a): pull_chunks x pull_chunk_bytes.
    const size_t pull = opt_.pull_sends ? static_cast<size_t>(opt_.pull_chunks) * opt_.pull_chunk_bytes : 0;
    const size_t slice = per_ring + flags_span_ + bounce_bytes() + pull;
    auto m = rt.mapped_alloc(slice * rings_.size());
    if (!m.ok()) return m.status();
    rt.mapped_free_at_exit(m->host);
    pool_host_ = static_cast<uint8_t*>(m->host);
    pool_dev_ = reinterpret_cast<uint64_t>(m->device);
    slice_bytes_ = slice;
    if (opt_.ready_words > 0) init_ready(rt);
    return {};
  }

  // The readiness words (docs 12.9a): one per descriptor below ready_words, in mapped
  // memory, published to kernels as module state net::kReadyModule. Without them (the
  // runtime already has that module state: another backend of the same runtime keeps
  // its own) kSoPollOnDevice answers ENOPROTOOPT and every poll() goes to the host.
  void init_ready(Runtime& rt) {
    const size_t bytes = (static_cast<size_t>(opt_.ready_words) * sizeof(uint32_t) + 4095) & ~size_t{4095};
    auto m = rt.mapped_alloc(bytes);
    if (!m.ok()) {
      ready_note_ = "poll on the device off (" + m.status().to_string() + ")";
      return;
    }
    rt.mapped_free_at_exit(m->host);
    std::memset(m->host, 0, bytes);
    auto in_use = rt.device_alloc(sizeof(uint32_t));  // zeroed
    if (!in_use.ok()) {
      ready_note_ = "poll on the device off (" + in_use.status().to_string() + ")";
      return;
    }
    rt.device_free_at_exit(*in_use);
    net::ReadyHead head{static_cast<uint32_t*>(m->device), opt_.ready_words, 0, static_cast<uint32_t*>(*in_use)};
    Status st = rt.set_module_state(net::kReadyModule, m->device, &head, sizeof head);
    if (!st.ok()) {
      ready_note_ = "poll on the device off (" + st.to_string() + ")";
      return;
    }
    ready_words_ = static_cast<uint32_t*>(m->host);
  }

  bool delivers() const { return opt_.deliver_min_bytes != 0 && opt_.deliver_chunk_bytes != 0; }
  size_t bounce_bytes() const {
    return delivers() ? static_cast<size_t>(opt_.deliver_chunks) * opt_.deliver_chunk_bytes : 0;
  }
  bool pulls() const override { return opt_.pull_sends; }

  const char* name() const override { return "io_uring"; }

  std::string describe() const override {
    std::string s = "io_uring: setup ";
    s += feat_.defer_taskrun ? "SINGLE_ISSUER|DEFER_TASKRUN" : feat_.coop_taskrun ? "COOP_TASKRUN" : "plain";
    if (feat_.taskrun_flag) s += "|TASKRUN_FLAG";
    s += ", multishot accept, provided buffer ring (" + std::to_string(opt_.recv_buffers) + " x " +
         std::to_string(opt_.recv_buffer_bytes / 1024) + " KiB per thread), fixed files";
    s += feat_.send_zc && opt_.send_zc_threshold != 0
             ? ", SEND_ZC >= " + std::to_string(opt_.send_zc_threshold) + " B (not to loopback)"
             : ", SEND_ZC off";
    s += feat_.registered_buffers ? ", staging registered as fixed buffers"
                                  : ", staging not registered (" + feat_.registered_buffers_error + ")";
    s += ready_words_ != nullptr ? ", poll on the device for " + std::to_string(opt_.ready_words) + " descriptors"
                                 : ", " + (ready_note_.empty() ? std::string("poll on the device off") : ready_note_);
    return s;
  }

  // ---- ServiceHook ----
  uint32_t poll(uint32_t thread) override {
    Ring* r = ring_for(thread);
    if (r == nullptr) return 0;
    uint32_t work = net::sweep_stragglers();
    if (r->inbox_nonempty.load(std::memory_order_acquire)) work += drain_inbox(*r);
    if (!r->lent.empty()) work += recycle(*r);
    // At most one enter per pass, and only when there is something to submit or to
    // collect. With DEFER_TASKRUN (or COOP_TASKRUN) completions are posted only when this
    // thread enters the kernel; the kernel says when that is due with IORING_SQ_TASKRUN
    // (TASKRUN_FLAG, checked at start-up). Without the flag the thread enters on every
    // pass while operations are in flight, and a listener's accept always is.
    const unsigned kflags = IO_URING_READ_ONCE(*r->ring.sq.kflags);
    const bool collect = (kflags & IORING_SQ_CQ_OVERFLOW) != 0 ||
                         (feat_.taskrun_flag ? (kflags & IORING_SQ_TASKRUN) != 0 : deferred_taskrun_ && !r->live.empty());
    if (io_uring_sq_ready(&r->ring) > 0 || collect) {
      io_uring_submit_and_get_events(&r->ring);
    }
    if (!r->injected.empty()) [[unlikely]] work += complete_injected(*r);
    work += reap(*r);
    return work;
  }

  // ---- stragglers (net/backend.hpp) ----
  // A token names where a lane waits: kind in bits 0-1, the ring in bits 2-13, and the Op,
  // the PollWait (user-space addresses fit in 48 bits) or the listener's descriptor above.
  enum WaitKind : uint64_t { kWaitOp = 0, kWaitPoll = 1, kWaitAccept = 2 };
  static uint64_t token(const Ring& r, WaitKind kind, uint64_t what) {
    return (what << 14) | (static_cast<uint64_t>(r.index & 0xfff) << 2) | kind;
  }

  void straggle(uint64_t tok) override {
    const uint32_t ring = static_cast<uint32_t>((tok >> 2) & 0xfff);
    // (rings_ is fixed after init; a Ring torn down meanwhile drops what is posted to it.)
    Ring* r = ring < rings_.size() ? rings_[ring].get() : nullptr;
    if (r == nullptr) return;
    const int t = hostcall::service_thread_index();
    if (t >= 0 && ring_for(static_cast<uint32_t>(t)) == r) {
      let_go(*r, tok);
    } else {
      r->post([this, r, tok] { let_go(*r, tok); });
    }
  }

  // On the ring's thread: ends the wait `tok` names, if it still waits and its call is due.
  void let_go(Ring& r, uint64_t tok) {
    const uint64_t what = tok >> 14;
    switch (static_cast<WaitKind>(tok & 3)) {
      case kWaitOp: {
        Op* op = reinterpret_cast<Op*>(what);
        // The set says the address is a live Op; straggling() that its call is due (an
        // Op that reused a freed address and waits in a due call is due as well).
        if (!r.live.contains(op) || op->straggling || !op->reply.straggling()) return;
        if (op->held) {
          // Waiting behind taken bytes, nothing sent: the lane asks again on its own.
          auto& held = op->sock->held;
          held.erase(std::find(held.begin(), held.end(), op));
          op->reply.finish(net::kAskAgain);
          return retire(r, op);
        }
        op->straggling = true;
        if (io_uring_sqe* sqe = r.sqe()) {
          io_uring_prep_cancel64(sqe, reinterpret_cast<uint64_t>(op), 0);
          io_uring_sqe_set_data64(sqe, kIgnore);
        }
        return;
      }
      case kWaitPoll: {
        PollWait* w = reinterpret_cast<PollWait*>(what);
        if (!r.polls.contains(w) || w->done || !w->reply.straggling()) return;
        finish_poll(r, w, static_cast<int>(net::kAskAgain));
        cancel_poll_ops(r, w);
        return;
      }
      case kWaitAccept: {
        std::shared_ptr<Sock> l = lookup(static_cast<int>(what));
        if (l == nullptr || l->home != r.index) return;
        for (auto it = l->waiters.begin(); it != l->waiters.end();) {
          if (it->reply.straggling()) {
            it->reply.finish(net::kAskAgain);
            it = l->waiters.erase(it);
          } else {
            ++it;
          }
        }
        return;
      }
    }
  }

  void park(uint32_t thread, std::chrono::nanoseconds max) override {
    Ring* r = ring_for(thread);
    if (r == nullptr) {
      std::this_thread::sleep_for(max);
      return;
    }
    __kernel_timespec ts{};
    ts.tv_sec = max.count() / 1000000000;
    ts.tv_nsec = max.count() % 1000000000;
    io_uring_cqe* cqe = nullptr;
    // Waits for one completion or the timeout, submitting anything queued on the way.
    io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, &ts, nullptr);
  }

  void thread_stop(uint32_t thread) override {
    if (thread >= rings_.size() || !rings_[thread] || !rings_[thread]->ok) return;
    teardown(*rings_[thread]);
  }

  // ---- requests ----
  void serve(net::Request& req, net::Reply reply) override {
    const int t = hostcall::service_thread_index();
    Ring* here = t >= 0 ? ring_for(static_cast<uint32_t>(t)) : nullptr;
    if (here == nullptr) {
      reply.finish(-EIO);
      return;
    }
    switch (req.op) {
      case net::Op::kSocket: return do_socket(*here, req, std::move(reply));
      case net::Op::kPoll: return do_poll(*here, req, std::move(reply));
      default: break;
    }
    std::shared_ptr<Sock> s = lookup(req.fd);
    if (s == nullptr) {
      reply.finish(-EBADF);
      return;
    }
    if (s->aborted.load(std::memory_order_relaxed) && req.op != net::Op::kClose) {
      reply.finish(-ECONNABORTED);
      return;
    }
    switch (req.op) {
      case net::Op::kBind:
        reply.finish(sock_err(::bind(s->fd, reinterpret_cast<const sockaddr*>(req.data.data()),
                                     static_cast<socklen_t>(req.data.size()))));
        return;
      case net::Op::kShutdown:
        // A stream's shutdown for writing goes home: it must follow taken bytes still
        // going out (docs 12.4, send 2a).
        if (s->stream && req.a[0] != SHUT_RD) break;
        reply.finish(sock_err(::shutdown(s->fd, static_cast<int>(req.a[0]))));
        return;
      case net::Op::kSetsockopt: {
        const int level = static_cast<int>(req.a[0]), name = static_cast<int>(req.a[1]);
        if (level == net::kSolGpusock) {
          if (name != net::kSoPollOnDevice) {
            reply.finish(-ENOPROTOOPT);
            return;
          }
          if (req.data.size() != sizeof(int)) {
            reply.finish(-EINVAL);
            return;
          }
          break;  // the readiness word is the home thread's
        }
        if (!option_allowed(level, name, true)) {
          reply.finish(-ENOPROTOOPT);
          return;
        }
        reply.finish(sock_err(::setsockopt(s->fd, level, name, req.data.data(), static_cast<socklen_t>(req.data.size()))));
        return;
      }
      case net::Op::kGetsockopt: {
        const int level = static_cast<int>(req.a[0]), name = static_cast<int>(req.a[1]);
        if (level == net::kSolGpusock && name == net::kSoPollOnDevice) {
          const int v = s->ready.load(std::memory_order_relaxed) ? 1 : 0;
          reply.set_addr(1, &v, static_cast<uint32_t>(std::min<int64_t>(req.a[2], sizeof v)));
          reply.finish(0);
          return;
        }
        if (!option_allowed(level, name, false)) {
          reply.finish(-ENOPROTOOPT);
          return;
        }
        uint8_t value[net::kMaxOptBytes] = {};
        socklen_t len = static_cast<socklen_t>(std::min<int64_t>(req.a[2], net::kMaxOptBytes));
        int r = sock_err(::getsockopt(s->fd, level, name, value, &len));
        if (r == 0) reply.set_addr(1, value, len);
        reply.finish(r);
        return;
      }
      case net::Op::kGetsockname:
      case net::Op::kGetpeername: {
        sockaddr_storage a{};
        socklen_t len = sizeof a;
        int r = req.op == net::Op::kGetsockname ? ::getsockname(s->fd, reinterpret_cast<sockaddr*>(&a), &len)
                                                : ::getpeername(s->fd, reinterpret_cast<sockaddr*>(&a), &len);
        r = sock_err(r);
        if (r == 0) reply.set_addr(1, &a, std::min<socklen_t>(len, net::kMaxAddrBytes));
        reply.finish(r);
        return;
      }
      case net::Op::kFcntl: {
        const int cmd = static_cast<int>(req.a[0]);
        if (cmd == F_GETFL) {
          reply.finish(O_RDWR | (s->nonblock.load(std::memory_order_relaxed) ? O_NONBLOCK : 0));
        } else if (cmd == F_SETFL) {
          // The host descriptor stays blocking; non-blocking is this socket's flag, which
          // every operation reads (io_uring waits for readiness itself).
          s->nonblock.store((req.a[1] & O_NONBLOCK) != 0, std::memory_order_relaxed);
          reply.finish(0);
        } else {
          reply.finish(-EINVAL);
        }
        return;
      }
      case net::Op::kConnect:
        if (s->nonblock.load(std::memory_order_relaxed)) {
          // A non-blocking connect returns at once (EINPROGRESS); the caller polls for
          // POLLOUT. The descriptor is made non-blocking just for this call.
          int fl = ::fcntl(s->fd, F_GETFL);
          ::fcntl(s->fd, F_SETFL, fl | O_NONBLOCK);
          int r = sock_err(::connect(s->fd, reinterpret_cast<const sockaddr*>(req.data.data()),
                                     static_cast<socklen_t>(req.data.size())));
          ::fcntl(s->fd, F_SETFL, fl);
          sockaddr_storage to{};
          std::memcpy(&to, req.data.data(), std::min(req.data.size(), sizeof to));
          s->loopback_peer.store(is_loopback(to), std::memory_order_relaxed);
          reply.finish(r);
          return;
        }
        break;
      default:
        break;
    }
    // The rest runs on the socket's home ring.
    Ring* home = rings_[s->home].get();
    if (home == here) {
      on_home(*home, s, req, std::move(reply));
    } else {
      // The request's views into staging stay valid until the reply: the lane waits.
      home->post([this, home, s, req, r = std::make_shared<net::Reply>(std::move(reply))]() mutable {
        on_home(*home, s, req, std::move(*r));
      });
    }
  }

  // ---- control (net::Backend) ----
  std::vector<net::SocketInfo> list_sockets() override {
    std::vector<net::SocketInfo> out;
    // Under table_mu_: do_close() removes a socket from the table before it closes the
    // descriptor, so every descriptor looked at here is still the socket's own.
    std::lock_guard<std::mutex> lock(table_mu_);
    out.reserve(table_.size());
    for (const auto& [fd, s] : table_) {
      net::SocketInfo i;
      i.fd = fd;
      i.family = s->domain;
      i.type = s->type;
      i.backend = name();
      i.bytes_in = s->bytes_in.load(std::memory_order_relaxed);
      i.bytes_out = s->bytes_out.load(std::memory_order_relaxed);
      socklen_t len = sizeof i.local;
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&i.local), &len) == 0 && !is_unbound(i.local)) {
        i.local_len = len;
      }
      len = sizeof i.peer;
      if (::getpeername(fd, reinterpret_cast<sockaddr*>(&i.peer), &len) == 0) i.peer_len = len;
      i.listener = s->listening.load(std::memory_order_relaxed);
      i.state = s->aborted.load(std::memory_order_relaxed) ? "aborted"
                : s->listening.load(std::memory_order_relaxed) ? "listening"
                : i.peer_len > 0 ? "connected"
                                 : "open";
      out.push_back(std::move(i));
    }
    std::sort(out.begin(), out.end(), [](const net::SocketInfo& a, const net::SocketInfo& b) { return a.fd < b.fd; });
    return out;
  }

  int abort_socket(int fd) override {
    std::shared_ptr<Sock> s = lookup(fd);
    if (s == nullptr) return -EBADF;
    abort(s);
    return 0;
  }

  int stop_accepting() override {
    draining_.store(true, std::memory_order_relaxed);
    std::vector<std::shared_ptr<Sock>> listeners;
    {
      std::lock_guard<std::mutex> lock(table_mu_);
      for (const auto& [fd, s] : table_) {
        if (s->listening.load(std::memory_order_relaxed)) listeners.push_back(s);
      }
    }
    int n = 0;
    for (auto& s : listeners) n += abort(s) ? 1 : 0;
    return n;
  }

 private:
  friend struct Ring;

  static bool is_unbound(const sockaddr_storage& a) {
    if (a.ss_family == AF_INET) return reinterpret_cast<const sockaddr_in&>(a).sin_port == 0;
    if (a.ss_family == AF_INET6) return reinterpret_cast<const sockaddr_in6&>(a).sin6_port == 0;
    return true;
  }

  // Marks `s` aborted (the next call on it sees -ECONNABORTED at once) and wakes what waits
  // on it from its home thread. Returns false when it was aborted already.
  bool abort(const std::shared_ptr<Sock>& s) {
    if (s->aborted.exchange(true, std::memory_order_relaxed)) return false;
    notify({net::SocketEvent::Kind::kAborted, s->fd, s->domain, s->type, ECONNABORTED, name()});
    Ring* home = rings_[s->home].get();
    home->post([this, home, s] { on_abort(*home, s); });
    return true;
  }

  void on_abort(Ring& r, const std::shared_ptr<Sock>& s) {
    if (s->closed) return;
    // The peer sees the connection end; io_uring operations on the socket complete (a
    // recv with 0, a send with EPIPE, an accept with EINVAL) and are answered
    // -ECONNABORTED below. A listener stops listening: new connections are refused.
    ::shutdown(s->fd, SHUT_RDWR);
    end_waiting(r, *s, -ECONNABORTED, false);
    // Polled on the device: readable and failed for good, so a poll ends and the next
    // call sees ECONNABORTED.
    if (s->ready.load(std::memory_order_relaxed)) ready_store(*s, ready_word(*s) | POLLIN | POLLERR);
    // A poll waiting on a listener watches its eventfd: make it readable, so the kernel's
    // poll ends and its accept() sees ECONNABORTED.
    if (const int e = s->accept_efd.load(std::memory_order_relaxed); e >= 0) {
      uint64_t v = 1;
      ssize_t n = ::write(e, &v, sizeof v);
      (void)n;
    }
  }

  // What close and abort share, on the home ring: closes the connections queued on a
  // listener, answers `err` to the lanes waiting in accept, and cancels every io_uring
  // operation in flight on the socket (they complete with -ECANCELED, and their handlers
  // answer for the socket's state: -EBADF once closed, -ECONNABORTED once aborted). With
  // `submit_now` the cancel goes to the kernel at once instead of with the next pass.
  void end_waiting(Ring& r, Sock& s, int err, bool submit_now) {
    for (int fd : s.accepted) ::close(fd);
    while (!s.accepted.empty()) {
      s.accepted.pop_front();
      count_accepted(s, -1);
    }
    while (!s.waiters.empty()) {
      s.waiters.front().reply.finish(err);
      s.waiters.pop_front();
    }
    if (s.inflight == 0) return;
    io_uring_sqe* sqe = r.sqe();
    if (sqe == nullptr) return;
    if (s.fixed >= 0) {
      io_uring_prep_cancel_fd(sqe, s.fixed, IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_FD_FIXED);
    } else {
      io_uring_prep_cancel_fd(sqe, s.fd, IORING_ASYNC_CANCEL_ALL);
    }
    io_uring_sqe_set_data64(sqe, kIgnore);
    if (submit_now) io_uring_submit(&r.ring);
  }

  // Tells the observer that an operation on `s` failed with `res` for a reason about the
  // connection (not EAGAIN, a cancel, or a close of our own).
  void maybe_error(const Sock& s, int res) {
    if (res >= 0 || res == -EAGAIN || res == -ECANCELED || res == -EBADF || res == -EINTR ||
        res == -ENOBUFS || res == -ECONNABORTED || res == -EALREADY || res == -EINPROGRESS) {
      return;
    }
    notify({net::SocketEvent::Kind::kError, s.fd, s.domain, s.type, -res, name()});
  }

  Ring* ring_for(uint32_t thread) {
    if (thread >= rings_.size()) return nullptr;
    if (!rings_[thread]) rings_[thread] = make_ring(thread);
    Ring* r = rings_[thread].get();
    return r->ok ? r : nullptr;
  }

  std::unique_ptr<Ring> make_ring(uint32_t index) {
    auto r = std::make_unique<Ring>();
    r->be = this;
    r->index = index;
    io_uring_params p{};
    p.flags = setup_flags_;
    p.flags |= IORING_SETUP_CQSIZE;
    p.cq_entries = opt_.ring_entries * 4;
    int rc = io_uring_queue_init_params(opt_.ring_entries, &r->ring, &p);
    if (rc < 0) {
      std::fprintf(stderr, "gpusock: io_uring ring for service thread %u: %s\n", index, std::strerror(-rc));
      return r;
    }
    // Provided buffers: this ring's slice of the mapped pool.
    r->nbufs = opt_.recv_buffers;
    r->buf_bytes = opt_.recv_buffer_bytes;
    r->bufs_host = pool_host_ + slice_bytes_ * index;
    r->bufs_dev = pool_dev_ + slice_bytes_ * index;
    r->flags_host = reinterpret_cast<uint32_t*>(r->bufs_host + static_cast<size_t>(r->nbufs) * r->buf_bytes);
    r->flags_dev = r->bufs_dev + static_cast<uint64_t>(r->nbufs) * r->buf_bytes;
    // After the buffers and their flags: the bounce area, then the pull area.
    uint8_t* const after_flags = r->bufs_host + static_cast<size_t>(r->nbufs) * r->buf_bytes + flags_span_;
    if (delivers()) {
      r->bounce = after_flags;
      r->bounce_piece = opt_.deliver_chunk_bytes;
      r->bounce_pieces = opt_.deliver_chunks;
    }
    if (opt_.pull_sends) {
      r->pull.base = after_flags + bounce_bytes();
      r->pull.piece = opt_.pull_chunk_bytes;
      r->pull.pieces = opt_.pull_chunks;
    }
    r->br_bytes = (sizeof(io_uring_buf) * r->nbufs + 4095) & ~size_t{4095};
    void* mem = mmap(nullptr, r->br_bytes, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (mem == MAP_FAILED) {
      io_uring_queue_exit(&r->ring);
      return r;
    }
    r->br = static_cast<io_uring_buf_ring*>(mem);
    io_uring_buf_ring_init(r->br);
    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<uint64_t>(r->br);
    reg.ring_entries = r->nbufs;
    reg.bgid = kBufGroup;
    rc = io_uring_register_buf_ring(&r->ring, &reg, 0);
    if (rc < 0) {
      std::fprintf(stderr, "gpusock: io_uring buffer ring for service thread %u: %s\n", index, std::strerror(-rc));
      munmap(r->br, r->br_bytes);
      io_uring_queue_exit(&r->ring);
      return r;
    }
    for (uint32_t b = 0; b < r->nbufs; ++b) add_buffer(*r, b, static_cast<int>(b));
    io_uring_buf_ring_advance(r->br, static_cast<int>(r->nbufs));
    // Fixed files: a sparse table; sockets take a slot while they live.
    const uint32_t nfixed = std::min<uint32_t>(opt_.max_sockets, 65536);
    if (io_uring_register_files_sparse(&r->ring, nfixed) == 0) {
      r->free_fixed.reserve(nfixed);
      for (uint32_t i = nfixed; i > 0; --i) r->free_fixed.push_back(static_cast<int>(i - 1));
    }
    // The staging region as fixed buffer 0, for SEND_ZC straight from it.
    if (feat_.registered_buffers) {
      iovec iov{staging_, staging_bytes_};
      r->staging_registered = io_uring_register_buffers(&r->ring, &iov, 1) == 0;
    }
    r->ok = true;
    return r;
  }

  void teardown(Ring& r) {
    if (!r.ok) return;
    r.ok = false;
    // Fail what is queued for this ring, then let the kernel cancel everything in flight.
    {
      std::lock_guard<std::mutex> lock(r.inbox_mu);
      r.inbox.clear();
    }
    io_uring_queue_exit(&r.ring);
    r.injected.clear();  // their Ops are in `live`, freed below
    std::unordered_set<PollWait*> waits;
    for (Op* op : r.live) {
      if (op->wait != nullptr) waits.insert(op->wait);
      delete_op(op);
    }
    r.live.clear();
    for (PollWait* w : waits) delete w;  // an unanswered one answers -ECANCELED
    r.polls.clear();  // each had an operation in `live` (one with none left is deleted)
    std::vector<std::shared_ptr<Sock>> mine;
    {
      std::lock_guard<std::mutex> lock(table_mu_);
      for (auto it = table_.begin(); it != table_.end();) {
        if (it->second->home == r.index) {
          mine.push_back(it->second);
          it = table_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& s : mine) {
      for (int fd : s->accepted) ::close(fd);
      s->accepted.clear();
      s->waiters.clear();  // their Replies answer -ECANCELED (the runtime already failed them)
      ::close(s->fd);
      nsockets_.fetch_sub(1, std::memory_order_relaxed);
    }
    if (r.br != nullptr) munmap(r.br, r.br_bytes);
    r.br = nullptr;
  }

  std::shared_ptr<Sock> lookup(int fd) {
    std::lock_guard<std::mutex> lock(table_mu_);
    auto it = table_.find(fd);
    return it == table_.end() ? nullptr : it->second;
  }

  // Makes the Sock for a new descriptor on ring `r`. Returns null (and closes fd) at the
  // socket limit.
  std::shared_ptr<Sock> adopt(Ring& r, int fd, int domain, int type) {
    if (nsockets_.fetch_add(1, std::memory_order_relaxed) >= opt_.max_sockets) {
      nsockets_.fetch_sub(1, std::memory_order_relaxed);
      ::close(fd);
      return nullptr;
    }
    auto s = std::make_shared<Sock>();
    s->fd = fd;
    s->home = r.index;
    s->domain = domain;
    s->type = type;
    s->stream = type == SOCK_STREAM;
    if (!r.free_fixed.empty()) {
      int idx = r.free_fixed.back();
      if (io_uring_register_files_update(&r.ring, static_cast<unsigned>(idx), &fd, 1) == 1) {
        s->fixed = idx;
        r.free_fixed.pop_back();
      }
    }
    // Told before the socket can be found (and so aborted or closed): its other events
    // come after this one.
    notify({net::SocketEvent::Kind::kOpened, fd, domain, type, 0, name()});
    std::lock_guard<std::mutex> lock(table_mu_);
    table_[fd] = s;
    return s;
  }

  // Points `sqe` at the socket: its fixed-file slot when it has one.
  static void target(io_uring_sqe* sqe, const Sock& s) {
    if (s.fixed >= 0) {
      sqe->fd = s.fixed;
      sqe->flags |= IOSQE_FIXED_FILE;
    }
  }

  Op* new_op(Ring& r, Kind k, std::shared_ptr<Sock> s) {
    Op* op = new Op;
    op->kind = k;
    op->ring = &r;
    op->sock = std::move(s);
    if (op->sock) op->sock->inflight++;
    r.live.insert(op);
    return op;
  }
  void delete_op(Op* op) {
    if (op->sock) op->sock->inflight--;
    delete op;
  }
  void retire(Ring& r, Op* op) {
    r.live.erase(op);
    delete_op(op);
  }

  // Asks the fault plan about a submission of `op` (callers test faults_ first, so a
  // runtime without a plan pays one predictable branch). When the plan fails it, the
  // operation is not submitted: it completes with -errno on the next pass. Returns true
  // then.
  bool inject(Ring& r, FaultOp kind, Op* op) {
    const int e = faults_->on_submit(kind);
    if (e == 0) return false;
    r.injected.emplace_back(op, -e);
    return true;
  }

  // Completes the operations the fault plan failed, through the handlers real completions
  // take (no flags: no buffer, no more completions to come, no notification).
  uint32_t complete_injected(Ring& r) {
    std::vector<std::pair<Op*, int>> now;
    now.swap(r.injected);  // completions may inject again: those wait for the next pass
    for (auto& [op, res] : now) complete(r, op, res, 0);
    return static_cast<uint32_t>(now.size());
  }

  uint32_t drain_inbox(Ring& r) {
    std::vector<std::function<void()>> work;
    {
      std::lock_guard<std::mutex> lock(r.inbox_mu);
      work.swap(r.inbox);
      r.inbox_nonempty.store(false, std::memory_order_relaxed);
    }
    for (auto& fn : work) fn();
    return static_cast<uint32_t>(work.size());
  }

  // Queues buffer b for the kernel at `offset` past the ring's tail (published by
  // io_uring_buf_ring_advance).
  static void add_buffer(Ring& r, uint32_t b, int offset) {
    io_uring_buf_ring_add(r.br, r.bufs_host + static_cast<size_t>(b) * r.buf_bytes, r.buf_bytes,
                          static_cast<unsigned short>(b), io_uring_buf_ring_mask(r.nbufs), offset);
  }

  // Gives buffers the device has finished with back to the kernel.
  uint32_t recycle(Ring& r) {
    int added = 0;
    for (size_t i = 0; i < r.lent.size();) {
      const uint32_t b = r.lent[i];
      // Acquire: pairs with the device's release store of 0 after its last read of the
      // buffer, so the kernel cannot overwrite bytes the device is still copying.
      if (std::atomic_ref<uint32_t>(r.flags_host[b]).load(std::memory_order_acquire) == 0) {
        add_buffer(r, b, added++);
        r.lent[i] = r.lent.back();
        r.lent.pop_back();
      } else {
        ++i;
      }
    }
    if (added > 0) io_uring_buf_ring_advance(r.br, added);
    return static_cast<uint32_t>(added);
  }

  void return_buffer_now(Ring& r, uint32_t b) {
    add_buffer(r, b, 0);
    io_uring_buf_ring_advance(r.br, 1);
  }

  uint32_t reap(Ring& r) {
    uint32_t n = 0;
    io_uring_cqe* cqe;
    // Completions may queue new SQEs (re-arms, resends); they go out on the next pass.
    while (io_uring_peek_cqe(&r.ring, &cqe) == 0) {
      const uint64_t ud = cqe->user_data;
      const int res = cqe->res;
      const uint32_t flags = cqe->flags;
      io_uring_cqe_seen(&r.ring, cqe);
      ++n;
      if (ud != kIgnore) complete(r, reinterpret_cast<Op*>(ud), res, flags);
    }
    return n;
  }

  void complete(Ring& r, Op* op, int res, uint32_t flags) {
    switch (op->kind) {
      case Kind::kAccept: return on_accept(r, op, res, flags);
      case Kind::kConnect:
        if (res == -ECANCELED && op->sock->closed) res = -EBADF;
        if (op->sock->aborted.load(std::memory_order_relaxed) && !op->sock->closed) res = -ECONNABORTED;
        maybe_error(*op->sock, res);
        op->reply.finish(res);
        return retire(r, op);
      case Kind::kSend: return on_send(r, op, res, flags);
      case Kind::kRecv: return on_recv(r, op, res, flags);
      case Kind::kPollArm:
      case Kind::kPollTimer: return on_poll_event(r, op, res);
      case Kind::kReady: return on_ready(r, op, res, flags);
    }
  }

  // ---- socket / listen / accept ----
  void do_socket(Ring& r, net::Request& req, net::Reply reply) {
    const int domain = static_cast<int>(req.a[0]);
    const int type_flags = static_cast<int>(req.a[1]);
    const int protocol = static_cast<int>(req.a[2]);
    if (domain != AF_INET && domain != AF_INET6) {
      reply.finish(-EAFNOSUPPORT);
      return;
    }
    const int type = type_flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (type != SOCK_STREAM && type != SOCK_DGRAM) {
      reply.finish(-EINVAL);
      return;
    }
    if (nsockets_.load(std::memory_order_relaxed) >= opt_.max_sockets) {
      reply.finish(-EMFILE);
      return;
    }
    int fd = ::socket(domain, type | SOCK_CLOEXEC, protocol);
    if (fd < 0) {
      reply.finish(-errno);
      return;
    }
    auto s = adopt(r, fd, domain, type);
    if (s == nullptr) {
      reply.finish(-EMFILE);
      return;
    }
    s->nonblock.store((type_flags & SOCK_NONBLOCK) != 0, std::memory_order_relaxed);
    reply.finish(fd);
  }

  void on_home(Ring& r, const std::shared_ptr<Sock>& s, net::Request& req, net::Reply reply) {
    if (s->closed || s->closing) {
      reply.finish(-EBADF);
      return;
    }
    switch (req.op) {
      case net::Op::kListen: return do_listen(r, s, req, std::move(reply));
      case net::Op::kAccept: return do_accept(r, s, req, std::move(reply));
      case net::Op::kConnect: return do_connect(r, s, req, std::move(reply));
      case net::Op::kSend: return do_send(r, s, req, std::move(reply));
      case net::Op::kRecv: return do_recv(r, s, req, std::move(reply));
      case net::Op::kClose: return do_close(r, s, std::move(reply));
      case net::Op::kShutdown: return do_shutdown(r, s, req, std::move(reply));
      case net::Op::kSetsockopt: return do_poll_on_device(r, s, req, std::move(reply));
      default: reply.finish(-ENOSYS); return;
    }
  }

  void do_listen(Ring& r, const std::shared_ptr<Sock>& s, net::Request& req, net::Reply reply) {
    if (!s->stream) {
      reply.finish(-EOPNOTSUPP);
      return;
    }
    if (draining_.load(std::memory_order_relaxed)) {
      reply.finish(-ECONNABORTED);  // stop_accepting(): no new listeners
      return;
    }
    const int backlog = static_cast<int>(req.a[0]);
    int rc = sock_err(::listen(s->fd, backlog));
    if (rc == 0 && s->accept_efd.load(std::memory_order_relaxed) < 0) {
      const int e = ::eventfd(0, EFD_SEMAPHORE | EFD_NONBLOCK | EFD_CLOEXEC);
      if (e < 0) rc = -errno;
      else s->accept_efd.store(e, std::memory_order_release);
    }
    if (rc == 0) {
      s->listening = true;
      s->accept_cap = std::max<uint32_t>(opt_.accept_queue, backlog > 0 ? static_cast<uint32_t>(backlog) : 1);
      arm_accept(r, s);
    }
    reply.finish(rc);
  }

  void arm_accept(Ring& r, const std::shared_ptr<Sock>& s) {
    if (s->accept_armed || s->closed || s->aborted.load(std::memory_order_relaxed)) return;
    if (faults_ != nullptr) [[unlikely]] {
      if (const int e = faults_->on_submit(FaultOp::kAccept)) {
        r.injected.emplace_back(new_op(r, Kind::kAccept, s), -e);
        s->accept_armed = true;  // until its one completion, which ends it (no F_MORE)
        return;
      }
    }
    io_uring_sqe* sqe = r.sqe();
    if (sqe == nullptr) return;  // re-armed by the next accept() call
    Op* op = new_op(r, Kind::kAccept, s);
    io_uring_prep_multishot_accept(sqe, s->fd, nullptr, nullptr, SOCK_CLOEXEC);
    target(sqe, *s);
    io_uring_sqe_set_data(sqe, op);
    s->accept_armed = true;
  }

  void on_accept(Ring& r, Op* op, int res, uint32_t flags) {
    std::shared_ptr<Sock> l = op->sock;
    const bool more = (flags & IORING_CQE_F_MORE) != 0;
    if (!more) {
      l->accept_armed = false;
      retire(r, op);
    }
    if (l->closed || l->aborted.load(std::memory_order_relaxed)) {
      if (res >= 0) ::close(res);
      return;
    }
    if (res >= 0) {
      if (!l->waiters.empty()) {
        Sock::Waiter w = std::move(l->waiters.front());
        l->waiters.pop_front();
        hand_over(r, *l, res, std::move(w.reply), w.flags);
      } else {
        l->accepted.push_back(res);
        count_accepted(*l, +1);
        if (l->accepted.size() >= l->accept_cap && l->accept_armed) {
          // The queue is full: stop accepting until accept() drains it, so the kernel's
          // backlog, not this queue, is what a flood of clients meets.
          if (io_uring_sqe* sqe = r.sqe()) {
            io_uring_prep_cancel64(sqe, reinterpret_cast<uint64_t>(op), 0);
            io_uring_sqe_set_data64(sqe, kIgnore);
          }
        }
      }
    } else if (res != -ECANCELED) {
      // EMFILE/ENFILE/ENOMEM...: the first waiter sees it, as accept(2) would report it.
      if (!l->waiters.empty()) {
        l->waiters.front().reply.finish(res);
        l->waiters.pop_front();
      }
    }
    if (!more && !l->accept_armed && l->accepted.size() < l->accept_cap && res != -EMFILE && res != -ENFILE) {
      arm_accept(r, l);
    }
  }

  // Keeps the listener's eventfd count equal to accepted.size(), and its readiness word
  // readable while that is not 0.
  void count_accepted(Sock& l, int delta) {
    if (l.ready.load(std::memory_order_relaxed)) {
      const uint32_t w = ready_word(l) & ~static_cast<uint32_t>(POLLIN);
      ready_store(l, w | (l.accepted.empty() ? 0u : static_cast<uint32_t>(POLLIN)));
    }
    const int e = l.accept_efd.load(std::memory_order_relaxed);
    if (e < 0) return;
    uint64_t v = 1;
    ssize_t n = delta > 0 ? ::write(e, &v, sizeof v) : ::read(e, &v, sizeof v);
    (void)n;  // a semaphore eventfd cannot overflow at these counts, nor be read below 0 here
  }

  // Gives accepted descriptor `fd` to a waiting lane.
  void hand_over(Ring& r, Sock& listener, int fd, net::Reply reply, int flags) {
    auto s = adopt(r, fd, listener.domain, SOCK_STREAM);
    if (s == nullptr) {
      reply.finish(-EMFILE);
      return;
    }
    s->nonblock.store((flags & SOCK_NONBLOCK) != 0, std::memory_order_relaxed);
    // Polled on the device like its listener (kSoPollOnDevice is inherited), where the
    // descriptor has a word.
    if (listener.ready.load(std::memory_order_relaxed)) watch(r, s);
    sockaddr_storage a{};
    socklen_t len = sizeof a;
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
      s->loopback_peer.store(is_loopback(a), std::memory_order_relaxed);
      reply.set_addr(1, &a, std::min<socklen_t>(len, net::kMaxAddrBytes));
    }
    reply.finish(fd);
  }

  void do_accept(Ring& r, const std::shared_ptr<Sock>& s, net::Request& req, net::Reply reply) {
    if (!s->listening) {
      reply.finish(-EINVAL);
      return;
    }
    const int flags = static_cast<int>(req.a[0]);
    if ((flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) != 0) {
      reply.finish(-EINVAL);
      return;
    }
    if (!s->accepted.empty()) {
      int fd = s->accepted.front();
      s->accepted.pop_front();
      count_accepted(*s, -1);
      hand_over(r, *s, fd, std::move(reply), flags);
      if (!s->accept_armed) arm_accept(r, s);
      return;
    }
    if (s->nonblock.load(std::memory_order_relaxed)) {
      reply.finish(-EAGAIN);
      return;
    }
    reply.wait_begin(*this, token(r, kWaitAccept, static_cast<uint32_t>(s->fd)));
    s->waiters.push_back({std::move(reply), flags});
    if (!s->accept_armed) arm_accept(r, s);
  }

  // ---- connect ----
  void do_connect(Ring& r, const std::shared_ptr<Sock>& s, net::Request& req, net::Reply reply) {
    Op* op = new_op(r, Kind::kConnect, s);
    op->reply = std::move(reply);
    std::memcpy(&op->addr, req.data.data(), req.data.size());
    op->addr_len = static_cast<socklen_t>(req.data.size());
    s->loopback_peer.store(is_loopback(op->addr), std::memory_order_relaxed);
    if (faults_ != nullptr && inject(r, FaultOp::kConnect, op)) [[unlikely]] return;
    io_uring_sqe* sqe = r.sqe();
    if (sqe == nullptr) {
      op->reply.finish(-EBUSY);
      return retire(r, op);
    }
    io_uring_prep_connect(sqe, s->fd, reinterpret_cast<sockaddr*>(&op->addr), op->addr_len);
    target(sqe, *s);
    io_uring_sqe_set_data(sqe, op);
  }

  // ---- send ----
  void do_send(Ring& r, const std::shared_ptr<Sock>& s, net::Request& req, net::Reply reply) {
    const int user = static_cast<int>(req.a[0]);
    if ((user & ~(MSG_DONTWAIT | MSG_MORE | MSG_OOB | MSG_NOSIGNAL | MSG_EOR)) != 0) {
      reply.finish(-EOPNOTSUPP);
      return;
    }
    if (s->send_error != 0) {
      reply.finish(std::exchange(s->send_error, 0));  // met by taken bytes after their answer
      return;
    }
    if (req.src != 0) return do_send_pull(r, s, req, std::move(reply), user);
    Op* op = new_op(r, Kind::kSend, s);
    op->reply = std::move(reply);
    op->data = req.data.data();
    op->len = static_cast<uint32_t>(req.data.size());
    op->flags = user | MSG_NOSIGNAL;
    if (s->nonblock.load(std::memory_order_relaxed)) op->flags |= MSG_DONTWAIT;
    if (req.addr_len > 0) {
      std::memcpy(&op->addr, req.addr, req.addr_len);
      op->addr_len = req.addr_len;
    }
    op->zc = feat_.send_zc && r.staging_registered && opt_.send_zc_threshold != 0 &&
             op->len >= opt_.send_zc_threshold && op->addr_len == 0 && s->stream && !s->loopback_peer.load(std::memory_order_relaxed) &&
             op->data >= staging_ && op->data + op->len <= staging_ + staging_bytes_;
    if (op->len == 0 && s->stream) {
      // Nothing to send; the descriptor was checked. (A zero-length datagram is real.)
      op->reply.finish(0);
      retire(r, op);
      return;
    }
    if (holds_area(r, *s)) {
      // Taken bytes of this socket are still going out (send 2a): these go after them. A
      // non-blocking send finds the socket full.
      if ((op->flags & MSG_DONTWAIT) != 0) {
        op->reply.finish(-EAGAIN);
        return retire(r, op);
      }
      op->held = true;
      s->held.push_back(op);
      op->reply.wait_begin(*this, token(r, kWaitOp, reinterpret_cast<uintptr_t>(op)));
      return;
    }
    submit_send(r, op);
  }

  void submit_send(Ring& r, Op* op) {
    if (faults_ != nullptr && inject(r, op->zc ? FaultOp::kSendZc : FaultOp::kSend, op)) [[unlikely]] return;
    io_uring_sqe* sqe = r.sqe();
    if (sqe == nullptr) {
      if (op->pull) return fail_area(r, -EBUSY);
      op->reply.finish(op->done > 0 ? op->done : -EBUSY);
      retire(r, op);
      return;
    }
    const uint8_t* p = op->data + op->done;
    const uint32_t n = op->len - op->done;
    if (op->addr_len > 0) {
      op->iov = {const_cast<uint8_t*>(p), n};
      op->msg = {};
      op->msg.msg_name = &op->addr;
      op->msg.msg_namelen = op->addr_len;
      op->msg.msg_iov = &op->iov;
      op->msg.msg_iovlen = 1;
      io_uring_prep_sendmsg(sqe, op->sock->fd, &op->msg, static_cast<unsigned>(op->flags));
    } else if (op->zc) {
      io_uring_prep_send_zc_fixed(sqe, op->sock->fd, p, n, op->flags, 0, 0);
      op->zc_notif_pending = true;
    } else {
      io_uring_prep_send(sqe, op->sock->fd, p, n, op->flags);
    }
    target(sqe, *op->sock);
    if (op->pull && opt_.pull_async_sends) sqe->flags |= IOSQE_ASYNC;
    io_uring_sqe_set_data(sqe, op);
    // A taken send is never let go (its lane is answered from the area, not by this send).
    if (op->sock->stream && (op->flags & MSG_DONTWAIT) == 0 && !op->pull) {
      op->reply.wait_begin(*this, token(r, kWaitOp, reinterpret_cast<uintptr_t>(op)));
    }
  }

  // ---- sends taken out of device memory (docs 12.4, send step 2a) ----
  // A blocking stream send of bytes in device_alloc() or registered memory. The host
  // copies them into the ring's pull area by DMA (Runtime::start_fetch()), as many pieces
  // ahead as are free, sends each piece once its own copy has ended, and answers the lane
  // as soon as all its bytes are in the area (and, for the oldest send there, a piece of
  // it has gone out): the area is to these bytes what the kernel's socket buffer is to a
  // send(2)'s, and the lane's next send is taken while they go out.
  // One socket holds a ring's area at a time; a send that cannot have it (another
  // socket's, a non-blocking send, a datagram socket, memory the runtime does not know)
  // answers kCopyInstead and the lane copies through staging, so no send ever waits for
  // another socket's peer.
  void do_send_pull(Ring& r, const std::shared_ptr<Sock>& s, net::Request& req, net::Reply reply, int user) {
    Ring::PullArea& a = r.pull;
    const auto* src = reinterpret_cast<const uint8_t*>(req.src);
    const uint64_t total = static_cast<uint64_t>(req.a[1]);
    const bool nonblock = (user & MSG_DONTWAIT) != 0 || s->nonblock.load(std::memory_order_relaxed);
    if (a.base == nullptr || (a.sock != nullptr && a.sock != s) || !s->held.empty() || !s->stream || nonblock ||
        req.addr_len != 0 || !rt_->is_device_memory(src, total)) {
      reply.finish(net::kCopyInstead);
      return;
    }
    if (s->shutdown_after == SHUT_WR || s->shutdown_after == SHUT_RDWR) {
      reply.finish(-EPIPE);
      return;
    }
    // Into an empty area: ask the socket the question a send(2) of these bytes would, with
    // a send(2) of none. A socket that failed (reset, shut for writing, never connected)
    // answers its error now, as send(2) would; one that can send lets this send be
    // answered as soon as its bytes are in the area. EAGAIN (still connecting): the send
    // waits until a piece of its own has gone out, and answers what that found.
    bool vouched = false;
    if (a.ops.empty()) {
      const ssize_t probe = ::send(s->fd, nullptr, 0, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (probe < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        const int err = -errno;
        maybe_error(*s, err);
        reply.finish(err);
        return;
      }
      vouched = probe == 0;
    }
    Op* op = new_op(r, Kind::kSend, s);
    op->reply = std::move(reply);
    op->flags = user | MSG_NOSIGNAL;
    op->pull = std::make_unique<Pull>();
    op->pull->src = src;
    op->pull->total = total;
    op->pull->vouched = vouched;
    a.sock = s;
    a.ops.push_back(op);
    pump(r);
  }
  // Moves the area on: starts copies into free pieces (the oldest send first), sends the
  // oldest piece, answers the sends whose bytes are all in, retires the ones all sent.
  void pump(Ring& r) {
    Ring::PullArea& a = r.pull;
    for (Op* op : a.ops) {
      Pull& p = *op->pull;
      while (!p.taken_all() && a.count < a.pieces) {
        const uint32_t slot = (a.first + a.count) % a.pieces;
        const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(p.total - p.fetched, a.piece));
        uint64_t t = 0;
        Status st = rt_->start_fetch(a.base + static_cast<size_t>(slot) * a.piece, p.src + p.fetched, n, &t);
        if (!st.ok()) {
          // Freed or unregistered meanwhile, or the device is gone: what was taken goes out.
          p.error = st.code() > 0 ? -st.code() : -EIO;
          break;
        }
        a.len[slot] = n;
        a.ticket[slot] = t;
        a.owner[slot] = op;
        ++a.count;
        p.fetched += n;
        p.last_ticket = t;
      }
      if (!p.taken_all()) break;  // the area is full; later sends wait their turn
    }
    bool submit = false;
    if (!a.sending && a.count > 0) {
      // The span: piece `first` (waited for), then each next piece whose copy has already
      // ended, while the pieces stay contiguous (full, no wrap). Fewer, larger sends.
      Op* op = a.owner[a.first];
      if (!rt_->finish_deliveries(a.ticket[a.first]).ok()) return fail_area(r, -EIO);
      uint32_t k = 1, bytes = a.len[a.first];
      while (k < a.count && a.first + k < a.pieces && a.len[a.first + k - 1] == a.piece &&
             rt_->deliveries_done(a.ticket[a.first + k])) {
        bytes += a.len[a.first + k];
        ++k;
      }
      op->data = a.base + static_cast<size_t>(a.first) * a.piece + a.head_done;
      op->len = bytes - a.head_done;
      op->done = 0;
      a.sending = true;
      submit_send(r, op);
      if (r.pull.sock == nullptr) return;  // the submission failed and ended the area
      // A worker sends it (pull_async_sends): into the kernel now, so it goes out while
      // this thread waits for copies below. Inline, it would hold this thread: after the
      // answers below, so the lanes' next sends are on their way while it goes out.
      if (opt_.pull_async_sends) {
        io_uring_submit(&r.ring);
      } else {
        submit = true;
      }
    }
    for (Op* op : a.ops) {
      Pull& p = *op->pull;
      if (p.answered) continue;
      if (!p.taken_all()) break;
      // The oldest send in the area, unless the probe in do_send_pull vouched for the
      // socket, waits until a piece of its own has gone out, so it answers what that found;
      // a later one is answered at once, its bytes queued behind bytes the socket took.
      if (op == a.ops.front() && p.sent == 0 && p.fetched > 0 && !p.vouched) break;
      if (p.fetched > 0 && !rt_->finish_deliveries(p.last_ticket).ok()) return fail_area(r, -EIO);
      p.answered = true;
      op->reply.finish(p.fetched > 0 ? static_cast<int64_t>(p.fetched) : p.error);
    }
    if (submit) io_uring_submit(&r.ring);
    while (!a.ops.empty()) {
      Op* op = a.ops.front();
      const Pull& p = *op->pull;
      if (!p.answered || p.sent < p.fetched) break;
      a.ops.pop_front();
      retire(r, op);
    }
    if (a.ops.empty()) area_drained(r);
  }
  void on_pull_send(Ring& r, Op* op, int res) {
    Ring::PullArea& a = r.pull;
    Sock& s = *op->sock;
    a.sending = false;
    const bool aborted = s.aborted.load(std::memory_order_relaxed);
    if (res > 0) {
      op->done += static_cast<uint32_t>(res);
      s.bytes_out.store(s.bytes_out.load(std::memory_order_relaxed) + static_cast<uint64_t>(res), std::memory_order_relaxed);
      // The span's bytes went out piece by piece, each counted to the send that owns it.
      for (uint32_t left = static_cast<uint32_t>(res); left > 0;) {
        const uint32_t n = std::min(left, a.len[a.first] - a.head_done);
        a.owner[a.first]->pull->sent += n;
        a.head_done += n;
        left -= n;
        if (a.head_done == a.len[a.first]) {
          a.head_done = 0;
          a.first = (a.first + 1) % a.pieces;
          --a.count;
        }
      }
      if (s.closed || aborted) return fail_area(r, s.closed ? -EBADF : -ECONNABORTED);
      if (op->done < op->len) {
        // The rest of the span, carried by the send that owns its first piece now, so the
        // carrier always has bytes still to go and is never retired while in the kernel.
        Op* carrier = a.owner[a.first];
        if (carrier != op) {
          carrier->data = op->data;
          carrier->len = op->len;
          carrier->done = op->done;
        }
        a.sending = true;
        return submit_send(r, carrier);
      }
      return pump(r);
    }
    if (res == -ECANCELED && !s.closed && !aborted) {
      a.sending = true;
      return submit_send(r, op);  // not a cancel of ours (see on_send)
    }
    int err = res == 0 ? -EIO : res;
    if (err == -ECANCELED && s.closed) err = -EBADF;
    if (aborted && !s.closed) err = -ECONNABORTED;
    maybe_error(s, err);
    fail_area(r, err);
  }
  // The socket failed under the area: a send still waiting is answered the bytes it got
  // out (or the error); one already answered leaves the error to the socket's next send,
  // as the kernel reports a failure of bytes it had accepted.
  void fail_area(Ring& r, int err) {
    Ring::PullArea& a = r.pull;
    if (a.count > 0) {
      // Copies may still read a waiting lane's buffer; it may write it once answered.
      (void)rt_->finish_deliveries(a.ticket[(a.first + a.count - 1) % a.pieces]);
    }
    for (Op* op : a.ops) {
      Pull& p = *op->pull;
      if (p.answered) {
        if (p.sent < p.fetched && a.sock->send_error == 0) a.sock->send_error = err;
      } else {
        op->reply.finish(p.sent > 0 ? static_cast<int64_t>(p.sent) : err);
      }
      retire(r, op);
    }
    a.ops.clear();
    a.first = a.count = a.head_done = 0;
    a.sending = false;
    area_drained(r);
  }
  // The area is free: the sends that waited behind it go out, in order, then a shutdown
  // or close that was answered meanwhile is done.
  void area_drained(Ring& r) {
    std::shared_ptr<Sock> s = std::move(r.pull.sock);
    r.pull.sock = nullptr;
    r.pull.first = r.pull.count = r.pull.head_done = 0;
    if (s == nullptr) return;
    while (!s->held.empty()) {
      Op* op = s->held.front();
      s->held.pop_front();
      op->held = false;
      const int err = s->aborted.load(std::memory_order_relaxed) ? -ECONNABORTED : std::exchange(s->send_error, 0);
      if (err != 0) {
        op->reply.finish(err);
        retire(r, op);
        continue;
      }
      submit_send(r, op);
    }
    if (s->shutdown_after >= 0) ::shutdown(s->fd, std::exchange(s->shutdown_after, -1));
    if (s->closing) close_now(r, s);
  }
  // Whether the socket's taken bytes are not all out yet.
  static bool holds_area(const Ring& r, const Sock& s) { return r.pull.sock.get() == &s; }

  void on_send(Ring& r, Op* op, int res, uint32_t flags) {
    if (op->pull) return on_pull_send(r, op, res);
    if (flags & IORING_CQE_F_NOTIF) {
      // The kernel no longer reads the staging bytes: now the lane may have them back.
      op->zc_notif_pending = false;
      finish_send(r, op, op->zc_result);
      return;
    }
    const bool notif_follows = op->zc && (flags & IORING_CQE_F_MORE) != 0;
    if (!notif_follows) op->zc_notif_pending = false;
    if (res > 0) {
      op->done += static_cast<uint32_t>(res);
      // A blocking stream send hands every byte over, as send(2) blocks until it has.
      if (op->done < op->len && op->sock->stream && (op->flags & MSG_DONTWAIT) == 0 && !op->sock->closed &&
          !op->straggling) {
        if (notif_follows) {
          // Resend after the notification: the buffer must not be reused before it.
          op->zc_result = kResendAfterNotif;
          return;
        }
        submit_send(r, op);
        return;
      }
    }
    if (op->straggling && op->done < op->len && (res > 0 || res == -ECANCELED) && !op->sock->closed &&
        !op->sock->aborted.load(std::memory_order_relaxed)) {
      const int64_t result = let_go_answer(*op);
      if (notif_follows) {
        op->zc_result = result;
        return;
      }
      finish_send(r, op, result);
      return;
    }
    if (res == -ECANCELED && !op->sock->closed && !op->sock->aborted.load(std::memory_order_relaxed)) {
      // Not a cancel of ours (close and abort set their flag first): the kernel gave up
      // on the operation before it took a byte, so the lane's send still stands. Answering
      // ECANCELED, which send(2) never returns, would end a transfer nothing ended.
      if (notif_follows) {
        op->zc_result = kResendAfterNotif;
        return;
      }
      submit_send(r, op);
      return;
    }
    int result = op->done > 0 ? static_cast<int>(op->done) : res;
    if (result == -ECANCELED && op->sock->closed) result = -EBADF;
    if (result <= 0 && op->sock->aborted.load(std::memory_order_relaxed) && !op->sock->closed) result = -ECONNABORTED;
    maybe_error(*op->sock, result);
    if (notif_follows) {
      op->zc_result = result;
      return;
    }
    finish_send(r, op, result);
  }

  static constexpr int64_t kResendAfterNotif = INT64_MIN;

  // A blocking send let go (straggle()): the bytes sent so far, and the lane sends the
  // rest; or, with none sent, ask again.
  static int64_t let_go_answer(const Op& op) {
    return op.done > 0 ? static_cast<int64_t>(op.done) | net::kSendMore : net::kAskAgain;
  }

  void finish_send(Ring& r, Op* op, int64_t result) {
    if (op->zc_result == kResendAfterNotif) {
      op->zc_result = 0;
      if (op->straggling) {
        result = let_go_answer(*op);
      } else {
        submit_send(r, op);
        return;
      }
    }
    if (result > 0) {
      auto& out = op->sock->bytes_out;  // home thread is the only writer
      out.store(out.load(std::memory_order_relaxed) + static_cast<uint64_t>(result & ~net::kSendMore),
                std::memory_order_relaxed);
    }
    op->reply.finish(result);
    retire(r, op);
  }

  // ---- recv ----
  void do_recv(Ring& r, const std::shared_ptr<Sock>& s, net::Request& req, net::Reply reply) {
    int user = static_cast<int>(req.a[0]);
    if ((user & ~(MSG_DONTWAIT | MSG_PEEK | MSG_WAITALL | MSG_TRUNC)) != 0) {
      reply.finish(-EOPNOTSUPP);
      return;
    }
    const uint32_t want = static_cast<uint32_t>(std::min<int64_t>(req.a[1], 0xffffffff));
    if (want == 0) {
      reply.finish_helper(0);  // warp_recv()'s other lanes ask 0 bytes; nothing to wait for
      return;
    }
    if (s->pending_error != 0 && (user & MSG_PEEK) == 0) {
      reply.finish(std::exchange(s->pending_error, 0));
      return;
    }
    Op* op = new_op(r, Kind::kRecv, s);
    op->reply = std::move(reply);
    op->want = want;
    op->len = std::min(want, r.buf_bytes);  // one buffer per receive
    op->dst = static_cast<uint64_t>(req.a[2]);
    // MSG_WAITALL is the device's loop (one buffer per call); the kernel sees the rest.
    op->flags = user & ~MSG_WAITALL;
    if (s->nonblock.load(std::memory_order_relaxed)) op->flags |= MSG_DONTWAIT;
    submit_recv(r, op);
  }

  void submit_recv(Ring& r, Op* op) {
    if (faults_ != nullptr && inject(r, FaultOp::kRecv, op)) [[unlikely]] return;
    io_uring_sqe* sqe = r.sqe();
    if (sqe == nullptr) {
      op->reply.finish(-EBUSY);
      retire(r, op);
      return;
    }
    if (op->sock->stream) {
      io_uring_prep_recv(sqe, op->sock->fd, nullptr, op->len, op->flags);
    } else {
      // Datagrams: recvmsg, for the source address.
      op->iov = {nullptr, op->len};
      op->msg = {};
      op->msg.msg_name = &op->addr;
      op->msg.msg_namelen = sizeof op->addr;
      op->msg.msg_iov = &op->iov;
      op->msg.msg_iovlen = 1;
      io_uring_prep_recvmsg(sqe, op->sock->fd, &op->msg, static_cast<unsigned>(op->flags));
    }
    target(sqe, *op->sock);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = kBufGroup;
    io_uring_sqe_set_data(sqe, op);
    if ((op->flags & MSG_DONTWAIT) == 0) op->reply.wait_begin(*this, token(r, kWaitOp, reinterpret_cast<uintptr_t>(op)));
  }

  void on_recv(Ring& r, Op* op, int res, uint32_t flags) {
    const bool has_buf = (flags & IORING_CQE_F_BUFFER) != 0;
    const uint32_t b = has_buf ? (flags >> IORING_CQE_BUFFER_SHIFT) : 0;
    if (op->straggling && (res == -ECANCELED || res == -ENOBUFS) && !op->sock->closed &&
        !op->sock->aborted.load(std::memory_order_relaxed)) {
      // Let go (straggle()) before a byte came: the lane asks again.
      if (has_buf) return_buffer_now(r, b);
      op->reply.finish(net::kAskAgain);
      return retire(r, op);
    }
    if (res == -ENOBUFS && !op->sock->closed) {
      // Every buffer is taken; the bytes stay in the kernel's socket buffer, nothing is
      // lost. While the device holds lent buffers, answer -ENOBUFS and let the device ask
      // again: a lane must not wait here, because the buffers it waits for may be lent to
      // other lanes of its own warp call, which copy out and give them back only once the
      // whole call (this lane included) is answered. The device's recv retries on
      // -ENOBUFS (net/socket.hpp), so the caller never sees it. With nothing lent, every
      // buffer is back in the ring or in a completion this pass is reaping (the kernel
      // failed this recv before recycle() put buffers back): submit it again at once.
      // Parking it until the next recycle() would wait forever, since recycle() runs only
      // while buffers are lent.
      if (!r.lent.empty()) {
        op->reply.finish(-ENOBUFS);
        return retire(r, op);
      }
      submit_recv(r, op);
      return;
    }
    if (res == -ECANCELED && !op->sock->closed && !op->sock->aborted.load(std::memory_order_relaxed)) {
      // Not a cancel of ours: no byte was taken from the socket, so ask again; recv(2)
      // has no ECANCELED to give the lane.
      if (has_buf) return_buffer_now(r, b);
      submit_recv(r, op);
      return;
    }
    if (res > 0 && op->sock->aborted.load(std::memory_order_relaxed) && !op->sock->closed) {
      res = -ECONNABORTED;  // aborted while the bytes were on their way; buffer goes back below
    }
    if (res <= 0) {
      if (has_buf) return_buffer_now(r, b);
      if (res == -EAGAIN && (op->flags & MSG_PEEK) == 0) ready_emptied(*op->sock);
      if (res == -ECANCELED && op->sock->closed) res = -EBADF;
      if (res <= 0 && op->sock->aborted.load(std::memory_order_relaxed) && !op->sock->closed) res = -ECONNABORTED;
      maybe_error(*op->sock, res);
      // An empty datagram still has a source.
      const uint32_t alen = (res == 0 && !op->sock->stream) ? std::min<uint32_t>(op->msg.msg_namelen, net::kMaxAddrBytes) : 0;
      op->reply.set_addr(3, &op->addr, alen, op->sock->stream ? (1ull << 32) : 0);
      op->reply.finish(res);
      return retire(r, op);
    }
    if (!has_buf || b >= r.nbufs) {
      op->reply.finish(-EIO);
      return retire(r, op);
    }
    if ((op->flags & MSG_PEEK) == 0) count_in(*op->sock, static_cast<uint64_t>(res));
    // What the lane gets: at most what it asked for (a longer datagram is cut, as recv(2)
    // cuts it); MSG_TRUNC reports the real length, as on Linux.
    const uint32_t take = std::min<uint32_t>(static_cast<uint32_t>(res), op->len);
    const int answer = (op->flags & MSG_TRUNC) ? res : static_cast<int>(take);
    const uint8_t* bytes = r.bufs_host + static_cast<size_t>(b) * r.buf_bytes;
    const bool more_ok = op->sock->stream && (op->flags & MSG_PEEK) == 0;
    if ((op->flags & MSG_PEEK) == 0 && op->sock->ready.load(std::memory_order_relaxed)) {
      after_receive(*op->sock, static_cast<uint32_t>(res) < op->len);
    }
    if (op->dst != 0 && opt_.deliver_min_bytes != 0 && take >= opt_.deliver_min_bytes &&
        rt_->is_device_memory(reinterpret_cast<void*>(op->dst), more_ok ? op->want : take) &&
        rt_->start_delivery(reinterpret_cast<void*>(op->dst), bytes, take).ok()) {
      // Into the lane's own buffer (a DMA copy on a GPU), nothing lent (docs 12.4, receive
      // step 3a). A stream receive that filled its buffer goes on to fill what the lane
      // asked for with what the socket already holds, in this same call.
      op->done = static_cast<uint32_t>(answer);  // a datagram's: with MSG_TRUNC its length
      if (more_ok && take == op->len) {
        if (gather_more(r, op)) ready_emptied(*op->sock);
      }
      return finish_gather(r, op, b);
    }
    // Lend the buffer: flag first (plain store; the reply's release store publishes it).
    std::atomic_ref<uint32_t>(r.flags_host[b]).store(1, std::memory_order_relaxed);
    r.lent.push_back(b);
    op->reply.set_word(1, r.bufs_dev + static_cast<uint64_t>(b) * r.buf_bytes);
    op->reply.set_word(2, r.flags_dev + static_cast<uint64_t>(b) * sizeof(uint32_t));
    set_recv_addr(*op, 0);
    op->reply.finish(answer);
    retire(r, op);
  }

  // Delivery (docs 12.4, receive 3a): the first buffer filled up, so the socket may hold
  // more. Takes it with non-blocking recv(2) calls straight into the ring's bounce area,
  // piece after piece while the copies of the pieces before run (a piece is reused once
  // its own copy has ended), until the lane's request is full, the socket is empty or
  // deliver_gather_max bytes came in this call. Blocks this service thread for those
  // calls (each brings up to deliver_chunk_bytes); the first receive went through the
  // ring, so the lane never waits here for bytes that are not there. Returns whether it
  // found the socket empty (its readiness word then loses POLLIN).
  bool gather_more(Ring& r, Op* op) {
    if (r.bounce == nullptr) return false;
    const uint64_t limit = std::min<uint64_t>(op->want, static_cast<uint64_t>(op->done) + opt_.deliver_gather_max);
    uint64_t ticket[kMaxBouncePieces] = {};  // the copy out of each piece; 0: none running
    for (uint32_t piece = 0; op->done < limit; piece = (piece + 1) % r.bounce_pieces) {
      if (ticket[piece] != 0) {
        if (!rt_->finish_deliveries(ticket[piece]).ok()) break;  // the device is gone; finish_gather() says so
        ticket[piece] = 0;
      }
      uint8_t* area = r.bounce + static_cast<size_t>(piece) * r.bounce_piece;
      const size_t ask = std::min<uint64_t>(limit - op->done, r.bounce_piece);
      const ssize_t n = ::recv(op->sock->fd, area, ask, MSG_DONTWAIT);
      if (n <= 0) {
        // Empty now, or the end of the stream (the next receive sees it again), or an
        // error: kept for the next receive, since this one answers bytes.
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) op->sock->pending_error = -errno;
        return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
      }
      count_in(*op->sock, static_cast<uint64_t>(n));
      uint64_t t = 0;
      if (!rt_->start_delivery(reinterpret_cast<uint8_t*>(op->dst) + op->done, area, static_cast<size_t>(n), &t).ok()) {
        op->sock->pending_error = -EIO;  // the device is gone: these bytes cannot reach it
        break;
      }
      ticket[piece] = t;
      op->done += static_cast<uint32_t>(n);
      if (static_cast<size_t>(n) < ask) return true;  // the socket is empty
    }
    return false;
  }
  // Waits for the copies, gives receive buffer b back and answers the bytes delivered.
  // All of a delivery happens inside the completion that started it, so no other
  // operation of the ring ever sees b missing from both the buffer ring and `lent`.
  void finish_gather(Ring& r, Op* op, uint32_t b) {
    const bool copied = rt_->finish_deliveries().ok();
    return_buffer_now(r, b);
    if (!copied) {
      op->reply.finish(-EIO);  // the device is gone: the runtime's health() says why
      return retire(r, op);
    }
    set_recv_addr(*op, net::kDelivered);
    op->reply.finish(static_cast<int64_t>(op->done));
    retire(r, op);
  }
  // A successful receive's address word: the stream bit, or a datagram's source; | extra.
  static void set_recv_addr(Op& op, uint64_t extra) {
    const uint32_t alen = op.sock->stream ? 0 : std::min<uint32_t>(op.msg.msg_namelen, net::kMaxAddrBytes);
    op.reply.set_addr(3, &op.addr, alen, (op.sock->stream ? net::kStreamBit : 0) | extra);
  }
  // Bytes the kernel's socket gave this socket's receives (home thread only writes).
  static void count_in(Sock& s, uint64_t n) {
    s.bytes_in.store(s.bytes_in.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }

  // ---- poll on the device (net::kSoPollOnDevice, docs 12.9a) ----
  // A watched socket's word says what a poll(2) of it would: the host keeps it with a
  // multishot IORING_OP_POLL_ADD (POLLIN | POLLPRI | POLLRDHUP) whose completions add
  // events, and takes POLLIN away when a receive shows the socket empty. Bytes that
  // arrive after that receive wake the multishot poll, whose completion comes after the
  // receive's, so the word is never left without POLLIN while bytes wait; the reverse
  // (a wake from before the receive, reaped after it) leaves POLLIN on an empty socket,
  // which the next receive's EAGAIN takes away. So the device can see a socket readable
  // that is empty, as poll(2) itself allows, but never the other way round.

  uint32_t ready_word(const Sock& s) const {
    return std::atomic_ref<uint32_t>(ready_words_[s.fd]).load(std::memory_order_relaxed);
  }
  // Release: a kernel that sees the word sees what the host wrote before (nothing it
  // relies on today; the order is free on x86).
  void ready_store(const Sock& s, uint32_t w) {
    std::atomic_ref<uint32_t>(ready_words_[s.fd]).store(w | net::kReadyWatched, std::memory_order_release);
  }
  // A receive showed the socket empty: no POLLIN, unless the end of the stream or an
  // error is there to be read.
  void ready_emptied(Sock& s) {
    if (!s.ready.load(std::memory_order_relaxed)) return;
    const uint32_t w = ready_word(s);
    if ((w & (POLLRDHUP | POLLHUP | POLLERR)) != 0 || (w & POLLIN) == 0) return;
    ready_store(s, w & ~static_cast<uint32_t>(POLLIN));
  }
  // After a receive that took `bytes_short` (fewer than it asked): a stream is empty then,
  // unless urgent data stopped the read at its mark; a datagram socket is empty when a
  // zero-byte peek finds nothing.
  void after_receive(Sock& s, bool bytes_short) {
    if (s.stream && !s.urgent) {
      if (bytes_short) ready_emptied(s);
      return;
    }
    char c;
    if (::recv(s.fd, &c, s.stream ? 1 : 0, MSG_PEEK | MSG_DONTWAIT) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      ready_emptied(s);
    }
  }

  // Starts keeping the socket's word. Returns 0, ENOPROTOOPT (no words), ENOSPC (the
  // descriptor is past ready_words).
  int watch(Ring& r, const std::shared_ptr<Sock>& s) {
    if (ready_words_ == nullptr) return -ENOPROTOOPT;
    if (s->fd < 0 || static_cast<uint32_t>(s->fd) >= opt_.ready_words) return -ENOSPC;
    if (s->ready.load(std::memory_order_relaxed)) return 0;
    s->ready.store(true, std::memory_order_relaxed);
    if (s->listening.load(std::memory_order_relaxed)) {
      // A listener's readiness is its queue of accepted connections (count_accepted()).
      ready_store(*s, s->accepted.empty() ? 0u : static_cast<uint32_t>(POLLIN));
      return 0;
    }
    ready_store(*s, 0);  // events come with the poll's first completion
    arm_ready(r, s);
    return 0;
  }
  // Stops keeping it: the word goes to 0, so kernels poll the descriptor through the host.
  void unwatch(Ring& r, Sock& s) {
    if (!s.ready.exchange(false, std::memory_order_relaxed)) return;
    std::atomic_ref<uint32_t>(ready_words_[s.fd]).store(0, std::memory_order_release);
    if (s.ready_op != nullptr && !s.closed) {
      if (io_uring_sqe* sqe = r.sqe()) {
        io_uring_prep_cancel64(sqe, reinterpret_cast<uint64_t>(s.ready_op), 0);
        io_uring_sqe_set_data64(sqe, kIgnore);
      }
    }
  }
  void arm_ready(Ring& r, const std::shared_ptr<Sock>& s) {
    if (!s->ready.load(std::memory_order_relaxed) || s->ready_op != nullptr || s->closed) return;
    io_uring_sqe* sqe = r.sqe();
    if (sqe == nullptr) {
      // No room to keep the word: hand the socket's polls back to the host.
      unwatch(r, *s);
      return;
    }
    Op* op = new_op(r, Kind::kReady, s);
    io_uring_prep_poll_multishot(sqe, s->fd, POLLIN | POLLPRI | POLLRDHUP);
    target(sqe, *s);
    io_uring_sqe_set_data(sqe, op);
    s->ready_op = op;
  }
  void on_ready(Ring& r, Op* op, int res, uint32_t flags) {
    std::shared_ptr<Sock> s = op->sock;
    const bool more = (flags & IORING_CQE_F_MORE) != 0;
    if (!more) {
      if (s->ready_op == op) s->ready_op = nullptr;
      retire(r, op);
    }
    if (s->closed || !s->ready.load(std::memory_order_relaxed)) return;
    if (res > 0) {
      const uint32_t ev = static_cast<uint32_t>(res) & (POLLIN | POLLPRI | POLLERR | POLLHUP | POLLRDHUP);
      if ((ev & POLLPRI) != 0) s->urgent = true;
      ready_store(*s, ready_word(*s) | ev);
    }
    if (!more) {
      // The multishot poll ended (the kernel's reasons: an overflowing completion queue,
      // no memory; or an abort's cancel). Say readable, since an event may have come
      // meanwhile, and keep the word again unless the socket was aborted.
      ready_store(*s, ready_word(*s) | POLLIN);
      if (!s->aborted.load(std::memory_order_relaxed)) arm_ready(r, s);
    }
  }
  // setsockopt(kSolGpusock, kSoPollOnDevice), on the home ring.
  void do_poll_on_device(Ring& r, const std::shared_ptr<Sock>& s, net::Request& req, net::Reply reply) {
    int v = 0;
    std::memcpy(&v, req.data.data(), sizeof v);
    if (v == 0) {
      unwatch(r, *s);
      return reply.finish(0);
    }
    if (s->stream && !s->listening.load(std::memory_order_relaxed)) {
      // A stream socket's events mean something once it listens or is connected.
      sockaddr_storage a{};
      socklen_t len = sizeof a;
      if (::getpeername(s->fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) return reply.finish(-ENOTCONN);
    }
    reply.finish(watch(r, s));
  }

  // ---- close ----
  void do_shutdown(Ring& r, const std::shared_ptr<Sock>& s, net::Request& req, net::Reply reply) {
    const int how = static_cast<int>(req.a[0]);
    if (holds_area(r, *s) && (how == SHUT_WR || how == SHUT_RDWR)) {
      // After the taken bytes, as the kernel sends its FIN after what its buffer holds.
      s->shutdown_after = how;
      return reply.finish(0);
    }
    reply.finish(sock_err(::shutdown(s->fd, how)));
  }

  void do_close(Ring& r, const std::shared_ptr<Sock>& s, net::Reply reply) {
    forget(s);
    unwatch(r, *s);  // a poll of the descriptor now goes to the host, which says POLLNVAL
    if (holds_area(r, *s)) {
      // Taken bytes are still going out: answered now, as close(2) returns while the
      // kernel still sends what its buffer holds; the socket closes once they are out.
      s->closing = true;
      return reply.finish(0);
    }
    close_now(r, s);
    reply.finish(0);
  }
  // Takes the socket out of the table: later calls on its descriptor answer EBADF.
  void forget(const std::shared_ptr<Sock>& s) {
    std::lock_guard<std::mutex> lock(table_mu_);
    auto it = table_.find(s->fd);
    if (it != table_.end() && it->second == s) table_.erase(it);
  }
  void close_now(Ring& r, const std::shared_ptr<Sock>& s) {
    forget(s);
    unwatch(r, *s);  // before the number can be reused
    s->closed = true;
    // The in-flight operations complete with -ECANCELED, answered -EBADF. The cancel must
    // reach the kernel while the fixed slot still names the socket: submitted at once.
    end_waiting(r, *s, -EBADF, true);
    if (s->fixed >= 0) {
      int minus_one = -1;
      io_uring_register_files_update(&r.ring, static_cast<unsigned>(s->fixed), &minus_one, 1);
      r.free_fixed.push_back(s->fixed);
      s->fixed = -1;
    }
    // Told while the number is still ours: a socket that reuses it opens after this.
    notify({net::SocketEvent::Kind::kClosed, s->fd, s->domain, s->type, 0, name()});
    // Ops still in flight hold their own reference to the file; the descriptor number is
    // free for reuse now, as after close(2).
    ::close(s->fd);
    nsockets_.fetch_sub(1, std::memory_order_relaxed);
  }

  // ---- poll ----
  void do_poll(Ring& r, net::Request& req, net::Reply reply) {
    const uint32_t n = static_cast<uint32_t>(req.a[0]);
    const int timeout = static_cast<int>(req.a[1]);
    auto* w = new PollWait;
    w->reply = std::move(reply);
    w->fds = req.data;
    w->host.resize(n);
    w->nval.assign(n, 0);
    for (uint32_t i = 0; i < n; ++i) {
      pollfd p;
      std::memcpy(&p, req.data.data() + i * sizeof(pollfd), sizeof p);
      w->host[i] = {-1, p.events, 0};
      // Negative entries are ignored; device descriptors are the device's to answer.
      if (p.fd < 0 || p.fd >= net::kDeviceFdFirst) continue;
      std::shared_ptr<Sock> s = lookup(p.fd);
      if (s == nullptr) {
        w->nval[i] = POLLNVAL;
      } else {
        const int e = s->accept_efd.load(std::memory_order_acquire);
        w->host[i].fd = e >= 0 ? e : p.fd;  // a listener is readable when a connection waits
      }
    }
    if (poll_now(*w) > 0 || timeout == 0) {
      finish_poll(r, w);
      delete w;
      return;
    }
    // Nothing ready: arm a one-shot poll per descriptor, and a timer.
    for (uint32_t i = 0; i < n; ++i) {
      if (w->host[i].fd >= 0) arm_poll(r, w, i);
    }
    if (timeout > 0) {
      // An absolute deadline, so a timer armed again (after a cancel it did not ask for)
      // still ends the wait when the caller's timeout says.
      timespec now{};
      ::clock_gettime(CLOCK_MONOTONIC, &now);
      const int64_t end = now.tv_sec * 1000000000LL + now.tv_nsec + timeout * 1000000LL;
      w->ts.tv_sec = end / 1000000000LL;
      w->ts.tv_nsec = end % 1000000000LL;
      arm_timer(r, w);
    }
    if (w->outstanding == 0) {  // nothing could be armed (or no descriptors and no timer)
      finish_poll(r, w);
      delete w;
      return;
    }
    r.polls.insert(w);
    w->reply.wait_begin(*this, token(r, kWaitPoll, reinterpret_cast<uintptr_t>(w)));
  }

  void delete_poll(Ring& r, PollWait* w) {
    r.polls.erase(w);
    delete w;
  }

  void arm_timer(Ring& r, PollWait* w) {
    if (faults_ != nullptr) [[unlikely]] {
      if (const int e = faults_->on_submit(FaultOp::kPollTimeout)) {
        Op* t = new_op(r, Kind::kPollTimer, nullptr);
        t->wait = w;
        r.injected.emplace_back(t, -e);
        w->outstanding++;
        return;
      }
    }
    io_uring_sqe* sqe = r.sqe();
    if (sqe == nullptr) return;
    Op* t = new_op(r, Kind::kPollTimer, nullptr);
    t->wait = w;
    io_uring_prep_timeout(sqe, &w->ts, 0, IORING_TIMEOUT_ABS);
    io_uring_sqe_set_data(sqe, t);
    w->outstanding++;
  }

  void arm_poll(Ring& r, PollWait* w, uint32_t i) {
    if (faults_ != nullptr) [[unlikely]] {
      if (const int e = faults_->on_submit(FaultOp::kPoll)) {
        Op* a = new_op(r, Kind::kPollArm, nullptr);
        a->wait = w;
        a->index = i;
        r.injected.emplace_back(a, -e);
        w->outstanding++;
        return;
      }
    }
    io_uring_sqe* sqe = r.sqe();
    if (sqe == nullptr) return;
    Op* a = new_op(r, Kind::kPollArm, nullptr);
    a->wait = w;
    a->index = i;
    io_uring_prep_poll_add(sqe, w->host[i].fd, static_cast<unsigned>(w->host[i].events | POLLERR | POLLHUP));
    io_uring_sqe_set_data(sqe, a);
    w->outstanding++;
  }

  // poll(2) with no wait over the entries; fills revents. Returns the ready count.
  static int poll_now(PollWait& w) {
    int ready = ::poll(w.host.data(), w.host.size(), 0);
    if (ready < 0) ready = 0;
    for (size_t i = 0; i < w.host.size(); ++i) {
      if (w.nval[i] != 0) {
        w.host[i].revents = w.nval[i];
        ++ready;
      }
    }
    return ready;
  }

  // Answers the poll: the ready count with every entry's revents, or `error` (< 0) alone.
  void finish_poll(Ring& r, PollWait* w, int error = 0) {
    if (error < 0) {
      w->done = true;
      w->reply.finish(error);
      return;
    }
    int ready = 0;
    for (size_t i = 0; i < w->host.size(); ++i) {
      short rev = w->nval[i] != 0 ? w->nval[i] : (w->host[i].fd >= 0 ? w->host[i].revents : 0);
      if (rev != 0) ++ready;
      std::memcpy(w->fds.data() + i * sizeof(pollfd) + offsetof(pollfd, revents), &rev, sizeof rev);
    }
    w->done = true;
    w->reply.finish(ready);
  }

  void on_poll_event(Ring& r, Op* op, int res) {
    PollWait* w = op->wait;
    const bool timer = op->kind == Kind::kPollTimer;
    const uint32_t index = op->index;
    retire(r, op);
    w->outstanding--;
    if (!w->done) {
      if (timer ? res == -ETIME : res >= 0) {
        if (poll_now(*w) > 0 || timer) {
          finish_poll(r, w);
          cancel_poll_ops(r, w);
        } else {
          arm_poll(r, w, index);  // woke, but someone else took the event: wait again
        }
      } else if (res == -ECANCELED) {
        // Not our cancel (ours come only after the answer): the wait is still wanted, so
        // arm the operation again. Leaving it would end the wait's last operation and
        // leave the lane waiting until shutdown.
        if (timer) {
          arm_timer(r, w);
        } else {
          arm_poll(r, w, index);
        }
      } else {
        // The descriptor went bad under the poll, or the timer failed: report what poll(2)
        // sees now, or the error when nothing is ready.
        const int ready = poll_now(*w);
        finish_poll(r, w, ready > 0 ? 0 : res);
        cancel_poll_ops(r, w);
      }
      if (!w->done && w->outstanding == 0) {
        // Nothing is left to end the wait (a re-arm found no SQE): answer now.
        finish_poll(r, w, poll_now(*w) > 0 ? 0 : -EBUSY);
      }
    }
    if (w->done && w->outstanding == 0) delete_poll(r, w);
  }

  void cancel_poll_ops(Ring& r, PollWait* w) {
    for (Op* op : r.live) {
      if (op->wait != w) continue;
      io_uring_sqe* sqe = r.sqe();
      if (sqe == nullptr) break;
      if (op->kind == Kind::kPollTimer) {
        io_uring_prep_timeout_remove(sqe, reinterpret_cast<uint64_t>(op), 0);
      } else {
        io_uring_prep_poll_remove(sqe, reinterpret_cast<uint64_t>(op));
      }
      io_uring_sqe_set_data64(sqe, kIgnore);
    }
  }

  Options opt_;
  KernelFeatures feat_;
  unsigned setup_flags_;
  bool deferred_taskrun_;
  Runtime* rt_;  // deliver(); alive while any service thread that calls it runs
  uint8_t* staging_;
  uint64_t staging_bytes_;
  std::vector<std::unique_ptr<Ring>> rings_;
  uint8_t* pool_host_ = nullptr;
  uint64_t pool_dev_ = 0;
  size_t slice_bytes_ = 0;
  size_t flags_span_ = 0;
  std::mutex table_mu_;
  std::unordered_map<int, std::shared_ptr<Sock>> table_;
  std::atomic<uint32_t> nsockets_{0};
  std::atomic<bool> draining_{false};  // stop_accepting() was called
  FaultPlan* faults_ = nullptr;        // opt_.faults: null unless a test injects faults
  // The readiness words (docs 12.9a), host view, opt_.ready_words of them; null when poll
  // on the device is off.
  uint32_t* ready_words_ = nullptr;
  std::string ready_note_;
};

const char* op_name(int op) {
  switch (op) {
    case IORING_OP_ACCEPT: return "IORING_OP_ACCEPT (Linux 5.5)";
    case IORING_OP_CONNECT: return "IORING_OP_CONNECT (Linux 5.5)";
    case IORING_OP_SEND: return "IORING_OP_SEND (Linux 5.6)";
    case IORING_OP_RECV: return "IORING_OP_RECV (Linux 5.6)";
    case IORING_OP_SENDMSG: return "IORING_OP_SENDMSG (Linux 5.3)";
    case IORING_OP_RECVMSG: return "IORING_OP_RECVMSG (Linux 5.3)";
    case IORING_OP_POLL_ADD: return "IORING_OP_POLL_ADD (Linux 5.1)";
    case IORING_OP_POLL_REMOVE: return "IORING_OP_POLL_REMOVE (Linux 5.1)";
    case IORING_OP_TIMEOUT: return "IORING_OP_TIMEOUT (Linux 5.4)";
    case IORING_OP_TIMEOUT_REMOVE: return "IORING_OP_TIMEOUT_REMOVE (Linux 5.5)";
    case IORING_OP_ASYNC_CANCEL: return "IORING_OP_ASYNC_CANCEL (Linux 5.5)";
    default: return "an io_uring opcode";
  }
}

// Does the kernel raise IORING_SQ_TASKRUN when a completion waits for us to enter? A
// receive on a socket pair goes async; a write to the other end completes it, and the
// flag must then show without entering the kernel. The service loop relies on the flag to
// skip io_uring_enter on passes with nothing to collect.
bool taskrun_flag_works(io_uring& ring) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return false;
  char buf[4];
  bool seen = false;
  if (io_uring_sqe* sqe = io_uring_get_sqe(&ring)) {
    io_uring_prep_recv(sqe, sv[0], buf, sizeof buf, 0);
    io_uring_sqe_set_data64(sqe, 3);
    io_uring_submit(&ring);
    if (::write(sv[1], "x", 1) == 1) {
      for (int i = 0; i < 1000000 && !seen; ++i) seen = (IO_URING_READ_ONCE(*ring.sq.kflags) & IORING_SQ_TASKRUN) != 0;
    }
    io_uring_cqe* cqe = nullptr;
    __kernel_timespec ts{0, 200000000};
    if (io_uring_wait_cqe_timeout(&ring, &cqe, &ts) == 0) io_uring_cqe_seen(&ring, cqe);
  }
  ::close(sv[0]);
  ::close(sv[1]);
  return seen;
}

}  // namespace

namespace {

// Runs fn on a thread of its own and waits for it. The probes make, use and exit
// io_uring instances; the kernel finishes tearing them down later, and that work can be
// queued to the thread that made them, which interrupts whatever blocking system call
// that thread is in by then (a recv with SO_RCVTIMEO fails with EINTR). The caller's
// thread is an application's thread: keep that away from it. A thread's pending task work
// runs when it exits, so the join leaves nothing behind.
template <typename F>
void on_own_thread(F&& fn) {
  std::thread(std::forward<F>(fn)).join();
}

KernelFeatures probe_here() {
  KernelFeatures f;
  if (FILE* fp = std::fopen("/proc/sys/kernel/io_uring_disabled", "r")) {
    if (std::fscanf(fp, "%d", &f.io_uring_disabled) != 1) f.io_uring_disabled = 0;
    std::fclose(fp);
  }
  io_uring ring{};
  io_uring_params p{};
  const unsigned attempts[] = {
      IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
      IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG, 0};
  int rc = -EINVAL;
  for (unsigned flags : attempts) {
    p = {};
    p.flags = flags;
    rc = io_uring_queue_init_params(8, &ring, &p);
    if (rc == 0) {
      f.single_issuer = (flags & IORING_SETUP_SINGLE_ISSUER) != 0;
      f.defer_taskrun = (flags & IORING_SETUP_DEFER_TASKRUN) != 0;
      f.coop_taskrun = (flags & IORING_SETUP_COOP_TASKRUN) != 0;
      f.taskrun_flag = (flags & IORING_SETUP_TASKRUN_FLAG) != 0;
      break;
    }
    if (rc != -EINVAL) break;  // EPERM, ENOSYS, ENOMEM: no flag helps
  }
  if (rc != 0) {
    f.setup_error = -rc;
    return f;
  }
  if (f.taskrun_flag) f.taskrun_flag = taskrun_flag_works(ring);
  f.ext_arg = (p.features & IORING_FEAT_EXT_ARG) != 0;
  f.fast_poll = (p.features & IORING_FEAT_FAST_POLL) != 0;
  if (io_uring_probe* probe = io_uring_get_probe_ring(&ring)) {
    const int required[] = {IORING_OP_ACCEPT,   IORING_OP_CONNECT,  IORING_OP_SEND,        IORING_OP_RECV,
                            IORING_OP_SENDMSG,  IORING_OP_RECVMSG,  IORING_OP_POLL_ADD,    IORING_OP_POLL_REMOVE,
                            IORING_OP_TIMEOUT,  IORING_OP_TIMEOUT_REMOVE, IORING_OP_ASYNC_CANCEL};
    for (int op : required) {
      if (!io_uring_opcode_supported(probe, op)) f.missing_ops.push_back(op_name(op));
    }
    f.send_zc = io_uring_opcode_supported(probe, IORING_OP_SEND_ZC) != 0;
    io_uring_free_probe(probe);
  } else {
    f.missing_ops.push_back("IORING_REGISTER_PROBE (Linux 5.6)");
  }
  // A provided buffer ring of 8 entries.
  const size_t br_bytes = 4096;
  void* mem = mmap(nullptr, br_bytes, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
  if (mem != MAP_FAILED) {
    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<uint64_t>(mem);
    reg.ring_entries = 8;
    reg.bgid = 7;
    f.buf_ring = io_uring_register_buf_ring(&ring, &reg, 0) == 0;
    if (f.buf_ring) io_uring_unregister_buf_ring(&ring, 7);
    munmap(mem, br_bytes);
  }
  f.sparse_files = io_uring_register_files_sparse(&ring, 8) == 0;
  if (f.sparse_files) io_uring_unregister_files(&ring);
  // Multishot accept and cancel-all-by-descriptor: arm one on a loopback listener, then
  // cancel it by descriptor, and read what the kernel answered.
  int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (lfd >= 0 && ::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::listen(lfd, 1) == 0) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    io_uring_prep_multishot_accept(sqe, lfd, nullptr, nullptr, 0);
    io_uring_sqe_set_data64(sqe, 1);
    io_uring_submit(&ring);
    sqe = io_uring_get_sqe(&ring);
    io_uring_prep_cancel_fd(sqe, lfd, IORING_ASYNC_CANCEL_ALL);
    io_uring_sqe_set_data64(sqe, 2);
    io_uring_submit(&ring);
    int accept_res = 1, cancel_res = 1;
    for (int i = 0; i < 2; ++i) {
      io_uring_cqe* cqe = nullptr;
      __kernel_timespec ts{0, 200000000};
      if (io_uring_wait_cqe_timeout(&ring, &cqe, &ts) != 0) break;
      if (cqe->user_data == 1) accept_res = cqe->res;
      if (cqe->user_data == 2) cancel_res = cqe->res;
      io_uring_cqe_seen(&ring, cqe);
    }
    f.multishot_accept = accept_res == -ECANCELED;
    f.cancel_fd_all = cancel_res >= 1;
  }
  if (lfd >= 0) ::close(lfd);
  io_uring_queue_exit(&ring);
  return f;
}

}  // namespace

FaultPlan::FaultPlan(std::vector<FaultRule> rules, uint64_t seed)
    : rules_(std::move(rules)), seed_(seed), hits_(new std::atomic<uint64_t>[rules_.size() + 1]()) {}

int FaultPlan::on_submit(FaultOp op) {
  const uint32_t k = static_cast<uint32_t>(op);
  // 1-based number of this submission among those of its kind.
  const uint64_t n = submitted_[k].fetch_add(1, std::memory_order_relaxed) + 1;
  for (size_t i = 0; i < rules_.size(); ++i) {
    const FaultRule& rule = rules_[i];
    if (rule.op != op || rule.error <= 0) continue;
    bool hit = rule.nth != 0 && rule.nth == n;
    if (!hit && rule.probability > 0.0) {
      // splitmix64 of (seed, kind, n): the same submissions fail in every run.
      uint64_t x = seed_ ^ (uint64_t{k} << 56) ^ n;
      x += 0x9e3779b97f4a7c15ull;
      x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
      x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
      x ^= x >> 31;
      hit = static_cast<double>(x >> 11) * 0x1.0p-53 < rule.probability;
    }
    if (!hit) continue;
    // Counted per rule, so max_hits holds however many threads submit at once.
    if (hits_[i].fetch_add(1, std::memory_order_relaxed) >= rule.max_hits) continue;
    injected_[k].fetch_add(1, std::memory_order_relaxed);
    return rule.error;
  }
  return 0;
}

KernelFeatures probe_kernel() {
  KernelFeatures f;
  on_own_thread([&f] { f = probe_here(); });
  return f;
}

Status check_features(const KernelFeatures& f) {
  if (f.setup_error != 0) {
    std::string m = "io_uring is not available: io_uring_setup failed with " + std::string(std::strerror(f.setup_error)) + ". ";
    if (f.setup_error == EPERM || f.io_uring_disabled != 0) {
      m += "The kernel setting kernel.io_uring_disabled is " + std::to_string(f.io_uring_disabled) +
           " (2: disabled for everyone; 1: only for members of kernel.io_uring_group). What to do: run "
           "`sysctl -w kernel.io_uring_disabled=0` as root (or add this user to the group named by "
           "kernel.io_uring_group), or, in a container, allow the io_uring_setup/io_uring_enter/"
           "io_uring_register system calls in its seccomp profile.";
    } else if (f.setup_error == ENOSYS) {
      m += "This kernel was built without io_uring (CONFIG_IO_URING) or a seccomp filter hides it. What to do: "
           "run on Linux 6.1 or newer with io_uring enabled.";
    } else if (f.setup_error == ENOMEM) {
      m += "What to do: raise the locked-memory limit (ulimit -l) or free memory.";
    } else {
      m += "What to do: run on Linux 6.1 or newer with io_uring enabled.";
    }
    return Status(f.setup_error, m);
  }
  std::vector<std::string> missing = f.missing_ops;
  if (!f.buf_ring) missing.push_back("provided buffer rings (IORING_REGISTER_PBUF_RING, Linux 5.19)");
  if (!f.multishot_accept) missing.push_back("multishot accept (IORING_ACCEPT_MULTISHOT, Linux 5.19)");
  if (!f.sparse_files) missing.push_back("sparse fixed-file tables (IORING_RSRC_REGISTER_SPARSE, Linux 5.19)");
  if (!f.cancel_fd_all) missing.push_back("cancel by descriptor (IORING_ASYNC_CANCEL_FD|ALL, Linux 5.19)");
  if (!f.ext_arg) missing.push_back("timed waits (IORING_FEAT_EXT_ARG, Linux 5.11)");
  if (!f.fast_poll) missing.push_back("internal poll for sockets (IORING_FEAT_FAST_POLL, Linux 5.7)");
  if (missing.empty()) return {};
  std::string m = "the io_uring backend needs kernel features this kernel lacks:";
  for (const auto& x : missing) m += "\n  - " + x;
  m += "\nWhat to do: run on Linux 6.1 or newer (the first kernel with all of them and DEFER_TASKRUN).";
  return Status(ENOTSUP, m);
}

Result<std::shared_ptr<net::Backend>> create_backend(Runtime& rt, const Options& options) {
  const Options& o = options;
  if (o.recv_buffers == 0 || o.recv_buffers > 32768 || (o.recv_buffers & (o.recv_buffers - 1)) != 0) {
    return Status(EINVAL, "iouring::Options::recv_buffers must be a power of two in 1..32768");
  }
  if (o.recv_buffer_bytes < 4096 || o.recv_buffer_bytes > (16u << 20)) {
    return Status(EINVAL, "iouring::Options::recv_buffer_bytes must be 4 KiB..16 MiB");
  }
  if (o.ring_entries < 8 || o.ring_entries > 32768) return Status(EINVAL, "iouring::Options::ring_entries must be 8..32768");
  if (o.deliver_min_bytes != 0 && o.deliver_chunk_bytes != 0 &&
      (o.deliver_chunks < 2 || o.deliver_chunks > kMaxBouncePieces || o.deliver_chunk_bytes < 4096 ||
       o.deliver_chunk_bytes > (16u << 20))) {
    return Status(EINVAL, "iouring::Options: deliver_chunks must be 2..8 and deliver_chunk_bytes 4 KiB..16 MiB");
  }
  if (o.pull_sends && (o.pull_chunks < 2 || o.pull_chunks > kMaxBouncePieces || o.pull_chunk_bytes < 4096 ||
                       o.pull_chunk_bytes > (16u << 20))) {
    return Status(EINVAL, "iouring::Options: pull_chunks must be 2..8 and pull_chunk_bytes 4 KiB..16 MiB");
  }
  if (o.max_sockets == 0) return Status(EINVAL, "iouring::Options::max_sockets must be at least 1");
  KernelFeatures f;
  on_own_thread([&f, &rt] {
    f = probe_here();
    // Can the staging region be registered as fixed buffers? (Needs the pages pinnable; a
    // failure only turns SEND_ZC off.)
    io_uring ring{};
    if (f.setup_error == 0 && io_uring_queue_init(8, &ring, 0) == 0) {
      iovec iov{rt.staging_host(), rt.staging_size()};
      int rc = io_uring_register_buffers(&ring, &iov, 1);
      f.registered_buffers = rc == 0;
      if (rc != 0) f.registered_buffers_error = std::strerror(-rc);
      io_uring_queue_exit(&ring);
    }
  });
  if (Status s = check_features(f); !s.ok()) return s;
  unsigned flags = f.defer_taskrun ? (IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN)
                   : f.coop_taskrun ? IORING_SETUP_COOP_TASKRUN
                                    : 0u;
  if (f.taskrun_flag) flags |= IORING_SETUP_TASKRUN_FLAG;
  auto be = std::make_shared<IouringBackend>(rt, options, f, flags);
  if (Status s = be->init(rt); !s.ok()) return s;
  return std::shared_ptr<net::Backend>(be);
}

Status enable(Runtime& rt, const Options& options) {
  auto be = create_backend(rt, options);
  if (!be.ok()) return be.status();
  return net::attach(rt, *be);
}

}  // namespace gpusock::iouring
