// examples/http/date.hpp — the HTTP Date format (IMF-fixdate, RFC 9110 5.6.7), GPUSOCK_HD.
//
//   char d[gpusock::http::kDateLen];
//   gpusock::http::format_date(unix_seconds, d);   // "Sun, 06 Nov 1994 08:49:37 GMT"
#pragma once

#include <cstdint>

#include "gpusock/hostcall/platform.hpp"

namespace gpusock::http {

inline constexpr uint32_t kDateLen = 29;

GPUSOCK_HD inline void two_digits(char* p, int64_t v) {
  p[0] = static_cast<char>('0' + v / 10);
  p[1] = static_cast<char>('0' + v % 10);
}

// Writes exactly kDateLen characters (no NUL) for `secs` seconds after 1970-01-01 UTC.
GPUSOCK_HD inline void format_date(int64_t secs, char* out) {
  if (secs < 0) secs = 0;
  const int64_t days = secs / 86400;
  const int64_t rem = secs % 86400;
  // Days to civil date (H. Hinnant's algorithm), valid for any date after 1970.
  const int64_t z = days + 719468;
  const int64_t era = z / 146097;
  const int64_t doe = z - era * 146097;
  const int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  const int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  const int64_t mp = (5 * doy + 2) / 153;
  const int64_t day = doy - (153 * mp + 2) / 5 + 1;
  const int64_t month = mp < 10 ? mp + 3 : mp - 9;
  const int64_t year = yoe + era * 400 + (month <= 2 ? 1 : 0);
  const char* wd = "ThuFriSatSunMonTueWed";  // 1970-01-01 was a Thursday
  const char* mn = "JanFebMarAprMayJunJulAugSepOctNovDec";
  const int64_t w = days % 7;
  out[0] = wd[3 * w];
  out[1] = wd[3 * w + 1];
  out[2] = wd[3 * w + 2];
  out[3] = ',';
  out[4] = ' ';
  two_digits(out + 5, day);
  out[7] = ' ';
  out[8] = mn[3 * (month - 1)];
  out[9] = mn[3 * (month - 1) + 1];
  out[10] = mn[3 * (month - 1) + 2];
  out[11] = ' ';
  two_digits(out + 12, (year / 100) % 100);
  two_digits(out + 14, year % 100);
  out[16] = ' ';
  two_digits(out + 17, rem / 3600);
  out[19] = ':';
  two_digits(out + 20, (rem / 60) % 60);
  out[22] = ':';
  two_digits(out + 23, rem % 60);
  out[25] = ' ';
  out[26] = 'G';
  out[27] = 'M';
  out[28] = 'T';
}

}  // namespace gpusock::http
