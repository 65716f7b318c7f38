// Shared by the fault-injection suites: the fixture that checks the runtime leaves no
// descriptor behind, host-side peers that own their descriptors, and the byte pattern
// kernels and host check streams against.
#pragma once

#include <arpa/inet.h>
#include <dirent.h>
#include <gmock/gmock.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>

#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/socket.hpp"
#include "kernel_test.hpp"

namespace gpusock::testing {

// Byte i of stream `id`: depends on both, so a byte from another stream or another offset
// (lost, duplicated or reordered) does not match.
GPUSOCK_HD inline uint8_t stream_byte(uint64_t id, uint64_t i) {
  return static_cast<uint8_t>(mix64(id * 0x100000001b3ull + (i >> 3)) >> (8 * (i & 7)));
}

GPUSOCK_HD inline sockaddr_in ipv4(uint32_t host_order_addr, uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = gpusock::htons(port);
  a.sin_addr.s_addr = gpusock::htonl(host_order_addr);
  return a;
}
GPUSOCK_HD inline sockaddr* sa(sockaddr_in& a) { return reinterpret_cast<sockaddr*>(&a); }
inline constexpr uint32_t kLoopback = 0x7f000001u;

// ---- host side --------------------------------------------------------------------

// A descriptor closed when it goes out of scope, so a failed assertion leaks nothing that
// the descriptor check would then blame on the runtime.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    reset(o.release());
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  int release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }
  // Closes with SO_LINGER {1, 0}: the peer gets a reset instead of an orderly end.
  void reset_hard() {
    if (fd_ < 0) return;
    linger lg{1, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    reset();
  }

 private:
  int fd_ = -1;
};

// A listening TCP socket on `addr` (host order), port chosen by the kernel.
inline Fd host_listen(uint16_t* port, int backlog = 1024, uint32_t addr = kLoopback, int rcvbuf = 0) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (rcvbuf > 0) ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(addr);
  socklen_t len = sizeof a;
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(fd.get(), backlog) != 0) return Fd();
  ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&a), &len);
  *port = ntohs(a.sin_port);
  return fd;
}

inline Fd host_connect(uint16_t port, uint32_t addr = kLoopback) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(addr);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return Fd();
  return fd;
}

inline bool host_send_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t r = ::send(fd, c, n, MSG_NOSIGNAL);
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}
inline bool host_recv_all(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = ::recv(fd, c, n, 0);
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// The first IPv4 address of an interface that is up and not loopback (host order), or 0.
// Connections to it still stay on this machine, but the backend does not see a loopback
// peer, so large sends take the SEND_ZC path.
inline uint32_t non_loopback_ipv4() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return 0;
  uint32_t found = 0;
  for (ifaddrs* i = list; i != nullptr && found == 0; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    if ((i->ifa_flags & IFF_UP) == 0 || (i->ifa_flags & IFF_LOOPBACK) != 0) continue;
    const uint32_t a = ntohl(reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr);
    if ((a >> 24) != 127) found = a;
  }
  ::freeifaddrs(list);
  return found;
}

// This process's open descriptors, number to what /proc/self/fd says each one is.
inline std::map<int, std::string> open_descriptors() {
  std::map<int, std::string> out;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return out;
  const int self = ::dirfd(d);
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const int fd = std::atoi(e->d_name);
    if (fd == self) continue;
    char target[512];
    const std::string path = std::string("/proc/self/fd/") + e->d_name;
    const ssize_t n = ::readlink(path.c_str(), target, sizeof target - 1);
    out[fd] = n > 0 ? std::string(target, static_cast<size_t>(n)) : std::string("?");
  }
  ::closedir(d);
  return out;
}

inline std::string descriptor_diff(const std::map<int, std::string>& before, const std::map<int, std::string>& after) {
  std::string s;
  for (const auto& [fd, what] : after) {
    auto it = before.find(fd);
    if (it == before.end() || it->second != what) s += " +" + std::to_string(fd) + "=" + what;
  }
  for (const auto& [fd, what] : before) {
    if (after.find(fd) == after.end()) s += " -" + std::to_string(fd) + "=" + what;
  }
  return s;
}

// Each case runs on the cpu device and on a GPU (skipped where there is none). The
// process's descriptors are listed before the runtime exists and again after it is
// destroyed; any difference fails the case.
class FaultTest : public KernelTest {
 protected:
  void SetUp() override {
    // The CUDA driver opens descriptors of its own (/dev/nvidia*, pipes, eventfds, a
    // socket) the first time a context is made, and keeps them for the process. Make
    // that happen before counting, once per process, with a runtime created and
    // destroyed here, so the count sees only what gpusock opens.
    if (GetParam() == DeviceKind::kCuda && cuda_available()) {
      static const Status warm = [] {
        RuntimeOptions o;
        o.device = DeviceKind::kCuda;
        auto rt = Runtime::create(o);
        return rt.ok() ? Status() : rt.status();
      }();
      ASSERT_TRUE(warm.ok()) << warm.to_string();
    }
    fds_before_ = open_descriptors();
    KernelTest::SetUp();
    opts_.cpu_resident_warps = 64;
  }
  void TearDown() override {
    if (IsSkipped()) return;
    rt_.reset();
    // A service thread left behind in a stalled handler closes its ring when the handler
    // returns, after the runtime object is gone: wait for that (bounded), then compare.
    std::map<int, std::string> now = open_descriptors();
    for (int i = 0; i < 300 && now != fds_before_; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      now = open_descriptors();
    }
    EXPECT_EQ(descriptor_diff(fds_before_, now), "") << "descriptors leaked (+) or closed (-) by the runtime";
  }
  // Creates the runtime with the io_uring backend.
  void Start(iouring::Options io = {}) {
    StartRuntime();
    if (HasFatalFailure()) return;
    Status s = iouring::enable(*rt_, io);
    ASSERT_TRUE(s.ok()) << s.to_string();
  }

  std::map<int, std::string> fds_before_;
};

}  // namespace gpusock::testing
