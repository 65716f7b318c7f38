// The host dispatcher: service threads find published slots through the doorbell ring
// (and a timed sweep), validate what the kernel wrote, run the handler, and publish the
// reply. See docs/architecture.md for the protocol this implements.
#include "core.hpp"

#include "decode.hpp"

#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

namespace gpusock::internal {

using hostcall::Call;
using hostcall::kMaxArgs;
using gpusock::kWarpSize;
using hostcall::Slot;

namespace {

constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

uint32_t next_pow2(uint32_t v) {
  uint32_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Host view of a slot's state word, shared with the device.
std::atomic_ref<uint64_t> state_of(Slot& s) { return std::atomic_ref<uint64_t>(s.hdr.state); }

}  // namespace

int64_t now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

Result<std::shared_ptr<Core>> Core::create(const RuntimeOptions& options) {
  std::shared_ptr<Core> core(new Core(options));
  Status s = core->init();
  if (!s.ok()) return s;
  core->register_builtins();
  core->start_threads();
  return core;
}

Status Core::init() {
  if (options_.service_threads == 0 || options_.service_threads > 256) {
    return {EINVAL, "service_threads must be 1..256"};
  }
  if (options_.slots_per_warp == 0) return {EINVAL, "slots_per_warp must be at least 1"};

  DeviceKind kind = options_.device == DeviceKind::kAuto ? detect_device() : options_.device;
  if (kind == DeviceKind::kCuda) {
    auto b = make_cuda_backend(options_);
    if (!b.ok()) return b.status();
    device_ = std::move(b.value());
  } else {
    device_ = make_cpu_backend(options_);
  }

  uint64_t slots64 = static_cast<uint64_t>(device_->max_resident_warps()) * options_.slots_per_warp;
  if (slots64 > hostcall::kMaxSlots) slots64 = hostcall::kMaxSlots;  // below kFillerSlot
  nslots_ = static_cast<uint32_t>(slots64);
  copied_ = std::make_unique<std::atomic<uint64_t>[]>(nslots_);
  // Twice the slots: a ring that only laps when the host stops consuming entirely.
  ring_cap_ = next_pow2(nslots_ * 2);
  const uint64_t word_bytes = uint64_t{hostcall::kStagingPageBytes} * 64;
  staging_bytes_ = std::max<uint64_t>(word_bytes, align_up(options_.staging_bytes, word_bytes));
  const uint32_t staging_pages = static_cast<uint32_t>(staging_bytes_ / hostcall::kStagingPageBytes);
  staging_pages_ = staging_pages;

  // One mapped block: control line, slots, ring, launch causes, staging (page aligned).
  const bool cuda = device_->kind() == DeviceKind::kCuda;
  const size_t off_slots = 64;
  const size_t off_ring = off_slots + sizeof(Slot) * nslots_;
  const size_t off_cause = align_up(off_ring + sizeof(uint64_t) * ring_cap_, 64);
  const size_t cause_bytes = cuda ? 4ull * hostcall::kLaunchIds * hostcall::kLaunchCauseWords : 0;
  const size_t off_staging = align_up(off_cause + cause_bytes, 4096);
  const size_t mapped_bytes = off_staging + staging_bytes_;
  void* host = nullptr;
  void* dev = nullptr;
  Status s = device_->alloc_mapped(mapped_bytes, &host, &dev);
  if (!s.ok()) return s;
  mapped_block_ = host;
  auto* hb = static_cast<uint8_t*>(host);
  auto* db = static_cast<uint8_t*>(dev);
  control_h_ = reinterpret_cast<hostcall::ControlBlock*>(hb);
  slots_h_ = reinterpret_cast<Slot*>(hb + off_slots);
  ring_h_ = reinterpret_cast<uint64_t*>(hb + off_ring);
  staging_h_ = hb + off_staging;
  if (cuda) {
    launch_cause_h_ = reinterpret_cast<uint32_t*>(hb + off_cause);
    launch_cause_dev_ = reinterpret_cast<uint32_t*>(db + off_cause);
  }
  control_h_->magic = hostcall::kControlMagic;
  swept_tags_.assign(nslots_, 0);

  // One device block: context, slot bitmap, ring position, staging bitmap, errno slots,
  // and on cuda the claim records and the launches' abort words.
  const uint32_t slot_words = (nslots_ + 31) / 32;
  const uint32_t staging_words = staging_pages / 64;
  const uint64_t errno_count = uint64_t{device_->sm_ids()} * device_->threads_per_sm();
  const size_t d_ctx = 0;
  const size_t d_bitmap = align_up(sizeof(hostcall::DeviceContext), 256);
  const size_t d_ringpos = align_up(d_bitmap + 4ull * slot_words, 256);
  const size_t d_staging = align_up(d_ringpos + 4, 256);
  const size_t d_errno = align_up(d_staging + 8ull * staging_words, 256);
  const size_t d_claims = align_up(d_errno + 4 * errno_count, 256);
  const size_t d_abort = align_up(d_claims + (cuda ? sizeof(ClaimRecord) * nslots_ : 0), 256);
  const size_t device_bytes = d_abort + (cuda ? 4ull * hostcall::kLaunchIds : 0);
  void* dblock = nullptr;
  s = device_->alloc_device(device_bytes, &dblock);
  if (!s.ok()) return s;
  device_block_ = dblock;
  auto* dd = static_cast<uint8_t*>(dblock);

  // Bits past the last slot start set, so no warp can ever claim them.
  if (nslots_ % 32 != 0) {
    uint32_t tail = ~((1u << (nslots_ % 32)) - 1);
    s = device_->copy_to_device(dd + d_bitmap + 4ull * (slot_words - 1), &tail, 4);
    if (!s.ok()) return s;
  }

  hostcall::DeviceContext c{};
  c.slots = reinterpret_cast<Slot*>(db + off_slots);
  c.ring = reinterpret_cast<uint64_t*>(db + off_ring);
  c.control = reinterpret_cast<hostcall::ControlBlock*>(db);
  c.staging = db + off_staging;
  c.state.slot_bitmap = reinterpret_cast<uint32_t*>(dd + d_bitmap);
  slot_bitmap_dev_ = c.state.slot_bitmap;
  staging_bitmap_dev_ = reinterpret_cast<uint64_t*>(dd + d_staging);
  c.state.ring_pos = reinterpret_cast<uint32_t*>(dd + d_ringpos);
  c.state.staging_bitmap = reinterpret_cast<uint64_t*>(dd + d_staging);
  c.state.errno_slots = reinterpret_cast<int32_t*>(dd + d_errno);
  if (cuda) {
    c.state.claims = reinterpret_cast<ClaimRecord*>(dd + d_claims);
    claims_dev_ = c.state.claims;
    launch_abort_dev_ = reinterpret_cast<uint32_t*>(dd + d_abort);
    for (uint32_t id = hostcall::kLaunchIds - 1; id >= 1; --id) free_launch_ids_.push_back(id);
  }
  c.nslots = nslots_;
  c.ring_mask = ring_cap_ - 1;
  c.staging_pages = staging_pages;
  c.threads_per_sm = device_->threads_per_sm();
  c.errno_sms = device_->sm_ids();
  c.slots_per_warp = options_.slots_per_warp;
  c.slot_wait_ns = static_cast<uint64_t>(std::max<int64_t>(0, options_.slot_wait.count()));
  if (device_->kind() == DeviceKind::kCpu) claims_.reset(new ClaimRecord[nslots_]());
  s = device_->calibrate_clock(&c.monotonic_offset_ns, &c.realtime_offset_ns);
  if (!s.ok()) return s;
  s = device_->copy_to_device(dd + d_ctx, &c, sizeof(c));
  if (!s.ok()) return s;
  ctx_dev_ = reinterpret_cast<hostcall::DeviceContext*>(dd + d_ctx);
  return {};
}

void Core::start_threads() {
  next_sweep_ns_.store(now_ns() + options_.sweep_interval.count(), std::memory_order_relaxed);
  for (uint32_t i = 0; i < options_.service_threads; ++i) {
    threads_running_.fetch_add(1, std::memory_order_relaxed);
    thread_done_.push_back(std::make_unique<std::atomic<bool>>(false));
    threads_.emplace_back([self = shared_from_this(), i] { self->service_loop(i); });
  }
}

Core::~Core() {
  shutdown();
  if (leak_memory_) return;
  if (device_block_ != nullptr) device_->free_device(device_block_);
  if (mapped_block_ != nullptr) device_->free_mapped(mapped_block_);
  for (void* p : adopted_mapped_) device_->free_mapped(p);
  for (void* p : adopted_device_) device_->free_device(p);
  if (failed()) device_->reset_after_failure();
}

Status Core::set_module_state(uint32_t index, void* device_ptr, const void* head, size_t head_bytes) {
  if (index >= hostcall::kModuleStates || device_ptr == nullptr) return {EINVAL, "bad module state index or null pointer"};
  if (head_bytes > hostcall::kModuleHeadBytes || (head_bytes > 0 && head == nullptr)) {
    return {EINVAL, "a module head is at most " + std::to_string(hostcall::kModuleHeadBytes) + " bytes"};
  }
  std::lock_guard<std::mutex> lock(hook_mu_);
  if (module_states_[index] != nullptr) return {EEXIST, "module state " + std::to_string(index) + " is already set"};
  // The head first: a kernel that sees the pointer sees the head with it.
  Status s = head_bytes > 0 ? device_->copy_to_device(ctx_dev_->module_heads[index], head, head_bytes) : Status{};
  if (s.ok()) s = device_->copy_to_device(&ctx_dev_->modules[index], &device_ptr, sizeof device_ptr);
  if (s.ok()) module_states_[index] = device_ptr;
  return s;
}

Status Core::register_handler(uint32_t opcode, std::string name, hostcall::Handler fn, bool core_range_ok) {
  if (opcode >= hostcall::kOpcodeLimit) return {EINVAL, "opcode " + std::to_string(opcode) + " is out of range"};
  if (!core_range_ok && opcode <= hostcall::kCoreLast) {
    return {EINVAL, "opcodes 0x0000-0x00ff belong to the hostcall core"};
  }
  if (!fn) return {EINVAL, "empty handler"};
  if (is_shut_down()) return {ESHUTDOWN, "runtime is shut down"};
  std::lock_guard<std::mutex> lock(handlers_mu_);
  if (handlers_[opcode].load(std::memory_order_relaxed) != nullptr) {
    return {EEXIST, "opcode " + std::to_string(opcode) + " already has a handler"};
  }
  auto e = std::make_unique<HandlerEntry>();
  e->opcode = opcode;
  e->name = std::move(name);
  e->fn = std::move(fn);
  // Release: a service thread that loads the pointer sees a fully built entry.
  handlers_[opcode].store(e.get(), std::memory_order_release);
  handler_store_.push_back(std::move(e));
  return {};
}

namespace {
thread_local int tls_service_thread = -1;
}

Status Core::set_service_hook(std::shared_ptr<hostcall::ServiceHook> hook) {
  if (hook == nullptr) return Status(EINVAL, "set_service_hook: null hook");
  std::lock_guard<std::mutex> lock(hook_mu_);
  if (stopping_.load(std::memory_order_acquire)) return Status(ESHUTDOWN, "runtime is shut down");
  if (hook_store_ != nullptr) return Status(EEXIST, "a service hook is already installed");
  hook_store_ = std::move(hook);
  // Release: a thread that loads the pointer sees a fully built hook.
  hook_.store(hook_store_.get(), std::memory_order_release);
  return {};
}

void Core::service_loop(uint32_t index) {
  tls_service_thread = static_cast<int>(index);
  // Parking relies on short sleeps; the default 50 us timer slack would double them.
  prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
  if (options_.pin_service_threads) {
    int cpu = options_.cpu_list.empty() ? static_cast<int>(index)
                                        : options_.cpu_list[index % options_.cpu_list.size()];
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    if (rc != 0) std::fprintf(stderr, "gpusock: cannot pin service thread %u to cpu %d: %s\n", index, cpu, std::strerror(rc));
  }
  const int64_t spin_ns = options_.spin_time.count();
  int64_t last_work = now_ns();
  std::vector<Early> early;
  while (!stopping_.load(std::memory_order_acquire)) {
    uint32_t n = drain_ring(64, early);
    if (!early.empty()) n += retry_early(early);
    hostcall::ServiceHook* hook = hook_.load(std::memory_order_acquire);
    if (hook != nullptr) n += hook->poll(index);
    int64_t now = now_ns();
    if (now >= next_sweep_ns_.load(std::memory_order_relaxed)) n += sweep();
    if (n > 0) {
      last_work = now;
      continue;
    }
    if (now - last_work < spin_ns) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
      continue;
    }
    // Park: nothing arrived for spin_time. The device cannot wake a host thread, so the
    // park is a bounded sleep; park_interval is the worst added delay for the next call.
    parks_.fetch_add(1, std::memory_order_relaxed);
    if (hook != nullptr) {
      // The hook blocks in its own wait (io_uring_enter), which its completions end early.
      hook->park(index, options_.park_interval);
    } else {
      std::unique_lock<std::mutex> lock(park_mu_);
      park_cv_.wait_for(lock, options_.park_interval,
                        [this] { return stopping_.load(std::memory_order_acquire); });
    }
  }
  // The hook cancels and frees what this thread owns, but only after shutdown() has failed
  // every pending call with ESHUTDOWN: a call the hook cancelled first would answer
  // ECANCELED instead. (Bounded: shutdown() sets the flag right after its first pass.)
  if (hostcall::ServiceHook* hook = hook_.load(std::memory_order_acquire)) {
    for (int i = 0; i < 20000 && !pending_failed_.load(std::memory_order_acquire); ++i) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    hook->thread_stop(index);
  }
  thread_done_[index]->store(true, std::memory_order_release);
  threads_running_.fetch_sub(1, std::memory_order_release);
}

uint32_t Core::drain_ring(uint32_t budget, std::vector<Early>& early) {
  uint32_t done = 0;
  while (done < budget) {
    uint32_t head = ring_head_.load(std::memory_order_acquire);
    // Acquire pairs with nothing on the device (the doorbell store is relaxed); the
    // state word read in on_doorbell() is what carries the request's data.
    uint64_t e = std::atomic_ref<uint64_t>(ring_h_[head & (ring_cap_ - 1)]).load(std::memory_order_acquire);
    const RingEntry r = decode_ring_entry(e, head);
    if (r.kind == RingEntryKind::kDoorbell || r.kind == RingEntryKind::kFiller) {
      if (!ring_head_.compare_exchange_strong(head, head + 1, std::memory_order_acq_rel)) continue;
      if (r.kind == RingEntryKind::kFiller) continue;
      doorbells_.fetch_add(1, std::memory_order_relaxed);
      if (on_doorbell(r.slot, r.seq_low) == DoorbellResult::kEarly) {
        early_doorbells_.fetch_add(1, std::memory_order_relaxed);
        early.push_back({r.slot, r.seq_low, now_ns()});
      }
      ++done;
      continue;
    }
    if (r.kind == RingEntryKind::kLapped) {
      // The device lapped us: jump to the entry it left here. Whatever lay between is
      // found by the sweep.
      ring_head_.compare_exchange_strong(head, r.new_head, std::memory_order_acq_rel);
      continue;
    }
    break;  // not written yet
  }
  return done;
}

Core::DoorbellResult Core::on_doorbell(uint32_t slot, uint32_t seq_low) {
  if (slot >= nslots_) {
    rejected_.fetch_add(1, std::memory_order_relaxed);
    return DoorbellResult::kDone;
  }
  uint64_t st = state_of(slots_h_[slot]).load(std::memory_order_acquire);
  switch (classify_doorbell(slot, seq_low, nslots_, st)) {
    case DoorbellAction::kClaim:
      claim_and_run(slot, st);
      return DoorbellResult::kDone;
    case DoorbellAction::kEarly:
      return DoorbellResult::kEarly;
    case DoorbellAction::kReject:  // not reached: checked above, before the state load
    case DoorbellAction::kIgnore:
      break;
  }
  return DoorbellResult::kDone;  // already taken by the sweep, or a stale doorbell
}

uint32_t Core::retry_early(std::vector<Early>& early) {
  uint32_t done = 0;
  const int64_t now = now_ns();
  for (size_t i = 0; i < early.size();) {
    DoorbellResult r = on_doorbell(early[i].slot, early[i].seq_low);
    // Past 1 ms the sweep will find it; stop looking here.
    if (r == DoorbellResult::kDone || now - early[i].since > 1'000'000) {
      done += r == DoorbellResult::kDone;
      early[i] = early.back();
      early.pop_back();
    } else {
      ++i;
    }
  }
  return done;
}

uint32_t Core::sweep() {
  bool expected = false;
  if (!sweeping_.compare_exchange_strong(expected, true, std::memory_order_acquire)) return 0;
  next_sweep_ns_.store(now_ns() + options_.sweep_interval.count(), std::memory_order_relaxed);
  sweeps_.fetch_add(1, std::memory_order_relaxed);
  // Only requests that were already pending, with the same seq, at the previous sweep
  // are taken here: those are the ones whose doorbell went missing. A request merely
  // queued behind others is left to its doorbell, so a busy host does no double work.
  uint32_t found = 0;
  for (uint32_t i = 0; i < nslots_; ++i) {
    uint64_t st = state_of(slots_h_[i]).load(std::memory_order_acquire);
    uint32_t tag = hostcall::state_tag(st);
    bool pending = hostcall::state_phase(st) == hostcall::kRequest;
    if (pending && swept_tags_[i] == tag && claim_and_run(i, st)) {
      swept_.fetch_add(1, std::memory_order_relaxed);
      ++found;
    }
    swept_tags_[i] = pending ? tag : 0;
  }
  // A producer that took a ring position and never wrote it would hold up every later
  // doorbell. If the head has not moved since the last sweep and entries after it are
  // written, step over it.
  uint32_t head = ring_head_.load(std::memory_order_acquire);
  if (head == last_swept_head_) {
    for (uint32_t k = 1; k < 64; ++k) {
      uint64_t e = std::atomic_ref<uint64_t>(ring_h_[(head + k) & (ring_cap_ - 1)]).load(std::memory_order_acquire);
      if (hostcall::ring_entry_tag(e) == head + k + 1) {
        ring_head_.compare_exchange_strong(head, head + k, std::memory_order_acq_rel);
        break;
      }
    }
  }
  last_swept_head_ = ring_head_.load(std::memory_order_relaxed);
  sweeping_.store(false, std::memory_order_release);
  return found;
}

bool Core::claim_and_run(uint32_t slot, uint64_t st) {
  Slot& s = slots_h_[slot];
  uint32_t seq = hostcall::state_seq(st);
  // Acquire: pairs with the device's release of kRequest; after this, the header,
  // arguments and payload the kernel wrote are visible. The CAS makes exactly one host
  // thread the owner.
  if (!state_of(s).compare_exchange_strong(st, hostcall::make_state(seq, hostcall::kClaimed),
                                           std::memory_order_acq_rel)) {
    return false;
  }
  // Copy the header once; every check below uses the copy, so a kernel that writes the
  // slot again cannot change what was validated.
  hostcall::SlotHeader hdr;
  std::memcpy(&hdr, &s.hdr, sizeof(hdr));
  Call call;
  call.core_ = this;
  call.slot_ = slot;
  call.seq_ = seq;
  call.opcode_ = hdr.opcode;
  call.mask_ = hdr.lane_mask;
  call.nargs_ = hdr.nargs;
  call.origin_ = hdr.origin;
  call.staging_first_ = hdr.staging_first;
  call.staging_count_ = hdr.staging_count;
  if (!check_tags(call, hdr)) return true;
  // One vDSO clock read here and one at commit() (tens of ns against a microseconds round
  // trip) give the service-time histogram.
  call.claimed_ns_ = now_ns();
  run(call, hdr);
  return true;
}

bool Core::check_tags(Call& call, const hostcall::SlotHeader& hdr) {
  const Slot& s = slots_h_[call.slot_];
  const uint32_t tag = hostcall::request_tag(call.seq_);
  uint32_t foreign = 0;
  for (uint32_t m = hdr.lane_mask; m != 0; m &= m - 1) {
    const uint32_t lane = __builtin_ctz(m);
    if (s.tag[lane] != tag) foreign |= 1u << lane;
  }
  const bool stale = hdr.seq != call.seq_;
  if (!stale && foreign == 0) return true;
  // A kernel's bad request, never a late store: the device writes the header and every
  // lane's tag before it releases the state word this thread acquired. Say what was seen
  // for the first few, since nothing else would show it.
  static std::atomic<uint32_t> reported{0};
  if (reported.fetch_add(1, std::memory_order_relaxed) < 8) {
    std::fprintf(stderr,
                 "gpusock: request in slot %u (seq %u, opcode %u, lanes %08x, warp %llu) %s; lanes %08x "
                 "did not write it (first: lane %d, tag %u)\n",
                 call.slot_, call.seq_, hdr.opcode, hdr.lane_mask, static_cast<unsigned long long>(hdr.origin),
                 stale ? "has a header from another request" : "has its own header", foreign,
                 foreign ? __builtin_ctz(foreign) : -1, foreign ? s.tag[__builtin_ctz(foreign)] : 0u);
  }
  if (stale) {
    // Nothing in the header can be trusted, the lane mask included: one inline -EPROTO,
    // which writes no lane's column.
    stale_headers_.fetch_add(1, std::memory_order_relaxed);
    reject(call, -EPROTO);
    return false;
  }
  // The lanes that did write it are served; the others get -EPROTO in their own column
  // (commit), where a lane that really waits here would find it.
  foreign_lanes_.fetch_add(__builtin_popcount(foreign), std::memory_order_relaxed);
  call.foreign_ = foreign;
  call.mask_ &= ~foreign;
  if (call.mask_ != 0) return true;
  reject(call, -EPROTO);
  return false;
}

void Core::reject(Call& call, int64_t error) {
  rejected_.fetch_add(1, std::memory_order_relaxed);
  mark_copied(call.slot_, call.seq_);
  call.nargs_ = 0;
  call.nresults_ = 1;
  call.set_all(error);
  commit(call);
}

void Core::run(Call& call, const hostcall::SlotHeader& hdr) {
  for (uint32_t m = call.mask_; m != 0; m &= m - 1) call.results_[0][__builtin_ctz(m)] = 0;
  const int verdict = check_header(hdr);
  if (verdict == -EINVAL) {
    reject(call, -EINVAL);
    return;
  }
  HandlerEntry* h = verdict == 0 ? handlers_[call.opcode_].load(std::memory_order_acquire) : nullptr;
  if (h == nullptr) {
    reject(call, -ENOSYS);
    return;
  }
  const Slot& s = slots_h_[call.slot_];
  for (uint32_t k = 0; k < call.nargs_; ++k) {
    for (uint32_t m = call.mask_; m != 0; m &= m - 1) {
      uint32_t lane = __builtin_ctz(m);
      call.args_[k][lane] = s.data[k][lane];
    }
  }
  mark_copied(call.slot_, call.seq_);
  try {
    h->fn(call);
  } catch (...) {
    // A handler must never take the host down, nor leave the kernel waiting.
    exceptions_.fetch_add(1, std::memory_order_relaxed);
    if (!call.deferred_) {
      call.nresults_ = 1;
      call.set_all(-EIO);
    }
  }
  h->calls.fetch_add(1, std::memory_order_relaxed);
  h->lanes.fetch_add(__builtin_popcount(call.mask_), std::memory_order_relaxed);
  if (call.deferred_) return;
  uint64_t errors = 0;
  call.for_each_lane([&](uint32_t lane) { errors += call.result(lane) < 0; });
  if (errors != 0) h->errors.fetch_add(errors, std::memory_order_relaxed);
  commit(call);
}

bool Core::commit(Call& call) {
  Slot& s = slots_h_[call.slot_];
  uint64_t claimed = hostcall::make_state(call.seq_, hostcall::kClaimed);
  // Whoever moves kClaimed to kCompleting answers; the loser (a late deferred reply
  // after shutdown failed the call) must not touch the slot.
  if (!state_of(s).compare_exchange_strong(claimed, hostcall::make_state(call.seq_, hostcall::kCompleting),
                                           std::memory_order_acq_rel)) {
    // Answered already. If an aborted launch's reclaim answered it, its staging run
    // waited for this handler to be done with the payload.
    if (quarantined_.load(std::memory_order_acquire) != 0) release_quarantined(call.slot_, call.seq_);
    return false;
  }
  // Inline reply when every lane has the same single result and it fits in 32 bits: the
  // device then reads one word for the whole call.
  bool uniform = call.nresults_ <= 1 && call.foreign_ == 0;
  int64_t first = 0;
  bool have_first = false;
  for (uint32_t m = call.mask_; uniform && m != 0; m &= m - 1) {
    int64_t v = static_cast<int64_t>(call.results_[0][__builtin_ctz(m)]);
    if (!have_first) {
      first = v;
      have_first = true;
    } else if (v != first) {
      uniform = false;
    }
  }
  if (!have_first) first = call.all_;  // no lanes at all (a kernel wrote mask 0)
  uniform = uniform && first == static_cast<int32_t>(first);
  uint64_t reply;
  if (uniform) {
    reply = hostcall::make_state(call.seq_, hostcall::kReplyInline, static_cast<int32_t>(first));
  } else {
    s.hdr.nresults = call.nresults_;
    for (uint32_t k = 0; k < call.nresults_; ++k) {
      for (uint32_t m = call.mask_; m != 0; m &= m - 1) {
        uint32_t lane = __builtin_ctz(m);
        s.data[k][lane] = call.results_[k][lane];
      }
      for (uint32_t m = call.foreign_; m != 0; m &= m - 1) {
        s.data[k][__builtin_ctz(m)] = k == 0 ? static_cast<uint64_t>(-EPROTO) : 0;
      }
    }
    reply = hostcall::make_state(call.seq_, hostcall::kReply);
  }
  // Release, system scope (on x86 a plain store): the results above are visible to the
  // device before it can see the reply. This is the host's last access to the slot.
  state_of(s).store(reply, std::memory_order_release);
  if (call.claimed_ns_ != 0 && call.opcode_ < hostcall::kOpcodeLimit) {
    if (HandlerEntry* h = handlers_[call.opcode_].load(std::memory_order_acquire)) {
      const uint64_t ns = static_cast<uint64_t>(std::max<int64_t>(0, now_ns() - call.claimed_ns_));
      const uint32_t b = ns < 2 ? 0 : std::min<uint32_t>(63 - __builtin_clzll(ns), LatencyHistogram::kBuckets - 1);
      h->latency[b].fetch_add(1, std::memory_order_relaxed);
      h->latency_sum_ns.fetch_add(ns, std::memory_order_relaxed);
    }
  }
  return true;
}

void Core::mark_copied(uint32_t slot, uint32_t seq) {
  copied_[slot].store((uint64_t{1} << 32) | seq, std::memory_order_release);
}

void Core::await_copied(uint32_t slot, uint32_t seq) {
  const uint64_t want = (uint64_t{1} << 32) | seq;
  const uint64_t claimed = hostcall::make_state(seq, hostcall::kClaimed);
  // The claimer copies right after its claim (straight-line code, no handler in between),
  // so this wait is short. It also ends if the call left kClaimed: its claimer answered.
  while (copied_[slot].load(std::memory_order_acquire) != want) {
    if (state_of(slots_h_[slot]).load(std::memory_order_acquire) != claimed) return;
    std::this_thread::yield();
  }
}

void Core::fail_pending(int64_t error) {
  for (uint32_t i = 0; i < nslots_; ++i) {
    Slot& s = slots_h_[i];
    auto state = state_of(s);
    for (;;) {
      uint64_t st = state.load(std::memory_order_acquire);
      hostcall::Phase p = hostcall::state_phase(st);
      uint32_t seq = hostcall::state_seq(st);
      if (p == hostcall::kRequest) {
        // Claim it first so no service thread starts it; then answer as below.
        if (!state.compare_exchange_strong(st, hostcall::make_state(seq, hostcall::kClaimed),
                                           std::memory_order_acq_rel)) {
          continue;
        }
      } else if (p != hostcall::kClaimed) {
        break;  // empty, being answered, or answered
      } else {
        await_copied(i, seq);  // a service thread's claim: let it finish reading the slot
      }
      Call call;
      call.core_ = this;
      call.slot_ = i;
      call.seq_ = seq;
      call.mask_ = s.hdr.lane_mask;
      call.nresults_ = 1;
      call.set_all(error);
      if (commit(call)) shutdown_failed_.fetch_add(1, std::memory_order_relaxed);
      break;
    }
  }
}

void Core::shutdown() {
  std::call_once(shutdown_once_, [this] {
    stopping_.store(true, std::memory_order_release);
    if (control_h_ != nullptr) {
      // System scope release: every device spin loop reads this flag and gives up.
      std::atomic_ref<uint32_t>(control_h_->shutdown).store(1, std::memory_order_release);
    }
    {
      std::lock_guard<std::mutex> lock(park_mu_);
    }
    park_cv_.notify_all();
    if (slots_h_ != nullptr) fail_pending(-ESHUTDOWN);
    pending_failed_.store(true, std::memory_order_release);
    // Service threads finish the handler they are in. One stuck in a handler forever
    // cannot be joined; after a bound it is left behind, holding its own reference to
    // this Core, so nothing it touches is freed under it.
    const int64_t deadline = now_ns() + 2'000'000'000;
    while (threads_running_.load(std::memory_order_acquire) != 0 && now_ns() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    for (size_t i = 0; i < threads_.size(); ++i) {
      std::thread& t = threads_[i];
      if (thread_done_[i]->load(std::memory_order_acquire)) {
        t.join();
      } else {
        std::fprintf(stderr, "gpusock: a service thread is stuck in a handler; leaving it behind\n");
        t.detach();
      }
    }
    threads_.clear();
    // Calls published after fail_pending() ran (kernels still submitting) are failed too.
    if (slots_h_ != nullptr) fail_pending(-ESHUTDOWN);
    if (device_ && device_->kernels_running() && !device_->wait_kernels(std::chrono::seconds(10))) {
      // A kernel that ignores ESHUTDOWN still reads this memory: keep it mapped.
      std::fprintf(stderr, "gpusock: kernels still running at shutdown; their memory is kept\n");
      leak_memory_ = true;
    }
  });
}

}  // namespace gpusock::internal

namespace gpusock::hostcall {
int service_thread_index() { return internal::tls_service_thread; }
}  // namespace gpusock::hostcall

namespace gpusock::internal {

RuntimeStats Core::stats() const {
  RuntimeStats r;
  {
    std::lock_guard<std::mutex> lock(handlers_mu_);
    for (const auto& e : handler_store_) {
      OpcodeStats o;
      o.opcode = e->opcode;
      o.name = e->name;
      o.calls = e->calls.load(std::memory_order_relaxed);
      o.lanes = e->lanes.load(std::memory_order_relaxed);
      o.errors = e->errors.load(std::memory_order_relaxed);
      for (uint32_t b = 0; b < LatencyHistogram::kBuckets; ++b) {
        o.latency.buckets[b] = e->latency[b].load(std::memory_order_relaxed);
        o.latency.count += o.latency.buckets[b];
      }
      o.latency.sum_ns = e->latency_sum_ns.load(std::memory_order_relaxed);
      r.calls += o.calls;
      r.lanes += o.lanes;
      r.errors += o.errors;
      r.by_opcode.push_back(std::move(o));
    }
  }
  std::sort(r.by_opcode.begin(), r.by_opcode.end(),
            [](const OpcodeStats& a, const OpcodeStats& b) { return a.opcode < b.opcode; });
  r.rejected = rejected_.load(std::memory_order_relaxed);
  r.handler_exceptions = exceptions_.load(std::memory_order_relaxed);
  r.doorbells = doorbells_.load(std::memory_order_relaxed);
  r.swept = swept_.load(std::memory_order_relaxed);
  r.sweeps = sweeps_.load(std::memory_order_relaxed);
  r.shutdown_failed = shutdown_failed_.load(std::memory_order_relaxed);
  r.parks = parks_.load(std::memory_order_relaxed);
  r.early_doorbells = early_doorbells_.load(std::memory_order_relaxed);
  r.stale_headers = stale_headers_.load(std::memory_order_relaxed);
  r.foreign_lanes = foreign_lanes_.load(std::memory_order_relaxed);
  r.reclaimed_slots = reclaimed_slots_.load(std::memory_order_relaxed);
  r.reclaimed_calls = reclaimed_calls_.load(std::memory_order_relaxed);
  r.deliveries = deliveries_.load(std::memory_order_relaxed);
  r.delivered_bytes = delivered_bytes_.load(std::memory_order_relaxed);
  r.fetches = fetches_.load(std::memory_order_relaxed);
  r.fetched_bytes = fetched_bytes_.load(std::memory_order_relaxed);
  occupancy(r);
  return r;
}

void Core::note_allocation(void* dev, size_t bytes) {
  std::unique_lock<std::shared_mutex> lock(allocs_mu_);
  allocs_[reinterpret_cast<uintptr_t>(dev)] = Range{bytes, false};
}

Status Core::forget_allocation(void* dev) {
  std::unique_lock<std::shared_mutex> lock(allocs_mu_);
  auto it = allocs_.find(reinterpret_cast<uintptr_t>(dev));
  if (it == allocs_.end()) return Status(ENOENT, "device_free: not the start of a live device_alloc() allocation");
  if (it->second.registered) {
    return Status(EINVAL, "device_free: memory registered with register_device_memory(); unregister it and free it yourself");
  }
  allocs_.erase(it);
  return {};
}

Status Core::register_range(void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (p == nullptr || bytes == 0 || a + bytes < a) return Status(EINVAL, "register_device_memory: empty or overflowing range");
  if (failed()) return health();
  Status s = device_->check_device_range(p, bytes);
  if (!s.ok()) return s;
  std::unique_lock<std::shared_mutex> lock(allocs_mu_);
  // Overlaps: a range starting inside [a, a + bytes), or the one before a reaching a.
  const auto next = allocs_.lower_bound(a);
  const bool starts_inside = next != allocs_.end() && next->first < a + bytes;
  const bool reaches_in = next != allocs_.begin() && a - std::prev(next)->first < std::prev(next)->second.bytes;
  if (starts_inside || reaches_in) {
    return Status(EEXIST, "register_device_memory: overlaps a registered range or a device_alloc() allocation");
  }
  allocs_.emplace(a, Range{bytes, true});
  return {};
}

Status Core::unregister_range(void* p) {
  std::unique_lock<std::shared_mutex> lock(allocs_mu_);
  auto it = allocs_.find(reinterpret_cast<uintptr_t>(p));
  if (it == allocs_.end() || !it->second.registered) {
    return Status(ENOENT, "unregister_device_memory: not the start of a registered range");
  }
  allocs_.erase(it);
  return {};
}

bool Core::inside_locked(uintptr_t p, size_t bytes) const {
  // The allocation that starts at or below p must hold all of [p, p + bytes).
  auto it = allocs_.upper_bound(p);
  if (bytes == 0 || it == allocs_.begin()) return false;
  --it;
  const uintptr_t off = p - it->first;
  return off < it->second.bytes && bytes <= it->second.bytes - off;
}

bool Core::inside_allocation(const void* p, size_t bytes) {
  std::shared_lock<std::shared_mutex> lock(allocs_mu_);
  return inside_locked(reinterpret_cast<uintptr_t>(p), bytes);
}

// One copy between host memory and device memory the runtime knows: `device_side` must
// lie inside one allocation or registered range, held so while the copy is queued.
template <class Copy>
Status Core::checked_copy(const void* device_side, size_t bytes, const char* what, Copy&& copy,
                          std::atomic<uint64_t>& count, std::atomic<uint64_t>& counted_bytes) {
  if (failed()) return health();
  std::shared_lock<std::shared_mutex> lock(allocs_mu_);
  if (!inside_locked(reinterpret_cast<uintptr_t>(device_side), bytes)) {
    return Status(EFAULT, std::string(what) + ": not inside one device_alloc() allocation or registered range");
  }
  Status s = copy();
  if (s.ok()) {
    count.fetch_add(1, std::memory_order_relaxed);
    counted_bytes.fetch_add(bytes, std::memory_order_relaxed);
  }
  return s;
}

Status Core::deliver(void* dst, const void* src, size_t bytes, bool wait, uint64_t* ticket) {
  uint64_t unused = 0;
  if (ticket == nullptr) ticket = &unused;
  return checked_copy(
      dst, bytes, "deliver",
      [&] { return wait ? device_->copy_to_device(dst, src, bytes) : device_->start_copy_to_device(dst, src, bytes, ticket); },
      deliveries_, delivered_bytes_);
}

Status Core::finish_deliveries(uint64_t ticket) { return device_->finish_copies(ticket); }

Status Core::fetch(void* dst, const void* src, size_t bytes, uint64_t* ticket) {
  uint64_t unused = 0;
  if (ticket == nullptr) ticket = &unused;
  *ticket = 0;
  return checked_copy(
      src, bytes, "start_fetch", [&] { return device_->start_copy_from_device(dst, src, bytes, ticket); }, fetches_,
      fetched_bytes_);
}

void Core::occupancy(RuntimeStats& r) const {
  r.slots = nslots_;
  r.staging_pages = staging_pages_;
  if (slots_h_ == nullptr) return;
  for (uint32_t i = 0; i < nslots_; ++i) {
    const hostcall::Phase p = hostcall::state_phase(
        std::atomic_ref<uint64_t>(const_cast<Slot&>(slots_h_[i]).hdr.state).load(std::memory_order_relaxed));
    r.calls_in_flight += p == hostcall::kRequest || p == hostcall::kClaimed || p == hostcall::kCompleting;
  }
  // The bitmaps live in device memory: a diagnostic copy on a GPU (besides shutdown, the
  // host's only read of it). On the cpu device the words are host memory that lanes
  // change with atomics, so they are read with atomic loads, word by word.
  const uint32_t slot_words = (nslots_ + 31) / 32;
  const uint32_t page_words = staging_pages_ / 64;
  std::vector<uint32_t> sw(slot_words);
  std::vector<uint64_t> pw(page_words);
  if (device_->kind() == DeviceKind::kCpu) {
    for (uint32_t w = 0; w < slot_words; ++w) sw[w] = std::atomic_ref<uint32_t>(slot_bitmap_dev_[w]).load(std::memory_order_relaxed);
    for (uint32_t w = 0; w < page_words; ++w) pw[w] = std::atomic_ref<uint64_t>(staging_bitmap_dev_[w]).load(std::memory_order_relaxed);
  } else if (!device_->copy_from_device(sw.data(), slot_bitmap_dev_, 4ull * slot_words).ok() ||
             !device_->copy_from_device(pw.data(), staging_bitmap_dev_, 8ull * page_words).ok()) {
    return;
  }
  for (uint32_t w = 0; w < slot_words; ++w) {
    uint32_t v = sw[w];
    if (w + 1 == slot_words && nslots_ % 32 != 0) v &= (1u << (nslots_ % 32)) - 1;  // preset filler bits
    r.slots_owned += static_cast<uint32_t>(__builtin_popcount(v));
  }
  for (uint64_t v : pw) r.staging_pages_used += static_cast<uint32_t>(__builtin_popcountll(v));
}

}  // namespace gpusock::internal

namespace gpusock {

uint64_t LatencyHistogram::quantile_ns(double q) const {
  if (count == 0) return 0;
  const double want = q * static_cast<double>(count);
  uint64_t seen = 0;
  for (uint32_t b = 0; b < kBuckets; ++b) {
    seen += buckets[b];
    if (buckets[b] != 0 && static_cast<double>(seen) >= want) return b + 1 >= 64 ? UINT64_MAX : (uint64_t{1} << (b + 1));
  }
  return uint64_t{1} << kBuckets;
}

void LatencyHistogram::merge(const LatencyHistogram& other) {
  for (uint32_t b = 0; b < kBuckets; ++b) buckets[b] += other.buckets[b];
  count += other.count;
  sum_ns += other.sum_ns;
}

}  // namespace gpusock

namespace gpusock::internal {

// ---- builtin handlers -------------------------------------------------------------

namespace {
int64_t write_all(int fd, const uint8_t* p, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = ::write(fd, p + done, n - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      return done > 0 ? static_cast<int64_t>(done) : -errno;
    }
    done += static_cast<size_t>(w);
  }
  return static_cast<int64_t>(done);
}
}  // namespace

void Core::register_builtins() {
  register_handler(hostcall::op::kNull, "null", [](Call& c) { c.set_all(0); }, true);
  register_handler(
      hostcall::op::kWrite, "write",
      [this](Call& c) {
        c.for_each_lane([&](uint32_t lane) {
          int64_t fd = static_cast<int64_t>(c.arg(lane, 0));
          if (fd != 1 && fd != 2) {
            c.set_result(lane, -EBADF);
            return;
          }
          std::span<const uint8_t> bytes;
          int err = c.payload(lane, 1, &bytes);
          if (err != 0) {
            c.set_result(lane, err);
            return;
          }
          int out = fd == 1 ? options_.stdout_fd : options_.stderr_fd;
          // One lock per target, so fds 1 and 2 sent to the same place never interleave.
          std::lock_guard<std::mutex> lock(out == options_.stdout_fd ? stdout_mu_ : stderr_mu_);
          c.set_result(lane, write_all(out, bytes.data(), bytes.size()));
        });
      },
      true);
}

}  // namespace gpusock::internal

// ---- Call / DeferredCall ----------------------------------------------------------

namespace gpusock::hostcall {

int Call::payload(uint32_t lane, uint32_t k, std::span<const uint8_t>* out) const {
  if (k + 1 >= nargs_) return -EINVAL;
  uint64_t off = arg(lane, k), len = arg(lane, k + 1);
  // The pages this call holds, clipped to the arena; both come from the kernel too.
  if (int e = internal::check_payload(off, len, staging_first_, staging_count_, core_->staging_size()); e != 0) {
    return e;
  }
  *out = std::span<const uint8_t>(core_->staging_host() + off, len);
  return 0;
}

DeferredCall Call::defer() {
  DeferredCall d;
  if (deferred_) return d;  // only once
  deferred_ = true;
  d.core_ = core_->self();
  d.call_ = std::make_unique<Call>(*this);
  return d;
}

DeferredCall& DeferredCall::operator=(DeferredCall&& other) noexcept {
  if (this != &other) {
    if (call_) complete_with_cancel();
    core_ = std::move(other.core_);
    call_ = std::move(other.call_);
  }
  return *this;
}

void DeferredCall::complete_with_cancel() {
  call_->nresults_ = 1;
  call_->set_all(-ECANCELED);
  complete();
}

DeferredCall::~DeferredCall() {
  if (call_) complete_with_cancel();
}

bool DeferredCall::complete() {
  if (!call_) return false;
  bool ok = core_->commit(*call_);
  call_.reset();
  core_.reset();
  return ok;
}

}  // namespace gpusock::hostcall
