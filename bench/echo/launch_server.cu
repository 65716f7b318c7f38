// echo-launch-server — the "launch per batch" baseline of bench/echo: how GPU request
// processing is usually wired today. A host thread receives (epoll), copies what arrived
// to the GPU, launches a kernel over the batch, copies the result back, waits, and sends.
// The kernel copies each byte (the echo's "processing"), so the data really makes the
// round trip through GPU memory, as it would through any real kernel.
//
//   echo-launch-server --port P [--address A] [--threads N]
//
// Every thread has its own SO_REUSEPORT listener, epoll set, CUDA stream and pinned
// buffers; a batch is everything one epoll_wait returned. CUDA only. Prints "listening
// on" when ready and a summary (batches, mean batch) on SIGINT/SIGTERM.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

namespace {

volatile sig_atomic_t g_signal = 0;
void on_signal(int sig) { g_signal = sig; }

constexpr size_t kBatchBytes = 8u << 20;
constexpr size_t kMaxRecv = 64u << 10;

__global__ void process(const uint8_t* in, uint8_t* out, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) out[i] = in[i];
}

struct Seg {
  int fd;
  size_t off, len;
};

struct Stats {
  std::atomic<unsigned long long> batches{0}, bytes{0}, conns{0}, errors{0};
};

bool send_all(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::send(fd, p, n, MSG_NOSIGNAL);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
    } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd pf{fd, POLLOUT, 0};
      ::poll(&pf, 1, 100);
    } else if (r < 0 && errno == EINTR) {
      continue;
    } else {
      return false;
    }
  }
  return true;
}

void serve(int lfd, Stats* st, std::atomic<int>* ready) {
  cudaStream_t stream;
  uint8_t *h_in, *h_out, *d_in, *d_out;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess ||
      cudaHostAlloc(&h_in, kBatchBytes, cudaHostAllocDefault) != cudaSuccess ||
      cudaHostAlloc(&h_out, kBatchBytes, cudaHostAllocDefault) != cudaSuccess ||
      cudaMalloc(&d_in, kBatchBytes) != cudaSuccess || cudaMalloc(&d_out, kBatchBytes) != cudaSuccess) {
    std::fprintf(stderr, "echo-launch-server: CUDA setup failed\n");
    st->errors++;
    ready->fetch_add(1);
    return;
  }
  int ep = epoll_create1(0);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = lfd;
  epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
  ready->fetch_add(1);
  std::vector<epoll_event> evs(1024);
  std::vector<Seg> segs;
  std::vector<int> dead;
  while (g_signal == 0) {
    int n = epoll_wait(ep, evs.data(), static_cast<int>(evs.size()), 100);
    size_t used = 0;
    segs.clear();
    dead.clear();
    for (int k = 0; k < n; ++k) {
      const int fd = evs[k].data.fd;
      if (fd == lfd) {
        for (;;) {
          int c = ::accept4(lfd, nullptr, nullptr, SOCK_NONBLOCK);
          if (c < 0) break;
          int one = 1;
          setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          epoll_event ce{};
          ce.events = EPOLLIN;
          ce.data.fd = c;
          epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
          st->conns++;
        }
        continue;
      }
      if (used == kBatchBytes) continue;  // the batch is full: next round (level-triggered)
      ssize_t r = ::recv(fd, h_in + used, std::min(kMaxRecv, kBatchBytes - used), 0);
      if (r > 0) {
        segs.push_back({fd, used, static_cast<size_t>(r)});
        used += static_cast<size_t>(r);
      } else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
        dead.push_back(fd);
      }
    }
    if (used > 0) {
      const int threads = 256;
      const int blocks = static_cast<int>(std::min<size_t>((used + threads - 1) / threads, 1024));
      cudaMemcpyAsync(d_in, h_in, used, cudaMemcpyHostToDevice, stream);
      process<<<blocks, threads, 0, stream>>>(d_in, d_out, used);
      cudaMemcpyAsync(h_out, d_out, used, cudaMemcpyDeviceToHost, stream);
      if (cudaStreamSynchronize(stream) != cudaSuccess) {
        st->errors++;
        break;
      }
      st->batches++;
      st->bytes += used;
      for (const Seg& s : segs) {
        if (!send_all(s.fd, h_out + s.off, s.len)) dead.push_back(s.fd);
      }
    }
    for (int fd : dead) {
      epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
      ::close(fd);
    }
  }
  ::close(ep);
}

}  // namespace

int main(int argc, char** argv) {
  int port = 0, threads = 1;
  std::string address = "127.0.0.1";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--port") port = std::atoi(argv[i + 1]);
    else if (a == "--address") address = argv[i + 1];
    else if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: echo-launch-server --port P [--address A] [--threads N]\n");
      return 2;
    }
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "echo-launch-server: no CUDA device\n");
    return 1;
  }
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, address.c_str(), &a.sin_addr);
  Stats st;
  std::atomic<int> ready{0};
  std::vector<std::thread> ts;
  std::vector<int> lfds;
  for (int t = 0; t < threads; ++t) {
    int l = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(l, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(l, 4096) != 0) {
      std::fprintf(stderr, "echo-launch-server: listen on %s:%d: %s\n", address.c_str(), port, std::strerror(errno));
      return 1;
    }
    lfds.push_back(l);
    ts.emplace_back(serve, l, &st, &ready);
  }
  while (ready.load() < threads) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::printf("echo-launch-server: listening on %s:%d (%d threads)\n", address.c_str(), port, threads);
  std::fflush(stdout);
  for (auto& t : ts) t.join();
  for (int l : lfds) ::close(l);
  const unsigned long long b = st.batches.load();
  std::printf("echo-launch-server: summary: %llu connections, %llu batches, %.0f bytes per batch, %llu errors\n",
              st.conns.load(), b, b ? static_cast<double>(st.bytes.load()) / static_cast<double>(b) : 0.0,
              st.errors.load());
  return st.errors.load() == 0 ? 0 : 1;
}
