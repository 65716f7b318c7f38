#include "engine.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>

#include "gpusock/rdma/policy.hpp"
#include "gpusock/rdma/wire.hpp"

namespace gpusock::rdma::internal {

namespace {
using Clock = std::chrono::steady_clock;
constexpr int kDeviceFdFirst = 0x40000000;  // net/protocol.hpp: localdevice descriptors

// wr_id: serial << 24 | kind << 20 | index. Completions of a socket destroyed meanwhile
// find no serial and are dropped.
enum WrKind : uint64_t { kWrRecv = 0, kWrData = 1, kWrControl = 2 };
uint64_t wr_id(uint64_t serial, WrKind k, uint32_t idx) { return (serial << 24) | (uint64_t{k} << 20) | idx; }

// A credit-only message goes out once this many credits are owed (at least 2, so two ends
// returning credits to each other cannot ping-pong: each credit message earns one back).
uint32_t credit_threshold(uint32_t nbuf) { return std::max<uint32_t>(2, nbuf / 4); }

}  // namespace

enum class State : uint8_t { kNew, kListening, kResolving, kConnecting, kConnected, kDead };

struct Sock {
  int fd = -1;
  uint64_t serial = 0;
  int domain = AF_INET;
  bool nonblock = false;
  bool user_closed = false;
  bool borrowed_fd = false;  // adopt(): the number belongs to someone else
  State state = State::kNew;
  rdma_cm_id* id = nullptr;
  int error = 0;          // sticky error: the connection's end (ECONNRESET, ...)
  int so_error = 0;       // SO_ERROR: a non-blocking connect's result, read once
  bool bound = false;
  std::map<std::pair<int, int>, std::vector<uint8_t>> opts;
  // listener
  int backlog = 0;
  uint32_t pending = 0;  // requests accepted at the CM, not yet established
  std::deque<std::shared_ptr<Sock>> accepted;
  struct AcceptWaiter {
    int flags;
    AcceptDone done;
    uint64_t id;  // Engine::let_go
  };
  std::deque<AcceptWaiter> accept_waiters;
  uint64_t listener_serial = 0;  // a passive connection: its listener until accepted
  // connect
  Done connect_done;
  // connection
  ibv_qp* qp = nullptr;
  ibv_mr* rx_mr = nullptr;
  uint8_t* rx_host = nullptr;
  uint64_t rx_dev = 0;
  uint32_t* flags_host = nullptr;
  uint64_t flags_dev = 0;
  uint32_t nbuf = 0, bufsz = 0;
  uint32_t cq_share = 0;
  struct Filled {
    uint32_t idx, len, off;
    bool lent = false, peek = false;
    uint32_t lent_n = 0;
  };
  std::deque<Filled> rxq;
  uint32_t lent = 0;
  struct RecvWaiter {
    uint32_t want;
    int flags;
    RecvDone done;
    uint64_t id;
  };
  std::deque<RecvWaiter> recv_waiters;
  int64_t credits = 0;         // messages the peer has room for
  uint32_t peer_bufsz = 0;
  uint32_t to_return = 0;      // buffers reposted, not yet reported to the peer
  struct SendOp {
    const uint8_t* p;
    uint32_t lkey, len, posted = 0, completed = 0;
    Done done;
    uint64_t id = 0;
    bool let_go = false;  // posts nothing more; answered posted | kSentSoFar once completed
  };
  std::deque<SendOp> sendq;
  std::deque<uint32_t> inflight;  // lengths of posted data messages, in order
  uint32_t sq_used = 0, sq_depth = 0;
  bool want_fin = false, fin_posted = false, fin_done = false, peer_fin = false, shut_rd = false;
  bool disconnect_called = false, disconnected = false;
  Clock::time_point linger_deadline{};
  sockaddr_storage peer{};
  socklen_t peer_len = 0;
};

// ---- set-up ------------------------------------------------------------------------------

std::unique_ptr<Engine> Engine::create(const EngineOptions& o, int* err, std::string* msg) {
  std::unique_ptr<Engine> e(new Engine());
  e->o_ = o;
  if (o.recv_buffers < 4 || o.recv_buffers > wire::kMaxRecvBuffers || o.recv_buffer_bytes < 4096 ||
      o.send_queue_depth < 8 || !o.memory.alloc || !o.memory.free) {
    *err = -EINVAL;
    *msg = "rdma: recv_buffers must be 4..65536, recv_buffer_bytes >= 4096, send_queue_depth >= 8";
    return nullptr;
  }
  int n = 0;
  ibv_context** list = rdma_get_devices(&n);
  if (list == nullptr || n == 0) {
    if (list != nullptr) rdma_free_devices(list);
    *err = -ENODEV;
    *msg = "rdma: no RDMA device (ibv_get_device_list found none; load rdma_rxe or siw for a software one)";
    return nullptr;
  }
  for (int i = 0; i < n; ++i) {
    if (o.device.empty() || o.device == ibv_get_device_name(list[i]->device)) {
      e->ctx_ = list[i];
      break;
    }
  }
  rdma_free_devices(list);  // the contexts stay open for the life of the process
  if (e->ctx_ == nullptr) {
    *err = -ENODEV;
    *msg = "rdma: no RDMA device named " + o.device;
    return nullptr;
  }
  ibv_device_attr attr{};
  if (ibv_query_device(e->ctx_, &attr) != 0) {
    *err = -errno;
    *msg = "rdma: ibv_query_device failed";
    return nullptr;
  }
  e->pd_ = ibv_alloc_pd(e->ctx_);
  e->cc_ = ibv_create_comp_channel(e->ctx_);
  e->cq_capacity_ = static_cast<uint32_t>(std::min(attr.max_cqe, 65536));
  e->cq_ = e->cc_ ? ibv_create_cq(e->ctx_, static_cast<int>(e->cq_capacity_), nullptr, e->cc_, 0) : nullptr;
  e->ec_ = rdma_create_event_channel();
  if (!e->pd_ || !e->cc_ || !e->cq_ || !e->ec_) {
    *err = -(errno ? errno : ENOMEM);
    *msg = "rdma: could not make the protection domain, completion queue or event channel";
    return nullptr;
  }
  for (int fd : {e->cc_->fd, e->ec_->fd}) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  ibv_req_notify_cq(e->cq_, 0);
  return e;
}

Engine::~Engine() {
  teardown(ECANCELED);
  for (ibv_mr* mr : mrs_) ibv_dereg_mr(mr);
  if (cq_) ibv_destroy_cq(cq_);
  if (cc_) ibv_destroy_comp_channel(cc_);
  if (pd_) ibv_dealloc_pd(pd_);
  if (ec_) rdma_destroy_event_channel(ec_);
}

uint32_t Engine::register_memory(void* p, size_t len) {
  ibv_mr* mr = ibv_reg_mr(pd_, p, len, IBV_ACCESS_LOCAL_WRITE);
  if (mr == nullptr) return 0;
  mrs_.push_back(mr);
  return mr->lkey;
}

std::string Engine::device_name() const { return ibv_get_device_name(ctx_->device); }

std::shared_ptr<Sock> Engine::find(int fd) const {
  auto it = fds_.find(fd);
  return it == fds_.end() ? nullptr : it->second;
}
std::shared_ptr<Sock> Engine::by_serial(uint64_t s) const {
  auto it = serials_.find(s);
  return it == serials_.end() ? nullptr : it->second;
}
bool Engine::owns(int fd) const { return fds_.count(fd) != 0; }

int Engine::make_fd() {
  if (fds_.size() >= o_.max_sockets) return -EMFILE;
  int fd = ::eventfd(0, EFD_CLOEXEC);
  return fd < 0 ? -errno : fd;
}

int Engine::ensure_id(Sock& s) {
  if (s.id != nullptr) return 0;
  if (rdma_create_id(ec_, &s.id, reinterpret_cast<void*>(s.serial), RDMA_PS_TCP) != 0) return -errno;
  return 0;
}

// ---- calls -------------------------------------------------------------------------------

int Engine::socket(int domain, int type) {
  if (domain != AF_INET && domain != AF_INET6) return -EAFNOSUPPORT;
  if ((type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) != SOCK_STREAM) return -EPROTONOSUPPORT;
  int fd = make_fd();
  if (fd < 0) return fd;
  auto s = std::make_shared<Sock>();
  s->fd = fd;
  s->serial = next_serial_++;
  s->domain = domain;
  s->nonblock = (type & SOCK_NONBLOCK) != 0;
  fds_[fd] = s;
  serials_[s->serial] = s;
  return fd;
}

int Engine::adopt(int fd, int domain, bool nonblock) {
  if (fds_.count(fd) != 0) return -EEXIST;
  if (domain != AF_INET && domain != AF_INET6) return -EAFNOSUPPORT;
  if (fds_.size() >= o_.max_sockets) return -EMFILE;
  auto s = std::make_shared<Sock>();
  s->fd = fd;
  s->borrowed_fd = true;
  s->serial = next_serial_++;
  s->domain = domain;
  s->nonblock = nonblock;
  fds_[fd] = s;
  serials_[s->serial] = s;
  return 0;
}

int Engine::bind(int fd, const sockaddr* a, socklen_t len) {
  auto s = find(fd);
  if (!s) return -EBADF;
  if (s->bound || s->state != State::kNew) return -EINVAL;
  if (len < sizeof(sockaddr_in) || (a->sa_family != AF_INET && a->sa_family != AF_INET6)) return -EINVAL;
  if (int r = ensure_id(*s); r < 0) return r;
  if (rdma_bind_addr(s->id, const_cast<sockaddr*>(a)) != 0) return -errno;
  s->bound = true;
  return 0;
}

int Engine::listen(int fd, int backlog) {
  auto s = find(fd);
  if (!s) return -EBADF;
  if (s->state == State::kListening) {
    s->backlog = std::max(backlog, 1);
    return 0;
  }
  if (s->state != State::kNew) return -EINVAL;
  if (!s->bound) {
    sockaddr_in any{};
    any.sin_family = AF_INET;
    if (int r = bind(fd, reinterpret_cast<sockaddr*>(&any), sizeof any); r < 0) return r;
  }
  s->backlog = std::clamp(backlog, 1, 4096);
  if (rdma_listen(s->id, s->backlog) != 0) return -errno;
  s->state = State::kListening;
  return 0;
}

void Engine::accept(int fd, int flags, AcceptDone done) {
  auto s = find(fd);
  sockaddr_storage none{};
  if (!s) return done(-EBADF, none, 0);
  if (s->state != State::kListening || (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) != 0) return done(-EINVAL, none, 0);
  if (s->accepted.empty() && s->nonblock) return done(-EAGAIN, none, 0);
  s->accept_waiters.push_back({flags, std::move(done), wait_id()});
  serve_accepts(*s);
}

void Engine::serve_accepts(Sock& l) {
  while (!l.accept_waiters.empty() && !l.accepted.empty()) {
    auto c = l.accepted.front();
    l.accepted.pop_front();
    auto w = std::move(l.accept_waiters.front());
    l.accept_waiters.pop_front();
    if (c->state != State::kConnected && c->rxq.empty()) {
      // Reset before it was accepted: Linux hands such a connection out too, and the
      // first recv reports it. Keep it simple and consistent: hand it out.
    }
    int nfd = make_fd();
    if (nfd < 0) {
      c->user_closed = true;
      fail_conn(*c, ECONNABORTED);
      maybe_destroy(c);
      w.done(nfd, c->peer, 0);
      continue;
    }
    c->fd = nfd;
    c->nonblock = (w.flags & SOCK_NONBLOCK) != 0;
    c->listener_serial = 0;
    fds_[nfd] = c;
    w.done(nfd, c->peer, c->peer_len);
  }
}

void Engine::connect(int fd, const sockaddr* a, socklen_t len, Done done) {
  auto s = find(fd);
  if (!s) return done(-EBADF);
  if (s->state == State::kConnected) return done(-EISCONN);
  if (s->state == State::kResolving || s->state == State::kConnecting) return done(-EALREADY);
  if (s->state != State::kNew) return done(-EINVAL);
  if (len < sizeof(sockaddr_in) || (a->sa_family != AF_INET && a->sa_family != AF_INET6)) return done(-EINVAL);
  if (int r = ensure_id(*s); r < 0) return done(r);
  std::memcpy(&s->peer, a, std::min<size_t>(len, sizeof s->peer));
  s->peer_len = len;
  if (rdma_resolve_addr(s->id, nullptr, reinterpret_cast<sockaddr*>(&s->peer), static_cast<int>(o_.resolve_timeout_ms)) != 0) {
    return done(-errno);
  }
  s->state = State::kResolving;
  if (s->nonblock) {
    s->so_error = EINPROGRESS;
    s->connect_done = [s](int64_t r) { s->so_error = static_cast<int>(r < 0 ? -r : 0); };
    return done(-EINPROGRESS);
  }
  s->connect_done = std::move(done);
}

int Engine::setup_connection(Sock& s, uint32_t peer_bufs, uint32_t peer_bytes) {
  // CQ room: every receive and send WR of this QP may complete at once.
  const uint32_t share = o_.recv_buffers + o_.send_queue_depth;
  if (cq_reserved_ + share > cq_capacity_) return -ENOBUFS;
  if (s.id->verbs != ctx_) return -ENODEV;  // reached through another RDMA device
  ibv_qp_init_attr qa{};
  qa.send_cq = cq_;
  qa.recv_cq = cq_;
  qa.qp_type = IBV_QPT_RC;
  qa.sq_sig_all = 1;
  qa.cap.max_send_wr = o_.send_queue_depth;
  qa.cap.max_recv_wr = o_.recv_buffers;
  qa.cap.max_send_sge = 1;
  qa.cap.max_recv_sge = 1;
  if (rdma_create_qp(s.id, pd_, &qa) != 0) return -errno;
  s.qp = s.id->qp;
  s.nbuf = o_.recv_buffers;
  s.bufsz = o_.recv_buffer_bytes;
  s.sq_depth = o_.send_queue_depth;
  // Buffers, then one 32-bit lent flag each, in one allocation and one MR.
  const size_t flags_off = size_t{s.nbuf} * s.bufsz;
  void* host = nullptr;
  uint64_t dev = 0;
  if (int r = o_.memory.alloc(flags_off + size_t{s.nbuf} * 4, &host, &dev); r < 0) return r;
  s.rx_host = static_cast<uint8_t*>(host);
  s.rx_dev = dev;
  s.flags_host = reinterpret_cast<uint32_t*>(s.rx_host + flags_off);
  s.flags_dev = dev + flags_off;
  s.rx_mr = ibv_reg_mr(pd_, s.rx_host, flags_off, IBV_ACCESS_LOCAL_WRITE);
  if (s.rx_mr == nullptr) return -errno;
  s.cq_share = share;
  cq_reserved_ += share;
  for (uint32_t i = 0; i < s.nbuf; ++i) post_recv(s, i);
  s.credits = peer_bufs;
  s.peer_bufsz = peer_bytes;
  return 0;
}

void Engine::post_recv(Sock& s, uint32_t idx) {
  ibv_sge sge{reinterpret_cast<uint64_t>(s.rx_host + size_t{idx} * s.bufsz), s.bufsz, s.rx_mr->lkey};
  ibv_recv_wr wr{};
  ibv_recv_wr* bad = nullptr;
  wr.wr_id = wr_id(s.serial, kWrRecv, idx);
  wr.sg_list = &sge;
  wr.num_sge = 1;
  if (ibv_post_recv(s.qp, &wr, &bad) != 0) fail_conn(s, ECONNRESET);
}

void Engine::send(int fd, const uint8_t* p, uint32_t len, uint32_t lkey, int flags, Done done) {
  auto s = find(fd);
  if (!s) return done(-EBADF);
  if ((flags & ~(MSG_DONTWAIT | MSG_NOSIGNAL | MSG_MORE | MSG_EOR)) != 0) return done(-EOPNOTSUPP);
  if (s->state != State::kConnected) {
    if (s->error != 0) return done(-s->error);
    if (s->state == State::kListening || s->state == State::kNew) return done(-ENOTCONN);
    if (s->state == State::kDead) return done(-EPIPE);
    return done(-EAGAIN);  // still connecting (non-blocking)
  }
  if (s->want_fin) return done(-EPIPE);
  if (len == 0) return done(0);
  const bool nb = s->nonblock || (flags & MSG_DONTWAIT) != 0;
  if (nb && s->credits <= wire::kReservedCredits + 1) return done(-EAGAIN);
  s->sendq.push_back({p, lkey, len, 0, 0, std::move(done), wait_id()});
  pump(*s);
}

void Engine::pump(Sock& s) {
  if (s.state != State::kConnected || s.qp == nullptr) return;
  auto post = [&](WrKind k, const uint8_t* p, uint32_t len, uint32_t lkey, wire::MsgType t) -> bool {
    ibv_sge sge{reinterpret_cast<uint64_t>(p), len, lkey};
    ibv_send_wr wr{};
    ibv_send_wr* bad = nullptr;
    wr.wr_id = wr_id(s.serial, k, 0);
    wr.opcode = IBV_WR_SEND_WITH_IMM;
    wr.sg_list = len ? &sge : nullptr;
    wr.num_sge = len ? 1 : 0;
    wr.imm_data = htonl(wire::encode_imm(t, s.to_return));
    if (ibv_post_send(s.qp, &wr, &bad) != 0) {
      fail_conn(s, ECONNRESET);
      return false;
    }
    s.to_return -= std::min(s.to_return, wire::kMaxCreditsPerImm);
    --s.credits;
    ++s.sq_used;
    return true;
  };
  // Data: keeps kReservedCredits + 1 back for credit and FIN messages, and 2 send WRs.
  for (auto& op : s.sendq) {
    if (op.let_go) break;  // let go part-way: what follows waits until it is answered
    while (op.posted < op.len) {
      if (s.credits <= int64_t{wire::kReservedCredits} + 1 || s.sq_used + 2 >= s.sq_depth) {
        ++counters_.send_blocked_on_credits;
        goto data_done;
      }
      const uint32_t n = std::min(op.len - op.posted, s.peer_bufsz);
      if (!post(kWrData, op.p + op.posted, n, op.lkey, wire::MsgType::kData)) return;
      s.inflight.push_back(n);
      op.posted += n;
      ++counters_.data_messages_sent;
    }
  }
data_done:
  const bool all_posted = s.sendq.empty() || s.sendq.back().posted == s.sendq.back().len;
  if (s.want_fin && !s.fin_posted && all_posted && s.sq_used < s.sq_depth) {
    // FIN may take the last credit, or go without one: the peer reposts control buffers
    // at once, and the QP's infinite RNR retry covers the moment in between.
    if (!post(kWrControl, nullptr, 0, 0, wire::MsgType::kFin)) return;
    s.fin_posted = true;
    ++counters_.fins_sent;
  }
  if (s.to_return >= credit_threshold(s.nbuf) && s.sq_used < s.sq_depth) {
    if (!post(kWrControl, nullptr, 0, 0, wire::MsgType::kCredit)) return;
    ++counters_.credit_messages_sent;
  }
}

void Engine::recv(int fd, uint32_t want, int flags, RecvDone done) {
  auto s = find(fd);
  if (!s) return done(-EBADF, {});
  if ((flags & ~(MSG_DONTWAIT | MSG_PEEK | MSG_WAITALL | MSG_TRUNC)) != 0) return done(-EOPNOTSUPP, {});
  if (s->state == State::kNew || s->state == State::kListening) return done(-ENOTCONN, {});
  if (want == 0) return done(0, {});
  s->recv_waiters.push_back({want, flags, std::move(done), wait_id()});
  serve_recvs(*s);
}

void Engine::serve_recvs(Sock& s) {
  while (!s.recv_waiters.empty()) {
    auto& w = s.recv_waiters.front();
    const bool peek = (w.flags & MSG_PEEK) != 0;
    // The first buffer not lent out. A buffer lent in part blocks the ones after it: its
    // rest comes first, once the reader gives it back.
    Sock::Filled* f = nullptr;
    bool blocked = false;
    for (auto& e : s.rxq) {
      if (e.lent) {
        if (e.peek || e.off + e.lent_n < e.len) {
          blocked = true;
          break;
        }
        continue;
      }
      f = &e;
      break;
    }
    if (peek && s.lent > 0) blocked = true;
    if (blocked) return;
    if (f != nullptr) {
      const uint32_t n = std::min(w.want, f->len - f->off);
      f->lent = true;
      f->peek = peek;
      f->lent_n = n;
      if (s.lent++ == 0) ++lent_socks_;
      // Relaxed: the reply that carries the flag's address publishes this store (the
      // hostcall answer is a release store the reader acquires before it reads the flag).
      std::atomic_ref<uint32_t>(s.flags_host[f->idx]).store(1, std::memory_order_relaxed);
      RecvLend l;
      const size_t off = size_t{f->idx} * s.bufsz + f->off;
      l.host = s.rx_host + off;
      l.device = s.rx_dev + off;
      l.flag_host = &s.flags_host[f->idx];
      l.flag_device = s.flags_dev + 4ull * f->idx;
      auto done = std::move(w.done);
      s.recv_waiters.pop_front();
      done(n, l);
      continue;
    }
    // Nothing buffered (or all of it lent).
    bool any_lent = s.lent > 0;
    int64_t r;
    if (any_lent) return;  // more may follow what the reader holds; wait for it
    if (s.shut_rd || s.peer_fin) {
      r = 0;
    } else if (s.error != 0) {
      r = -s.error;
    } else if (s.state == State::kDead) {
      r = 0;
    } else if (s.nonblock || (w.flags & MSG_DONTWAIT) != 0 || s.state != State::kConnected) {
      r = s.state == State::kConnected ? -EAGAIN : -ENOTCONN;
      if (s.state == State::kResolving || s.state == State::kConnecting) r = -EAGAIN;
    } else {
      return;
    }
    auto done = std::move(w.done);
    s.recv_waiters.pop_front();
    done(r, {});
  }
}

int Engine::shutdown(int fd, int how) {
  auto s = find(fd);
  if (!s) return -EBADF;
  if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR) return -EINVAL;
  if (s->state != State::kConnected && s->state != State::kDead) return -ENOTCONN;
  if (how != SHUT_WR) {
    s->shut_rd = true;
    serve_recvs(*s);
  }
  if (how != SHUT_RD) {
    s->want_fin = true;
    pump(*s);
  }
  return 0;
}

int Engine::close(int fd) {
  auto s = find(fd);
  if (!s) return -EBADF;
  fds_.erase(fd);
  if (!s->borrowed_fd) ::close(fd);
  s->fd = -1;
  s->user_closed = true;
  sockaddr_storage none{};
  for (auto& w : s->accept_waiters) w.done(-EBADF, none, 0);
  s->accept_waiters.clear();
  for (auto& w : s->recv_waiters) w.done(-EBADF, {});
  s->recv_waiters.clear();
  if (s->connect_done) {
    auto d = std::move(s->connect_done);
    s->connect_done = nullptr;
    d(-EBADF);
  }
  // Unposted sends end here; posted ones finish with their completions.
  for (auto it = s->sendq.begin(); it != s->sendq.end();) {
    if (it->posted == 0) {
      it->done(-EBADF);
      it = s->sendq.erase(it);
    } else {
      it->len = it->posted;
      ++it;
    }
  }
  if (s->state == State::kListening) {
    for (auto& c : s->accepted) {
      c->user_closed = true;
      fail_conn(*c, ECONNABORTED);
      maybe_destroy(c);
    }
    s->accepted.clear();
    s->state = State::kDead;
  }
  if (s->state == State::kConnected) {
    s->want_fin = true;
    s->linger_deadline = Clock::now() + std::chrono::milliseconds(o_.linger_ms);
    pump(*s);
  }
  maybe_destroy(s);
  return 0;
}

int Engine::getsockname(int fd, sockaddr_storage* a, socklen_t* len) {
  auto s = find(fd);
  if (!s) return -EBADF;
  *a = {};
  if (s->id != nullptr) {
    sockaddr* la = rdma_get_local_addr(s->id);
    *len = la->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
    std::memcpy(a, la, *len);
    if (a->ss_family == 0) a->ss_family = static_cast<sa_family_t>(s->domain);
  } else {
    a->ss_family = static_cast<sa_family_t>(s->domain);
    *len = s->domain == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  }
  return 0;
}

int Engine::getpeername(int fd, sockaddr_storage* a, socklen_t* len) {
  auto s = find(fd);
  if (!s) return -EBADF;
  if (s->state != State::kConnected && s->state != State::kDead) return -ENOTCONN;
  *a = s->peer;
  *len = s->peer_len;
  return 0;
}

int Engine::setsockopt(int fd, int level, int name, std::span<const uint8_t> v) {
  auto s = find(fd);
  if (!s) return -EBADF;
  // Options that mean something to a TCP socket are accepted and kept (so code written
  // for TCP runs unchanged) but change nothing here: RC QPs have their own reliability,
  // timeouts and no Nagle. The transport option is the routing backend's.
  const bool ok = (level == SOL_SOCKET && (name == SO_REUSEADDR || name == SO_REUSEPORT || name == SO_KEEPALIVE ||
                                           name == SO_RCVBUF || name == SO_SNDBUF || name == SO_LINGER ||
                                           name == SO_RCVLOWAT || name == SO_PRIORITY)) ||
                  (level == IPPROTO_TCP && (name == TCP_NODELAY || name == TCP_CORK || name == TCP_QUICKACK ||
                                            name == TCP_KEEPIDLE || name == TCP_KEEPINTVL || name == TCP_KEEPCNT ||
                                            name == TCP_USER_TIMEOUT)) ||
                  (level == kSolGpusock && name == kSoTransport);
  if (!ok) return -ENOPROTOOPT;
  if (v.size() < sizeof(int)) return -EINVAL;
  s->opts[{level, name}] = std::vector<uint8_t>(v.begin(), v.end());
  return 0;
}

int Engine::getsockopt(int fd, int level, int name, uint8_t* out, uint32_t* len) {
  auto s = find(fd);
  if (!s) return -EBADF;
  int v = 0;
  if (level == SOL_SOCKET && name == SO_ERROR) {
    v = s->so_error == EINPROGRESS ? 0 : s->so_error;
    if (s->so_error != EINPROGRESS) s->so_error = 0;
  } else if (level == SOL_SOCKET && name == SO_TYPE) {
    v = SOCK_STREAM;
  } else if (level == SOL_SOCKET && name == SO_DOMAIN) {
    v = s->domain;
  } else if (level == SOL_SOCKET && name == SO_PROTOCOL) {
    v = 0;
  } else if (level == SOL_SOCKET && name == SO_ACCEPTCONN) {
    v = s->state == State::kListening;
  } else if (level == kSolGpusock && name == kSoTransport) {
    v = static_cast<int>(Transport::kRdma);
  } else if (auto it = s->opts.find({level, name}); it != s->opts.end()) {
    const uint32_t n = std::min<uint32_t>(*len, static_cast<uint32_t>(it->second.size()));
    std::memcpy(out, it->second.data(), n);
    *len = n;
    return 0;
  } else if (level == SOL_SOCKET || level == IPPROTO_TCP) {
    v = 0;  // an option that can be set, not set yet
    const int probe = setsockopt(fd, level, name, std::span<const uint8_t>(reinterpret_cast<uint8_t*>(&v), sizeof v));
    s->opts.erase({level, name});
    if (probe < 0) return probe;
  } else {
    return -ENOPROTOOPT;
  }
  const uint32_t n = std::min<uint32_t>(*len, sizeof v);
  std::memcpy(out, &v, n);
  *len = n;
  return 0;
}

int Engine::fcntl(int fd, int cmd, int64_t arg) {
  auto s = find(fd);
  if (!s) return -EBADF;
  if (cmd == F_GETFL) return O_RDWR | (s->nonblock ? O_NONBLOCK : 0);
  if (cmd == F_SETFL) {
    s->nonblock = (arg & O_NONBLOCK) != 0;
    return 0;
  }
  return -EINVAL;
}

short Engine::revents_of(const Sock& s, short events) const {
  short r = 0;
  if (s.state == State::kListening) {
    if (!s.accepted.empty()) r |= POLLIN;
    return r & (events | POLLERR | POLLHUP);
  }
  bool readable = s.shut_rd || s.peer_fin || s.error != 0 || s.state == State::kDead;
  for (auto& e : s.rxq) readable |= !e.lent;
  if (readable) r |= POLLIN;
  if (s.state == State::kConnected && !s.want_fin && s.credits > int64_t{wire::kReservedCredits} + 1) r |= POLLOUT;
  if (s.error != 0) r |= POLLERR;
  if (s.state == State::kDead || s.error != 0) r |= POLLHUP;
  return r & (events | POLLERR | POLLHUP);
}

void Engine::poll(std::span<pollfd> fds, int timeout_ms, short foreign, Done done) {
  int ready = 0;
  for (auto& p : fds) {
    p.revents = 0;
    if (p.fd < 0 || p.fd >= kDeviceFdFirst) continue;  // localdevice: the device answers those
    auto s = find(p.fd);
    p.revents = s ? revents_of(*s, p.events) : foreign;
    ready += p.revents != 0;
  }
  if (ready > 0 || timeout_ms == 0) return done(ready);
  PollWait w{fds, foreign, Clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0)), timeout_ms < 0,
             std::move(done), wait_id()};
  polls_.push_back(std::move(w));
}

void Engine::let_go(int fd, uint64_t id) {
  if (fd < 0) {
    for (auto it = polls_.begin(); it != polls_.end(); ++it) {
      if (it->id != id) continue;
      auto d = std::move(it->done);
      polls_.erase(it);
      return d(kLetGo);
    }
    return;
  }
  auto s = find(fd);
  if (!s) return;
  for (auto it = s->recv_waiters.begin(); it != s->recv_waiters.end(); ++it) {
    if (it->id != id) continue;
    auto d = std::move(it->done);
    s->recv_waiters.erase(it);
    d(kLetGo, {});
    return serve_recvs(*s);  // a waiter behind it may be answerable
  }
  for (auto it = s->accept_waiters.begin(); it != s->accept_waiters.end(); ++it) {
    if (it->id != id) continue;
    auto d = std::move(it->done);
    s->accept_waiters.erase(it);
    return d(kLetGo, sockaddr_storage{}, 0);
  }
  for (auto it = s->sendq.begin(); it != s->sendq.end(); ++it) {
    if (it->id != id || it->let_go || it->posted == it->len) continue;  // all posted: it ends by itself
    if (it->posted == 0) {
      auto d = std::move(it->done);
      s->sendq.erase(it);
      d(kLetGo);
      return pump(*s);
    }
    it->let_go = true;  // answered once what it posted completed (poll_cq), or now
    if (it == s->sendq.begin() && answer_front_send(*s)) pump(*s);
    return;
  }
}

bool Engine::answer_front_send(Sock& s) {
  auto& op = s.sendq.front();
  const bool whole = op.completed >= op.len;
  if (!whole && !(op.let_go && op.completed >= op.posted)) return false;
  auto d = std::move(op.done);
  const int64_t v = whole ? int64_t{op.len} : int64_t{op.completed} | kSentSoFar;
  s.sendq.pop_front();
  d(v);
  return true;
}

void Engine::check_polls(bool timers) {
  const auto now = Clock::now();
  for (auto it = polls_.begin(); it != polls_.end();) {
    int ready = 0;
    for (auto& p : it->fds) {
      p.revents = 0;
      if (p.fd < 0 || p.fd >= kDeviceFdFirst) continue;
      auto s = find(p.fd);
      p.revents = s ? revents_of(*s, p.events) : it->foreign;
      ready += p.revents != 0;
    }
    if (ready > 0 || (timers && !it->forever && now >= it->deadline)) {
      auto d = std::move(it->done);
      it = polls_.erase(it);
      d(ready);
    } else {
      ++it;
    }
  }
}

// ---- progress ----------------------------------------------------------------------------

void Engine::fail_conn(Sock& s, int err) {
  if (s.state == State::kDead) return;
  if (s.error == 0 && !(s.peer_fin && err == ECONNRESET && s.fin_done)) s.error = err;
  s.state = State::kDead;
  for (auto& op : s.sendq) {
    op.done(op.completed > 0 ? op.completed : -(err == ECONNRESET ? ECONNRESET : EPIPE));
  }
  s.sendq.clear();
  s.inflight.clear();
  if (s.connect_done) {
    auto d = std::move(s.connect_done);
    s.connect_done = nullptr;
    d(-err);
  }
  if (s.id != nullptr && s.qp != nullptr && !s.disconnect_called) {
    s.disconnect_called = true;
    rdma_disconnect(s.id);  // moves the QP to error: posted WRs flush
  }
  serve_recvs(s);
}

void Engine::destroy(Sock& s) {
  if (s.id != nullptr) {
    if (s.qp != nullptr) rdma_destroy_qp(s.id);
    rdma_destroy_id(s.id);
    s.id = nullptr;
    s.qp = nullptr;
  }
  if (s.rx_mr) ibv_dereg_mr(s.rx_mr);
  s.rx_mr = nullptr;
  if (s.rx_host) o_.memory.free(s.rx_host, s.lent > 0);
  s.rx_host = nullptr;
  if (s.lent > 0) --lent_socks_;
  s.lent = 0;
  cq_reserved_ -= s.cq_share;
  s.cq_share = 0;
  serials_.erase(s.serial);
}

void Engine::maybe_destroy(const std::shared_ptr<Sock>& s) {
  if (!s->user_closed) return;
  const bool quiet = s->state != State::kConnected || (s->fin_done && s->sendq.empty());
  if (s->state == State::kConnected && quiet && !s->disconnect_called) {
    s->disconnect_called = true;
    rdma_disconnect(s->id);
  }
  // A connection that said FIN waits for the DISCONNECTED event (or the linger timer), so
  // the peer's CM exchange finishes before the id goes away.
  if (s->state == State::kConnected && !s->disconnected && Clock::now() < s->linger_deadline) return;
  destroy(*s);
}

uint32_t Engine::poll_cq() {
  ibv_wc wc[32];
  uint32_t total = 0;
  for (;;) {
    const int n = ibv_poll_cq(cq_, 32, wc);
    if (n <= 0) break;
    total += static_cast<uint32_t>(n);
    for (int i = 0; i < n; ++i) {
      const uint64_t serial = wc[i].wr_id >> 24;
      const auto kind = static_cast<WrKind>((wc[i].wr_id >> 20) & 0xf);
      const uint32_t idx = static_cast<uint32_t>(wc[i].wr_id & 0xfffff);
      auto s = by_serial(serial);
      if (!s) continue;
      if (kind != kWrRecv) --s->sq_used;
      if (wc[i].status != IBV_WC_SUCCESS) {
        if (wc[i].status != IBV_WC_WR_FLUSH_ERR) fail_conn(*s, ECONNRESET);
        continue;
      }
      if (kind == kWrRecv) {
        wire::Imm imm;
        if (!(wc[i].wc_flags & IBV_WC_WITH_IMM) || wire::decode_imm(ntohl(wc[i].imm_data), &imm) < 0) {
          fail_conn(*s, ECONNRESET);
          continue;
        }
        s->credits += imm.credits;
        if (imm.type == wire::MsgType::kData && wc[i].byte_len > 0 && !s->shut_rd) {
          s->rxq.push_back({idx, wc[i].byte_len, 0});
          ++counters_.data_messages_received;
        } else {
          // Control messages (and data after SHUT_RD) give their buffer back at once.
          if (imm.type == wire::MsgType::kFin) s->peer_fin = true;
          post_recv(*s, idx);
          ++s->to_return;
        }
        serve_recvs(*s);
        pump(*s);
      } else if (kind == kWrData) {
        if (!s->inflight.empty()) {
          const uint32_t n = s->inflight.front();
          s->inflight.pop_front();
          if (!s->sendq.empty()) {
            s->sendq.front().completed += n;
            answer_front_send(*s);
          }
        }
        pump(*s);
      } else {
        if (s->fin_posted && !s->fin_done && s->sq_used == 0) s->fin_done = true;
        if (s->fin_posted) s->fin_done = s->fin_done || s->sq_used == 0;
        pump(*s);
      }
      maybe_destroy(s);
    }
  }
  return total;
}

uint32_t Engine::recycle() {
  if (lent_socks_ == 0) return 0;
  uint32_t n = 0;
  std::vector<std::shared_ptr<Sock>> touched;
  for (auto& [serial, s] : serials_) {
    if (s->lent == 0) continue;
    bool any = false;
    for (auto it = s->rxq.begin(); it != s->rxq.end();) {
      // Acquire, pairs with the reader's release store of 0: its loads from the buffer
      // are done before the buffer is posted to the QP again.
      if (it->lent && std::atomic_ref<uint32_t>(s->flags_host[it->idx]).load(std::memory_order_acquire) == 0) {
        it->lent = false;
        any = true;
        ++n;
        if (--s->lent == 0) --lent_socks_;
        if (!it->peek) it->off += it->lent_n;
        it->peek = false;
        if (it->off >= it->len) {
          if (s->qp != nullptr && s->state == State::kConnected) {
            post_recv(*s, it->idx);
            ++s->to_return;
          }
          it = s->rxq.erase(it);
          continue;
        }
      }
      ++it;
    }
    if (any) touched.push_back(s);
  }
  for (auto& s : touched) {
    serve_recvs(*s);
    pump(*s);
    maybe_destroy(s);
  }
  return n;
}

void Engine::handle_cm(rdma_cm_event* ev) {
  const auto serial = reinterpret_cast<uint64_t>(ev->id->context);
  switch (ev->event) {
    case RDMA_CM_EVENT_CONNECT_REQUEST: {
      auto l = by_serial(reinterpret_cast<uint64_t>(ev->listen_id->context));
      uint8_t rej[wire::kRejectBytes];
      wire::Hello peer;
      const auto& cp = ev->param.conn;
      if (!l || l->state != State::kListening || l->user_closed) {
        rdma_reject(ev->id, nullptr, 0);
        rdma_destroy_id(ev->id);
        return;
      }
      if (wire::decode_hello(cp.private_data, cp.private_data_len, &peer) < 0) {
        wire::encode_reject(wire::RejectReason::kBadHello, rej);
        rdma_reject(ev->id, rej, sizeof rej);
        rdma_destroy_id(ev->id);
        return;
      }
      if (l->accepted.size() + l->pending >= static_cast<size_t>(l->backlog)) {
        wire::encode_reject(wire::RejectReason::kBacklogFull, rej);
        rdma_reject(ev->id, rej, sizeof rej);
        rdma_destroy_id(ev->id);
        return;
      }
      auto c = std::make_shared<Sock>();
      c->serial = next_serial_++;
      c->id = ev->id;
      c->id->context = reinterpret_cast<void*>(c->serial);
      c->domain = l->domain;
      c->listener_serial = l->serial;
      c->state = State::kConnecting;
      sockaddr* pa = rdma_get_peer_addr(ev->id);
      c->peer_len = pa->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
      std::memcpy(&c->peer, pa, c->peer_len);
      serials_[c->serial] = c;
      if (setup_connection(*c, peer.recv_buffers, peer.recv_buffer_bytes) < 0) {
        wire::encode_reject(wire::RejectReason::kNoResources, rej);
        rdma_reject(ev->id, rej, sizeof rej);
        c->user_closed = true;
        c->state = State::kDead;
        destroy(*c);
        return;
      }
      uint8_t hello[wire::kHelloBytes];
      wire::encode_hello({wire::kVersion, 0, c->nbuf, c->bufsz}, hello);
      rdma_conn_param p{};
      p.private_data = hello;
      p.private_data_len = sizeof hello;
      p.retry_count = 7;
      p.rnr_retry_count = 7;  // infinite: a control message never fails for want of a buffer
      if (rdma_accept(ev->id, &p) != 0) {
        c->user_closed = true;
        c->state = State::kDead;
        destroy(*c);
        return;
      }
      ++l->pending;
      return;
    }
    default:
      break;
  }
  auto s = by_serial(serial);
  if (!s) return;
  switch (ev->event) {
    case RDMA_CM_EVENT_ADDR_RESOLVED:
      if (rdma_resolve_route(s->id, static_cast<int>(o_.resolve_timeout_ms)) != 0) fail_conn(*s, errno);
      break;
    case RDMA_CM_EVENT_ROUTE_RESOLVED: {
      if (int r = setup_connection(*s, 0, 0); r < 0) {
        fail_conn(*s, -r);
        break;
      }
      uint8_t hello[wire::kHelloBytes];
      wire::encode_hello({wire::kVersion, 0, s->nbuf, s->bufsz}, hello);
      rdma_conn_param p{};
      p.private_data = hello;
      p.private_data_len = sizeof hello;
      p.retry_count = 7;
      p.rnr_retry_count = 7;
      if (rdma_connect(s->id, &p) != 0) {
        fail_conn(*s, errno);
        break;
      }
      s->state = State::kConnecting;
      break;
    }
    case RDMA_CM_EVENT_ESTABLISHED: {
      if (s->listener_serial != 0) {
        // Passive side: the Hello came with the request.
        s->state = State::kConnected;
        auto l = by_serial(s->listener_serial);
        if (!l || l->user_closed) {
          s->user_closed = true;
          fail_conn(*s, ECONNABORTED);
          maybe_destroy(s);
          break;
        }
        --l->pending;
        l->accepted.push_back(s);
        serve_accepts(*l);
        break;
      }
      wire::Hello peer;
      const auto& cp = ev->param.conn;
      if (wire::decode_hello(cp.private_data, cp.private_data_len, &peer) < 0) {
        s->state = State::kConnected;
        fail_conn(*s, EPROTO);
        break;
      }
      s->credits = peer.recv_buffers;
      s->peer_bufsz = peer.recv_buffer_bytes;
      s->state = State::kConnected;
      if (s->connect_done) {
        auto d = std::move(s->connect_done);
        s->connect_done = nullptr;
        d(0);
      }
      pump(*s);
      break;
    }
    case RDMA_CM_EVENT_REJECTED:
      fail_conn(*s, ECONNREFUSED);
      break;
    case RDMA_CM_EVENT_ADDR_ERROR:
      fail_conn(*s, EHOSTUNREACH);
      break;
    case RDMA_CM_EVENT_ROUTE_ERROR:
      fail_conn(*s, ENETUNREACH);
      break;
    case RDMA_CM_EVENT_UNREACHABLE:
      fail_conn(*s, ETIMEDOUT);
      break;
    case RDMA_CM_EVENT_CONNECT_ERROR:
      fail_conn(*s, ECONNREFUSED);
      break;
    case RDMA_CM_EVENT_DISCONNECTED:
    case RDMA_CM_EVENT_DEVICE_REMOVAL:
      // Completions already in the CQ (a FIN among them) come first.
      poll_cq();
      s->disconnected = true;
      if (s->listener_serial != 0) {
        if (auto l = by_serial(s->listener_serial); l && l->pending > 0) --l->pending;
        s->user_closed = true;
      }
      fail_conn(*s, s->peer_fin ? EPIPE : ECONNRESET);
      if (s->peer_fin && s->error == EPIPE) s->error = 0;  // orderly: reads see EOF
      serve_recvs(*s);
      break;
    case RDMA_CM_EVENT_TIMEWAIT_EXIT:
    default:
      break;
  }
  maybe_destroy(s);
}

uint32_t Engine::cm_events() {
  uint32_t n = 0;
  rdma_cm_event* ev = nullptr;
  while (rdma_get_cm_event(ec_, &ev) == 0) {
    // Copy what handle_cm needs, then ack first: rdma_destroy_id waits for its events'
    // acks, and handle_cm may destroy the id. Private data lives in the event, so the
    // handler runs on a copy with its own buffer.
    rdma_cm_event copy = *ev;
    uint8_t pd[256];
    const uint8_t len = ev->param.conn.private_data_len;
    if (ev->param.conn.private_data != nullptr && len > 0) {
      std::memcpy(pd, ev->param.conn.private_data, len);
      copy.param.conn.private_data = pd;
    }
    rdma_ack_cm_event(ev);
    handle_cm(&copy);
    ++n;
  }
  return n;
}

uint32_t Engine::progress() {
  if (torn_down_) return 0;
  uint32_t n = poll_cq();
  pollfd p{ec_->fd, POLLIN, 0};
  if (::poll(&p, 1, 0) > 0) n += cm_events();
  n += recycle();
  const auto now = Clock::now();
  const bool timers = now >= next_timer_;
  if (timers) {
    next_timer_ = now + std::chrono::milliseconds(1);
    std::vector<std::shared_ptr<Sock>> lingering;
    for (auto& [serial, s] : serials_) {
      if (s->user_closed && s->state == State::kConnected && now >= s->linger_deadline) lingering.push_back(s);
    }
    for (auto& s : lingering) {
      fail_conn(*s, ETIMEDOUT);
      destroy(*s);
    }
  }
  if (!polls_.empty() && (n > 0 || timers)) check_polls(timers);
  return n;
}

void Engine::wait(std::chrono::nanoseconds max) {
  {
    // Arm the CQ, then look once more: a completion that arrived after the caller's last
    // progress() and before the arming raises no event, and would otherwise wait out `max`.
    std::lock_guard lock(mu_);
    if (torn_down_) return;
    ibv_req_notify_cq(cq_, 0);
    if (progress() > 0) return;
  }
  pollfd p[2] = {{cc_->fd, POLLIN, 0}, {ec_->fd, POLLIN, 0}};
  // ppoll, not poll: the service threads park for park_interval (50 us by default), and
  // poll(2)'s millisecond timeout would round that to 0 (a busy loop) or 1 ms.
  const int64_t ns = std::max<int64_t>(0, max.count());
  timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
  if (::ppoll(p, 2, &ts, nullptr) > 0 && (p[0].revents & POLLIN)) {
    std::lock_guard lock(mu_);
    ibv_cq* cq = nullptr;
    void* ctx = nullptr;
    while (ibv_get_cq_event(cc_, &cq, &ctx) == 0) ibv_ack_cq_events(cq, 1);
  }
}

void Engine::teardown(int err) {
  if (torn_down_) return;
  torn_down_ = true;
  sockaddr_storage none{};
  for (auto& w : polls_) w.done(-err);
  polls_.clear();
  auto all = serials_;
  for (auto& [serial, s] : all) {
    for (auto& w : s->accept_waiters) w.done(-err, none, 0);
    s->accept_waiters.clear();
    for (auto& w : s->recv_waiters) w.done(-err, {});
    s->recv_waiters.clear();
    for (auto& op : s->sendq) op.done(-err);
    s->sendq.clear();
    if (s->connect_done) {
      auto d = std::move(s->connect_done);
      s->connect_done = nullptr;
      d(-err);
    }
    if (s->fd >= 0 && !s->borrowed_fd) ::close(s->fd);
    s->fd = -1;
    destroy(*s);
  }
  fds_.clear();
  serials_.clear();
}

}  // namespace gpusock::rdma::internal
