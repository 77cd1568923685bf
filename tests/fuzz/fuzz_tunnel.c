/*
 * fuzz_tunnel.c - libFuzzer target for the tunnel frame decoder (shared/tunnel.c).
 *
 * The first input byte picks a chunk size (1..256) so the same input also exercises the
 * incremental paths; the rest is fed to mtp_tunnel_decode in chunks of that size until an
 * error. Every decoded frame must pass mtp_tunnel_frame_check and re-encode to a frame that
 * decodes again to the same type. Not built by CMake; build it by hand (after a normal build
 * generated tunnel.pb-c.{c,h} into BUILD/proto):
 *
 *   B=build-tunnel
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -std=c11 \
 *     -Ishared -I$B/proto tests/fuzz/fuzz_tunnel.c shared/tunnel.c shared/alloc.c \
 *     $B/proto/tunnel.pb-c.c -lprotobuf-c -o fuzz_tunnel
 *   ./fuzz_tunnel -max_len=4096 -runs=1000000
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "tunnel.h"

static void recheck(const Mtp__Frame *f) {
  if (mtp_tunnel_frame_check(f) != MTP_OK)
    abort();
  if (f->msg_case == MTP__FRAME__MSG__NOT_SET)
    return;
  size_t n = mtp_tunnel_frame_size(f);
  if (n == 0)
    abort(); /* decoded frames are never above the limit, so they can be re-sent */
  uint8_t *buf = malloc(n);
  if (buf == NULL)
    return;
  if (mtp_tunnel_encode(f, buf, n) != (ssize_t)n)
    abort();
  struct mtp_tunnel_dec d;
  mtp_tunnel_dec_init(&d);
  Mtp__Frame *g = NULL;
  if (mtp_tunnel_decode(&d, buf, n, &g) != (ssize_t)n || g == NULL || g->msg_case != f->msg_case)
    abort();
  mtp_tunnel_frame_free(g);
  mtp_tunnel_dec_free(&d);
  free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0)
    return 0;
  size_t chunk = (size_t)data[0] + 1;
  data++;
  size--;
  struct mtp_tunnel_dec d;
  mtp_tunnel_dec_init(&d);
  size_t off = 0;
  while (off < size) {
    size_t len = size - off < chunk ? size - off : chunk;
    Mtp__Frame *f = NULL;
    ssize_t n = mtp_tunnel_decode(&d, data + off, len, &f);
    if (n < 0) {
      if (n != MTP_EPROTO && n != MTP_ETOOBIG && n != MTP_ENOMEM)
        abort();
      break;
    }
    if (n == 0 && len > 0)
      abort(); /* no progress */
    if (f != NULL) {
      recheck(f);
      mtp_tunnel_frame_free(f);
    }
    off += (size_t)n;
  }
  mtp_tunnel_dec_free(&d);
  return 0;
}
