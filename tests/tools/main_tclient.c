/*
 * tclient - a Telegram-app-like test client: connects through a proxy, sends MTProto-shaped
 * packets and checks that each comes back unchanged (true with the fake middle proxy, which
 * echoes).
 *
 *   tclient --host H --port P --secret HEX32 [--proto abridged|intermediate|secure] [--dc N]
 *           [--size BYTES] [--count N] [--quickack] [--encrypted] [--check-token] [--timeout MS]
 *           [--sni DOMAIN] [--hello classic|pq] [--time-offset SECONDS] [--record-max BYTES]
 *           [--split-hello]
 *
 * Fake-TLS: a secret in the link form ee + HEX32 + hex(domain), or --sni DOMAIN, makes the
 * client speak fake-TLS with that SNI (--sni wins over the secret's domain). --hello picks the
 * ClientHello (classic 517 bytes, or pq with a post-quantum key share), --time-offset shifts
 * its timestamp from now, --record-max caps the payload of each record we send, and
 * --split-hello sends the hello in two pieces.
 *
 * Packets look like unencrypted auth messages (req_pq_multi), or with --encrypted like
 * encrypted messages (random non-zero auth_key_id); see tc_make_packet for the sizes the
 * official proxy forwards (>= 40, encrypted >= 56).
 *
 * With --quickack every packet asks for a quick ack and one must arrive before or with the
 * echo; with --check-token its token must be the fake middle proxy's fm_quickack_token of the
 * packet (top bit set). Exit 0 when every echo matched, 1 otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "tclient.h"
#include "banned.h"

static void usage(void) {
  fprintf(stderr,
          "usage: tclient --host H --port P --secret HEX32 [--proto abridged|intermediate|secure] [--dc N]\n"
          "               [--size BYTES] [--count N] [--quickack] [--encrypted] [--check-token] [--timeout MS]\n"
          "               [--sni DOMAIN] [--hello classic|pq] [--time-offset SECONDS] [--record-max BYTES]\n"
          "               [--split-hello]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1", *secret_hex = NULL, *proto_s = "abridged";
  int port = 0, dc = 2, count = 1, timeout_ms = 5000;
  size_t size = 64;
  bool quickack = false, encrypted = false, check_token = false;
  const char *sni = NULL, *hello_s = "classic";
  long time_offset = 0;
  struct tc_tls tls;
  memset(&tls, 0, sizeof(tls));
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    bool has = i + 1 < argc;
    if (!strcmp(a, "--host") && has)
      host = argv[++i];
    else if (!strcmp(a, "--port") && has)
      port = atoi(argv[++i]);
    else if (!strcmp(a, "--secret") && has)
      secret_hex = argv[++i];
    else if (!strcmp(a, "--proto") && has)
      proto_s = argv[++i];
    else if (!strcmp(a, "--dc") && has)
      dc = atoi(argv[++i]);
    else if (!strcmp(a, "--size") && has)
      size = (size_t)strtoul(argv[++i], NULL, 10);
    else if (!strcmp(a, "--count") && has)
      count = atoi(argv[++i]);
    else if (!strcmp(a, "--timeout") && has)
      timeout_ms = atoi(argv[++i]);
    else if (!strcmp(a, "--check-token"))
      check_token = true;
    else if (!strcmp(a, "--encrypted"))
      encrypted = true;
    else if (!strcmp(a, "--quickack"))
      quickack = true;
    else if (!strcmp(a, "--sni") && has)
      sni = argv[++i];
    else if (!strcmp(a, "--hello") && has)
      hello_s = argv[++i];
    else if (!strcmp(a, "--time-offset") && has)
      time_offset = strtol(argv[++i], NULL, 10);
    else if (!strcmp(a, "--record-max") && has)
      tls.record_max = (size_t)strtoul(argv[++i], NULL, 10);
    else if (!strcmp(a, "--split-hello"))
      tls.split_hello = true;
    else
      usage();
  }
  enum mtp_proto proto = tc_proto_parse(proto_s);
  if (!secret_hex || port <= 0 || port > 65535 || proto == MTP_PROTO_NONE || size < 8 || size % 4 ||
      size > MTP_MAX_PACKET || count < 1)
    usage();
  /* Accept the link forms too: "dd" + hex32 (secure) and "ee" + hex32 + domain (only the key is used). */
  const char *hex = secret_hex;
  if (strlen(hex) > 32 && (!strncmp(hex, "dd", 2) || !strncmp(hex, "ee", 2)))
    hex += 2;
  char key_hex[33];
  if (strlen(hex) < 32)
    usage();
  memcpy(key_hex, hex, 32);
  key_hex[32] = '\0';
  uint8_t secret[16];
  if (mtp_hex_decode(key_hex, secret, sizeof(secret)) != 16)
    usage();
  /* ee + key + hex(domain): the domain is the SNI unless --sni says otherwise. */
  char domain[MTP_FAKETLS_MAX_HOST + 1];
  if (!strncmp(secret_hex, "ee", 2) && strlen(secret_hex) > 34 && sni == NULL) {
    const char *dh = secret_hex + 34;
    int dl = mtp_hex_decode(dh, (uint8_t *)domain, sizeof(domain) - 1);
    if (dl <= 0)
      usage();
    domain[dl] = '\0';
    sni = domain;
  }
  if (!strcmp(hello_s, "classic"))
    tls.kind = MTP_FAKETLS_KIND_CLASSIC;
  else if (!strcmp(hello_s, "pq"))
    tls.kind = MTP_FAKETLS_KIND_PQ;
  else
    usage();
  tls.sni = sni;
  tls.timestamp = (uint32_t)((long)time(NULL) + time_offset);

  struct tclient c;
  tc_init(&c);
  int rc = sni != NULL ? tc_connect_tls(&c, host, (uint16_t)port, secret, &tls, proto, (int16_t)dc, timeout_ms)
                       : tc_connect(&c, host, (uint16_t)port, secret, proto, (int16_t)dc, timeout_ms);
  if (rc != MTP_OK) {
    fprintf(stderr, "tclient: connect failed: %s\n", mtp_strerror(rc));
    return 1;
  }
  uint8_t *pkt = mtp_malloc(size);
  if (!pkt)
    return 1;
  int failures = 0;
  for (int n = 0; n < count && failures == 0; n++) {
    tc_make_packet(pkt, size, encrypted);
    rc = tc_send(&c, pkt, size, quickack);
    if (rc != MTP_OK) {
      fprintf(stderr, "tclient: packet %d: send failed: %s\n", n, mtp_strerror(rc));
      failures++;
      break;
    }
    bool got_ack = false, got_echo = false;
    while (!got_echo) {
      struct tc_msg m;
      rc = tc_recv(&c, timeout_ms, &m);
      if (rc != MTP_OK) {
        fprintf(stderr, "tclient: packet %d: receive failed: %s\n", n, mtp_strerror(rc));
        failures++;
        break;
      }
      if (m.kind == TC_QUICKACK) {
        fprintf(stderr, "tclient: packet %d: quick ack %08x\n", n, m.token);
        got_ack = true;
        if (check_token && m.token != fm_quickack_token(pkt, size)) {
          fprintf(stderr, "tclient: packet %d: quick ack %08x, expected %08x\n", n, m.token, fm_quickack_token(pkt, size));
          failures++;
        }
        continue;
      }
      got_echo = true;
      if (m.len != size || memcmp(m.data, pkt, size) != 0) {
        fprintf(stderr, "tclient: packet %d: echo mismatch (got %zu bytes, sent %zu)\n", n, m.len, size);
        failures++;
      }
    }
    if (got_echo && quickack && !got_ack) {
      fprintf(stderr, "tclient: packet %d: no quick ack before the echo\n", n);
      failures++;
    }
  }
  mtp_free(pkt);
  tc_close(&c);
  if (failures == 0)
    fprintf(stderr, "tclient: %d packet(s) of %zu bytes echoed over %s%s to dc %d%s: OK\n", count, size,
            sni != NULL ? "fake-TLS + " : "", mtp_proto_name(proto), dc, quickack ? " with quick acks" : "");
  return failures ? 1 : 0;
}
