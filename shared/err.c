#include "err.h"

#include <uv.h>

const char *mtp_strerror(int err) {
  switch (err) {
  case MTP_OK:
    return "ok";
#define XX(name, val, str) \
  case MTP_##name:         \
    return str;
    MTP_ERRNO_MAP(XX)
#undef XX
  default:
    break;
  }
  if (err < 0 && err > -10000)
    return uv_strerror(err);
  return "unknown error";
}
