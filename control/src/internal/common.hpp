// Private to control/: names the server and gpusockctl both print.
#pragma once

#include <sys/socket.h>

#include <string>

#include "gpusock/net/localdevice.hpp"  // AF_LOCALDEVICE

namespace gpusock::control::internal {

inline std::string family_name(int family) {
  switch (family) {
    case AF_INET: return "inet";
    case AF_INET6: return "inet6";
    case AF_UNIX: return "unix";
    default: return family == AF_LOCALDEVICE ? "localdevice" : "family-" + std::to_string(family);
  }
}

inline std::string type_name(int type) {
  switch (type) {
    case SOCK_STREAM: return "stream";
    case SOCK_DGRAM: return "dgram";
    default: return "type-" + std::to_string(type);
  }
}

}  // namespace gpusock::control::internal
