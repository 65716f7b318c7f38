// ThreadSanitizer suppressions for binaries that link gRPC (gpusockctl, control_test).
//
// Debian's gRPC, protobuf and Abseil are not built with -fsanitize=thread, so TSan does
// not see their synchronization (absl::Mutex, gpr atomics, completion queues): memory
// that gRPC hands from one of its threads to another looks unsynchronized when
// instrumented code (the generated control.pb.cc, our handlers) touches it on both sides.
// These entries suppress reports whose stacks run through those libraries or the
// generated message code; races in gpusock's own code (runtime, backends, the control
// server's state) are still reported. Compiled only into sanitizer builds with TSan.
#if defined(__SANITIZE_THREAD__)
extern "C" const char* __tsan_default_suppressions() {
  return "called_from_lib:libgrpc.so\n"
         "called_from_lib:libgrpc++.so\n"
         "called_from_lib:libgpr.so\n"
         "race:libgrpc.so\n"
         "race:libgrpc++.so\n"
         "race:libgrpc++_reflection.so\n"
         "race:libgpr.so\n"
         "race:libprotobuf.so\n"
         "race:libabsl_*\n"
         "race:gpusock::control::v1::\n"
         "deadlock:libgrpc.so\n";
}
#endif
