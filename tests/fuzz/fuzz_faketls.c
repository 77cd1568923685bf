/*
 * fuzz_faketls.c - libFuzzer target for the fake-TLS codecs (shared/faketls.c).
 *
 * The first input byte picks a chunk size (1..256); the rest is
 *   1. parsed whole as a ClientHello record (from an exactly-sized heap copy, so ASan sees
 *      any overread);
 *   2. fed to the incremental hello reader in chunks of that size: when it completes, the
 *      parse of exactly the bytes it claimed must succeed too, and the answer we would send
 *      must verify with the client-side checker;
 *   3. fed to the record reader in chunks: the payload it yields is never longer than what
 *      went in.
 * Build by hand (or with -DMTP_FUZZ=ON once CMake has it):
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -std=c11 -Ishared \
 *     tests/fuzz/fuzz_faketls.c shared/faketls.c shared/crypto.c shared/alloc.c \
 *     -lmbedcrypto -lz -o fuzz_faketls
 *   ./fuzz_faketls -max_len=20000 -runs=1000000
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "faketls.h"

static const uint8_t SECRET[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

static void answer_roundtrip(const struct mtp_faketls_hello *h) {
  static uint8_t out[MTP_FAKETLS_MAX_RECORD_PAYLOAD * 2];
  struct mtp_faketls_answer_opts opts = {100, false};
  int n = mtp_faketls_server_hello(h, SECRET, &opts, out, sizeof out);
  if (n < 0 || (size_t)n != mtp_faketls_server_hello_len(h, &opts))
    abort();
  if (mtp_faketls_answer_check(SECRET, h->random, out, (size_t)n) != n)
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  size_t chunk = (size_t)data[0] + 1;
  data++;
  size--;

  uint8_t *copy = malloc(size ? size : 1);
  if (copy == NULL)
    return 0;
  memcpy(copy, data, size);
  struct mtp_faketls_hello h;
  if (mtp_faketls_hello_parse(copy, size, &h) == MTP_OK) {
    if (h.sni_len == 0 || h.sni_len > MTP_FAKETLS_MAX_HOST || h.server_share_len == 0)
      abort();
    struct mtp_faketls_match m;
    (void)mtp_faketls_hello_validate(&h, &SECRET, 1, &m);
  }

  struct mtp_faketls_hello_reader r;
  mtp_faketls_hello_init(&r);
  size_t off = 0;
  int rc = MTP_AGAIN;
  while (off < size && rc == MTP_AGAIN) {
    size_t k = size - off < chunk ? size - off : chunk;
    rc = mtp_faketls_hello_feed(&r, data + off, k);
    if (rc >= 0) {
      size_t total = off + (size_t)rc;
      if (mtp_faketls_hello_parse(copy, total, &h) != MTP_OK)
        abort();
      answer_roundtrip(&r.hello);
    }
    off += k;
  }
  mtp_faketls_hello_free(&r);

  struct mtp_faketls_rx rx;
  mtp_faketls_rx_init(&rx);
  uint8_t *out = malloc(chunk);
  size_t total_out = 0;
  for (off = 0; out != NULL && off < size; off += chunk) {
    size_t k = size - off < chunk ? size - off : chunk, ol = 0;
    if (mtp_faketls_rx_feed(&rx, data + off, k, out, &ol) < 0)
      break;
    if (ol > k)
      abort();
    total_out += ol;
  }
  if (total_out > size)
    abort();
  free(out);
  free(copy);
  return 0;
}
