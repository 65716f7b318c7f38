// gpusock/hostcall/runtime.hpp — the host runtime: owns the hostcall region, the service
// threads that answer calls, and the device kernels run on.
//
//   gpusock::RuntimeOptions opts;                  // device: GPUSOCK_DEVICE or auto
//   auto rt = gpusock::Runtime::create(opts);
//   if (!rt.ok()) return fail(rt.status());
//   (*rt)->register_handler(kMyOp, "my-op", [](gpusock::hostcall::Call& c) { c.set_all(7); });
//   auto k = gpusock::launch(**rt, {4}, {128}, MyKernel{}, args...);   // launch.hpp
//   k->wait();
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpusock/hostcall/handler.hpp"
#include "gpusock/hostcall/protocol.hpp"
#include "gpusock/hostcall/service_hook.hpp"
#include "gpusock/hostcall/status.hpp"

namespace gpusock {

enum class DeviceKind { kAuto, kCuda, kCpu };
const char* to_string(DeviceKind kind);

struct RuntimeOptions {
  // kAuto: the environment variable GPUSOCK_DEVICE (cuda|cpu) if set, else cuda when a
  // GPU is present, else cpu. kCuda fails at create() when there is no usable GPU.
  DeviceKind device = DeviceKind::kAuto;
  int cuda_device = 0;

  // Host service threads that answer hostcalls, and whether each pins itself to a core
  // (thread i to cpu_list[i % size], or to core i when cpu_list is empty).
  uint32_t service_threads = 1;
  bool pin_service_threads = false;
  std::vector<int> cpu_list;

  // A service thread that found no work keeps polling for spin_time, then parks and
  // re-checks every park_interval: the wake-up delay of an idle runtime is bounded by
  // park_interval (plus scheduling); bench/hostcall measures it.
  std::chrono::nanoseconds spin_time = std::chrono::microseconds(200);
  std::chrono::nanoseconds park_interval = std::chrono::microseconds(50);
  // Every sweep_interval one service thread scans all slots and takes requests that were
  // already pending at the previous sweep: a call whose doorbell was lost waits at most
  // two intervals. Doorbells are hints; the sweep is what guarantees progress.
  std::chrono::nanoseconds sweep_interval = std::chrono::milliseconds(5);

  // Slots = max resident warps of the device * slots_per_warp (at least 1 per resident
  // warp, so warps making synchronous calls can never starve each other of slots).
  uint32_t slots_per_warp = 2;
  // How long a submission waits for a free slot before it fails with EBUSY. The pool runs
  // dry only when kernels hold more tickets (or more diverged blocking calls) than there
  // are slots; the bound turns that into an error instead of a hang. 0: wait until
  // shutdown. try_submit() never waits. Waits for staging are not bounded: they are the
  // backpressure of sends.
  std::chrono::nanoseconds slot_wait = std::chrono::seconds(10);
  // Pinned staging arena for payloads, rounded up to whole 256 KiB words of pages.
  uint64_t staging_bytes = 16ull << 20;

  // Where kernels' write(1, ...) and write(2, ...) go.
  int stdout_fd = 1;
  int stderr_fd = 2;

  // cpu device: most warps resident at once (each lane is a host thread), and the
  // largest block. Blocks wait for room, as on a GPU.
  uint32_t cpu_resident_warps = 64;
};

// Host service time of calls, from the moment a service thread claims the slot to the
// reply's publication (a deferred call's I/O included), in power-of-two buckets: bucket 0
// counts calls under 2 ns, bucket i >= 1 those in [2^i, 2^(i+1)) ns, the last everything
// from 2^(kBuckets-1) ns (about 9 minutes) up.
struct LatencyHistogram {
  static constexpr uint32_t kBuckets = 40;
  std::array<uint64_t, kBuckets> buckets{};
  uint64_t count = 0;
  uint64_t sum_ns = 0;
  // The upper edge (exclusive) of the bucket holding the q-quantile (0 < q <= 1), so the
  // true value is at most this and more than half of it; 0 when nothing was counted.
  uint64_t quantile_ns(double q) const;
  void merge(const LatencyHistogram& other);
};

// Counters of calls the host has served. Cheap to read; no lock on the hot path.
struct OpcodeStats {
  uint32_t opcode = 0;
  std::string name;
  uint64_t calls = 0;   // slots answered (one per warp group)
  uint64_t lanes = 0;   // lane calls answered
  uint64_t errors = 0;  // lane results < 0
  LatencyHistogram latency;  // per call (warp group)
};
struct RuntimeStats {
  std::vector<OpcodeStats> by_opcode;  // registered opcodes, ascending
  uint64_t calls = 0, lanes = 0, errors = 0;
  uint64_t rejected = 0;        // calls failed by validation (bad opcode, mask, nargs)
  uint64_t handler_exceptions = 0;
  uint64_t doorbells = 0;       // calls found through the doorbell ring
  uint64_t swept = 0;           // calls found only by the timed sweep
  uint64_t sweeps = 0;
  uint64_t shutdown_failed = 0; // calls answered ESHUTDOWN at shutdown
  uint64_t parks = 0;           // times a service thread parked
  uint64_t early_doorbells = 0; // doorbells that arrived before their slot's state
  // Requests whose header did not carry the seq of their state word (a kernel's bad
  // request), answered -EPROTO; and lanes a request named that did not write it (their
  // tag is not the request's seq), each answered -EPROTO in its own column.
  uint64_t stale_headers = 0;
  uint64_t foreign_lanes = 0;
  uint64_t reclaimed_slots = 0; // slots taken back from aborted launches (cpu device)
  uint64_t reclaimed_calls = 0; // of those, calls in flight answered ECANCELED
  // Occupancy, read when stats() is called (a diagnostic copy of device state; on a GPU
  // one small cudaMemcpy each, never on the hot path). A value may be a moment old.
  uint32_t slots = 0;              // slots in the region
  uint32_t slots_owned = 0;        // slots a warp holds (slot bitmap in device memory)
  uint32_t calls_in_flight = 0;    // slots published and not yet answered
  uint32_t staging_pages = 0;      // 4 KiB pages in the staging arena
  uint32_t staging_pages_used = 0; // pages held by calls (staging bitmap)
  uint64_t deliveries = 0;         // deliver() copies made for modules (net/ receives)
  uint64_t delivered_bytes = 0;
  uint64_t fetches = 0;            // start_fetch() copies made for modules (net/ sends)
  uint64_t fetched_bytes = 0;
};

namespace internal {
class Core;
}

class Runtime {
 public:
  // Starts a runtime on the chosen device. Fails with a message naming what is missing.
  static Result<std::unique_ptr<Runtime>> create(const RuntimeOptions& options = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  DeviceKind device() const;
  std::string device_name() const;

  // Registers `handler` for `opcode`. Returns ok, or EINVAL (opcode out of range or in
  // the core range), EEXIST (already registered), ESHUTDOWN (runtime shut down).
  // Handlers may be registered while kernels run.
  Status register_handler(uint32_t opcode, std::string name, hostcall::Handler handler);

  // Registers the handler for op::kDescriptorWrite (write() on descriptors other than 1
  // and 2), for the module that owns descriptors (net/). Returns ok, or EEXIST.
  Status register_descriptor_write(hostcall::Handler handler);

  RuntimeStats stats() const;

  // Ok while the runtime can run kernels. After a CUDA kernel trapped or faulted (a sticky
  // error that loses the device context) it returns EIO naming the cause; launch(),
  // register_handler(), the allocators and copies then return that error too. The only
  // way on is to destroy this Runtime (which resets the GPU) and create a new one.
  Status health() const;

  // Installs the event loop a module runs on the service threads (service_hook.hpp); one
  // per runtime. Returns ok, or EEXIST (one is installed), ESHUTDOWN, EINVAL (null).
  Status set_service_hook(std::shared_ptr<hostcall::ServiceHook> hook);

  // Fails every pending call with ESHUTDOWN, tells running kernels to give up waiting,
  // and stops the service threads. Idempotent; the destructor calls it.
  void shutdown();
  bool is_shut_down() const;

  // Memory kernels can use: device memory on a GPU, host memory on the cpu device.
  // Allocations are zeroed. See device_buffer.hpp for an owning wrapper.
  Result<void*> device_alloc(size_t bytes);
  // Frees what device_alloc() returned (nullptr: nothing). Anything else is left alone
  // and refused: ENOENT for a pointer that is not the start of a live allocation (an
  // interior pointer, a second free), EINVAL for the start of memory registered with
  // register_device_memory() (the program's own: unregister it, then free it yourself).
  Status device_free(void* ptr);
  Status copy_to_device(void* dst, const void* src, size_t bytes);
  Status copy_from_device(void* dst, const void* src, size_t bytes);
  // Copies host bytes into memory a kernel named, for modules answering kernels (net/
  // puts received bytes straight into the kernel's buffer this way): a DMA copy on a GPU
  // (synchronous, beside running kernels), memcpy on the cpu device. Only into memory
  // from device_alloc(): returns EFAULT unless [dst, dst + bytes) lies inside one live
  // allocation, so a kernel's wrong pointer can never make the host write elsewhere.
  // Thread-safe; device_free() of the allocation waits for a copy into it to end.
  Status deliver(void* dst, const void* src, size_t bytes);
  // The same, started and not waited for: the copy runs on the calling thread's own copy
  // stream while the thread goes on (on the cpu device it is made at once). `src` must
  // stay unchanged until finish_deliveries() on the same thread returns: with no
  // argument it waits for every delivery that thread started; given the `ticket` a
  // start_delivery() wrote, for that delivery and every one the thread started before it
  // (a thread's deliveries end in the order they started), so a caller can reuse one
  // source area while later copies still run. A ticket of 0 is a delivery made at once
  // (the cpu device), which finish_deliveries(0) does not wait for. A delivery whose allocation is freed
  // before it ends is the caller's mistake, as with any copy.
  Status start_delivery(void* dst, const void* src, size_t bytes, uint64_t* ticket = nullptr);
  // Whether [p, p + bytes) lies inside one live device_alloc() allocation or registered
  // range (what deliver() checks).
  bool is_device_memory(const void* p, size_t bytes) const;
  // Device memory the caller allocated itself (cudaMalloc, cudaMallocAsync, managed
  // memory, a framework's tensor) that kernels receive into: once registered, the host
  // delivers into it as into device_alloc() memory (docs/architecture.md 12.4, receive
  // 3a) instead of lending buffers for the warps to copy out. On a GPU both ends of the
  // range must be device or managed memory of the runtime's device
  // (cudaPointerGetAttributes), else EINVAL; on the cpu device any memory. EEXIST when it
  // overlaps a registered range or an allocation, EINVAL for an empty or overflowing
  // range. The runtime only reads the pointer; it never frees it.
  Status register_device_memory(void* p, size_t bytes);
  // Removes the range that starts at p (ENOENT if none): no delivery writes into it after
  // this returns, so unregister before freeing the memory. Waits for a synchronous
  // deliver() into it; deliveries started and not finished are the caller's to finish.
  Status unregister_device_memory(void* p);
  static constexpr uint64_t kAllDeliveries = ~uint64_t{0};
  Status finish_deliveries(uint64_t ticket = kAllDeliveries);
  // Whether finish_deliveries(ticket) would return at once, without waiting: true when
  // that copy and every one the thread started before it have ended; false while one
  // runs, or when asking failed (finish_deliveries() then says why).
  bool deliveries_done(uint64_t ticket = kAllDeliveries);
  // The other direction, for modules that send what a kernel names (net/ sends a warp's
  // buffer straight from device memory this way, docs 12.4 send step 2a): starts a copy
  // of [src, src + bytes) into host memory `dst` (pinned for a DMA copy that runs beside
  // kernels) on the calling thread's copy stream. Only out of memory is_device_memory()
  // accepts: EFAULT otherwise, so a kernel's wrong pointer can never make the host read
  // elsewhere. Fetches share the thread's tickets with its deliveries (one sequence, one
  // order): finish_deliveries(ticket) waits for both.
  Status start_fetch(void* dst, const void* src, size_t bytes, uint64_t* ticket = nullptr);

  // Pinned host memory that kernels read and write directly (zero-copy), zeroed:
  // `host` for host threads, `device` for kernels. Freed with mapped_free(host).
  struct Mapped {
    void* host = nullptr;
    void* device = nullptr;
  };
  Result<Mapped> mapped_alloc(size_t bytes);
  void mapped_free(void* host);
  // Hands a mapped allocation to the runtime: it is freed when the runtime's core goes
  // away, after every service thread and kernel has stopped. For modules whose buffers
  // kernels may still read after the module object is gone.
  void mapped_free_at_exit(void* host);
  // The same for device_alloc() memory.
  void device_free_at_exit(void* device);
  // Publishes a module's device state to kernels as DeviceContext::modules[index]
  // (hostcall::module_state(index) on the device), with up to kModuleHeadBytes of `head`
  // (hostcall::module_head(index)): what a module's hot paths read and never change, which
  // a GPU kernel then reads from its block's shared copy of the context. Set it before
  // launching kernels that use it: a GPU block copies the context when it starts. Returns
  // ok, or EINVAL (index out of range, null, head too long), EEXIST (already set).
  Status set_module_state(uint32_t index, void* device_ptr, const void* head = nullptr, size_t head_bytes = 0);
  uint32_t service_threads() const;

  // Region facts, for modules built on hostcall (net/ registers the staging arena with
  // io_uring and RDMA).
  uint8_t* staging_host() const;
  uint64_t staging_size() const;
  uint32_t slot_count() const;
  uint32_t max_resident_warps() const;

  internal::Core& core() { return *core_; }
  const hostcall::DeviceContext* device_context() const;  // device-visible pointer

 private:
  explicit Runtime(std::shared_ptr<internal::Core> core);
  std::shared_ptr<internal::Core> core_;
};

// The runtime's default device choice, without creating one: GPUSOCK_DEVICE if set,
// else cuda when a usable GPU is present.
DeviceKind detect_device();
// Whether this build can drive a GPU at all (compiled with CUDA) and one is present.
bool cuda_available();

}  // namespace gpusock
