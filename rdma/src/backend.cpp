// The RDMA backend: socket hostcalls served by the connection engine (engine.hpp) on the
// hostcall service threads. One engine per runtime under one mutex: the thread that gets
// the lock in its pass reaps completions and events for every connection; serve() takes
// the same lock, so a call and the completions it waits for never race.
#include <dlfcn.h>
#include <infiniband/verbs.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "backend_impl.hpp"
#include "gpusock/hostcall/service_hook.hpp"

namespace gpusock::rdma {

bool device_present() {
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list != nullptr) ibv_free_device_list(list);
  return n > 0;
}

namespace internal {
namespace {

// Asks the CUDA driver (loaded at run time: rdma/ does not link CUDA) whether GPU `ordinal`
// can export its memory as a dma-buf, the first half of what GPUDirect RDMA through
// ibv_reg_dmabuf_mr needs. Returns 1 yes, 0 no, -1 could not ask.
int cuda_dmabuf_supported(int ordinal) {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return -1;
  using Init = int (*)(unsigned);
  using Get = int (*)(int*, int);
  using Attr = int (*)(int*, int, int);
  auto init = reinterpret_cast<Init>(dlsym(lib, "cuInit"));
  auto get = reinterpret_cast<Get>(dlsym(lib, "cuDeviceGet"));
  auto attr = reinterpret_cast<Attr>(dlsym(lib, "cuDeviceGetAttribute"));
  constexpr int kDmaBufSupported = 124;  // CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED (CUDA 11.7)
  int dev = 0, v = 0, r = -1;
  if (init && get && attr && init(0) == 0 && get(&dev, ordinal) == 0 && attr(&v, kDmaBufSupported, dev) == 0) {
    r = v != 0;
  }
  dlclose(lib);
  return r;
}

}  // namespace

RdmaBackend::RdmaBackend(Runtime& rt, std::unique_ptr<Engine> engine, uint32_t staging_lkey, std::string gpudirect)
    : rt_(rt),
      engine_(std::move(engine)),
      staging_lkey_(staging_lkey),
      staging_(rt.staging_host()),
      staging_size_(rt.staging_size()),
      gpudirect_(std::move(gpudirect)) {}

std::string RdmaBackend::describe() const {
  const auto& o = engine_->options();
  return "rdma: device " + engine_->device_name() + ", RC QPs through rdma_cm, " + std::to_string(o.recv_buffers) +
         " x " + std::to_string(o.recv_buffer_bytes / 1024) + " KiB receive buffers per connection (pinned, lent to the device), staging (" +
         std::to_string(staging_size_ >> 20) + " MiB) registered as one MR; " + gpudirect_;
}

static_assert(kLetGo == net::kAskAgain && kSentSoFar == net::kSendMore, "engine.hpp's let-go answers are net/'s");

void RdmaBackend::serve(net::Request& req, net::Reply reply) { serve_with(req, std::move(reply), POLLNVAL); }

// ---- stragglers (net/backend.hpp) ----
// A token is (fd + 1) << 40 | the engine's wait id (fd -1: a poll).
namespace {
constexpr uint64_t kIdBits = 40, kIdMask = (uint64_t{1} << kIdBits) - 1;
uint64_t wait_token(int fd, uint64_t id) { return (static_cast<uint64_t>(fd + 1) << kIdBits) | (id & kIdMask); }
}  // namespace

void RdmaBackend::straggle(uint64_t token) {
  std::lock_guard lock(engine_->mu());
  engine_->let_go(static_cast<int>(token >> kIdBits) - 1, token & kIdMask);
}

// Engine lock held, right after an engine call that may have gone to wait: a lane whose
// call's other lanes already waited too long for it is let go at once; any other that
// waits is marked waiting in this backend, for the sweep.
void RdmaBackend::track(Waiting& w, int fd) {
  if (w.answered) return;
  const uint64_t id = engine_->last_wait();
  if (w.reply.straggling()) return engine_->let_go(fd, id);
  w.reply.wait_begin(*this, wait_token(fd, id));
}

void RdmaBackend::serve_with(net::Request& req, net::Reply reply, short foreign) {
  std::lock_guard lock(engine_->mu());
  Engine& e = *engine_;
  const int fd = req.fd;
  switch (req.op) {
    case net::Op::kSocket:
      return reply.finish(e.socket(static_cast<int>(req.a[0]), static_cast<int>(req.a[1])));
    case net::Op::kBind:
      return reply.finish(e.bind(fd, reinterpret_cast<const sockaddr*>(req.data.data()),
                                 static_cast<socklen_t>(req.data.size())));
    case net::Op::kListen:
      return reply.finish(e.listen(fd, static_cast<int>(req.a[0])));
    case net::Op::kAccept: {
      auto w = std::make_shared<Waiting>(std::move(reply));
      e.accept(fd, static_cast<int>(req.a[0]), [w](int64_t nfd, const sockaddr_storage& a, socklen_t len) {
        if (nfd >= 0) w->reply.set_addr(1, &a, std::min<socklen_t>(len, net::kMaxAddrBytes));
        w->answer(nfd);
      });
      return track(*w, fd);
    }
    case net::Op::kConnect: {
      auto r = std::make_shared<net::Reply>(std::move(reply));
      return e.connect(fd, reinterpret_cast<const sockaddr*>(req.data.data()), static_cast<socklen_t>(req.data.size()),
                       [r](int64_t v) { r->finish(v); });
    }
    case net::Op::kSend: {
      if (req.src != 0) return reply.finish(net::kCopyInstead);  // out of staging only
      const uint32_t addr_len = static_cast<uint32_t>(static_cast<uint64_t>(req.a[0]) >> 32);
      if (addr_len != 0) return reply.finish(e.owns(fd) ? -EISCONN : -EBADF);
      const uint8_t* p = req.data.data();
      // Sends post straight from the lane's staging pages (one MR over the arena); they
      // stay the lane's until the reply, which comes after the last completion.
      if (!req.data.empty() && (p < staging_ || p + req.data.size() > staging_ + staging_size_)) {
        return reply.finish(-EFAULT);
      }
      auto w = std::make_shared<Waiting>(std::move(reply));
      e.send(fd, p, static_cast<uint32_t>(req.data.size()), staging_lkey_, static_cast<int>(req.a[0] & 0xffffffff),
             [w](int64_t v) { w->answer(v); });
      return track(*w, fd);
    }
    case net::Op::kRecv: {
      auto w = std::make_shared<Waiting>(std::move(reply));
      const uint32_t want = static_cast<uint32_t>(std::min<int64_t>(req.a[1], 0xffffffff));
      e.recv(fd, want, static_cast<int>(req.a[0]), [w](int64_t n, const RecvLend& l) {
        if (n > 0) {
          w->reply.set_word(1, l.device);
          w->reply.set_word(2, l.flag_device);
        }
        w->reply.set_addr(3, nullptr, 0, 1ull << 32);  // a stream: MSG_WAITALL loops on the device
        w->answer(n);
      });
      return track(*w, fd);
    }
    case net::Op::kShutdown:
      return reply.finish(e.shutdown(fd, static_cast<int>(req.a[0])));
    case net::Op::kClose:
      return reply.finish(e.close(fd));
    case net::Op::kSetsockopt:
      return reply.finish(e.setsockopt(fd, static_cast<int>(req.a[0]), static_cast<int>(req.a[1]), req.data));
    case net::Op::kGetsockopt: {
      uint8_t v[net::kMaxOptBytes] = {};
      uint32_t len = static_cast<uint32_t>(std::min<int64_t>(std::max<int64_t>(req.a[2], 0), net::kMaxOptBytes));
      const int r = e.getsockopt(fd, static_cast<int>(req.a[0]), static_cast<int>(req.a[1]), v, &len);
      if (r == 0) reply.set_addr(1, v, len);
      return reply.finish(r);
    }
    case net::Op::kGetsockname:
    case net::Op::kGetpeername: {
      sockaddr_storage a{};
      socklen_t len = 0;
      const int r = req.op == net::Op::kGetsockname ? e.getsockname(fd, &a, &len) : e.getpeername(fd, &a, &len);
      if (r == 0) reply.set_addr(1, &a, std::min<socklen_t>(len, net::kMaxAddrBytes));
      return reply.finish(r);
    }
    case net::Op::kPoll: {
      auto w = std::make_shared<Waiting>(std::move(reply));
      std::span<pollfd> fds(reinterpret_cast<pollfd*>(req.data.data()), req.data.size() / sizeof(pollfd));
      e.poll(fds, static_cast<int>(req.a[1]), foreign, [w](int64_t v) { w->answer(v); });
      return track(*w, -1);
    }
    case net::Op::kFcntl:
      return reply.finish(e.fcntl(fd, static_cast<int>(req.a[0]), req.a[1]));
  }
  reply.finish(-ENOSYS);
}

uint32_t RdmaBackend::poll(uint32_t) {
  // Before the lock: the sweep's straggle() takes it.
  const uint32_t work = net::sweep_stragglers();
  std::unique_lock lock(engine_->mu(), std::try_to_lock);
  if (!lock.owns_lock()) return work;  // another service thread is reaping
  return work + engine_->progress();
}

void RdmaBackend::park(uint32_t, std::chrono::nanoseconds max) { engine_->wait(max); }

void RdmaBackend::thread_stop(uint32_t) {
  std::lock_guard lock(engine_->mu());
  engine_->teardown(ECANCELED);
}

}  // namespace internal

Result<std::shared_ptr<net::Backend>> create_backend(Runtime& rt, const Options& options) {
  internal::EngineOptions eo;
  eo.recv_buffers = options.recv_buffers;
  eo.recv_buffer_bytes = options.recv_buffer_bytes;
  eo.send_queue_depth = options.send_queue_depth;
  eo.max_sockets = options.max_sockets;
  eo.resolve_timeout_ms = options.resolve_timeout_ms;
  eo.linger_ms = options.linger_ms;
  eo.device = options.device;
  Runtime* rtp = &rt;
  eo.memory.alloc = [rtp](size_t bytes, void** host, uint64_t* dev) -> int {
    auto m = rtp->mapped_alloc(bytes);
    if (!m.ok()) return -m.status().code();
    *host = m->host;
    *dev = reinterpret_cast<uint64_t>(m->device);
    return 0;
  };
  // A buffer still lent to a kernel is freed with the runtime, after kernels stop.
  eo.memory.free = [rtp](void* host, bool lent) {
    if (lent) rtp->mapped_free_at_exit(host);
    else rtp->mapped_free(host);
  };
  int err = 0;
  std::string msg;
  auto engine = internal::Engine::create(eo, &err, &msg);
  if (!engine) return Status(-err, msg);
  const uint32_t lkey = engine->register_memory(rt.staging_host(), rt.staging_size());
  if (lkey == 0) {
    return Status(errno ? errno : ENOMEM,
                  "rdma: could not register the staging arena as a memory region (ulimit -l too low? "
                  "memlock must cover the staging arena)");
  }
  // GPUDirect RDMA would register GPU memory through a dma-buf (cuMemGetHandleForAddressRange
  // + ibv_reg_dmabuf_mr). What can be known without trying is whether the GPU can export
  // one; whether the NIC accepts it only a registration would tell, and no machine this is
  // built on has a NIC that could reach a GPU, so it is never attempted. Say which case
  // applies.
  std::string gd;
  if (rt.device() == DeviceKind::kCpu) {
    gd = "GPUDirect RDMA: not applicable (cpu device); host staging";
  } else {
    const int dmabuf = internal::cuda_dmabuf_supported(0);  // the runtime does not say which GPU: ask GPU 0
    gd = std::string("GPUDirect RDMA: GPU 0 ") +
         (dmabuf == 1 ? "can export dma-bufs" : dmabuf == 0 ? "cannot export dma-bufs" : "was not asked (no libcuda)") +
         "; not attempted (GPU memory through ibv_reg_dmabuf_mr on " + engine->device_name() +
         " is untested); host staging";
  }
  return std::shared_ptr<net::Backend>(std::make_shared<internal::RdmaBackend>(rt, std::move(engine), lkey, gd));
}

Status enable(Runtime& rt, const Options& options) {
  auto be = create_backend(rt, options);
  if (!be.ok()) return be.status();
  return net::attach(rt, *be);
}

}  // namespace gpusock::rdma
