// examples/http/files.hpp — host side: reads a directory into the table and blob the
// server kernel serves from device memory.
//
//   gpusock::http::StaticFiles f;
//   std::string err = gpusock::http::load_directory("www", limits, f);   // "" on success
//   // f.entries, f.slots, f.blob: copy them to the device, point a FileTable at them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "server.hpp"

namespace gpusock::http {

struct StaticFiles {
  std::vector<FileEntry> entries;
  std::vector<uint32_t> slots;  // power-of-two open-addressing table (entry index + 1)
  std::vector<uint8_t> blob;
};

struct LoadLimits {
  uint32_t max_files = 4096;
  uint64_t max_total_bytes = 256ull << 20;
};

// The Content-Type for a file name, by its extension (lower-cased); unknown ones are
// application/octet-stream.
const char* content_type(const std::string& name);

// Loads every regular file under `root` (recursively, symbolic links followed, hidden
// files included) as "/relative/path". Returns "" or a message saying what went wrong.
std::string load_directory(const std::string& root, const LoadLimits& limits, StaticFiles& out);

}  // namespace gpusock::http
