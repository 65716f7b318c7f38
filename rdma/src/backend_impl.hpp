// The RDMA backend's class, shared by backend.cpp and router.cpp.
#pragma once

#include <memory>
#include <string>

#include "engine.hpp"
#include "gpusock/net/backend.hpp"
#include "gpusock/rdma/backend.hpp"

namespace gpusock::rdma::internal {

class RdmaBackend : public net::Backend {
 public:
  RdmaBackend(Runtime& rt, std::unique_ptr<Engine> engine, uint32_t staging_lkey, std::string gpudirect);
  const char* name() const override { return "rdma"; }
  std::string describe() const override;
  void serve(net::Request& req, net::Reply reply) override;
  uint32_t poll(uint32_t thread) override;
  void park(uint32_t thread, std::chrono::nanoseconds max) override;
  void thread_stop(uint32_t thread) override;
  void straggle(uint64_t token) override;

  // `foreign`: revents for poll entries this backend does not own.
  void serve_with(net::Request& req, net::Reply reply, short foreign);
  Engine& engine() { return *engine_; }
  // Under the engine's lock: whether `fd` is an RDMA socket; adopt a descriptor number.
  bool owns(int fd) {
    std::lock_guard lock(engine_->mu());
    return engine_->owns(fd);
  }
  int adopt(int fd, int domain, bool nonblock) {
    std::lock_guard lock(engine_->mu());
    return engine_->adopt(fd, domain, nonblock);
  }
  void replay_option(int fd, int level, int name, std::span<const uint8_t> v) {
    std::lock_guard lock(engine_->mu());
    engine_->setsockopt(fd, level, name, v);  // options RDMA does not know are dropped
  }

 private:
  // A call the engine may answer later, and whether it has been.
  struct Waiting {
    explicit Waiting(net::Reply r) : reply(std::move(r)) {}
    net::Reply reply;
    bool answered = false;  // under the engine's lock
    void answer(int64_t v) {
      answered = true;
      reply.finish(v);
    }
  };
  void track(Waiting& w, int fd);

  Runtime& rt_;
  std::unique_ptr<Engine> engine_;
  uint32_t staging_lkey_;
  uint8_t* staging_ = nullptr;
  uint64_t staging_size_ = 0;
  std::string gpudirect_;
};

}  // namespace gpusock::rdma::internal
