/*
 * fuzz_tunnel.c - libFuzzer target for the tunnel frame decoder (shared/tunnel.c).
 *
 * The first input byte picks a chunk size (1..256) so the same input also exercises the
 * incremental paths; the rest is fed to mtp_tunnel_decode in chunks of that size until an
 * error. Every decoded frame must pass mtp_tunnel_frame_check and, without the unknown fields
 * protobuf kept (we never send those on), re-encode to a frame that decodes again to the same
 * type. (protobuf-c keeps a field whose tag is a non-minimal encoding of 0, "80 00", as an
 * unknown field but refuses the minimal "00" it would write back: a peer may send it, we
 * ignore it, and it must not break the property.)
 *
 * Built by CMake (tests/CMakeLists.txt): always as fuzz_tunnel_replay, the unit test that runs
 * it over tests/fuzz/corpus/tunnel and mutations of it; with -DMTP_FUZZ=ON and CC=clang also
 * as the libFuzzer binary:
 *
 *   CC=clang cmake -S . -B build-fuzz -DMTP_FUZZ=ON && make -C build-fuzz fuzz_tunnel
 *   mkdir -p /tmp/corpus && build-fuzz/tests/fuzz_tunnel -max_len=4096 -runs=1000000 \
 *     /tmp/corpus tests/fuzz/corpus/tunnel
 *
 * (libFuzzer adds the inputs it finds to the first directory: keep the committed seeds second.)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "tunnel.h"

static void recheck(Mtp__Frame *f) {
  if (mtp_tunnel_frame_check(f) != MTP_OK)
    abort();
  if (f->msg_case == MTP__FRAME__MSG__NOT_SET)
    return;
  size_t n = mtp_tunnel_frame_size(f);
  if (n == 0)
    abort(); /* decoded frames are never above the limit, so they can be re-sent */
  /* Every oneof member is a pointer to a message in the same union slot. */
  ProtobufCMessage *fm = (ProtobufCMessage *)&f->base, *mm = (ProtobufCMessage *)f->hello;
  unsigned fu = fm->n_unknown_fields, mu = mm->n_unknown_fields;
  fm->n_unknown_fields = 0;
  mm->n_unknown_fields = 0;
  n = mtp_tunnel_frame_size(f);
  uint8_t *buf = malloc(n);
  ssize_t w = buf != NULL ? mtp_tunnel_encode(f, buf, n) : (ssize_t)n;
  fm->n_unknown_fields = fu; /* restored so that free releases them */
  mm->n_unknown_fields = mu;
  if (buf == NULL)
    return;
  if (w != (ssize_t)n)
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
