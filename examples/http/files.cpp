#include "files.hpp"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace gpusock::http {

const char* content_type(const std::string& name) {
  struct Type {
    const char* ext;
    const char* type;
  };
  static const Type kTypes[] = {
      {".html", "text/html; charset=utf-8"}, {".htm", "text/html; charset=utf-8"},
      {".css", "text/css; charset=utf-8"},   {".js", "text/javascript; charset=utf-8"},
      {".mjs", "text/javascript; charset=utf-8"},
      {".json", "application/json"},         {".txt", "text/plain; charset=utf-8"},
      {".xml", "application/xml"},           {".svg", "image/svg+xml"},
      {".png", "image/png"},                 {".jpg", "image/jpeg"},
      {".jpeg", "image/jpeg"},               {".gif", "image/gif"},
      {".webp", "image/webp"},               {".ico", "image/x-icon"},
      {".wasm", "application/wasm"},         {".pdf", "application/pdf"},
      {".woff2", "font/woff2"},              {".mp4", "video/mp4"},
  };
  std::string ext = std::filesystem::path(name).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const Type& t : kTypes) {
    if (ext == t.ext) return t.type;
  }
  return "application/octet-stream";
}

std::string load_directory(const std::string& root, const LoadLimits& limits, StaticFiles& out) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return "--root " + root + ": not a directory";
  out = StaticFiles{};
  std::vector<fs::path> paths;
  for (auto it = fs::recursive_directory_iterator(root, fs::directory_options::follow_directory_symlink, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_regular_file(ec)) paths.push_back(it->path());
  }
  if (ec) return "--root " + root + ": " + ec.message();
  std::sort(paths.begin(), paths.end());
  if (paths.size() > limits.max_files) {
    return "--root " + root + ": " + std::to_string(paths.size()) + " files, more than the limit of " +
           std::to_string(limits.max_files);
  }
  for (const fs::path& p : paths) {
    const std::string rel = "/" + fs::relative(p, root, ec).generic_string();
    if (rel.size() >= kMaxPath) return "file path too long to serve (max " + std::to_string(kMaxPath - 1) + "): " + rel;
    std::ifstream f(p, std::ios::binary);
    if (!f) return "cannot read " + p.string();
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (out.blob.size() + bytes.size() > limits.max_total_bytes) {
      return "--root " + root + ": files exceed the limit of " + std::to_string(limits.max_total_bytes) + " bytes";
    }
    FileEntry e{};
    e.offset = out.blob.size();
    e.size = bytes.size();
    e.path_len = static_cast<uint32_t>(rel.size());
    std::memcpy(e.path, rel.data(), rel.size());
    const char* type = content_type(rel);
    e.type_len = static_cast<uint32_t>(std::strlen(type));
    std::memcpy(e.type, type, e.type_len);
    out.entries.push_back(e);
    out.blob.insert(out.blob.end(), bytes.begin(), bytes.end());
  }
  // At most half full, so probes stay short and an empty slot always ends a miss.
  uint32_t n = 16;
  while (n < 2 * out.entries.size()) n *= 2;
  out.slots.assign(n, 0);
  for (uint32_t i = 0; i < out.entries.size(); ++i) {
    const FileEntry& e = out.entries[i];
    uint32_t s = static_cast<uint32_t>(path_hash(e.path, e.path_len)) & (n - 1);
    while (out.slots[s] != 0) s = (s + 1) & (n - 1);
    out.slots[s] = i + 1;
  }
  if (out.blob.empty()) out.blob.push_back(0);  // a device allocation of 0 bytes is not one
  return "";
}

}  // namespace gpusock::http
