// The HTTP server example end to end, on the cpu device: the real binary, real clients
// (curl, wrk, raw sockets) over loopback.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;

bool have(const char* tool) {
  return std::system((std::string("command -v ") + tool + " >/dev/null 2>&1").c_str()) == 0;
}

// Runs a shell command; returns its stdout (stderr too with `with_stderr`).
std::string sh(const std::string& cmd, bool with_stderr = false) {
  std::string full = cmd + (with_stderr ? " 2>&1" : " 2>/dev/null");
  std::unique_ptr<FILE, int (*)(FILE*)> p(popen(full.c_str(), "r"), pclose);
  std::string out;
  char buf[4096];
  size_t n;
  while (p && (n = fread(buf, 1, sizeof buf, p.get())) > 0) out.append(buf, n);
  return out;
}

// The server as a child process, its stdout in a file.
class ServerProcess {
 public:
  bool start(const std::vector<std::string>& extra) {
    out_path_ = testing::TempDir() + "http_server_" + std::to_string(getpid()) + "_" + std::to_string(counter_++) + ".out";
    std::vector<std::string> args = {GPUSOCK_HTTP_SERVER, "--device", "cpu", "--address", "127.0.0.1", "--port", "0",
                                     "--root", GPUSOCK_HTTP_WWW};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ) != 0) return false;
    posix_spawn_file_actions_destroy(&fa);
    const auto end = Clock::now() + std::chrono::seconds(60);
    const std::regex re("listening on \\S+ port ([0-9]+)");
    while (Clock::now() < end) {
      std::smatch m;
      const std::string o = output();
      if (std::regex_search(o, m, re)) {
        port_ = std::stoi(m[1]);
        return true;
      }
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  // SIGINT, then waits; returns the exit status (or -1).
  int stop() {
    if (pid_ < 0) return -1;
    kill(pid_, SIGINT);
    int status = 0;
    const auto end = Clock::now() + std::chrono::seconds(60);
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() > end) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        pid_ = -1;
        return -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  ~ServerProcess() { stop(); }
  std::string output() const {
    std::ifstream f(out_path_);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
  }
  int port() const { return port_; }
  std::string url(const std::string& path) const { return "http://127.0.0.1:" + std::to_string(port_) + path; }

 private:
  static inline int counter_ = 0;
  pid_t pid_ = -1;
  int port_ = 0;
  std::string out_path_;
};

int connect_to(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Reads until the peer closes, `want` bytes arrived, or `limit` passes.
std::string read_all(int fd, std::chrono::milliseconds limit, size_t want = SIZE_MAX) {
  std::string got;
  const auto end = Clock::now() + limit;
  while (got.size() < want) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now()).count();
    if (left <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) break;
    char buf[65536];
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  return got;
}

// Sends `request` on a fresh connection and returns everything the server answers
// before it closes (or 10 s).
std::string exchange(int port, const std::string& request, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  int fd = connect_to(port);
  if (fd < 0) return "connect failed";
  send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string r = read_all(fd, limit);
  close(fd);
  return r;
}

int status_code(const std::string& response) {
  if (response.compare(0, 9, "HTTP/1.1 ") != 0 || response.size() < 12) return -1;
  return std::stoi(response.substr(9, 3));
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

class HttpServer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess();
    if (!server_->start({"--request-timeout-ms", "1500"})) {
      delete server_;
      server_ = nullptr;
    }
  }
  static void TearDownTestSuite() {
    if (server_ != nullptr) {
      // A clean stop: exit status 0 (a sanitizer's report would make it non-zero).
      EXPECT_EQ(server_->stop(), 0) << server_->output();
      EXPECT_NE(server_->output().find("summary: stopped by signal"), std::string::npos) << server_->output();
    }
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(server_, nullptr) << "the server did not start"; }
  static inline ServerProcess* server_ = nullptr;
};

#define NEED(tool) \
  if (!have(tool)) GTEST_SKIP() << tool " is not installed (scripts/setup-deps.sh installs it)"

TEST_F(HttpServer, CurlGetsEveryRouteWithItsContentType) {
  NEED("curl");
  const std::string www = GPUSOCK_HTTP_WWW;
  struct Case {
    std::string path, file, type;
  } cases[] = {
      {"/", "/index.html", "text/html; charset=utf-8"},
      {"/index.html", "/index.html", "text/html; charset=utf-8"},
      {"/css/site.css", "/css/site.css", "text/css; charset=utf-8"},
      {"/data.json", "/data.json", "application/json"},
      {"/4k.bin", "/4k.bin", "application/octet-stream"},
  };
  const std::string body = testing::TempDir() + "http_body";
  for (const Case& c : cases) {
    const std::string meta = sh("curl -s -o " + body + " -w '%{http_code} %{content_type}' " + server_->url(c.path));
    EXPECT_EQ(meta, "200 " + c.type) << c.path;
    EXPECT_EQ(read_file(body), read_file(www + c.file)) << c.path;
  }
  EXPECT_EQ(sh("curl -s " + server_->url("/healthz")), "ok\n");
  EXPECT_EQ(sh("curl -s -o /dev/null -w '%{http_code}' " + server_->url("/missing.html")), "404");
}

TEST_F(HttpServer, CurlReusesTheConnectionForTwoUrls) {
  NEED("curl");
  const std::string v = sh("curl -sv " + server_->url("/healthz") + " " + server_->url("/data.json"), true);
  EXPECT_NE(v.find("Re-using existing connection"), std::string::npos) << v;
  EXPECT_EQ(v.find("Connection: close"), std::string::npos) << v;
  EXPECT_NE(v.find("< Server: gpusock-http/"), std::string::npos) << v;
  EXPECT_TRUE(std::regex_search(v, std::regex("< Date: [A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT")))
      << v;
}

TEST_F(HttpServer, HeadHasTheLengthButNoBody) {
  const std::string r =
      exchange(server_->port(), "HEAD /4k.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(status_code(r), 200) << r;
  EXPECT_NE(r.find("Content-Length: 4096\r\n"), std::string::npos) << r;
  EXPECT_EQ(r.substr(r.size() - 4), "\r\n\r\n") << "HEAD got a body: " << r.size() << " bytes";
  if (have("curl")) {
    EXPECT_NE(sh("curl -sI " + server_->url("/index.html")).find("Content-Type: text/html"), std::string::npos);
  }
}

TEST_F(HttpServer, Sha256OfContentLengthAndChunkedBodies) {
  NEED("curl");
  NEED("sha256sum");
  for (size_t size : {size_t{0}, size_t{1}, size_t{64}, size_t{100000}, size_t{1} << 20}) {
    const std::string file = testing::TempDir() + "http_sha_" + std::to_string(size);
    {
      std::ofstream f(file, std::ios::binary);
      uint64_t x = size * 0x9e3779b97f4a7c15ull + 1;
      for (size_t i = 0; i < size; ++i) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.put(static_cast<char>(x));
      }
    }
    const std::string want = sh("sha256sum " + file + " | cut -c1-64") ;
    ASSERT_EQ(want.size(), 65u);
    EXPECT_EQ(sh("curl -s --data-binary @" + file + " " + server_->url("/sha256")), want) << size;
    EXPECT_EQ(sh("curl -s -H 'Transfer-Encoding: chunked' --data-binary @" + file + " " + server_->url("/sha256")), want)
        << size;
  }
}

TEST_F(HttpServer, CurlUploadingTooMuchGets413) {
  NEED("curl");
  const std::string file = testing::TempDir() + "http_big_upload";
  {
    std::ofstream f(file, std::ios::binary);
    f << std::string(3u << 20, 'x');  // 3 MiB, over the 1 MiB default
  }
  // Content-Length: refused at the head. Chunked: refused in the middle of the upload,
  // and the 413 must still reach curl.
  EXPECT_EQ(sh("curl -s -o /dev/null -w '%{http_code}' --data-binary @" + file + " " + server_->url("/sha256")), "413");
  EXPECT_EQ(sh("curl -s -o /dev/null -w '%{http_code}' -H 'Transfer-Encoding: chunked' --data-binary @" + file + " " +
               server_->url("/sha256")),
            "413");
}

TEST_F(HttpServer, BadRequestsGetTheirStatusCodes) {
  const int port = server_->port();
  struct Case {
    const char* what;
    std::string request;
    int status;
  } cases[] = {
      {"garbage", "GARBAGE\r\n\r\n", 400},
      {"no Host", "GET / HTTP/1.1\r\n\r\n", 400},
      {"Content-Length and chunked", "POST /sha256 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
      {"bad chunk", "POST /sha256 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n", 400},
      {"not found", "GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 404},
      {"DELETE", "DELETE /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 405},
      {"GET /sha256", "GET /sha256 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 405},
      {"POST to a file", "POST /index.html HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi", 405},
      {"body too large", "POST /sha256 HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n", 413},
      {"header too large", "GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + std::string(10000, 'b') + "\r\n\r\n", 431},
      {"HTTP/2.0", "GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505},
      {"gzip coding", "POST /sha256 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501},
  };
  for (const Case& c : cases) {
    const std::string r = exchange(port, c.request);
    EXPECT_EQ(status_code(r), c.status) << c.what << ":\n" << r;
    EXPECT_NE(r.find("\r\nServer: gpusock-http/"), std::string::npos) << c.what;
    EXPECT_NE(r.find("\r\nDate: "), std::string::npos) << c.what;
    if (c.status == 405) {
      EXPECT_NE(r.find("\r\nAllow: "), std::string::npos) << c.what;
    }
  }
}

TEST_F(HttpServer, SlowRequestGets408AndIsClosed) {
  const auto start = Clock::now();
  const std::string r = exchange(server_->port(), "GET /healthz HTTP/1.1\r\nHost: t\r\n", std::chrono::seconds(20));
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_EQ(status_code(r), 408) << r;
  EXPECT_NE(r.find("Connection: close"), std::string::npos) << r;
  EXPECT_GE(secs, 1.4);  // --request-timeout-ms 1500
}

TEST_F(HttpServer, PipelinedRequestsAreAnsweredInOrderOnOneConnection) {
  const std::string reqs =
      "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
      "POST /sha256 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
      "GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"
      "GET /data.json HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  // Split mid-request, so the parser must resume across receives.
  int fd = connect_to(server_->port());
  ASSERT_GE(fd, 0);
  send(fd, reqs.data(), 50, MSG_NOSIGNAL);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  send(fd, reqs.data() + 50, reqs.size() - 50, MSG_NOSIGNAL);
  const std::string r = read_all(fd, std::chrono::seconds(10));
  close(fd);
  std::vector<int> codes;
  for (size_t at = r.find("HTTP/1.1 "); at != std::string::npos; at = r.find("HTTP/1.1 ", at + 1)) {
    codes.push_back(std::stoi(r.substr(at + 9, 3)));
  }
  EXPECT_EQ(codes, (std::vector<int>{200, 200, 404, 200})) << r;
  EXPECT_NE(r.find("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"), std::string::npos) << r;
  EXPECT_NE(r.find("\"gpusock\""), std::string::npos) << r;
}

TEST_F(HttpServer, WrkLoadHasNoSocketErrors) {
  NEED("wrk");
  const std::string out = sh("wrk -t2 -c32 -d3s --timeout 10s " + server_->url("/healthz"), true);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m, std::regex("([0-9]+) requests in"))) << out;
  EXPECT_GT(std::stoll(m[1]), 0) << out;
  EXPECT_EQ(out.find("Socket errors"), std::string::npos) << out;
  EXPECT_EQ(out.find("Non-2xx"), std::string::npos) << out;
  const std::string out4k = sh("wrk -t2 -c32 -d2s --timeout 10s " + server_->url("/4k.bin"), true);
  EXPECT_EQ(out4k.find("Socket errors"), std::string::npos) << out4k;
  EXPECT_NE(out4k.find("requests in"), std::string::npos) << out4k;
}

TEST(HttpServerLimits, ConnectionsPastTheLimitGet503) {
  ServerProcess s;
  ASSERT_TRUE(s.start({"--max-connections", "2"}));
  int a = connect_to(s.port()), b = connect_to(s.port());
  ASSERT_GE(a, 0);
  ASSERT_GE(b, 0);
  // Make sure both are accepted (answered) before the third arrives.
  const std::string req = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
  for (int fd : {a, b}) {
    send(fd, req.data(), req.size(), MSG_NOSIGNAL);
    EXPECT_EQ(status_code(read_all(fd, std::chrono::seconds(10), 100)), 200);
  }
  const std::string r = exchange(s.port(), req);
  EXPECT_EQ(status_code(r), 503) << r;
  close(a);
  close(b);
  // Closing frees the places again.
  std::string again;
  for (int i = 0; i < 50 && status_code(again) != 200; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    again = exchange(s.port(), "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
  }
  EXPECT_EQ(status_code(again), 200) << again;
}

TEST(HttpServerLimits, SigintStopsCleanlyWithASummary) {
  ServerProcess s;
  ASSERT_TRUE(s.start({"--max-body-bytes", "100"}));
  EXPECT_EQ(status_code(exchange(s.port(), "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")), 200);
  EXPECT_EQ(status_code(exchange(s.port(), "POST /sha256 HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n")), 413);
  int idle = connect_to(s.port());  // open at the stop: closed by the server, not leaked
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // accepted by now
  EXPECT_EQ(s.stop(), 0);
  const std::string out = s.output();
  EXPECT_NE(out.find("summary: stopped by signal; 3 connections"), std::string::npos) << out;
  EXPECT_NE(out.find("2 requests (2xx 1, 4xx 1, 5xx 0"), std::string::npos) << out;
  EXPECT_NE(out.find("req/s"), std::string::npos) << out;
  EXPECT_EQ(read_all(idle, std::chrono::seconds(5)), "");  // end of stream, no bytes
  close(idle);
}

}  // namespace
