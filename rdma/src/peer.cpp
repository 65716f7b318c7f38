#include "gpusock/rdma/peer.hpp"

#include <arpa/inet.h>
#include <netdb.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "engine.hpp"

namespace gpusock::rdma {

using internal::Engine;


Result<std::unique_ptr<Peer>> Peer::create(const PeerOptions& options) {
  if (options.send_buffer_bytes < 4 * 4096) return Status(EINVAL, "rdma peer: send_buffer_bytes must be >= 16 KiB");
  internal::EngineOptions eo;
  eo.recv_buffers = options.recv_buffers;
  eo.recv_buffer_bytes = options.recv_buffer_bytes;
  eo.device = options.device;
  eo.memory.alloc = [](size_t bytes, void** host, uint64_t* dev) -> int {
    void* p = std::aligned_alloc(4096, (bytes + 4095) & ~size_t{4095});
    if (p == nullptr) return -ENOMEM;
    std::memset(p, 0, bytes);
    *host = p;
    *dev = reinterpret_cast<uint64_t>(p);
    return 0;
  };
  eo.memory.free = [](void* host, bool) { std::free(host); };
  int err = 0;
  std::string msg;
  std::unique_ptr<Peer> p(new Peer());
  p->e_ = Engine::create(eo, &err, &msg);
  if (!p->e_) return Status(-err, msg);
  p->send_slot_bytes_ = (options.send_buffer_bytes / 4) & ~4095u;
  p->spin_us_ = options.spin_us;
  p->send_buf_ = static_cast<uint8_t*>(std::aligned_alloc(4096, size_t{p->send_slot_bytes_} * 4));
  if (p->send_buf_ == nullptr) return Status(ENOMEM, "rdma peer: no memory for the send buffer");
  p->send_lkey_ = p->e_->register_memory(p->send_buf_, size_t{p->send_slot_bytes_} * 4);
  if (p->send_lkey_ == 0) return Status(errno ? errno : ENOMEM, "rdma peer: could not register the send buffer");
  return p;
}

Peer::~Peer() {
  if (e_) {
    std::lock_guard lock(e_->mu());
    e_->teardown(ECANCELED);
  }
  e_.reset();  // deregisters the send buffer before it is freed
  std::free(send_buf_);
}

template <typename Pred>
bool Peer::run_until(Pred done, int timeout_ms) {
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + std::chrono::milliseconds(timeout_ms);
  auto last_event = start;
  for (;;) {
    uint32_t n;
    {
      std::lock_guard lock(e_->mu());
      n = e_->progress();
      if (done()) return true;
    }
    const auto now = std::chrono::steady_clock::now();
    if (timeout_ms >= 0 && now >= end) return false;
    if (n > 0) {
      last_event = now;
    } else if (now - last_event >= std::chrono::microseconds(spin_us_)) {
      // Idle past the spin time: sleep until a completion or connection event (or 1 ms).
      e_->wait(std::chrono::milliseconds(1));
    }
  }
}

namespace {
int resolve(const std::string& host, uint16_t port, sockaddr_storage* out, socklen_t* len) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (host.empty() ? AI_PASSIVE : 0);
  const std::string ps = std::to_string(port);
  if (getaddrinfo(host.empty() ? nullptr : host.c_str(), ps.c_str(), &hints, &res) != 0 || res == nullptr) {
    return -EHOSTUNREACH;
  }
  std::memcpy(out, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return 0;
}
}  // namespace

int Peer::listen(const std::string& host, uint16_t port, int backlog, uint16_t* bound_port) {
  sockaddr_storage a{};
  socklen_t len = 0;
  if (int r = resolve(host, port, &a, &len); r < 0) return r;
  std::lock_guard lock(e_->mu());
  int fd = e_->socket(a.ss_family, SOCK_STREAM);
  if (fd < 0) return fd;
  int r = e_->bind(fd, reinterpret_cast<sockaddr*>(&a), len);
  if (r == 0) r = e_->listen(fd, backlog);
  if (r == 0 && bound_port != nullptr) {
    sockaddr_storage b{};
    socklen_t bl = 0;
    e_->getsockname(fd, &b, &bl);
    *bound_port = ntohs(reinterpret_cast<sockaddr_in*>(&b)->sin_port);
  }
  if (r < 0) {
    e_->close(fd);
    return r;
  }
  return fd;
}

int Peer::accept(int listener, int timeout_ms) {
  int64_t result = 1;
  bool done = false;
  {
    std::lock_guard lock(e_->mu());
    e_->accept(listener, 0, [&](int64_t fd, const sockaddr_storage&, socklen_t) {
      result = fd;
      done = true;
    });
  }
  if (!run_until([&] { return done; }, timeout_ms)) {
    // The waiter is still queued; closing the listener is the only way to take it back,
    // so a timed-out accept leaves the listener unusable.
    std::lock_guard lock(e_->mu());
    e_->close(listener);
    return done ? static_cast<int>(result) : -ETIMEDOUT;
  }
  return static_cast<int>(result);
}

int Peer::connect(const std::string& host, uint16_t port, int timeout_ms) {
  sockaddr_storage a{};
  socklen_t len = 0;
  if (int r = resolve(host, port, &a, &len); r < 0) return r;
  int fd;
  int64_t result = 1;
  bool done = false;
  {
    std::lock_guard lock(e_->mu());
    fd = e_->socket(a.ss_family, SOCK_STREAM);
    if (fd < 0) return fd;
    e_->connect(fd, reinterpret_cast<sockaddr*>(&a), len, [&](int64_t r) {
      result = r;
      done = true;
    });
  }
  const bool ok = run_until([&] { return done; }, timeout_ms);
  if (!ok || result < 0) {
    std::lock_guard lock(e_->mu());
    e_->close(fd);  // answers the connect EBADF if it is still waiting
    return ok ? static_cast<int>(result) : -ETIMEDOUT;
  }
  return fd;
}

int64_t Peer::send(int fd, const void* data, size_t len) {
  const auto* src = static_cast<const uint8_t*>(data);
  // Four slots of the registered send buffer, used in order: copy into the next free one
  // while earlier ones are on the wire.
  enum : uint8_t { kFree, kBusy, kDone };
  struct Slot {
    uint8_t state = kFree;
    int64_t result = 0;
  };
  Slot slots[4];
  size_t queued = 0, sent = 0;
  int err = 0;
  uint32_t head = 0, tail = 0, in_use = 0;
  for (;;) {
    {
      std::lock_guard lock(e_->mu());
      while (err == 0 && queued < len && in_use < 4) {
        const uint32_t n = static_cast<uint32_t>(std::min<size_t>(len - queued, send_slot_bytes_));
        uint8_t* buf = send_buf_ + size_t{tail} * send_slot_bytes_;
        std::memcpy(buf, src + queued, n);
        Slot* s = &slots[tail];
        s->state = kBusy;
        e_->send(fd, buf, n, send_lkey_, 0, [s](int64_t r) {
          s->result = r;
          s->state = kDone;
        });
        queued += n;
        tail = (tail + 1) % 4;
        ++in_use;
      }
    }
    if (in_use == 0) break;
    Slot* o = &slots[head];
    run_until([&] { return o->state == kDone; }, -1);
    if (o->result < 0) {
      if (err == 0) err = static_cast<int>(-o->result);
    } else {
      sent += static_cast<size_t>(o->result);
    }
    o->state = kFree;
    head = (head + 1) % 4;
    --in_use;
  }
  if (err != 0) return sent > 0 ? static_cast<int64_t>(sent) : -err;
  return static_cast<int64_t>(sent);
}

int64_t Peer::recv(int fd, void* data, size_t len, bool all, int timeout_ms) {
  auto* dst = static_cast<uint8_t*>(data);
  size_t got = 0;
  while (got < len) {
    int64_t result = 0;
    bool done = false;
    {
      std::lock_guard lock(e_->mu());
      const uint32_t want = static_cast<uint32_t>(std::min<size_t>(len - got, 0xffffffffu));
      e_->recv(fd, want, 0, [&](int64_t n, const internal::RecvLend& l) {
        if (n > 0) {
          std::memcpy(dst + got, l.host, static_cast<size_t>(n));
          // Release: the copy is done before the engine may repost the buffer.
          std::atomic_ref<uint32_t>(*l.flag_host).store(0, std::memory_order_release);
        }
        result = n;
        done = true;
      });
    }
    if (!run_until([&] { return done; }, timeout_ms)) {
      std::lock_guard lock(e_->mu());
      e_->shutdown(fd, SHUT_RD);  // ends the waiting recv (answers 0)
      if (!done) return -ETIMEDOUT;
      return got > 0 ? static_cast<int64_t>(got) : -ETIMEDOUT;
    }
    if (result < 0) return got > 0 ? static_cast<int64_t>(got) : result;
    if (result == 0) break;
    got += static_cast<size_t>(result);
    if (!all) break;
  }
  return static_cast<int64_t>(got);
}

int Peer::shutdown_write(int fd) {
  std::lock_guard lock(e_->mu());
  return e_->shutdown(fd, SHUT_WR);
}

int Peer::close(int fd) {
  std::lock_guard lock(e_->mu());
  return e_->close(fd);
}

void Peer::drain(int timeout_ms) { run_until([] { return false; }, timeout_ms); }

}  // namespace gpusock::rdma
