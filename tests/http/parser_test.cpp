// The server's GPUSOCK_HD pieces (parser, SHA-256, Date, file lookup), run on the host.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "date.hpp"
#include "files.hpp"
#include "parser.hpp"
#include "sha256.hpp"
#include "server.hpp"

namespace gpusock::http {
namespace {

// What a run of the parser saw, as text, so runs can be compared and read in failures.
struct Transcript {
  std::vector<RequestHead> heads;
  std::vector<std::string> bodies;
  int done = 0;
  int error = 0;
};

// Feeds `input` the way the server does: into a buffer of max_header_bytes, at most
// `piece` bytes per "recv", keeping the unparsed tail.
Transcript run(const std::string& input, uint32_t piece, Limits lim = {}) {
  Transcript t;
  std::vector<uint8_t> buf(lim.max_header_bytes);
  uint32_t used = 0;
  size_t pos = 0;
  Parser p;
  while (t.error == 0) {
    const uint32_t room = lim.max_header_bytes - used;
    const uint32_t n = static_cast<uint32_t>(std::min<size_t>({room, piece, input.size() - pos}));
    if (n == 0 && pos == input.size()) break;
    std::memcpy(buf.data() + used, input.data() + pos, n);
    used += n;
    pos += n;
    uint32_t off = 0;
    for (;;) {
      const uint8_t* at = buf.data() + off;
      Event ev = step(p, lim, at, used - off);
      EXPECT_LE(ev.consumed, used - off);
      off += ev.consumed;
      if (ev.kind == EventKind::kNeedMore) {
        if (ev.consumed == 0) break;
        continue;
      }
      if (ev.kind == EventKind::kHead) {
        t.heads.push_back(p.head);
        t.bodies.emplace_back();
      } else if (ev.kind == EventKind::kBody) {
        t.bodies.back().append(reinterpret_cast<const char*>(at + ev.body_offset), ev.body_len);
      } else if (ev.kind == EventKind::kDone) {
        ++t.done;
      } else {
        t.error = ev.status;
        break;
      }
    }
    std::memmove(buf.data(), buf.data() + off, used - off);
    used -= off;
  }
  return t;
}

int status_of(const std::string& input, Limits lim = {}) { return run(input, 1 << 20, lim).error; }

TEST(HttpParser, ParsesASimpleGet) {
  Transcript t = run("GET /index.html?x=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: t\r\n\r\n", 4096);
  ASSERT_EQ(t.error, 0);
  ASSERT_EQ(t.heads.size(), 1u);
  EXPECT_EQ(t.done, 1);
  EXPECT_EQ(t.heads[0].method, Method::kGet);
  EXPECT_STREQ(t.heads[0].path, "/index.html");
  EXPECT_TRUE(t.heads[0].keep_alive);
  EXPECT_EQ(t.heads[0].version_minor, 1);
}

TEST(HttpParser, SameResultWhateverTheRecvBoundaries) {
  const std::string in =
      "POST /sha256 HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
      "POST /sha256 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
      "5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"
      "\r\nHEAD /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
  const Transcript whole = run(in, 1 << 20);
  ASSERT_EQ(whole.error, 0);
  ASSERT_EQ(whole.done, 3);
  EXPECT_EQ(whole.bodies[0], "hello world");
  EXPECT_EQ(whole.bodies[1], "hello world");
  EXPECT_TRUE(whole.heads[1].chunked);
  EXPECT_EQ(whole.heads[2].method, Method::kHead);
  EXPECT_TRUE(whole.heads[2].keep_alive);
  EXPECT_EQ(whole.heads[2].version_minor, 0);
  for (uint32_t piece = 1; piece < 40; ++piece) {
    const Transcript t = run(in, piece);
    EXPECT_EQ(t.error, 0) << piece;
    EXPECT_EQ(t.done, 3) << piece;
    EXPECT_EQ(t.bodies, whole.bodies) << piece;
  }
}

TEST(HttpParser, ConnectionDefaultsFollowTheVersion) {
  EXPECT_FALSE(run("GET / HTTP/1.0\r\n\r\n", 100).heads.at(0).keep_alive);
  EXPECT_FALSE(run("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 100).heads.at(0).keep_alive);
  EXPECT_TRUE(run("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, Keep-Alive\r\n\r\n", 100).heads.at(0).keep_alive);
  EXPECT_TRUE(run("GET / HTTP/1.1\r\nhost: a\r\nExpect: 100-continue\r\n\r\n", 100).heads.at(0).expect_continue);
}

TEST(HttpParser, MalformedRequestsGet400) {
  EXPECT_EQ(status_of("GARBAGE\r\n\r\n"), 400);
  EXPECT_EQ(status_of("GET index.html HTTP/1.1\r\nHost: a\r\n\r\n"), 400);     // not origin-form
  EXPECT_EQ(status_of("GET / HTTP/1.1\r\n\r\n"), 400);                         // no Host
  EXPECT_EQ(status_of("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);   // two Hosts
  EXPECT_EQ(status_of("GET / HTTP/1.1\nHost: a\r\n\r\n"), 400);                // bare LF
  EXPECT_EQ(status_of("GET / HTTP/1.1\r\nHost : a\r\n\r\n"), 400);             // space before ':'
  EXPECT_EQ(status_of("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"), 400);   // obs-fold
  EXPECT_EQ(status_of("GET / HTTP/1.1\r\nHost: a\x01\r\n\r\n"), 400);          // control character
  EXPECT_EQ(status_of("GET / HTTX/1.1\r\nHost: a\r\n\r\n"), 400);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n"), 400);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), 400);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), 400);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX"), 400);
}

TEST(HttpParser, LimitsGetTheirStatus) {
  Limits lim;
  lim.max_header_bytes = 256;
  lim.max_body_bytes = 10;
  EXPECT_EQ(status_of("GET / HTTP/1.1\r\nHost: a\r\nX: " + std::string(300, 'a') + "\r\n\r\n", lim), 431);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", lim), 413);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789", lim), 0);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n5\r\n", lim), 413);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9999999999999999999\r\n\r\n"), 413);
  EXPECT_EQ(status_of("GET /" + std::string(kMaxPath, 'p') + " HTTP/1.1\r\nHost: a\r\n\r\n"), 414);
  std::string many = "GET / HTTP/1.1\r\nHost: a\r\n";
  for (uint32_t i = 0; i < kMaxFields; ++i) many += "X: y\r\n";
  EXPECT_EQ(status_of(many + "\r\n"), 431);
  EXPECT_EQ(status_of("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
  EXPECT_EQ(status_of("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"), 501);
}

TEST(HttpParser, AnErrorIsFinal) {
  Parser p;
  Limits lim;
  const std::string bad = "BAD\r\n\r\n";
  Event e = step(p, lim, reinterpret_cast<const uint8_t*>(bad.data()), bad.size());
  EXPECT_EQ(e.kind, EventKind::kError);
  const std::string good = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
  e = step(p, lim, reinterpret_cast<const uint8_t*>(good.data()), good.size());
  EXPECT_EQ(e.kind, EventKind::kError);
  EXPECT_EQ(e.status, 400);
}

TEST(HttpParser, IncompleteHeadWaitsForMore) {
  Transcript t = run("GET / HTTP/1.1\r\nHost: a\r\n", 3);
  EXPECT_EQ(t.error, 0);
  EXPECT_TRUE(t.heads.empty());
  Parser p;
  const std::string part = "GET / HTTP/1.1\r\nHo";
  Event e = step(p, Limits{}, reinterpret_cast<const uint8_t*>(part.data()), part.size());
  EXPECT_EQ(e.kind, EventKind::kNeedMore);
  EXPECT_TRUE(in_request(p, static_cast<uint32_t>(part.size())));
  EXPECT_FALSE(in_request(Parser{}, 0));
}

std::string hex_sha(const std::string& s, size_t piece) {
  Sha256 h;
  for (size_t i = 0; i < s.size(); i += piece) {
    h.update(reinterpret_cast<const uint8_t*>(s.data() + i), std::min(piece, s.size() - i));
  }
  char out[64];
  h.finish_hex(out);
  return std::string(out, 64);
}

TEST(HttpSha256, MatchesFips180Vectors) {
  EXPECT_EQ(hex_sha("", 1), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex_sha("abc", 1), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  for (size_t piece : {1, 3, 55, 56, 64, 1000}) {
    EXPECT_EQ(hex_sha(two, piece), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  }
  EXPECT_EQ(hex_sha(std::string(1000000, 'a'), 4097), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(HttpDate, FormatsImfFixdate) {
  char d[kDateLen + 1] = {};
  format_date(784111777, d);
  EXPECT_STREQ(d, "Sun, 06 Nov 1994 08:49:37 GMT");
  format_date(0, d);
  EXPECT_STREQ(d, "Thu, 01 Jan 1970 00:00:00 GMT");
  format_date(951782400, d);  // a leap day
  EXPECT_STREQ(d, "Tue, 29 Feb 2000 00:00:00 GMT");
  format_date(4102444799, d);
  EXPECT_STREQ(d, "Thu, 31 Dec 2099 23:59:59 GMT");
}

TEST(HttpFiles, LoadsADirectoryAndFindsEveryFile) {
  StaticFiles f;
  ASSERT_EQ(load_directory(GPUSOCK_HTTP_WWW, {}, f), "");
  ASSERT_GE(f.entries.size(), 4u);
  FileTable t{f.entries.data(), static_cast<uint32_t>(f.entries.size()), f.slots.data(),
              static_cast<uint32_t>(f.slots.size() - 1), f.blob.data()};
  for (const FileEntry& e : f.entries) EXPECT_EQ(find_file(t, e.path, e.path_len), &e) << e.path;
  const FileEntry* css = find_file(t, "/css/site.css", 13);
  ASSERT_NE(css, nullptr);
  EXPECT_EQ(std::string(css->type, css->type_len), "text/css; charset=utf-8");
  EXPECT_EQ(find_file(t, "/missing", 8), nullptr);
  EXPECT_EQ(find_file(t, "/css", 4), nullptr);
  EXPECT_STREQ(content_type("a.PNG"), "image/png");
  EXPECT_STREQ(content_type("noext"), "application/octet-stream");
  EXPECT_NE(load_directory("/nonexistent-dir", {}, f), "");
}

}  // namespace
}  // namespace gpusock::http
