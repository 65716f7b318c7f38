// gpusockctl — talks to a running gpusock runtime's control plane.
//
//   gpusockctl [--endpoint E] [--token T] [--json] [--timeout S] <command> [args]
//
// Commands: info, stats, sockets, localdevice, close FD, drain, watch, metrics, log-level.
// Without --endpoint (or GPUSOCK_ENDPOINT) it finds the runtime itself: the one
// gpusock-<pid>.sock in $XDG_RUNTIME_DIR (or /tmp when unset) whose process is alive.
//
// Exit codes (also in `gpusockctl --help`):
//   0 success                      4 not authorized (UNAUTHENTICATED, PERMISSION_DENIED)
//   1 the call failed on the server 5 not found (close: no such socket)
//   2 usage error                   6 drain: connections were still open at the deadline
//   3 no runtime reachable (none found, several found, connection failed, deadline)
#include <dirent.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "gpusock/control/v1/control.grpc.pb.h"

namespace v1 = ::gpusock::control::v1;

namespace {

enum Exit : int {
  kOk = 0,
  kServerError = 1,
  kUsage = 2,
  kUnreachable = 3,
  kUnauthorized = 4,
  kNotFound = 5,
  kNotDrained = 6,
};

const char* kUsageText = R"(usage: gpusockctl [options] <command> [args]

Talks to the control plane of a running gpusock runtime.

options:
  --endpoint E     unix:/path, /path (a unix socket) or host:port (TCP, needs a token).
                   Default: $GPUSOCK_ENDPOINT, else the single live runtime found as
                   gpusock-<pid>.sock in $XDG_RUNTIME_DIR (or /tmp when it is unset).
  --token T        bearer token for a TCP endpoint (default: $GPUSOCK_TOKEN)
  --json           print JSON (one object; watch: one object per line)
  --timeout S      seconds to wait for each call (default 10; drain and watch add theirs)

commands:
  info                                 version, device, backends, configuration
  stats                                hostcalls by opcode with latency, occupancy, sockets
  sockets [--family F] [--state S]     host sockets (F: inet|inet6; S: open|listening|connected|aborted)
  localdevice                          localdevice listeners and connections
  close FD                             abort socket FD: the kernel's next call on it gets ECONNABORTED
  drain [--deadline-ms N]              stop accepting, wait up to N ms (default 30000) for connections
  watch [--count N] [--duration-ms N]  stream socket and drain events (until N events / N ms / Ctrl-C)
  metrics                              the stats in Prometheus text format
  log-level LEVEL                      set the server's log level (error|warn|info|debug)

exit codes:
  0 success; 1 the call failed on the server; 2 usage error; 3 no runtime reachable
  (none found, several found, cannot connect); 4 not authorized; 5 not found (close);
  6 drain left connections open at the deadline
)";

struct Args {
  std::string endpoint, token, command;
  bool json = false;
  int timeout_s = 10;
  std::vector<std::string> rest;
};

int usage(const std::string& why) {
  std::fprintf(stderr, "gpusockctl: %s\n(run gpusockctl --help for usage)\n", why.c_str());
  return kUsage;
}

int exit_for(const grpc::Status& s, const char* what) {
  std::fprintf(stderr, "gpusockctl: %s: %s (%d)\n", what, s.error_message().c_str(), static_cast<int>(s.error_code()));
  switch (s.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED: return kUnreachable;
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED: return kUnauthorized;
    case grpc::StatusCode::NOT_FOUND: return kNotFound;
    case grpc::StatusCode::INVALID_ARGUMENT: return kUsage;
    default: return kServerError;
  }
}

bool pid_alive(long pid) { return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM); }

// The live runtimes' sockets where servers put them by default: $XDG_RUNTIME_DIR, or /tmp
// when it is unset (control::default_unix_path()).
std::vector<std::string> discover() {
  std::vector<std::string> dirs;
  const char* x = std::getenv("XDG_RUNTIME_DIR");
  dirs.push_back(x != nullptr && x[0] != '\0' ? x : "/tmp");
  std::vector<std::string> found;
  for (const auto& d : dirs) {
    DIR* dir = ::opendir(d.c_str());
    if (dir == nullptr) continue;
    while (dirent* e = ::readdir(dir)) {
      long pid = 0;
      char tail[16] = {};
      if (std::sscanf(e->d_name, "gpusock-%ld%15s", &pid, tail) != 2 || std::strcmp(tail, ".sock") != 0) continue;
      std::string path = d + "/" + e->d_name;
      struct stat st {};
      if (::stat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode) || !pid_alive(pid)) continue;
      if (std::find(found.begin(), found.end(), path) == found.end()) found.push_back(path);
    }
    ::closedir(dir);
  }
  return found;
}

std::string json_of(const google::protobuf::Message& m, bool pretty) {
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = pretty;
  o.always_print_primitive_fields = true;
  o.preserve_proto_field_names = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  if (!pretty || out.empty() || out.back() != '\n') out += '\n';
  return out;
}

// A table: the header row, then rows; columns padded to their widest cell.
void print_table(const std::vector<std::string>& head, const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> w(head.size());
  for (size_t i = 0; i < head.size(); ++i) w[i] = head[i].size();
  for (const auto& r : rows) {
    for (size_t i = 0; i < r.size() && i < w.size(); ++i) w[i] = std::max(w[i], r[i].size());
  }
  auto line = [&](const std::vector<std::string>& r) {
    std::string s;
    for (size_t i = 0; i < head.size(); ++i) {
      std::string c = i < r.size() ? r[i] : "";
      s += c;
      if (i + 1 < head.size()) s += std::string(w[i] - c.size() + 2, ' ');
    }
    while (!s.empty() && s.back() == ' ') s.pop_back();
    std::printf("%s\n", s.c_str());
  };
  line(head);
  for (const auto& r : rows) line(r);
}

std::string ns_text(uint64_t ns) {
  char b[32];
  if (ns == 0) return "-";
  if (ns < 1000) std::snprintf(b, sizeof b, "%" PRIu64 "ns", ns);
  else if (ns < 1000000) std::snprintf(b, sizeof b, "%.1fus", static_cast<double>(ns) / 1e3);
  else if (ns < 1000000000) std::snprintf(b, sizeof b, "%.1fms", static_cast<double>(ns) / 1e6);
  else std::snprintf(b, sizeof b, "%.2fs", static_cast<double>(ns) / 1e9);
  return b;
}

std::string n(uint64_t v) { return std::to_string(v); }

class Ctl {
 public:
  // Without a channel, each command only checks its arguments (returns kOk or kUsage).
  Ctl(const Args& a, std::shared_ptr<grpc::Channel> ch) : a_(a), stub_(ch ? v1::Control::NewStub(ch) : nullptr) {}

  void prepare(grpc::ClientContext& c, int extra_s = 0) {
    if (!a_.token.empty()) c.AddMetadata("authorization", "Bearer " + a_.token);
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(a_.timeout_s + extra_s));
  }

  int info() {
    grpc::ClientContext c;
    prepare(c);
    v1::Info r;
    if (auto s = stub_->GetInfo(&c, {}, &r); !s.ok()) return exit_for(s, "GetInfo");
    if (a_.json) return std::printf("%s", json_of(r, true).c_str()), kOk;
    std::printf("version      %s\ndevice       %s (%s)\npid          %" PRId64 "\nlocaldevice  %s\n", r.version().c_str(),
                r.device().c_str(), r.device_name().c_str(), r.pid(), r.localdevice() ? "enabled" : "off");
    for (const auto& b : r.backends()) {
      // describe() usually starts with the backend's name already.
      const bool named = b.description().rfind(b.name() + ":", 0) == 0;
      std::printf("backend      %s%s%s\n", named ? "" : b.name().c_str(), named ? "" : ": ", b.description().c_str());
    }
    std::map<std::string, std::string> cfg(r.config().begin(), r.config().end());
    for (const auto& [k, v] : cfg) std::printf("config       %s = %s\n", k.c_str(), v.c_str());
    return kOk;
  }

  bool get_stats(v1::Stats* r, int* code) {
    grpc::ClientContext c;
    prepare(c);
    if (auto s = stub_->GetStats(&c, {}, r); !s.ok()) {
      *code = exit_for(s, "GetStats");
      return false;
    }
    return true;
  }

  int stats() {
    v1::Stats r;
    int code = kOk;
    if (!get_stats(&r, &code)) return code;
    if (a_.json) return std::printf("%s", json_of(r, true).c_str()), kOk;
    std::vector<std::vector<std::string>> rows;
    for (const auto& o : r.opcodes()) {
      if (o.calls() == 0) continue;
      rows.push_back({o.name(), n(o.calls()), n(o.lanes()), n(o.errors()), ns_text(o.latency_p50_ns()),
                      ns_text(o.latency_p90_ns()), ns_text(o.latency_p99_ns()), ns_text(o.latency_max_ns())});
    }
    print_table({"OPCODE", "CALLS", "LANES", "ERRORS", "P50<=", "P90<=", "P99<=", "MAX<="}, rows);
    std::printf("\ncalls %" PRIu64 ", lanes %" PRIu64 ", errors %" PRIu64 ", rejected %" PRIu64 ", handler exceptions %" PRIu64 "\n",
                r.calls(), r.lanes(), r.errors(), r.rejected(), r.handler_exceptions());
    if (r.foreign_lanes() != 0 || r.stale_headers() != 0) {
      std::printf("bad requests: %" PRIu64 " lanes named that did not write them, %" PRIu64 " stale headers\n",
                  r.foreign_lanes(), r.stale_headers());
    }
    std::printf("slots %u (owned %u, calls in flight %u); staging %" PRIu64 " of %" PRIu64 " bytes in use\n", r.slots(),
                r.slots_owned(), r.calls_in_flight(), r.staging_bytes_used(), r.staging_bytes());
    std::printf("host sockets: bytes in %" PRIu64 ", out %" PRIu64 "%s\n", r.bytes_in(), r.bytes_out(), r.draining() ? " (draining)" : "");
    std::printf("delivered into device memory by the host: %" PRIu64 " copies, %" PRIu64 " bytes\n", r.deliveries(),
                r.delivered_bytes());
    std::printf("taken out of device memory by the host: %" PRIu64 " copies, %" PRIu64 " bytes\n", r.fetches(),
                r.fetched_bytes());
    std::printf("localdevice: %u listeners, %u connected, %" PRIu64 " bytes queued\n\n", r.localdevice_listeners(),
                r.localdevice_connected(), r.localdevice_queued_bytes());
    rows.clear();
    for (const auto& s : r.sockets()) rows.push_back({s.family(), s.type(), s.state(), n(s.count())});
    print_table({"FAMILY", "TYPE", "STATE", "SOCKETS"}, rows);
    return kOk;
  }

  int sockets() {
    v1::ListSocketsRequest req;
    for (size_t i = 0; i < a_.rest.size(); ++i) {
      if (a_.rest[i] == "--family" && i + 1 < a_.rest.size()) req.set_family(a_.rest[++i]);
      else if (a_.rest[i] == "--state" && i + 1 < a_.rest.size()) req.set_state(a_.rest[++i]);
      else return usage("sockets: unknown argument " + a_.rest[i]);
    }
    if (!stub_) return kOk;
    v1::ListSocketsResponse all;
    for (;;) {
      grpc::ClientContext c;
      prepare(c);
      v1::ListSocketsResponse page;
      if (auto s = stub_->ListSockets(&c, req, &page); !s.ok()) return exit_for(s, "ListSockets");
      for (auto& s : *page.mutable_sockets()) *all.add_sockets() = std::move(s);
      all.set_total(page.total());
      if (page.next_page_token().empty()) break;
      req.set_page_token(page.next_page_token());
    }
    if (a_.json) return std::printf("%s", json_of(all, true).c_str()), kOk;
    std::vector<std::vector<std::string>> rows;
    for (const auto& s : all.sockets()) {
      rows.push_back({std::to_string(s.fd()), s.family(), s.type(), s.state(), s.local().empty() ? "-" : s.local(),
                      s.peer().empty() ? "-" : s.peer(), n(s.bytes_in()), n(s.bytes_out()), s.backend()});
    }
    print_table({"FD", "FAMILY", "TYPE", "STATE", "LOCAL", "PEER", "BYTES_IN", "BYTES_OUT", "BACKEND"}, rows);
    return kOk;
  }

  int localdevice() {
    grpc::ClientContext c;
    prepare(c);
    v1::LocalDeviceState r;
    if (auto s = stub_->ListLocalDevice(&c, {}, &r); !s.ok()) return exit_for(s, "ListLocalDevice");
    if (a_.json) return std::printf("%s", json_of(r, true).c_str()), kOk;
    if (!r.enabled()) {
      std::printf("localdevice family not enabled in this runtime\n");
      return kOk;
    }
    std::printf("%u listeners, %u connected, %" PRIu64 " bytes queued (max %u sockets, %u-byte rings)\n\n", r.listeners(),
                r.connected(), r.queued_bytes(), r.max_sockets(), r.ring_bytes());
    std::vector<std::vector<std::string>> rows;
    for (const auto& s : r.sockets()) {
      rows.push_back({s.fd() < 0 ? "-" : std::to_string(s.fd()), s.type(), s.state() + (s.closed() ? " (closed)" : ""),
                      n(s.port()), s.peer_port() ? n(s.peer_port()) : "-", n(s.queued()), n(s.bytes_in()), n(s.bytes_direct()), n(s.bytes_out())});
    }
    print_table({"FD", "TYPE", "STATE", "PORT", "PEER", "QUEUED", "BYTES_IN", "OF_THEM_DIRECT", "BYTES_OUT"}, rows);
    return kOk;
  }

  int close() {
    if (a_.rest.size() != 1) return usage("close takes one descriptor");
    char* end = nullptr;
    long fd = std::strtol(a_.rest[0].c_str(), &end, 10);
    if (end == a_.rest[0].c_str() || *end != '\0' || fd < 0 || fd > INT32_MAX) return usage("close: bad descriptor " + a_.rest[0]);
    if (!stub_) return kOk;
    grpc::ClientContext c;
    prepare(c);
    v1::CloseSocketRequest req;
    req.set_fd(static_cast<int32_t>(fd));
    v1::CloseSocketResponse r;
    if (auto s = stub_->CloseSocket(&c, req, &r); !s.ok()) return exit_for(s, "CloseSocket");
    if (a_.json) return std::printf("%s", json_of(r, true).c_str()), kOk;
    std::printf("socket %ld aborted (%s)\n", fd, r.backend().c_str());
    return kOk;
  }

  int drain() {
    v1::DrainRequest req;
    req.set_deadline_ms(30000);
    for (size_t i = 0; i < a_.rest.size(); ++i) {
      if (a_.rest[i] == "--deadline-ms" && i + 1 < a_.rest.size()) {
        char* end = nullptr;
        long v = std::strtol(a_.rest[++i].c_str(), &end, 10);
        if (*end != '\0' || v < 0 || v > 86400000) return usage("drain: bad --deadline-ms");
        req.set_deadline_ms(static_cast<uint32_t>(v));
      } else {
        return usage("drain: unknown argument " + a_.rest[i]);
      }
    }
    if (!stub_) return kOk;
    grpc::ClientContext c;
    prepare(c, static_cast<int>(req.deadline_ms() / 1000 + 1));
    v1::DrainResponse r;
    if (auto s = stub_->Drain(&c, req, &r); !s.ok()) return exit_for(s, "Drain");
    if (a_.json) {
      std::printf("%s", json_of(r, true).c_str());
    } else {
      std::printf("%u listeners stopped; %s after %" PRIu64 " ms; %d host connections left, %u localdevice\n",
                  r.listeners_stopped(), r.drained() ? "drained" : "NOT drained", r.waited_ms(), r.left_size(), r.localdevice_left());
      for (const auto& s : r.left()) std::printf("  fd %d %s %s -> %s\n", s.fd(), s.state().c_str(), s.local().c_str(), s.peer().c_str());
    }
    return r.drained() ? kOk : kNotDrained;
  }

  int watch() {
    long count = -1, duration_ms = -1;
    for (size_t i = 0; i < a_.rest.size(); ++i) {
      if ((a_.rest[i] == "--count" || a_.rest[i] == "--duration-ms") && i + 1 < a_.rest.size()) {
        char* end = nullptr;
        long v = std::strtol(a_.rest[i + 1].c_str(), &end, 10);
        if (*end != '\0' || v < 0) return usage("watch: bad " + a_.rest[i]);
        (a_.rest[i] == "--count" ? count : duration_ms) = v;
        ++i;
      } else {
        return usage("watch: unknown argument " + a_.rest[i]);
      }
    }
    if (!stub_) return kOk;
    grpc::ClientContext c;
    if (!a_.token.empty()) c.AddMetadata("authorization", "Bearer " + a_.token);
    if (duration_ms >= 0) c.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(duration_ms));
    auto reader = stub_->WatchEvents(&c, {});
    long seen = 0;
    v1::Event ev;
    while ((count < 0 || seen < count) && reader->Read(&ev)) {
      ++seen;
      if (a_.json) {
        std::printf("%s", json_of(ev, false).c_str());
      } else if (ev.has_socket()) {
        const auto& s = ev.socket();
        std::printf("#%" PRIu64 " socket %s fd %d %s/%s %s%s\n", ev.seq(), s.what().c_str(), s.fd(), s.family().c_str(),
                    s.type().c_str(), s.backend().c_str(),
                    s.error() ? (std::string(" errno ") + std::to_string(s.error()) + " (" + std::strerror(s.error()) + ")").c_str() : "");
      } else if (ev.has_drain()) {
        std::printf("#%" PRIu64 " drain %s: %u connections left, %u listeners stopped\n", ev.seq(), ev.drain().phase().c_str(),
                    ev.drain().connections_left(), ev.drain().listeners_stopped());
      }
      std::fflush(stdout);
    }
    if (count >= 0 && seen >= count) {
      c.TryCancel();
      reader->Finish();
      return kOk;
    }
    grpc::Status s = reader->Finish();
    // The watch ran for the time asked: that is success.
    if (duration_ms >= 0 && s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) return kOk;
    if (!s.ok()) return exit_for(s, "WatchEvents");
    return kOk;
  }

  int metrics() {
    v1::Stats r;
    int code = kOk;
    if (!get_stats(&r, &code)) return code;
    std::string o;
    auto help = [&](const char* name, const char* type, const char* text) {
      o += std::string("# HELP ") + name + " " + text + "\n# TYPE " + name + " " + type + "\n";
    };
    auto line = [&](const std::string& name, const std::string& labels, const std::string& v) {
      o += name + (labels.empty() ? "" : "{" + labels + "}") + " " + v + "\n";
    };
    auto esc = [](const std::string& s) {
      std::string e;
      for (char ch : s) {
        if (ch == '\\' || ch == '"') e += '\\';
        if (ch == '\n') { e += "\\n"; continue; }
        e += ch;
      }
      return e;
    };
    // One metric, one sample per opcode.
    auto per_opcode = [&](const char* name, const char* text, auto value) {
      help(name, "counter", text);
      for (const auto& p : r.opcodes()) line(name, "opcode=\"" + esc(p.name()) + "\"", n(value(p)));
    };
    using OpStats = std::decay_t<decltype(r.opcodes(0))>;
    per_opcode("gpusock_hostcalls_total", "Hostcalls answered (one per warp group), by opcode.",
               [](const OpStats& p) { return p.calls(); });
    per_opcode("gpusock_hostcall_lanes_total", "Lane calls answered, by opcode.",
               [](const OpStats& p) { return p.lanes(); });
    per_opcode("gpusock_hostcall_errors_total", "Lane calls answered with an error, by opcode.",
               [](const OpStats& p) { return p.errors(); });
    help("gpusock_hostcall_latency_seconds", "histogram", "Host service time of a hostcall, claim to reply.");
    for (const auto& p : r.opcodes()) {
      const std::string op = "opcode=\"" + esc(p.name()) + "\"";
      uint64_t cum = 0;
      for (int b = 0; b < p.latency_buckets_size(); ++b) {
        cum += p.latency_buckets(b);
        char le[32];
        std::snprintf(le, sizeof le, "%.9g", static_cast<double>(uint64_t{1} << (b + 1)) / 1e9);
        line("gpusock_hostcall_latency_seconds_bucket", op + ",le=\"" + le + "\"", n(cum));
      }
      line("gpusock_hostcall_latency_seconds_bucket", op + ",le=\"+Inf\"", n(cum));
      char sum[32];
      std::snprintf(sum, sizeof sum, "%.9g", static_cast<double>(p.latency_sum_ns()) / 1e9);
      line("gpusock_hostcall_latency_seconds_sum", op, sum);
      line("gpusock_hostcall_latency_seconds_count", op, n(cum));
    }
    // A metric with one unlabelled sample.
    auto single = [&](const char* name, const char* type, const char* text, const std::string& v) {
      help(name, type, text);
      line(name, "", v);
    };
    single("gpusock_hostcalls_rejected_total", "counter", "Calls failed by validation.", n(r.rejected()));
    single("gpusock_hostcall_foreign_lanes_total", "counter", "Lanes a request named that did not write it.",
           n(r.foreign_lanes()));
    single("gpusock_hostcall_stale_headers_total", "counter", "Requests whose header was another request's.",
           n(r.stale_headers()));
    single("gpusock_slots", "gauge", "Hostcall slots in the region.", n(r.slots()));
    single("gpusock_slots_owned", "gauge", "Slots a warp holds.", n(r.slots_owned()));
    single("gpusock_calls_in_flight", "gauge", "Calls published and not yet answered.", n(r.calls_in_flight()));
    single("gpusock_staging_bytes", "gauge", "Size of the staging arena.", n(r.staging_bytes()));
    single("gpusock_staging_bytes_used", "gauge", "Staging bytes held by calls.", n(r.staging_bytes_used()));
    single("gpusock_deliveries_total", "counter", "Copies the host made into kernels' device memory.", n(r.deliveries()));
    single("gpusock_delivered_bytes_total", "counter", "Bytes the host copied into kernels' device memory.",
           n(r.delivered_bytes()));
    single("gpusock_fetches_total", "counter", "Copies the host made out of kernels' device memory.", n(r.fetches()));
    single("gpusock_fetched_bytes_total", "counter", "Bytes the host copied out of kernels' device memory.",
           n(r.fetched_bytes()));
    help("gpusock_sockets", "gauge", "Open sockets by family, type and state.");
    for (const auto& s : r.sockets()) {
      line("gpusock_sockets", "family=\"" + esc(s.family()) + "\",type=\"" + esc(s.type()) + "\",state=\"" + esc(s.state()) + "\"",
           n(s.count()));
    }
    single("gpusock_socket_bytes_in", "gauge", "Bytes received by kernels over the host sockets open now.", n(r.bytes_in()));
    single("gpusock_socket_bytes_out", "gauge", "Bytes sent by kernels over the host sockets open now.", n(r.bytes_out()));
    single("gpusock_localdevice_listeners", "gauge", "localdevice listeners.", n(r.localdevice_listeners()));
    single("gpusock_localdevice_connected", "gauge", "Connected localdevice stream sockets.", n(r.localdevice_connected()));
    single("gpusock_localdevice_queued_bytes", "gauge", "Bytes waiting in localdevice rings.", n(r.localdevice_queued_bytes()));
    single("gpusock_draining", "gauge", "1 once Drain was called.", r.draining() ? "1" : "0");
    std::fwrite(o.data(), 1, o.size(), stdout);
    return kOk;
  }

  int log_level() {
    if (a_.rest.size() != 1) return usage("log-level takes one level");
    if (!stub_) return kOk;
    grpc::ClientContext c;
    prepare(c);
    v1::SetLogLevelRequest req;
    req.set_level(a_.rest[0]);
    v1::SetLogLevelResponse r;
    if (auto s = stub_->SetLogLevel(&c, req, &r); !s.ok()) return exit_for(s, "SetLogLevel");
    if (a_.json) return std::printf("%s", json_of(r, true).c_str()), kOk;
    std::printf("log level %s (was %s)\n", a_.rest[0].c_str(), r.previous().c_str());
    return kOk;
  }

 private:
  const Args& a_;
  std::unique_ptr<v1::Control::Stub> stub_;
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (const char* t = std::getenv("GPUSOCK_TOKEN")) a.token = t;
  if (const char* e = std::getenv("GPUSOCK_ENDPOINT")) a.endpoint = e;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (a.command.empty()) {
      if (s == "-h" || s == "--help") return std::printf("%s", kUsageText), kOk;
      if (s == "--json") { a.json = true; continue; }
      if ((s == "--endpoint" || s == "--token" || s == "--timeout") && i + 1 < argc) {
        std::string v = argv[++i];
        if (s == "--endpoint") a.endpoint = v;
        else if (s == "--token") a.token = v;
        else {
          char* end = nullptr;
          long t = std::strtol(v.c_str(), &end, 10);
          if (*end != '\0' || t <= 0 || t > 86400) return usage("bad --timeout " + v);
          a.timeout_s = static_cast<int>(t);
        }
        continue;
      }
      if (s.rfind("--", 0) == 0) return usage("unknown option " + s);
      a.command = s;
    } else if (s == "--json") {
      a.json = true;
    } else {
      a.rest.push_back(s);
    }
  }
  if (a.command.empty()) return usage("no command");
  static const char* known[] = {"info", "stats", "sockets", "localdevice", "close", "drain", "watch", "metrics", "log-level"};
  if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return a.command == k; }) == std::end(known)) {
    return usage("unknown command " + a.command);
  }
  // Arguments are checked before anything is looked for or connected to.
  if ((a.command == "info" || a.command == "stats" || a.command == "localdevice" || a.command == "metrics") && !a.rest.empty()) {
    return usage(a.command + " takes no arguments");
  }
  if (a.command != "info" && a.command != "stats" && a.command != "localdevice" && a.command != "metrics") {
    Ctl check(a, nullptr);
    int code = a.command == "sockets" ? check.sockets()
               : a.command == "close" ? check.close()
               : a.command == "drain" ? check.drain()
               : a.command == "watch" ? check.watch()
                                      : check.log_level();
    if (code != kOk) return code;
  }
  if (a.endpoint.empty()) {
    auto found = discover();
    if (found.empty()) {
      std::fprintf(stderr, "gpusockctl: no running gpusock runtime found (no live gpusock-<pid>.sock in $XDG_RUNTIME_DIR, or /tmp when unset); use --endpoint\n");
      return kUnreachable;
    }
    if (found.size() > 1) {
      std::fprintf(stderr, "gpusockctl: %zu runtimes found; pick one with --endpoint:\n", found.size());
      for (const auto& f : found) std::fprintf(stderr, "  unix:%s\n", f.c_str());
      return kUnreachable;
    }
    a.endpoint = "unix:" + found[0];
  } else if (a.endpoint.front() == '/') {
    a.endpoint = "unix:" + a.endpoint;
  }
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  auto channel = grpc::CreateCustomChannel(a.endpoint, grpc::InsecureChannelCredentials(), args);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(a.timeout_s))) {
    std::fprintf(stderr, "gpusockctl: cannot connect to %s\n", a.endpoint.c_str());
    return kUnreachable;
  }
  Ctl ctl(a, channel);
  if (a.command == "info") return ctl.info();
  if (a.command == "stats") return ctl.stats();
  if (a.command == "sockets") return ctl.sockets();
  if (a.command == "localdevice") return ctl.localdevice();
  if (a.command == "close") return ctl.close();
  if (a.command == "drain") return ctl.drain();
  if (a.command == "watch") return ctl.watch();
  if (a.command == "metrics") return ctl.metrics();
  return ctl.log_level();
}
