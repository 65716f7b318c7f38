// The routing backend: each stream socket is served by the TCP (io_uring) backend or the
// RDMA backend, chosen at bind/listen/connect by the socket's kSoTransport option or the
// policy. A socket starts as a TCP socket, which reserves its descriptor number; when
// RDMA is chosen, the RDMA backend adopts that number and the TCP socket stays open,
// unused, until the descriptor is closed. So descriptor numbers never collide between
// the two, and a kernel never sees a number change.
#include <fcntl.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "backend_impl.hpp"
#include "gpusock/rdma/backend.hpp"

namespace gpusock::rdma {
namespace {

class Router : public net::Backend {
 public:
  Router(std::shared_ptr<net::Backend> tcp, std::shared_ptr<internal::RdmaBackend> rdma, Policy policy)
      : tcp_(std::move(tcp)), rdma_(std::move(rdma)), policy_(std::move(policy)) {}

  const char* name() const override { return "router"; }
  std::string describe() const override {
    return "router: policy \"" + policy_.to_string() + "\" (default tcp); " + tcp_->describe() + "; " +
           rdma_->describe();
  }

  // Sends from device memory reach whichever part owns the socket; the RDMA part answers
  // them kCopyInstead (its messages go out of the registered staging region).
  bool pulls() const override { return tcp_->pulls(); }

  void serve(net::Request& req, net::Reply reply) override {
    const int fd = req.fd;
    if (req.op == net::Op::kSocket) return serve_socket(req, std::move(reply));
    if (req.op == net::Op::kPoll) return serve_poll(req, std::move(reply));
    if (rdma_->owns(fd)) {
      if (req.op == net::Op::kClose) return close_rdma(req, std::move(reply));
      return rdma_->serve(req, std::move(reply));
    }
    std::unique_lock lock(mu_);
    auto it = pending_.find(fd);
    if (it == pending_.end()) {
      lock.unlock();
      if (req.op == net::Op::kGetsockopt && req.a[0] == kSolGpusock && req.a[1] == kSoTransport) {
        return answer_int(reply, static_cast<int>(Transport::kTcp));
      }
      return tcp_->serve(req, std::move(reply));
    }
    Pending& p = it->second;
    switch (req.op) {
      case net::Op::kSetsockopt:
        if (req.a[0] == kSolGpusock && req.a[1] == kSoTransport) {
          int v = -1;
          if (req.data.size() >= sizeof v) std::memcpy(&v, req.data.data(), sizeof v);
          if (v < 0 || v > static_cast<int>(Transport::kRdma)) return reply.finish(-EINVAL);
          p.forced = static_cast<Transport>(v);
          return reply.finish(0);
        }
        p.opts.emplace_back(static_cast<int>(req.a[0]), static_cast<int>(req.a[1]),
                            std::vector<uint8_t>(req.data.begin(), req.data.end()));
        break;
      case net::Op::kGetsockopt:
        if (req.a[0] == kSolGpusock && req.a[1] == kSoTransport) return answer_int(reply, static_cast<int>(p.forced));
        break;
      case net::Op::kFcntl:
        if (req.a[0] == F_SETFL) p.nonblock = (req.a[1] & O_NONBLOCK) != 0;
        break;
      case net::Op::kBind:
      case net::Op::kConnect:
      case net::Op::kListen: {
        Transport t = p.forced;
        if (t == Transport::kAuto) {
          sockaddr_in any{};
          any.sin_family = AF_INET;
          const bool has_addr = req.op != net::Op::kListen;
          const auto* a = has_addr ? reinterpret_cast<const sockaddr*>(req.data.data()) : reinterpret_cast<sockaddr*>(&any);
          const socklen_t len = has_addr ? static_cast<socklen_t>(req.data.size()) : sizeof any;
          t = policy_.choose(a, len, req.op == net::Op::kConnect ? Direction::kConnect : Direction::kListen);
        }
        Pending moved = std::move(p);
        pending_.erase(it);
        lock.unlock();
        if (t != Transport::kRdma) return tcp_->serve(req, std::move(reply));
        if (int r = rdma_->adopt(fd, moved.domain, moved.nonblock); r < 0) return reply.finish(r);
        for (auto& [level, name, v] : moved.opts) rdma_->replay_option(fd, level, name, v);
        return rdma_->serve(req, std::move(reply));
      }
      case net::Op::kClose:
        pending_.erase(it);
        break;
      default:
        break;
    }
    lock.unlock();
    tcp_->serve(req, std::move(reply));
  }

  uint32_t poll(uint32_t thread) override { return tcp_->poll(thread) + rdma_->poll(thread); }
  // Parks in the TCP backend (io_uring_enter); RDMA completions are reaped on the next
  // pass, at most park_interval later.
  void park(uint32_t thread, std::chrono::nanoseconds max) override { tcp_->park(thread, max); }
  void thread_stop(uint32_t thread) override {
    rdma_->thread_stop(thread);
    tcp_->thread_stop(thread);
  }

  // The control plane's view goes to both parts. A socket the RDMA backend adopted keeps
  // its TCP placeholder open (see the top of this file), so list_sockets() shows it as
  // the TCP backend's; aborting it reaches whichever part owns the descriptor.
  std::vector<net::SocketInfo> list_sockets() override { return tcp_->list_sockets(); }
  int abort_socket(int fd) override { return rdma_->owns(fd) ? rdma_->abort_socket(fd) : tcp_->abort_socket(fd); }
  int stop_accepting() override {
    const int t = tcp_->stop_accepting();
    const int r = rdma_->stop_accepting();
    if (t < 0 && r < 0) return t;
    return (t > 0 ? t : 0) + (r > 0 ? r : 0);
  }
  void set_observer(std::shared_ptr<net::SocketObserver> observer) override {
    tcp_->set_observer(observer);
    rdma_->set_observer(std::move(observer));
  }

 private:
  struct Pending {
    int domain = AF_INET;
    bool nonblock = false;
    Transport forced = Transport::kAuto;
    std::vector<std::tuple<int, int, std::vector<uint8_t>>> opts;  // replayed on the RDMA socket
  };

  static void answer_int(net::Reply& reply, int v) {
    reply.set_addr(1, &v, sizeof v);
    reply.finish(0);
  }

  void serve_socket(net::Request& req, net::Reply reply) {
    const int domain = static_cast<int>(req.a[0]);
    const int type = static_cast<int>(req.a[1]);
    if ((type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) != SOCK_STREAM) return tcp_->serve(req, std::move(reply));
    auto outer = std::make_shared<net::Reply>(std::move(reply));
    tcp_->serve(req, net::Reply::to_host([this, outer, domain, type](int64_t r, const uint64_t*) {
      if (r >= 0) {
        std::lock_guard lock(mu_);
        pending_[static_cast<int>(r)] = Pending{domain, (type & SOCK_NONBLOCK) != 0, Transport::kAuto, {}};
      }
      outer->finish(r);
    }));
  }

  void close_rdma(net::Request& req, net::Reply reply) {
    const int fd = req.fd;
    auto outer = std::make_shared<net::Reply>(std::move(reply));
    // RDMA first: it lets go of the number; then the TCP socket that reserved it.
    rdma_->serve(req, net::Reply::to_host([this, fd, outer](int64_t r, const uint64_t*) {
      net::Request c;
      c.op = net::Op::kClose;
      c.fd = fd;
      tcp_->serve(c, net::Reply::to_host(nullptr));
      outer->finish(r);
    }));
  }

  void serve_poll(net::Request& req, net::Reply reply) {
    const size_t n = req.data.size() / sizeof(pollfd);
    const auto* fds = reinterpret_cast<const pollfd*>(req.data.data());
    size_t on_rdma = 0, on_tcp = 0;
    for (size_t i = 0; i < n; ++i) {
      if (fds[i].fd < 0 || fds[i].fd >= net::kDeviceFdFirst) continue;
      (rdma_->owns(fds[i].fd) ? on_rdma : on_tcp) += 1;
    }
    if (on_rdma > 0 && on_tcp > 0) return start_mixed_poll(req, std::move(reply));
    if (on_rdma > 0) return rdma_->serve(req, std::move(reply));
    tcp_->serve(req, std::move(reply));
  }

  // ---- a poll over TCP and RDMA descriptors at once ----
  //
  // Neither backend can wait on the other's descriptors, so the router alternates: the
  // RDMA part is looked at without waiting (the engine answers a 0 ms poll at once, under
  // its lock), then the TCP part waits at most kMixedSliceMs in io_uring; the first part
  // that finds something ready ends the wait after the other part is looked at once more,
  // so one answer reports every ready entry. A TCP event ends the wait at once, an RDMA one
  // within about a slice. Each part sees a copy of the lane's array in which the other
  // part's entries are -1 (ignored): the TCP backend still holds an RDMA socket's
  // placeholder descriptor (see the top of this file), whose own readiness means nothing.
  static constexpr int kMixedSliceMs = 1;

  struct MixedPoll {
    net::Reply reply;
    std::span<uint8_t> out;         // the lane's array: revents are answered in place
    std::vector<pollfd> tcp, rdma;  // each part's copy
    std::chrono::steady_clock::time_point deadline;
    bool forever = false;
  };

  void start_mixed_poll(net::Request& req, net::Reply reply) {
    auto m = std::make_shared<MixedPoll>();
    const size_t n = req.data.size() / sizeof(pollfd);
    m->reply = std::move(reply);
    m->out = req.data;
    m->tcp.resize(n);
    std::memcpy(m->tcp.data(), req.data.data(), n * sizeof(pollfd));
    m->rdma = m->tcp;
    for (size_t i = 0; i < n; ++i) {
      const int fd = m->tcp[i].fd;
      if (fd < 0 || fd >= net::kDeviceFdFirst) continue;  // both parts ignore these alike
      (rdma_->owns(fd) ? m->tcp[i] : m->rdma[i]).fd = -1;
    }
    const int timeout = static_cast<int>(req.a[1]);
    m->forever = timeout < 0;
    m->deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(std::max(timeout, 0));
    mixed_round(m);
  }

  // A poll request over `fds` (a part's copy), answered in place.
  static net::Request poll_request(std::vector<pollfd>& fds, int timeout_ms) {
    net::Request r;
    r.op = net::Op::kPoll;
    r.data = std::span<uint8_t>(reinterpret_cast<uint8_t*>(fds.data()), fds.size() * sizeof(pollfd));
    r.a[0] = static_cast<int64_t>(fds.size());
    r.a[1] = timeout_ms;
    return r;
  }

  // The RDMA part with a 0 ms timeout: its ready count, or -errno.
  int64_t poll_rdma_now(MixedPoll& m) {
    net::Request r = poll_request(m.rdma, 0);
    int64_t result = -EIO;
    // Answered before serve_with returns: a 0 ms engine poll never waits.
    rdma_->serve_with(r, net::Reply::to_host([&result](int64_t v, const uint64_t*) { result = v; }), 0);
    return result;
  }

  // One round: RDMA now, then TCP for at most a slice (without waiting when RDMA found
  // something or the deadline has passed).
  void mixed_round(const std::shared_ptr<MixedPoll>& m) {
    const int64_t on_rdma = poll_rdma_now(*m);
    if (on_rdma < 0) return m->reply.finish(on_rdma);
    int slice = 0;
    if (on_rdma == 0) {
      const auto left = m->deadline - std::chrono::steady_clock::now();
      slice = m->forever ? kMixedSliceMs
                         : static_cast<int>(std::clamp<int64_t>(
                               std::chrono::ceil<std::chrono::milliseconds>(left).count(), 0, kMixedSliceMs));
    }
    net::Request r = poll_request(m->tcp, slice);
    // The answer comes on this service thread's io_uring pass (at once when it need not
    // wait); the state lives in `m` until then.
    tcp_->serve(r, net::Reply::to_host([this, m, on_rdma, slice](int64_t on_tcp, const uint64_t*) {
      if (on_tcp < 0) return m->reply.finish(on_tcp);
      if (on_rdma > 0) return mixed_answer(*m);
      const bool over = slice == 0 || (!m->forever && std::chrono::steady_clock::now() >= m->deadline);
      if (on_tcp == 0 && !over) return mixed_round(m);
      // Look at the RDMA part once more, so that the answer has both parts' events.
      if (const int64_t again = poll_rdma_now(*m); again < 0) return m->reply.finish(again);
      mixed_answer(*m);
    }));
  }

  // Writes both parts' revents into the lane's array; answers the number of entries with
  // any.
  static void mixed_answer(MixedPoll& m) {
    int ready = 0;
    for (size_t i = 0; i < m.tcp.size(); ++i) {
      pollfd p;
      std::memcpy(&p, m.out.data() + i * sizeof(pollfd), sizeof p);
      p.revents = static_cast<short>(m.tcp[i].revents | m.rdma[i].revents);
      ready += p.revents != 0;
      std::memcpy(m.out.data() + i * sizeof(pollfd), &p, sizeof p);
    }
    m.reply.finish(ready);
  }

  std::shared_ptr<net::Backend> tcp_;
  std::shared_ptr<internal::RdmaBackend> rdma_;
  Policy policy_;
  std::mutex mu_;
  std::unordered_map<int, Pending> pending_;  // stream sockets whose transport is not chosen yet
};

}  // namespace

Result<std::shared_ptr<net::Backend>> create_router(std::shared_ptr<net::Backend> tcp, std::shared_ptr<net::Backend> rdma,
                                                    Policy policy) {
  auto r = std::dynamic_pointer_cast<internal::RdmaBackend>(rdma);
  if (!tcp || !r) return Status(EINVAL, "rdma: create_router needs a TCP backend and a backend from rdma::create_backend");
  return std::shared_ptr<net::Backend>(std::make_shared<Router>(std::move(tcp), std::move(r), std::move(policy)));
}

Status enable_with_policy(Runtime& rt, Policy policy, const Options& options, const iouring::Options& tcp_options) {
  auto tcp = iouring::create_backend(rt, tcp_options);
  if (!tcp.ok()) return tcp.status();
  auto rdma = create_backend(rt, options);
  if (!rdma.ok()) return rdma.status();
  auto router = create_router(*tcp, *rdma, std::move(policy));
  if (!router.ok()) return router.status();
  return net::attach(rt, *router);
}

}  // namespace gpusock::rdma
