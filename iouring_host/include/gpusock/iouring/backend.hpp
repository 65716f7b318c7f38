// gpusock/iouring/backend.hpp — sockets for kernels served by io_uring (liburing).
//
//   auto rt = gpusock::Runtime::create();
//   if (auto s = gpusock::iouring::enable(**rt); !s.ok()) {   // probes the kernel first
//     std::fprintf(stderr, "%s\n", s.to_string().c_str());    // says what is missing, and what to do
//     return 1;
//   }
//   gpusock::launch(**rt, {1}, {32}, MyServer{});               // kernels call gpusock::socket() ...
//
// Each hostcall service thread owns one ring (IORING_SETUP_SINGLE_ISSUER +
// DEFER_TASKRUN, COOP_TASKRUN where that is missing), reaps it between calls, and parks
// inside io_uring_enter, so a completion wakes it at once. A socket belongs to the ring of
// the thread that created (or accepted) it; its operations run there, with the socket in
// that ring's fixed-file table. Receives land in a provided buffer ring whose buffers are
// pinned memory the device reads directly; listeners keep one multishot accept armed;
// sends go out with MSG_NOSIGNAL, as SEND_ZC from the registered staging region above
// send_zc_threshold (never to loopback peers, where the kernel copies anyway).
// docs/architecture.md ("Sockets") has the whole picture.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/hostcall/status.hpp"
#include "gpusock/net/backend.hpp"

namespace gpusock::iouring {

// ---- Fault injection (tests) ----
//
//   auto plan = std::make_shared<iouring::FaultPlan>(
//       std::vector<iouring::FaultRule>{{.op = iouring::FaultOp::kRecv, .error = ECANCELED, .probability = 0.2}},
//       /*seed=*/42);
//   iouring::Options o;
//   o.faults = plan;                       // then: plan->injected(FaultOp::kRecv) > 0
//
// A rule fails chosen io_uring operations of one kind with -error, the way the kernel
// reports a failed operation. The decision is made when the backend submits the
// operation: a failed one never reaches the kernel (no byte is taken from or given to a
// socket, no connection is accepted) and completes with -error on the ring's next pass,
// through the same completion handler as a real failure. Resubmissions (the rest of a
// partial send, a recv asked again, a re-armed accept or poll) count as submissions.

// The operation kinds a rule can name.
enum class FaultOp : uint8_t {
  kAccept,       // a (multishot) accept armed on a listener
  kConnect,      // a blocking connect
  kSend,         // send / sendmsg (not zero-copy)
  kSendZc,       // IORING_OP_SEND_ZC
  kRecv,         // recv / recvmsg from the provided buffer ring
  kPoll,         // one descriptor's IORING_OP_POLL_ADD of a poll()
  kPollTimeout,  // the timer of a poll() with a timeout
};
inline constexpr uint32_t kFaultOps = 7;

struct FaultRule {
  FaultOp op = FaultOp::kRecv;
  int error = ECANCELED;     // positive errno; the operation completes with -error
  uint64_t nth = 0;          // fail the nth submission of `op` (1 = the first); 0: none by count
  double probability = 0.0;  // and/or fail each submission with this probability (seeded)
  uint64_t max_hits = UINT64_MAX;  // this rule fails at most this many operations
};

// A set of rules and what they did. Shared between the backend (which asks it on every
// submission of a ring operation) and the test (which reads the counters); thread-safe.
// The probabilistic choice hashes (seed, kind, submission number), so a given order of
// submissions fails the same operations in every run.
class FaultPlan {
 public:
  explicit FaultPlan(std::vector<FaultRule> rules, uint64_t seed = 1);
  // Called by the backend for each submission of `op`. Returns the errno (> 0) the
  // operation is to fail with, or 0 to submit it for real. The first matching rule wins.
  int on_submit(FaultOp op);
  uint64_t submitted(FaultOp op) const { return submitted_[static_cast<uint32_t>(op)].load(std::memory_order_relaxed); }
  uint64_t injected(FaultOp op) const { return injected_[static_cast<uint32_t>(op)].load(std::memory_order_relaxed); }

 private:
  std::vector<FaultRule> rules_;
  uint64_t seed_;
  std::unique_ptr<std::atomic<uint64_t>[]> hits_;  // per rule
  std::atomic<uint64_t> submitted_[kFaultOps] = {};
  std::atomic<uint64_t> injected_[kFaultOps] = {};
};

struct Options {
  // Submission queue entries per ring (completion queue: four times that, so bursts of
  // multishot completions do not overflow it).
  uint32_t ring_entries = 1024;
  // Provided receive buffers per service thread (a power of two) and their size. A recv()
  // returns at most one buffer's worth; buffers are lent to the device until it has
  // copied the bytes out.
  uint32_t recv_buffers = 256;
  uint32_t recv_buffer_bytes = 64 * 1024;
  // A stream or datagram receive of at least this many bytes into a kernel's device_alloc()
  // memory is copied there by the host (Runtime::deliver(): a DMA copy on a GPU, on the
  // service thread) and the buffer goes straight back to the kernel's network stack,
  // instead of being lent to the device for the warp to copy out across PCIe. Smaller
  // ones are lent, where a DMA copy's fixed cost would outweigh it. 0: never deliver.
  // bench/net measures both ways (bench/RESULTS.md).
  uint32_t deliver_min_bytes = 32 * 1024;
  // A delivered stream receive that filled its buffer takes more of what the socket holds
  // in the same call, with non-blocking recv(2)s of up to deliver_chunk_bytes into a
  // bounce area of deliver_chunks such pieces per service thread (pinned, 2..8), each
  // copied on while the next ones come, up to deliver_gather_max bytes a call (the
  // service thread is busy with the call meanwhile). bench/net sweeps them
  // (bench/RESULTS.md).
  uint32_t deliver_chunk_bytes = 256 * 1024;
  uint32_t deliver_chunks = 4;
  uint32_t deliver_gather_max = 2 * 1024 * 1024;
  // The other direction: a blocking warp_send() of at least net::kPullMinBytes from a
  // kernel's device_alloc() or registered memory is taken out of device memory by the host
  // (Runtime::start_fetch(): DMA copies on the service thread's copy stream) into a pull
  // area of pull_chunks pieces of pull_chunk_bytes per service thread (pinned, 2..8), each
  // piece sent while the next ones are copied, instead of the warp copying the bytes into
  // staging. false: every send goes through staging. bench/net measures both ways.
  bool pull_sends = true;
  uint32_t pull_chunk_bytes = 128 * 1024;
  uint32_t pull_chunks = 8;
  // Taken bytes go out from io_uring's worker threads (IOSQE_ASYNC) instead of inline on
  // the service thread, which meanwhile answers hostcalls and starts the next copies. One
  // send(2) of a run of pieces at a time either way. bench/net measures both.
  bool pull_async_sends = true;
  // Most sockets (listeners, connections, datagram sockets) open at once: socket() and
  // accept() beyond it fail with EMFILE.
  uint32_t max_sockets = 65536;
  // Sends of at least this many bytes to a non-loopback peer use IORING_OP_SEND_ZC from
  // the registered staging region; 0 turns zero-copy off. bench/net measures the
  // crossover (bench/RESULTS.md).
  uint32_t send_zc_threshold = 64 * 1024;
  // Accepted connections a listener keeps queued before it pauses its multishot accept
  // (at least the listen() backlog).
  uint32_t accept_queue = 1024;
  // How long the lanes of a warp call that are answered wait for the call's lanes still
  // blocked in accept/recv/send/poll before those are let go to ask again on their own
  // (net/backend.hpp, "Stragglers"). Shorter: less delay for answered lanes when a warp's
  // connections are unevenly busy; longer: fewer repeated calls when they are evenly busy.
  std::chrono::nanoseconds straggler_wait = std::chrono::microseconds(20);
  // Descriptors below this can be polled on the device (net::kSoPollOnDevice, docs 12.9a):
  // one 4-byte readiness word each, in mapped memory (256 KiB by default). 0: off, and
  // every poll() of a host socket is a hostcall.
  uint32_t ready_words = 65536;
  // Fault injection for tests (above); null in production, where it costs one predictable
  // branch per submission and one per service-loop pass.
  std::shared_ptr<FaultPlan> faults;
};

// What the kernel offers, as the start-up probe found it.
struct KernelFeatures {
  int io_uring_disabled = 0;     // /proc/sys/kernel/io_uring_disabled (0 when absent)
  int setup_error = 0;           // errno of io_uring_setup, 0 when a ring was made
  bool single_issuer = false;    // IORING_SETUP_SINGLE_ISSUER (6.0)
  bool defer_taskrun = false;    // IORING_SETUP_DEFER_TASKRUN (6.1)
  bool coop_taskrun = false;     // IORING_SETUP_COOP_TASKRUN (5.19)
  bool taskrun_flag = false;     // IORING_SETUP_TASKRUN_FLAG (5.19), seen raising IORING_SQ_TASKRUN
  bool ext_arg = false;          // IORING_FEAT_EXT_ARG (5.11): waits with a timeout
  bool fast_poll = false;        // IORING_FEAT_FAST_POLL (5.7)
  std::vector<std::string> missing_ops;  // required opcodes the probe did not list
  bool send_zc = false;          // IORING_OP_SEND_ZC (6.0), optional
  bool buf_ring = false;         // IORING_REGISTER_PBUF_RING (5.19)
  bool multishot_accept = false; // IORING_ACCEPT_MULTISHOT (5.19)
  bool sparse_files = false;     // IORING_REGISTER_FILES2 sparse tables (5.19)
  bool cancel_fd_all = false;    // IORING_ASYNC_CANCEL_FD | ALL (5.19)
  bool registered_buffers = false; // the staging region registered as fixed buffers
  std::string registered_buffers_error;
};

// Probes the running kernel (makes a ring with the flags the backend uses, lists its
// opcodes, registers a buffer ring, arms and cancels a multishot accept on a loopback
// listener). Never fails; what it could not do is in the result.
KernelFeatures probe_kernel();

// Ok when `f` has everything the backend needs; otherwise an error whose message names
// each missing piece, the Linux version that has it, and what to do.
Status check_features(const KernelFeatures& f);

// Makes the backend for `rt` (probing the kernel first; fails with check_features()'s
// message). It still has to be attached: net::attach(rt, backend), or use enable().
Result<std::shared_ptr<net::Backend>> create_backend(Runtime& rt, const Options& options = {});

// create_backend() + net::attach().
Status enable(Runtime& rt, const Options& options = {});

}  // namespace gpusock::iouring
