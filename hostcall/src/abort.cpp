// What the runtime does when a kernel dies with calls in flight (docs/architecture.md,
// section 18.3). A launch aborted by gpusock::trap() is one launch among others, on either
// device: its slots and staging runs are taken back while the rest runs on. On cuda a
// fault (an illegal address, a __trap()) loses the whole context: the runtime marks
// itself failed and only a new runtime goes on.
#include <sched.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "core.hpp"

namespace gpusock::internal {

using hostcall::Call;
using hostcall::Slot;

namespace {
std::atomic_ref<uint64_t> state_word(Slot& s) { return std::atomic_ref<uint64_t>(s.hdr.state); }
uint64_t quarantine_key(uint32_t slot, uint32_t seq) { return (uint64_t{slot} << 32) | seq; }
}  // namespace

void Core::give_back(uint32_t launch_id, const std::vector<uint32_t>& slots, const std::vector<uint64_t>& runs) {
  if (slots.empty() && runs.empty()) return;
  if (device_->kind() != DeviceKind::kCpu) {
    if (failed()) return;  // the context is lost: nothing runs on it any more
    if (!device_->give_back(slot_bitmap_dev_, staging_bitmap_dev_, claims_dev_, launch_id, slots, runs)) {
      std::fprintf(stderr, "gpusock: could not queue the give-back of %zu slots and %zu staging runs of an aborted launch\n",
                   slots.size(), runs.size());
    }
    return;
  }
  // The cpu device's bitmaps are host memory that lanes change with atomics. Releases, as
  // release_slot() and release_staging() do on the cpu device: our accesses to the slot
  // and pages happen before the next owner's.
  for (uint64_t r : runs) {
    const uint32_t first = static_cast<uint32_t>(r >> 32), count = static_cast<uint32_t>(r);
    if (count == 0 || first / 64 >= staging_pages_ / 64) continue;
    const uint64_t run = hostcall::staging_run_bits(count);
    std::atomic_ref<uint64_t>(staging_bitmap_dev_[first / 64]).fetch_and(~(run << (first % 64)), std::memory_order_release);
  }
  for (uint32_t i : slots) {
    std::atomic_ref<uint32_t>(claims_[i].launch).store(0, std::memory_order_relaxed);
    std::atomic_ref<uint32_t>(slot_bitmap_dev_[i / 32]).fetch_and(~(1u << (i % 32)), std::memory_order_release);
  }
}

void Core::reclaim_launch(uint32_t launch_id) {
  if (slots_h_ == nullptr || launch_id == 0) return;
  // The records: the host table on the cpu device, a copy of the device's on cuda. Either
  // way a record naming this launch cannot change under us: no lane of it is left, and
  // nobody else can claim a slot whose bit is set. (cpu device: the lanes' stores reached
  // us through the launch's own bookkeeping, a mutex. cuda: the launch has ended.)
  std::vector<ClaimRecord> copy;
  if (claims_ == nullptr) {
    if (claims_dev_ == nullptr || failed()) return;
    copy.resize(nslots_);
    Status st = device_->copy_from_device(copy.data(), claims_dev_, sizeof(ClaimRecord) * nslots_);
    if (!st.ok()) {
      std::fprintf(stderr, "gpusock: cannot read the claim records of an aborted launch: %s\n", st.to_string().c_str());
      return;
    }
  }
  auto record = [&](uint32_t i) {
    if (claims_ == nullptr) return copy[i];
    ClaimRecord r{};
    r.launch = std::atomic_ref<uint32_t>(claims_[i].launch).load(std::memory_order_relaxed);
    r.staging_first = std::atomic_ref<uint32_t>(claims_[i].staging_first).load(std::memory_order_relaxed);
    r.staging_count = std::atomic_ref<uint32_t>(claims_[i].staging_count).load(std::memory_order_relaxed);
    return r;
  };
  std::vector<uint32_t> slots;
  std::vector<uint64_t> runs;
  for (uint32_t i = 0; i < nslots_; ++i) {
    const ClaimRecord rec = record(i);
    if (rec.launch != launch_id) continue;
    const uint32_t first = rec.staging_first;
    const uint32_t count = rec.staging_count;
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
    if (!keep_staging && count != 0) runs.push_back((uint64_t{first} << 32) | count);
    slots.push_back(i);
  }
  give_back(launch_id, slots, runs);
  reclaimed_slots_.fetch_add(slots.size(), std::memory_order_relaxed);
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
  // Back before the late commit() returns (cuda: a small kernel, waited for).
  give_back(0, {}, {run});
}

Status Core::take_launch_id(uint32_t* id, uint32_t** abort_dev, uint32_t** cause_dev) {
  std::lock_guard<std::mutex> lock(launch_ids_mu_);
  if (launch_abort_dev_ == nullptr) return {ENODEV, "launch ids are kept for the cuda device only"};
  if (free_launch_ids_.empty()) {
    return {EAGAIN, std::to_string(hostcall::kLaunchIds - 1) +
                        " kernels are in flight on this runtime; wait for one to finish"};
  }
  *id = free_launch_ids_.back();
  free_launch_ids_.pop_back();
  *abort_dev = launch_abort_dev_ + *id;
  *cause_dev = launch_cause_dev_ + uint64_t{*id} * hostcall::kLaunchCauseWords;
  return {};
}

void Core::give_launch_id(uint32_t id) {
  if (id == 0 || id >= hostcall::kLaunchIds) return;
  std::lock_guard<std::mutex> lock(launch_ids_mu_);
  free_launch_ids_.push_back(id);
}

bool Core::finish_launch(uint32_t id, Status* why) {
  if (id == 0 || id >= hostcall::kLaunchIds || launch_cause_h_ == nullptr) return false;
  uint32_t* cause = launch_cause_h_ + uint64_t{id} * hostcall::kLaunchCauseWords;
  // The launch has ended, so the trapping lane's stores have all landed; acquire pairs
  // with its release all the same.
  const bool trapped = std::atomic_ref<uint32_t>(cause[0]).load(std::memory_order_acquire) != 0;
  if (trapped) {
    auto d = [&](int k) {
      return "(" + std::to_string(cause[k]) + "," + std::to_string(cause[k + 1]) + "," + std::to_string(cause[k + 2]) +
             ")";
    };
    *why = Status(EIO, "kernel aborted: gpusock::trap() in block " + d(1) + " thread " + d(4));
    reclaim_launch(id);
    // The next launch with this id starts with a clear abort word (device memory, written
    // while nothing of this launch runs) and a clear cause.
    const uint32_t zero = 0;
    if (!device_->copy_to_device(launch_abort_dev_ + id, &zero, sizeof zero).ok()) return true;  // id stays out
    std::memset(cause, 0, 4 * hostcall::kLaunchCauseWords);
  }
  give_launch_id(id);
  return trapped;
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
