// bench/net/baseline — the CPU side of the network benchmark: what a GPU socket server or
// GPU bulk transfer is compared against, and the load generator used against both.
//
//   CpuEchoServer  plain host io_uring request/response echo server (N threads, each with
//                  its own ring and SO_REUSEPORT listener).
//   LoadClient     closed-loop request/response client (epoll); the same client drives the
//                  CPU server and the GPU server, so the two figures are comparable.
//   cpu_send / cpu_recv / BulkSink / BulkSource
//                  bulk TCP transfer from/to (pinned) host memory with io_uring, and plain
//                  host threads at the other end that checksum or generate the stream.
//   sweep_send_zc  send vs send_zc GB/s per chunk size, to choose a threshold from data.
//
// Plain host C++20: no liburing or CUDA types in this header, so device code (.cu) can
// include it for pattern_byte / fill_pattern / fnv1a_update. Nothing here throws across
// threads; failures come back as -errno, a bool + message, or an `error` field.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__CUDACC__)
#define GPUSOCK_BENCH_HD __host__ __device__
#else
#define GPUSOCK_BENCH_HD
#endif

namespace gpusock::bench {

// ---------------------------------------------------------------------------------------
// Stream pattern and checksum shared by host and device checkers.

// Byte at stream offset i of a BulkSource stream. Only bits 0..20 of i matter (the byte is
// bits 13..20 of the product), so the pattern repeats every 2 MiB; fill_pattern uses that.
// Returns the expected byte.
GPUSOCK_BENCH_HD inline uint8_t pattern_byte(uint64_t i) {
  return static_cast<uint8_t>((i * 2654435761u) >> 13);
}

inline constexpr uint64_t kPatternPeriod = uint64_t{1} << 21;

// Writes pattern_byte(offset + j) to dst[j] for j < n. Uses 32-bit arithmetic, which gives
// the same bits 13..20 as the 64-bit product and vectorizes. Returns nothing.
GPUSOCK_BENCH_HD inline void fill_pattern(uint8_t* dst, uint64_t offset, size_t n) {
  const uint32_t base = static_cast<uint32_t>(offset);
  for (size_t j = 0; j < n; ++j) {
    dst[j] = static_cast<uint8_t>(((base + static_cast<uint32_t>(j)) * 2654435761u) >> 13);
  }
}

inline constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ull;
inline constexpr uint64_t kFnvPrime = 0x100000001b3ull;

// FNV-1a 64 continued over n more bytes: start a stream with h = kFnvOffset and feed every
// piece in order. Returns the updated hash. Byte-serial by definition (~4 cycles/byte).
GPUSOCK_BENCH_HD inline uint64_t fnv1a_update(uint64_t h, const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * kFnvPrime;
  return h;
}

// Nearest-rank percentile of `ns` (nanoseconds), p in percent (50, 99.9). Sorts ns in
// place. Returns microseconds; 0 when ns is empty.
double percentile_us(std::vector<uint64_t>& ns, double p);

// ---------------------------------------------------------------------------------------
// Socket helpers (also usable by the GPU-side servers/receivers for their listeners).

// Creates a TCP socket bound to addr:*port (0 = ephemeral), listening with `backlog`;
// SO_REUSEADDR always, SO_REUSEPORT when reuse_port. On success writes the bound port to
// *port. Returns the blocking listening fd, or -errno.
int tcp_listen(const std::string& addr, uint16_t* port, bool reuse_port, int backlog = 4096);

// Connects to addr:port with a non-blocking connect polled in <= 100 ms steps, retrying
// ECONNREFUSED/EAGAIN/ETIMEDOUT up to 5 times with short sleeps (small listen backlogs),
// giving up after timeout_ms overall or when *stop turns true. TCP_NODELAY is set. The
// fd is left non-blocking only when `nonblocking`. Returns the fd, or -errno.
int tcp_connect(const std::string& addr, uint16_t port, int timeout_ms, bool nonblocking,
                const std::atomic<bool>* stop = nullptr);

// ---------------------------------------------------------------------------------------
// CPU io_uring echo server.

struct EchoServerOptions {
  std::string address = "127.0.0.1";
  uint16_t port = 0;            // 0 = ephemeral; CpuEchoServer::port() reports it
  int threads = 1;              // host threads, each with one ring + one REUSEPORT listener
  size_t request_bytes = 64;    // fixed request (and reply) size
  int max_connections = 4096;   // whole server; accepts beyond this are closed
};

struct EchoServerStats {
  uint64_t requests = 0;        // replies fully sent
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  uint64_t connections = 0;     // accepted so far
  uint64_t resets = 0;          // ECONNRESET/EPIPE: clients closing with a request in
                                //   flight (normal at the end of a load run)
  uint64_t errors = 0;          // any other failed op, refused accepts
  unsigned ring_flags = 0;      // IORING_SETUP_* the rings got (after EINVAL fallbacks)
};

class CpuEchoServer {
 public:
  // Binds, sets up every thread's ring (inside that thread: SINGLE_ISSUER rings belong to
  // their creator) and waits until all are accepting. Returns the running server, or
  // nullptr with *err set (err may be null).
  static std::unique_ptr<CpuEchoServer> start(const EchoServerOptions& opt, std::string* err);

  ~CpuEchoServer();
  CpuEchoServer(const CpuEchoServer&) = delete;
  CpuEchoServer& operator=(const CpuEchoServer&) = delete;

  // Returns the port every listener is bound to.
  uint16_t port() const { return port_; }

  // Returns counters summed over threads (relaxed; exact once stopped).
  EchoServerStats stats() const;

  // Stops the loops (each notices within 100 ms), closes every socket and ring, joins.
  // Idempotent. Returns nothing.
  void stop();

  struct Worker;  // defined in baseline.cpp

 private:
  CpuEchoServer() = default;
  EchoServerOptions opt_;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> open_conns_{0};  // across threads, against max_connections
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::thread> threads_;
};

// ---------------------------------------------------------------------------------------
// Closed-loop load client.

struct LoadOptions {
  std::string address = "127.0.0.1";
  uint16_t port = 0;
  int connections = 64;         // 1..4096 (needs RLIMIT_NOFILE above that)
  int threads = 1;              // client threads; connections spread round-robin
  size_t request_bytes = 64;
  std::chrono::nanoseconds warmup = std::chrono::milliseconds(200);
  std::chrono::nanoseconds duration = std::chrono::seconds(1);
  int connect_timeout_ms = 5000;
  const std::atomic<bool>* stop = nullptr;  // optional early stop (result = what was seen)
};

struct LoadResult {
  uint64_t requests = 0;        // completed inside the measured window
  double seconds = 0;           // measured window length
  double req_per_s = 0;
  double p50_us = 0, p90_us = 0, p99_us = 0, p999_us = 0;
  int connected = 0;            // connections that reached the warmup
  uint64_t errors = 0;          // connect_failures + resets + mismatches
  uint64_t connect_failures = 0;
  uint64_t resets = 0;          // peer close / socket errors mid-run
  uint64_t mismatches = 0;      // replies that differ from their request
  std::string error;            // non-empty when the run failed or was degraded
};

class LoadClient {
 public:
  // Connects every connection, runs warmup then the measured window with one request
  // outstanding per connection, checking every reply byte. Returns the figures; `error`
  // is set when anything failed (figures then cover what did run).
  static LoadResult run(const LoadOptions& opt);
};

// ---------------------------------------------------------------------------------------
// Bulk transfer.

struct BulkResult {
  double gbps = 0;              // 1e9 bytes/s
  uint64_t bytes = 0;
  double seconds = 0;
  std::string error;            // empty on success
};

struct BulkSinkOptions {
  std::string address = "127.0.0.1";
  uint16_t port = 0;
  bool checksum = true;         // FNV-1a over the stream; off for pure-throughput runs
  size_t recv_bytes = size_t{1} << 20;
};

// Host thread that accepts one connection and reads it to EOF with plain recv, counting
// bytes and (optionally) computing FNV-1a 64 of the whole stream.
class BulkSink {
 public:
  // Listens and starts the thread. Returns the sink, or nullptr with *err set.
  static std::unique_ptr<BulkSink> start(const BulkSinkOptions& opt, std::string* err);
  ~BulkSink();
  BulkSink(const BulkSink&) = delete;
  BulkSink& operator=(const BulkSink&) = delete;

  uint16_t port() const { return port_; }
  // Waits up to timeout_ms for EOF (or failure). Returns true when the thread finished.
  bool wait(int timeout_ms);
  // Returns bytes, seconds (first byte to EOF) and GB/s; meaningful once wait() is true.
  BulkResult result() const;
  // Returns the FNV-1a 64 of the stream (kFnvOffset for an empty one, or when off).
  uint64_t checksum() const;
  // Stops the thread (within 100 ms), closes sockets, joins. Idempotent.
  void stop();

 private:
  BulkSink() = default;
  void run();
  BulkSinkOptions opt_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<bool> done_{false};
  BulkResult result_;           // written by the thread before done_ (release)
  uint64_t fnv_ = kFnvOffset;
  std::thread thread_;
};

struct BulkSourceOptions {
  std::string address = "127.0.0.1";
  uint16_t port = 0;
  uint64_t total_bytes = 0;
  size_t chunk_bytes = size_t{1} << 20;  // per send(); at most 1 MiB
};

// Host thread that accepts one connection, sends total_bytes of pattern_byte(i), closes.
class BulkSource {
 public:
  // Listens and starts the thread. Returns the source, or nullptr with *err set.
  static std::unique_ptr<BulkSource> start(const BulkSourceOptions& opt, std::string* err);
  ~BulkSource();
  BulkSource(const BulkSource&) = delete;
  BulkSource& operator=(const BulkSource&) = delete;

  uint16_t port() const { return port_; }
  // Waits up to timeout_ms for the thread to finish. Returns true when it has.
  bool wait(int timeout_ms);
  // Returns bytes sent and sender-side seconds/GB/s; meaningful once wait() is true.
  BulkResult result() const;
  // Stops the thread (within 100 ms), closes sockets, joins. Idempotent.
  void stop();

 private:
  BulkSource() = default;
  void run();
  BulkSourceOptions opt_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<bool> done_{false};
  BulkResult result_;
  std::thread thread_;
};

// Connects to addr:port and sends total_bytes taken from src (src_len bytes, wrapped:
// stream byte i = src[i % src_len]) in chunk_bytes pieces with io_uring send, or send_zc
// when use_send_zc (a src region is not resent until its notification CQE has arrived).
// Up to 4 sends are in flight as one IOSQE_IO_LINK chain with MSG_WAITALL: sends on one
// stream socket that overlap unlinked may interleave their bytes. Closes the socket when
// done. Returns sender-side GB/s (first submit to last completion/notification), or
// `error` set; aborts with an error after 10 s without progress or when *stop is true.
BulkResult cpu_send(const std::string& addr, uint16_t port, uint64_t total_bytes,
                    size_t chunk_bytes, const uint8_t* src, size_t src_len, bool use_send_zc,
                    const std::atomic<bool>* stop = nullptr);

// Connects to a BulkSource at addr:port and receives with io_uring recv into dst
// (dst_len bytes, reused/wrapped) until EOF, checking every byte against pattern_byte.
// Returns GB/s from first byte to EOF; `error` names the first mismatching offset and the
// mismatch count, or a short stream (bytes != total_bytes), or a failed op. Aborts after
// 10 s without progress or when *stop is true.
BulkResult cpu_recv(const std::string& addr, uint16_t port, uint64_t total_bytes,
                    uint8_t* dst, size_t dst_len, const std::atomic<bool>* stop = nullptr);

// Extra send_zc detail from cpu_send_ex (the plain cpu_send drops it).
struct SendStats {
  uint64_t notifications = 0;   // IORING_CQE_F_NOTIF CQEs seen
  uint64_t zc_copied = 0;       // of those, the kernel reported it copied anyway
};

// cpu_send plus *stats (may be null). Same return contract as cpu_send.
BulkResult cpu_send_ex(const std::string& addr, uint16_t port, uint64_t total_bytes,
                       size_t chunk_bytes, const uint8_t* src, size_t src_len,
                       bool use_send_zc, const std::atomic<bool>* stop, SendStats* stats);

struct SendZcPoint {
  size_t chunk_bytes = 0;
  double send_gbps = 0;         // io_uring send, sender side
  double send_zc_gbps = 0;      // io_uring send_zc, sender side
  double sink_send_gbps = 0;    // same runs measured at the BulkSink (first byte to EOF)
  double sink_send_zc_gbps = 0;
  uint64_t zc_copied = 0;       // send_zc notifications that reported a kernel copy
  uint64_t zc_notifications = 0;
  std::string error;
};

// For each chunk size, sends bytes_per_size over loopback TCP to an in-process BulkSink
// (checksum off) once with send and once with send_zc. Returns one point per size, in
// order; a point's `error` is set if either run failed.
std::vector<SendZcPoint> sweep_send_zc(const std::vector<size_t>& sizes,
                                       uint64_t bytes_per_size);

}  // namespace gpusock::bench
