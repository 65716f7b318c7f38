// gpusock/hostcall/handler.hpp — the host side of a hostcall: what a handler sees.
//
// A handler runs on a service thread with one warp group's call: up to 32 lanes, each
// with its own arguments. It answers each lane, or defers the whole call and answers it
// later from any thread:
//
//   rt->register_handler(kOpLookup, "lookup", [&table](gpusock::hostcall::Call& call) {
//     call.for_each_lane([&](uint32_t lane) {
//       auto it = table.find(call.arg(lane, 0));
//       call.set_result(lane, it == table.end() ? -ENOENT : it->second);
//     });
//   });
//
// Header and arguments a handler reads through Call were copied out of the slot once,
// after the host claimed it, so a kernel that keeps scribbling on its slot cannot change
// what the handler validated. Payloads are the exception: payload() is a view into the
// staging pages the call holds, checked to lie inside them; a kernel that rewrites its
// own payload mid-call can only change what its own call sends. A handler that throws
// answers EIO to every lane.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "gpusock/hostcall/protocol.hpp"

namespace gpusock::internal {
class Core;
}

namespace gpusock::hostcall {

class DeferredCall;

class Call {
 public:
  uint32_t opcode() const { return opcode_; }
  uint32_t lane_mask() const { return mask_; }
  uint32_t nargs() const { return nargs_; }
  // Global warp id of the calling warp, as the kernel reported it (diagnostics only).
  uint64_t origin() const { return origin_; }

  // Argument word k of `lane`; 0 for words the kernel did not send.
  uint64_t arg(uint32_t lane, uint32_t k) const {
    return (k < nargs_ && lane < kWarpSize) ? args_[k][lane] : 0;
  }

  // The bytes `lane` passed through staging, described by argument words k (offset) and
  // k + 1 (length). Returns 0 and sets *out, or -EFAULT if the descriptor does not lie
  // inside the staging pages this call holds (a kernel wrote garbage), or -EINVAL if
  // k + 1 >= nargs.
  int payload(uint32_t lane, uint32_t k, std::span<const uint8_t>* out) const;

  // Result word 0 of `lane` (a value or -errno by convention), and further words.
  void set_result(uint32_t lane, int64_t value) { set_result(lane, 0, static_cast<uint64_t>(value)); }
  // Words a lane was not given are 0.
  void set_result(uint32_t lane, uint32_t k, uint64_t value) {
    if (lane >= kWarpSize || k >= kMaxArgs) return;
    for (; nresults_ <= k; ++nresults_) {
      for (uint32_t l = 0; l < kWarpSize; ++l) results_[nresults_][l] = 0;
    }
    results_[k][lane] = value;
  }
  // Result word 0 of every lane in the mask (and the answer to a call with no lanes).
  void set_all(int64_t value) {
    all_ = value;
    for_each_lane([&](uint32_t lane) { results_[0][lane] = static_cast<uint64_t>(value); });
  }
  int64_t result(uint32_t lane) const { return static_cast<int64_t>(results_[0][lane]); }

  template <typename F>
  void for_each_lane(F&& f) const {
    for (uint32_t m = mask_; m != 0; m &= m - 1) f(static_cast<uint32_t>(__builtin_ctz(m)));
  }

  // Keeps the call open after the handler returns. The returned handle answers it with
  // complete(), from any thread, at any later time; a handle destroyed without
  // complete() answers -ECANCELED, so no call is ever left hanging. The handle holds a
  // copy: set results through DeferredCall::call(), not on this Call, from now on.
  DeferredCall defer();

 private:
  friend class ::gpusock::internal::Core;
  friend class DeferredCall;

  ::gpusock::internal::Core* core_ = nullptr;
  uint32_t slot_ = 0;
  uint32_t seq_ = 0;
  uint32_t opcode_ = 0;
  uint32_t mask_ = 0;
  uint32_t foreign_ = 0;  // lanes the header named that did not write this request: -EPROTO
  uint32_t nargs_ = 0;
  uint32_t nresults_ = 1;
  uint64_t origin_ = 0;
  uint32_t staging_first_ = 0;
  uint32_t staging_count_ = 0;
  int64_t all_ = 0;
  int64_t claimed_ns_ = 0;  // when a service thread claimed the slot (0: not timed)
  bool deferred_ = false;
  uint64_t args_[kMaxArgs][kWarpSize];
  uint64_t results_[kMaxArgs][kWarpSize];
};

class DeferredCall {
 public:
  DeferredCall() = default;
  DeferredCall(DeferredCall&&) noexcept = default;
  DeferredCall& operator=(DeferredCall&& other) noexcept;
  ~DeferredCall();

  explicit operator bool() const { return call_ != nullptr; }
  Call& call() { return *call_; }
  // Sends the reply with the results set on call(). Returns true if this reply reached
  // the kernel's slot, false if the call had already been answered (the runtime shut
  // down and failed it meanwhile) or was completed before.
  bool complete();

 private:
  friend class Call;
  void complete_with_cancel();
  std::shared_ptr<::gpusock::internal::Core> core_;
  std::unique_ptr<Call> call_;
};

using Handler = std::function<void(Call&)>;

}  // namespace gpusock::hostcall
