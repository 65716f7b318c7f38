// ThreadSanitizer suppressions for fault_test only.
//
// StallTest leaves a service thread stuck in a handler past shutdown's 2 s wait, so the
// runtime detaches it (docs/architecture.md section 6, shutdown step 3). When the handler
// is released the thread leaves its loop, closes its io_uring and unmaps its rings. A
// later test's ring can then be mapped at the same address, and TSan, which orders
// nothing after a detached thread that was never joined, reports the new thread's
// completion-queue head update against the dead thread's last read of the old mapping.
// The two accesses are to different rings. Only the completion-queue accessors of
// liburing are suppressed, and only in this binary; every other suite runs the same
// code under TSan with no suppression.
#if defined(__SANITIZE_THREAD__)
extern "C" const char* __tsan_default_suppressions() {
  return "race:__io_uring_peek_cqe\n"
         "race:io_uring_cq_advance\n";
}
#endif
