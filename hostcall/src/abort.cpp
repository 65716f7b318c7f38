// What the runtime does when a kernel dies with calls in flight (docs/architecture.md,
// section 18.3). On the cpu device an aborted launch is one launch among others: its slots
// and staging runs are taken back while the rest runs on. On cuda a trap or fault loses the
// whole context: the runtime marks itself failed and only a new runtime goes on.
#include <sched.h>

#include <cerrno>
#include <cstring>

#include "core.hpp"

namespace gpusock::internal {

using hostcall::Call;
using hostcall::Slot;

namespace {
std::atomic_ref<uint64_t> state_word(Slot& s) { return std::atomic_ref<uint64_t>(s.hdr.state); }
uint64_t quarantine_key(uint32_t slot, uint32_t seq) { return (uint64_t{slot} << 32) | seq; }
}  // namespace

void Core::free_staging_run(uint32_t first, uint32_t count) {
  if (count == 0 || first / 64 >= staging_pages_ / 64) return;
  const uint64_t run = count >= 64 ? ~0ull : ((1ull << count) - 1);
  // The cpu device's bitmap is host memory that lanes change with atomics (release, as
  // release_staging() does on the cpu device: our reads of the pages happen before the
  // next owner's writes).
  std::atomic_ref<uint64_t>(staging_bitmap_dev_[first / 64]).fetch_and(~(run << (first % 64)), std::memory_order_release);
}

void Core::reclaim_launch(uint32_t launch_id) {
  if (claims_ == nullptr || slots_h_ == nullptr || launch_id == 0) return;
  for (uint32_t i = 0; i < nslots_; ++i) {
    ClaimRecord& rec = claims_[i];
    // Relaxed: every lane of the launch has stopped, and its stores reached us through
    // the launch's own bookkeeping (a mutex). A record naming this launch cannot change
    // under us: no lane of it is left, and nobody else can claim a slot whose bit is set.
    if (std::atomic_ref<uint32_t>(rec.launch).load(std::memory_order_relaxed) != launch_id) continue;
    const uint32_t first = std::atomic_ref<uint32_t>(rec.staging_first).load(std::memory_order_relaxed);
    const uint32_t count = std::atomic_ref<uint32_t>(rec.staging_count).load(std::memory_order_relaxed);
    Slot& s = slots_h_[i];
    bool keep_staging = false;  // a handler may still read the payload
    for (;;) {
      uint64_t st = state_word(s).load(std::memory_order_acquire);
      const hostcall::Phase p = hostcall::state_phase(st);
      const uint32_t seq = hostcall::state_seq(st);
      if (p == hostcall::kCompleting) {
        sched_yield();  // a service thread is writing its reply; the store follows at once
        continue;
      }
      if (p != hostcall::kRequest && p != hostcall::kClaimed) break;  // never published, or answered
      const bool handler_has_it = p == hostcall::kClaimed;
      if (p == hostcall::kRequest &&
          !state_word(s).compare_exchange_strong(st, hostcall::make_state(seq, hostcall::kClaimed),
                                                 std::memory_order_acq_rel)) {
        continue;  // a service thread claimed it meanwhile: look again
      }
      if (handler_has_it) await_copied(i, seq);  // let its claimer finish reading the slot
      // A claimed call's handler may still read its payload (a send from staging): its
      // run is held back until that handler's own answer, which loses to ours, comes in.
      // Recorded before we answer, so that answer always finds the record.
      if (handler_has_it && count != 0) {
        std::lock_guard<std::mutex> lock(quarantine_mu_);
        quarantine_[quarantine_key(i, seq)] = (uint64_t{first} << 32) | count;
        quarantined_.store(static_cast<uint32_t>(quarantine_.size()), std::memory_order_release);
      }
      Call call;
      call.core_ = this;
      call.slot_ = i;
      call.seq_ = seq;
      call.mask_ = s.hdr.lane_mask;
      call.nresults_ = 1;
      call.set_all(-ECANCELED);
      const bool ours = commit(call);
      if (handler_has_it && count != 0) {
        std::lock_guard<std::mutex> lock(quarantine_mu_);
        // We answered: the handler gives the run back when its own answer loses (perhaps
        // already). The handler answered first: it is done, and the run is ours to give back.
        keep_staging = ours;
        if (!ours) quarantine_.erase(quarantine_key(i, seq));
        quarantined_.store(static_cast<uint32_t>(quarantine_.size()), std::memory_order_release);
      }
      if (ours) reclaimed_calls_.fetch_add(1, std::memory_order_relaxed);
      // Answered (by us or by the handler); a kCompleting handler is waited out above.
    }
    if (!keep_staging) free_staging_run(first, count);
    std::atomic_ref<uint32_t>(rec.launch).store(0, std::memory_order_relaxed);
    // Release, as release_slot() on the cpu device: our accesses to the slot happen before
    // the next owner's. The bitmap is host memory on the cpu device.
    std::atomic_ref<uint32_t>(slot_bitmap_dev_[i / 32]).fetch_and(~(1u << (i % 32)), std::memory_order_release);
    reclaimed_slots_.fetch_add(1, std::memory_order_relaxed);
  }
}

void Core::release_quarantined(uint32_t slot, uint32_t seq) {
  uint64_t run = 0;
  {
    std::lock_guard<std::mutex> lock(quarantine_mu_);
    auto it = quarantine_.find(quarantine_key(slot, seq));
    if (it == quarantine_.end()) return;
    run = it->second;
    quarantine_.erase(it);
    quarantined_.store(static_cast<uint32_t>(quarantine_.size()), std::memory_order_release);
  }
  free_staging_run(static_cast<uint32_t>(run >> 32), static_cast<uint32_t>(run));
}

void Core::mark_failed(const Status& why) {
  {
    std::lock_guard<std::mutex> lock(failed_mu_);
    if (failed_flag_.load(std::memory_order_relaxed)) return;
    failed_ = Status(why.code() != 0 ? why.code() : EIO,
                     "the device is lost, this runtime cannot run kernels any more (" + why.message() +
                         "); destroy it and create a new Runtime");
    failed_flag_.store(true, std::memory_order_release);
  }
  // Every kernel of the context is gone: nobody waits for these answers, but answering
  // settles each slot, so deferred handlers that answer later lose quietly.
  if (slots_h_ != nullptr) fail_pending(-ECANCELED);
}

Status Core::health() const {
  if (!failed_flag_.load(std::memory_order_acquire)) return {};
  std::lock_guard<std::mutex> lock(failed_mu_);
  return failed_;
}

}  // namespace gpusock::internal
