/*
 * test_ipv6 - one mtproxy with an IPv4 and an IPv6 listener (--listen 127.0.0.1:0 and
 * --listen [::1]:0): a client on each echoes, and the fake middle proxy sees the IPv6 client's
 * real address in RPC_PROXY_REQ (16 bytes, not IPv4-mapped) and the IPv6 listener address as
 * the proxy address. Skipped (exit 0 with a message) when the machine has no ::1.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "harness.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"

static bool have_ipv6_loopback(void) {
  int fd = socket(AF_INET6, SOCK_STREAM, 0);
  if (fd < 0)
    return false;
  struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
  bool ok = bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
  close(fd);
  return ok;
}

static void echo(const char *host, uint16_t port, const uint8_t *secret, struct fake_middle *fm,
                 struct fm_conn_info *ci) {
  struct tclient c;
  tc_init(&c);
  CHECK(tc_connect(&c, host, port, secret, MTP_PROTO_INTERMEDIATE, 2, 5000) == MTP_OK);
  uint8_t pkt[256];
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(&c, pkt, sizeof(pkt), false) == MTP_OK);
  struct tc_msg m;
  CHECK(tc_recv(&c, 5000, &m) == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == sizeof(pkt) && memcmp(m.data, pkt, sizeof(pkt)) == 0);
  CHECK(fm_find_client(fm, hx_local_port(c.fd), ci));
  tc_close(&c);
}

int main(void) {
  if (!have_ipv6_loopback()) {
    printf("skipped: no IPv6 loopback (::1) on this machine\n");
    return 0;
  }
  struct h_proc proc = {.pid = -1};
  uint8_t proxy_secret[128], secret[16];
  mtp_random(proxy_secret, sizeof(proxy_secret));
  mtp_random(secret, sizeof(secret));
  char secret_hex[33];
  mtp_hex_encode(secret, 16, secret_hex);
  struct fake_middle *fm = NULL;
  int fport = fm_start(proxy_secret, sizeof(proxy_secret), &fm);
  CHECK(fport > 0);
  char dir[256], sp[256], cp[256];
  CHECK(h_tmpdir(dir, sizeof(dir)) == 0);
  CHECK(h_write_middle_files(dir, proxy_secret, sizeof(proxy_secret), (uint16_t)fport, sp, cp) == 0);
  char *argv[] = {(char *)h_mtproxy_bin(), "--listen", "127.0.0.1:0", "--listen", "[::1]:0", "--secret", secret_hex,
                  "--proxy-secret", sp, "--proxy-config", cp, "--workers", "1", NULL};
  CHECK(argv[0] != NULL);
  CHECK(h_spawn(&proc, argv) == 0);
  uint16_t p4 = 0, p6 = 0;
  CHECK(h_wait_listener(&proc, "l0", &p4, 20000) == 0);
  CHECK(h_wait_listener(&proc, "l1", &p6, 20000) == 0);
  CHECK(h_wait_log(&proc, "listener l1 listening on [::1]:", NULL, 0, 1000) == 0);

  struct fm_conn_info c4, c6;
  echo("127.0.0.1", p4, secret, fm, &c4);
  echo("::1", p6, secret, fm, &c6);

  static const uint8_t v4mapped_lo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1};
  static const uint8_t v6_lo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  CHECK(memcmp(c4.client_ip, v4mapped_lo, 16) == 0);
  CHECK(c4.proxy_port == p4);
  CHECK(memcmp(c6.client_ip, v6_lo, 16) == 0);
  CHECK(memcmp(c6.proxy_ip, v6_lo, 16) == 0);
  CHECK(c6.proxy_port == p6);

  CHECK(h_stop(&proc, 10000) == 0);
  h_remove_log(&proc);
  fm_free(fm);
  h_rmdir(dir);
  return check_report();
}
