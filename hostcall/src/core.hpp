// Private: the runtime's implementation. One Core per Runtime, shared (shared_ptr) with
// everything that may outlive the Runtime object: deferred calls, cpu-device lanes,
// service threads stuck in a handler at shutdown.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "gpusock/hostcall/handler.hpp"
#include "gpusock/hostcall/internal/claim_record.hpp"
#include "gpusock/hostcall/opcodes.hpp"
#include "gpusock/hostcall/protocol.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/hostcall/service_hook.hpp"
#include "gpusock/hostcall/status.hpp"

namespace gpusock::internal {

// What a device must provide to host a runtime: memory the GPU (or cpu device) and the
// host share, device memory, and the facts that size the slot pool.
class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual DeviceKind kind() const = 0;
  virtual std::string name() const = 0;
  // Pinned host memory mapped into the device; zeroed. *dev is the device's address.
  virtual Status alloc_mapped(size_t bytes, void** host, void** dev) = 0;
  virtual void free_mapped(void* host) = 0;
  // Device memory, zeroed.
  virtual Status alloc_device(size_t bytes, void** dev) = 0;
  virtual void free_device(void* dev) = 0;
  virtual Status copy_to_device(void* dev, const void* host, size_t bytes) = 0;
  virtual Status copy_from_device(void* host, const void* dev, size_t bytes) = 0;
  // Starts a copy into device memory that runs beside kernels and writes its ticket (the
  // calling thread's copies are numbered from 1 in the order they start, and end in that
  // order); finish_copies(t) waits for the thread's copies up to ticket t (~0: all of
  // them). `host` must stay valid until then. Ticket 0: the copy was made at once (the
  // default, cpu device), nothing to wait for.
  virtual Status start_copy_to_device(void* dev, const void* host, size_t bytes, uint64_t* ticket) {
    *ticket = 0;
    return copy_to_device(dev, host, bytes);
  }
  // The same out of device memory into host memory, numbered with the copies above.
  virtual Status start_copy_from_device(void* host, const void* dev, size_t bytes, uint64_t* ticket) {
    *ticket = 0;
    return copy_from_device(host, dev, bytes);
  }
  virtual Status finish_copies(uint64_t /*ticket*/) { return {}; }
  // Whether the thread's copies up to ticket t have ended, without waiting. False also
  // when asking failed: finish_copies(t) then says why.
  virtual bool copies_done(uint64_t /*ticket*/) { return true; }
  // Whether [p, p + bytes) is memory of this device that copies to the device may write
  // (the caller's own allocation, for register_range). Default (cpu device): any memory.
  virtual Status check_device_range(const void* /*p*/, size_t /*bytes*/) { return {}; }
  virtual uint32_t max_resident_warps() const = 0;
  virtual uint32_t sm_count() const = 0;
  virtual uint32_t threads_per_sm() const = 0;
  // One past the largest SM id a thread can see (%nsmid on a GPU): sizes per-SM arrays.
  virtual uint32_t sm_ids() const = 0;
  // Offsets from the device clock to CLOCK_MONOTONIC and CLOCK_REALTIME.
  virtual Status calibrate_clock(int64_t* monotonic_offset, int64_t* realtime_offset) = 0;
  // Whether kernels launched on this device may still be running.
  virtual bool kernels_running() const = 0;
  // Waits up to `timeout` for launched kernels to finish; true if none is running.
  virtual bool wait_kernels(std::chrono::nanoseconds timeout) = 0;
  // cuda: clears the claim records of `slots` that still name `launch`, then their bits in
  // `slot_bitmap`, and the staging runs (first << 32 | count) in `staging_bitmap`, with
  // device atomics (a kernel on a stream of its own: other kernels change these words
  // meanwhile). Returns once done, or after a few seconds when every SM is taken by
  // kernels that do not end (the work stays queued and runs when one does). False if it
  // could not be queued. The cpu device's pools are host memory: the Core changes them
  // itself.
  virtual bool give_back(uint32_t* slot_bitmap, uint64_t* staging_bitmap, ClaimRecord* claims, uint32_t launch,
                         const std::vector<uint32_t>& slots, const std::vector<uint64_t>& runs) {
    (void)slot_bitmap, (void)staging_bitmap, (void)claims, (void)launch, (void)slots, (void)runs;
    return false;
  }
  // Called last when a runtime whose device failed (Core::mark_failed) goes away, after
  // everything it allocated was handed back: makes the device usable for a new runtime.
  // cuda: cudaDeviceReset(), the only way out of a sticky error. cpu: nothing.
  virtual void reset_after_failure() {}
};

std::unique_ptr<DeviceBackend> make_cpu_backend(const RuntimeOptions& options);
Result<std::unique_ptr<DeviceBackend>> make_cuda_backend(const RuntimeOptions& options);

struct HandlerEntry {
  uint32_t opcode = 0;
  std::string name;
  hostcall::Handler fn;
  std::atomic<uint64_t> calls{0}, lanes{0}, errors{0};
  // Service time per call (LatencyHistogram's buckets). Relaxed increments on the thread
  // that answers; stats() reads them without a lock, so a reader may see a call in its
  // bucket before it is in `latency_sum_ns`, which is harmless for a histogram.
  std::array<std::atomic<uint64_t>, LatencyHistogram::kBuckets> latency{};
  std::atomic<uint64_t> latency_sum_ns{0};
};

class Core : public std::enable_shared_from_this<Core> {
 public:
  static Result<std::shared_ptr<Core>> create(const RuntimeOptions& options);
  ~Core();

  Status register_handler(uint32_t opcode, std::string name, hostcall::Handler fn, bool core_range_ok);
  void shutdown();
  bool is_shut_down() const { return stopping_.load(std::memory_order_acquire); }
  RuntimeStats stats() const;
  // Fills the occupancy fields of `r` (slots, staging) from a look at the region.
  void occupancy(RuntimeStats& r) const;

  // Answers a claimed call with the results set on it. Returns false if someone else
  // (shutdown) answered it first.
  bool commit(hostcall::Call& call);

  DeviceBackend& device() { return *device_; }
  const DeviceBackend& device() const { return *device_; }
  const RuntimeOptions& options() const { return options_; }
  const hostcall::DeviceContext* device_context() const { return ctx_dev_; }
  uint8_t* staging_host() const { return staging_h_; }
  uint64_t staging_size() const { return staging_bytes_; }
  uint32_t slot_count() const { return nslots_; }
  // Keeps kernels' launch bookkeeping alive; see LaunchState.
  std::shared_ptr<Core> self() { return shared_from_this(); }

  // Installs the module event loop that service threads run between calls (one per
  // runtime). Returns ok, or EEXIST if one is installed, ESHUTDOWN after shutdown.
  Status set_service_hook(std::shared_ptr<hostcall::ServiceHook> hook);

  // Takes ownership of a mapped allocation: freed when this Core is destroyed, after every
  // service thread and kernel has stopped (unless kernels outlived shutdown).
  void adopt_mapped(void* host) {
    std::lock_guard<std::mutex> lock(hook_mu_);
    adopted_mapped_.push_back(host);
  }
  void adopt_device(void* dev) {
    std::lock_guard<std::mutex> lock(hook_mu_);
    adopted_device_.push_back(dev);
  }
  Status set_module_state(uint32_t index, void* device_ptr, const void* head, size_t head_bytes);

  // ---- device allocations, for deliver() (docs/architecture.md 12.4, receive 3a) ----
  void note_allocation(void* dev, size_t bytes);
  // Blocks while a delivery into the allocation is running.
  Status forget_allocation(void* dev);  // ENOENT / EINVAL: not a live device_alloc() start
  // Memory the caller allocated, registered for deliveries (Runtime::register_device_memory).
  Status register_range(void* p, size_t bytes);
  Status unregister_range(void* p);
  Status deliver(void* dst, const void* src, size_t bytes, bool wait = true, uint64_t* ticket = nullptr);
  Status finish_deliveries(uint64_t ticket);
  bool deliveries_done(uint64_t ticket) { return device_->copies_done(ticket); }
  Status fetch(void* dst, const void* src, size_t bytes, uint64_t* ticket);
  bool inside_allocation(const void* p, size_t bytes);

  // ---- aborted kernels (abort.cpp; docs/architecture.md section 18.3) ----
  // cpu device: one record per slot (ClaimRecord), null on cuda (its table is in device
  // memory, DeviceState::claims).
  ClaimRecord* claims() { return claims_.get(); }
  // Launch `launch_id` was aborted and every lane of it has stopped. Answers its calls
  // still in flight with -ECANCELED and gives its slots and staging runs back; a run a
  // handler may still read (the call was claimed) stays held until that handler answers,
  // and is given back then. Other launches keep running meanwhile.
  void reclaim_launch(uint32_t launch_id);

  // cuda launch ids (hostcall::kLaunchIds). Takes an id whose abort word and cause record
  // are clear, with their device addresses; EAGAIN when every id is in flight.
  Status take_launch_id(uint32_t* id, uint32_t** abort_dev, uint32_t** cause_dev);
  // The launch with this id has ended. If a lane of it called trap(), sets *why (EIO,
  // naming where), takes back what it held (reclaim_launch) and clears its abort word and
  // cause; then the id is free again. Returns whether it was aborted.
  bool finish_launch(uint32_t id, Status* why);
  // An id taken for a launch that never started.
  void give_launch_id(uint32_t id);
  // The device is lost (a CUDA kernel trapped or faulted: a sticky context error). Records
  // `why`, answers every call in flight with -ECANCELED, and from then on health() and the
  // runtime's API return `why`. The first failure is kept.
  void mark_failed(const Status& why);
  // Ok, or what mark_failed() recorded.
  Status health() const;
  bool failed() const { return failed_flag_.load(std::memory_order_acquire); }

 private:
  explicit Core(const RuntimeOptions& options) : options_(options) {}
  Status init();
  void start_threads();
  void service_loop(uint32_t index);
  // A doorbell that arrived before the state it announces; retried by its thread.
  struct Early {
    uint32_t slot, seq_low;
    int64_t since;
  };
  enum class DoorbellResult { kDone, kEarly };
  // Returns how many doorbells it consumed.
  uint32_t drain_ring(uint32_t budget, std::vector<Early>& early);
  uint32_t retry_early(std::vector<Early>& early);
  uint32_t sweep();
  DoorbellResult on_doorbell(uint32_t slot, uint32_t seq_low);
  // Claims slot `slot` if its state is `state` (a kRequest) and runs the call.
  bool claim_and_run(uint32_t slot, uint64_t state);
  void run(hostcall::Call& call, const hostcall::SlotHeader& hdr);
  // Checks the header's seq and every named lane's tag against the claimed state (see
  // hostcall::Slot::tag). Drops lanes that did not write the request from call.mask_ into
  // call.foreign_; answers the call itself (and returns false) when nothing is left to run.
  bool check_tags(hostcall::Call& call, const hostcall::SlotHeader& hdr);
  // Answers a call that will not run: `error` to every lane of its mask (and -EPROTO to
  // its foreign lanes, see commit()), counted in `rejected`.
  void reject(hostcall::Call& call, int64_t error);
  void fail_pending(int64_t error);
  // A call answered by another thread than its claimer (fail_pending, launch reclaim)
  // frees the slot for the kernel's next call, so that answer must wait until the claimer
  // has copied the header and arguments out of the slot: the claimer marks it
  // (release), the answerer awaits the mark (acquire) before its commit.
  void mark_copied(uint32_t slot, uint32_t seq);
  void await_copied(uint32_t slot, uint32_t seq);
  void register_builtins();
  // A late commit() lost its race: if the call's staging run was held back for its
  // handler (reclaim_launch), give it back now.
  void release_quarantined(uint32_t slot, uint32_t seq);
  // Gives slots (with their claim records) and staging runs (first << 32 | count) back to
  // the device's pools: host atomics on the cpu device, a small kernel on cuda. Returns
  // once they are back (cuda: at most a few seconds, see DeviceBackend::give_back).
  void give_back(uint32_t launch_id, const std::vector<uint32_t>& slots, const std::vector<uint64_t>& runs);

  RuntimeOptions options_;
  std::unique_ptr<DeviceBackend> device_;

  // Mapped memory (host addresses; the device's are in the DeviceContext).
  hostcall::Slot* slots_h_ = nullptr;
  uint64_t* ring_h_ = nullptr;
  hostcall::ControlBlock* control_h_ = nullptr;
  uint8_t* staging_h_ = nullptr;
  void* mapped_block_ = nullptr;
  uint32_t nslots_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> copied_;  // per slot: (1 << 32) | seq once copied
  uint32_t ring_cap_ = 0;
  uint32_t staging_pages_ = 0;
  uint64_t staging_bytes_ = 0;
  // Device memory.
  void* device_block_ = nullptr;
  hostcall::DeviceContext* ctx_dev_ = nullptr;
  uint32_t* slot_bitmap_dev_ = nullptr;     // device addresses, read by occupancy()
  uint64_t* staging_bitmap_dev_ = nullptr;
  ClaimRecord* claims_dev_ = nullptr;       // cuda: DeviceState::claims
  uint32_t* launch_abort_dev_ = nullptr;    // cuda: kLaunchIds abort words
  uint32_t* launch_cause_h_ = nullptr;      // cuda: kLaunchIds cause records (mapped)
  uint32_t* launch_cause_dev_ = nullptr;
  std::mutex launch_ids_mu_;
  std::vector<uint32_t> free_launch_ids_;   // guarded by launch_ids_mu_

  // Handlers, readable without a lock from service threads; written under handlers_mu_.
  std::array<std::atomic<HandlerEntry*>, hostcall::kOpcodeLimit> handlers_{};
  std::vector<std::unique_ptr<HandlerEntry>> handler_store_;
  mutable std::mutex handlers_mu_;

  // Service threads.
  std::vector<std::thread> threads_;
  std::vector<std::unique_ptr<std::atomic<bool>>> thread_done_;  // one per service thread
  std::atomic<uint32_t> threads_running_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> pending_failed_{false};  // shutdown() has failed the pending calls
  // The module event loop; written once under hook_mu_, read lock-free by the threads.
  std::shared_ptr<hostcall::ServiceHook> hook_store_;
  std::atomic<hostcall::ServiceHook*> hook_{nullptr};
  std::mutex hook_mu_;
  std::vector<void*> adopted_mapped_;  // guarded by hook_mu_
  std::vector<void*> adopted_device_;  // guarded by hook_mu_
  void* module_states_[hostcall::kModuleStates] = {};  // guarded by hook_mu_
  std::mutex park_mu_;
  std::condition_variable park_cv_;
  std::atomic<uint32_t> ring_head_{0};
  std::atomic<int64_t> next_sweep_ns_{0};
  std::atomic<bool> sweeping_{false};
  uint32_t last_swept_head_ = 0;      // guarded by sweeping_
  std::vector<uint32_t> swept_tags_;  // guarded by sweeping_: per slot, the pending
                                      // request's tag seen by the last sweep, or 0

  // kWrite: one lock per output so calls never interleave mid-write.
  std::mutex stdout_mu_, stderr_mu_;

  // Live device_alloc() allocations and registered ranges, start -> size. Shared while a
  // delivery copies into one, exclusive while one is freed or unregistered, so neither
  // races a copy into it.
  struct Range {
    size_t bytes;
    bool registered;  // register_range(), not device_alloc()
  };
  std::shared_mutex allocs_mu_;
  std::map<uintptr_t, Range> allocs_;
  bool inside_locked(uintptr_t p, size_t bytes) const;  // allocs_mu_ held
  template <class Copy>
  Status checked_copy(const void* device_side, size_t bytes, const char* what, Copy&& copy,
                      std::atomic<uint64_t>& count, std::atomic<uint64_t>& counted_bytes);
  std::atomic<uint64_t> deliveries_{0}, delivered_bytes_{0}, fetches_{0}, fetched_bytes_{0};

  // Counters.
  std::atomic<uint64_t> rejected_{0}, exceptions_{0}, doorbells_{0}, swept_{0}, sweeps_{0},
      shutdown_failed_{0}, parks_{0}, early_doorbells_{0}, stale_headers_{0}, foreign_lanes_{0};

  // Aborted launches (cpu device) and a lost device (cuda); abort.cpp.
  std::unique_ptr<ClaimRecord[]> claims_;
  std::mutex quarantine_mu_;
  // (slot << 32 | seq) -> staging run (first << 32 | count) of calls answered by
  // reclaim_launch() while their handler still ran.
  std::unordered_map<uint64_t, uint64_t> quarantine_;
  std::atomic<uint32_t> quarantined_{0};  // quarantine_.size(), read without the lock
  mutable std::mutex failed_mu_;
  Status failed_;                         // guarded by failed_mu_
  std::atomic<bool> failed_flag_{false};
  std::atomic<uint64_t> reclaimed_slots_{0}, reclaimed_calls_{0};

  std::once_flag shutdown_once_;
  bool leak_memory_ = false;  // kernels still ran at destruction: freeing would fault them
};

// Monotonic nanoseconds for host-side timing.
int64_t now_ns();

}  // namespace gpusock::internal
