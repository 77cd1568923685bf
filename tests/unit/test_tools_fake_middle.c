/*
 * test_tools_fake_middle - the fake middle proxy (tests/tools/fake_middle.h) against a
 * direct RPC client written here with shared/rpc.h: nonce, keys, handshake (with and
 * without CRC32C), PROXY_REQ echo, quick ack token, ping/pong, CLOSE_EXT on demand,
 * CLOSE_CONN recording, silent mode, push, rotation (close all), bad key selector.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "obf2.h"
#include "rpc.h"
#include "check.h"
#include "banned.h"

static uint8_t g_secret[128];

struct cli {
  int fd;
  struct mtp_rpc_codec codec;
  uint32_t local_ip;
  uint16_t local_port, srv_port;
  uint8_t buf[1 << 16];
  size_t len, off;
};

static void cli_connect(struct cli *c, uint16_t port) {
  memset(c, 0, sizeof(*c));
  c->fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(c->fd >= 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(0x7f000001);
  CHECK(connect(c->fd, (struct sockaddr *)&a, sizeof(a)) == 0);
  struct sockaddr_in l;
  socklen_t ll = sizeof(l);
  CHECK(getsockname(c->fd, (struct sockaddr *)&l, &ll) == 0);
  c->local_ip = ntohl(l.sin_addr.s_addr);
  c->local_port = ntohs(l.sin_port);
  c->srv_port = port;
  mtp_rpc_codec_init(&c->codec);
}

static void cli_close(struct cli *c) {
  close(c->fd);
  mtp_rpc_codec_free(&c->codec);
}

static void cli_send(struct cli *c, const void *body, size_t len) {
  uint8_t out[4096];
  struct iovec iov = {.iov_base = (void *)body, .iov_len = len};
  size_t n = mtp_rpc_frame_size(&c->codec, len);
  CHECK(n <= sizeof(out));
  CHECK(mtp_rpc_sendv(&c->codec, &iov, 1, out) == n);
  CHECK(write(c->fd, out, n) == (ssize_t)n);
}

/* Receives one frame body into m (parsed) or returns MTP_ECLOSED / MTP_ETIMEDOUT. */
static int cli_recv(struct cli *c, struct mtp_rpc_msg *m, uint8_t *copy, size_t *copy_len, int timeout_ms) {
  for (;;) {
    if (c->off < c->len) {
      const uint8_t *body;
      size_t blen;
      bool has = false;
      ssize_t used = mtp_rpc_recv(&c->codec, c->buf + c->off, c->len - c->off, &body, &blen, &has);
      CHECK(used >= 0);
      c->off += (size_t)used;
      if (has) {
        if (copy) {
          memcpy(copy, body, blen);
          *copy_len = blen;
          body = copy;
        }
        CHECK(mtp_rpc_parse(body, blen, m) == MTP_OK);
        return MTP_OK;
      }
      if (used == 0 && c->off < c->len)
        CHECK(!"codec made no progress");
    }
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    int n = poll(&p, 1, timeout_ms);
    if (n == 0)
      return MTP_ETIMEDOUT;
    CHECK(n == 1);
    ssize_t r = read(c->fd, c->buf, sizeof(c->buf));
    if (r <= 0)
      return MTP_ECLOSED;
    c->len = (size_t)r;
    c->off = 0;
  }
}

static void cli_nonce(struct cli *c, uint32_t key_selector, struct mtp_rpc_nonce *mine) {
  mine->key_selector = key_selector;
  mine->crypto_schema = 1;
  mine->crypto_ts = (uint32_t)time(NULL);
  mtp_random(mine->nonce, 16);
  uint8_t out[MTP_RPC_NONCE_LEN];
  cli_send(c, out, mtp_rpc_build_nonce(mine, out));
}

/* Full client handshake; returns with keys set. */
static void cli_handshake(struct cli *c, uint32_t hs_flags) {
  uint32_t sel = (uint32_t)g_secret[0] | (uint32_t)g_secret[1] << 8 | (uint32_t)g_secret[2] << 16 |
                 (uint32_t)g_secret[3] << 24;
  struct mtp_rpc_nonce mine;
  cli_nonce(c, sel, &mine);
  struct mtp_rpc_msg m;
  CHECK(cli_recv(c, &m, NULL, NULL, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_NONCE);
  CHECK(m.nonce.key_selector == sel);
  CHECK(m.nonce.crypto_schema == 1);
  uint32_t now = (uint32_t)time(NULL);
  CHECK(m.nonce.crypto_ts + 30 >= now && m.nonce.crypto_ts <= now + 30);
  struct mtp_rpc_key_params p;
  memset(&p, 0, sizeof(p));
  memcpy(p.nonce_srv, m.nonce.nonce, 16);
  memcpy(p.nonce_clt, mine.nonce, 16);
  p.clt_ts = mine.crypto_ts;
  p.srv_ip = 0x7f000001;
  p.srv_port = c->srv_port;
  p.clt_ip = c->local_ip;
  p.clt_port = c->local_port;
  p.secret = g_secret;
  p.secret_len = sizeof(g_secret);
  uint8_t key[32], iv[16];
  mtp_rpc_derive_keys(&p, true, key, iv);
  mtp_rpc_codec_set_tx_key(&c->codec, key, iv);
  mtp_rpc_derive_keys(&p, false, key, iv);
  mtp_rpc_codec_set_rx_key(&c->codec, key, iv);
  struct mtp_rpc_pid me = {.ip = 0x7f000001, .port = 7777, .pid = 42, .utime = 1700000000};
  struct mtp_rpc_pid peer = {.ip = 0, .port = c->srv_port};
  uint8_t hs[MTP_RPC_HANDSHAKE_LEN];
  cli_send(c, hs, mtp_rpc_build_handshake(hs_flags, &me, &peer, hs));
  CHECK(cli_recv(c, &m, NULL, NULL, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_HANDSHAKE);
  CHECK(m.flags == (hs_flags & MTP_RPC_HS_FLAG_CRC32C));
  CHECK(m.sender.port == c->srv_port);
  CHECK(m.sender.ip == 0x7f000001);
  CHECK(m.peer.ip == me.ip && m.peer.port == me.port && m.peer.pid == me.pid && m.peer.utime == me.utime);
  if (hs_flags & MTP_RPC_HS_FLAG_CRC32C)
    c->codec.crc32c = true;
}

static const uint8_t k_tag[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

static void send_req(struct cli *c, uint64_t conn_id, uint32_t flags, const uint8_t *data, size_t len,
                     const uint8_t *tag) {
  uint8_t body[4096];
  uint8_t cip[16] = {0}, pip[16] = {0};
  cip[10] = cip[11] = pip[10] = pip[11] = 0xff;
  cip[12] = 10, cip[15] = 7;
  pip[12] = 127, pip[15] = 1;
  size_t hl = mtp_rpc_build_proxy_req_hdr(flags, conn_id, cip, 5555, pip, 443, tag, body);
  CHECK(hl + len <= sizeof(body));
  memcpy(body + hl, data, len);
  cli_send(c, body, hl + len);
}

static bool p_pushed(const struct fm_stats *s, void *a) {
  return s->pushed_bytes >= *(uint64_t *)a;
}
static bool p_bad(const struct fm_stats *s, void *a) {
  return s->bad >= *(unsigned *)a;
}

static void test_main_flow(struct fake_middle *fm, uint16_t port) {
  struct cli c;
  cli_connect(&c, port);
  cli_handshake(&c, 0);
  CHECK(fm_wait_handshakes(fm, 1, 5000));

  /* Echo with quick ack. */
  uint8_t pkt[64], copy[8192];
  size_t clen;
  mtp_random(pkt, sizeof(pkt));
  memset(pkt, 0, 8);
  uint32_t flags = mtp_rpc_proxy_req_flags(MTP_PROTO_INTERMEDIATE, true) | MTP_RPC_FLAG_NOT_ENCRYPTED;
  send_req(&c, 0x1234, flags, pkt, sizeof(pkt), k_tag);
  struct mtp_rpc_msg m;
  CHECK(cli_recv(&c, &m, NULL, NULL, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_SIMPLE_ACK);
  CHECK(m.conn_id == 0x1234);
  CHECK(m.token == fm_quickack_token(pkt, sizeof(pkt)));
  CHECK(m.token & 0x80000000u);
  CHECK(cli_recv(&c, &m, copy, &clen, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_PROXY_ANS);
  CHECK(m.conn_id == 0x1234);
  CHECK(m.data_len == sizeof(pkt) && memcmp(m.data, pkt, sizeof(pkt)) == 0);

  /* What the fake recorded. */
  struct fm_conn_info ci;
  CHECK(fm_conn_find(fm, 0x1234, &ci) == MTP_OK);
  CHECK(ci.has_ad_tag && memcmp(ci.ad_tag, k_tag, 16) == 0);
  CHECK(ci.flags & MTP_RPC_FLAG_QUICKACK);
  CHECK(ci.flags & MTP_RPC_FLAG_INTERMEDIATE);
  CHECK(ci.flags & MTP_RPC_FLAG_HAS_AD_TAG);
  CHECK(ci.client_port == 5555 && ci.proxy_port == 443);
  CHECK(ci.client_ip[12] == 10 && ci.client_ip[15] == 7 && ci.client_ip[10] == 0xff);
  CHECK(ci.packets == 1 && ci.bytes == sizeof(pkt));
  CHECK(!ci.close_conn);
  CHECK(ci.rpc_conn == 1);

  /* Echo without quick ack, no tag, second conn_id. */
  send_req(&c, 0x5678, mtp_rpc_proxy_req_flags(MTP_PROTO_ABRIDGED, false), pkt, sizeof(pkt), NULL);
  CHECK(cli_recv(&c, &m, NULL, NULL, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_PROXY_ANS && m.conn_id == 0x5678);
  CHECK(fm_conn_find(fm, 0x5678, &ci) == MTP_OK);
  CHECK(!ci.has_ad_tag);
  CHECK(fm_conn_count(fm) == 2);

  /* Ping. */
  uint8_t ping[12];
  cli_send(&c, ping, mtp_rpc_build_ping(0x1122334455667788LL, ping));
  CHECK(cli_recv(&c, &m, NULL, NULL, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_PONG && m.ping_id == 0x1122334455667788LL);

  /* CLOSE_EXT on demand. */
  CHECK(fm_close_ext(fm, 0x1234) == MTP_OK);
  CHECK(cli_recv(&c, &m, NULL, NULL, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_CLOSE_EXT && m.conn_id == 0x1234);
  CHECK(fm_close_ext(fm, 0x9999) == MTP_EINVAL);

  /* CLOSE_CONN is recorded. */
  uint8_t cc[12];
  cli_send(&c, cc, mtp_rpc_build_close_conn(0x5678, cc));
  CHECK(fm_wait_close_conns(fm, 1, 5000));
  CHECK(fm_conn_find(fm, 0x5678, &ci) == MTP_OK && ci.close_conn);

  /* Silent mode: no answer to PROXY_REQ, PING still answered. */
  fm_set_mode(fm, FM_SILENT);
  send_req(&c, 0x1234, flags, pkt, sizeof(pkt), NULL);
  cli_send(&c, ping, mtp_rpc_build_ping(7, ping));
  CHECK(cli_recv(&c, &m, NULL, NULL, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_PONG && m.ping_id == 7);
  CHECK(fm_conn_find(fm, 0x1234, &ci) == MTP_OK && ci.packets == 2);
  fm_set_mode(fm, FM_ANSWER);

  /* Push 10 x 1000 bytes to conn_id 0x1234. */
  CHECK(fm_push(fm, 0x1234, 10000, 1000) == MTP_OK);
  for (int i = 0; i < 10; i++) {
    CHECK(cli_recv(&c, &m, copy, &clen, 5000) == MTP_OK);
    CHECK(m.type == MTP_RPC_PROXY_ANS && m.conn_id == 0x1234 && m.data_len == 1000);
  }
  uint64_t want = 10000;
  CHECK(fm_wait(fm, p_pushed, &want, 5000));
  CHECK(fm_push(fm, 0x1234, 100, 6) == MTP_EINVAL);

  /* Stalled mode: the fake stops reading; a ping is answered only after resuming. */
  fm_set_mode(fm, FM_STALLED);
  cli_send(&c, ping, mtp_rpc_build_ping(8, ping));
  CHECK(cli_recv(&c, &m, NULL, NULL, 300) == MTP_ETIMEDOUT);
  fm_set_mode(fm, FM_ANSWER);
  CHECK(cli_recv(&c, &m, NULL, NULL, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_PONG && m.ping_id == 8);

  /* Rotation: close all. */
  struct fm_stats st;
  fm_get_stats(fm, &st);
  CHECK(st.open == 1);
  CHECK(fm_close_all(fm) == 1);
  CHECK(cli_recv(&c, &m, NULL, NULL, 5000) == MTP_ECLOSED);
  CHECK(fm_wait_open(fm, 0, 5000));
  fm_get_stats(fm, &st);
  CHECK(st.accepted == 1 && st.handshakes == 1 && st.bad == 0);
  CHECK(st.proxy_reqs == 3 && st.simple_acks == 1 && st.pings == 3 && st.close_conns == 1 && st.close_exts == 1);
  cli_close(&c);
}

static void test_crc32c(struct fake_middle *fm, uint16_t port) {
  struct cli c;
  cli_connect(&c, port);
  cli_handshake(&c, MTP_RPC_HS_FLAG_CRC32C);
  uint8_t pkt[128];
  mtp_random(pkt, sizeof(pkt));
  send_req(&c, 0xabc, mtp_rpc_proxy_req_flags(MTP_PROTO_PADDED, false), pkt, sizeof(pkt), k_tag);
  struct mtp_rpc_msg m;
  CHECK(cli_recv(&c, &m, NULL, NULL, 5000) == MTP_OK);
  CHECK(m.type == MTP_RPC_PROXY_ANS && m.conn_id == 0xabc);
  CHECK(m.data_len == sizeof(pkt) && memcmp(m.data, pkt, sizeof(pkt)) == 0);
  struct fm_stats st;
  fm_get_stats(fm, &st);
  CHECK(st.last_hs_flags == MTP_RPC_HS_FLAG_CRC32C);
  struct fm_conn_info ci;
  CHECK(fm_conn_find(fm, 0xabc, &ci) == MTP_OK && ci.rpc_conn == 2);
  cli_close(&c);
  CHECK(fm_wait_open(fm, 0, 5000));
}

static void test_bad_selector(struct fake_middle *fm, uint16_t port) {
  struct cli c;
  cli_connect(&c, port);
  struct mtp_rpc_nonce mine;
  cli_nonce(&c, 0xdeadbeef, &mine);
  struct mtp_rpc_msg m;
  CHECK(cli_recv(&c, &m, NULL, NULL, 5000) == MTP_ECLOSED);
  unsigned one = 1;
  CHECK(fm_wait(fm, p_bad, &one, 5000));
  struct fm_stats st;
  fm_get_stats(fm, &st);
  CHECK(strstr(st.last_error, "key_selector") != NULL);
  CHECK(st.last_key_selector == 0xdeadbeef);
  cli_close(&c);
}

int main(void) {
  mtp_random(g_secret, sizeof(g_secret));
  struct fake_middle *fm = NULL;
  int port = fm_start(g_secret, sizeof(g_secret), &fm);
  CHECK(port > 0 && fm != NULL);
  CHECK(fm_port(fm) == port);
  test_main_flow(fm, (uint16_t)port);
  test_crc32c(fm, (uint16_t)port);
  test_bad_selector(fm, (uint16_t)port);
  fm_stop(fm);
  fm_stop(fm); /* idempotent */
  CHECK(fm_close_all(fm) == MTP_ECLOSED);
  fm_free(fm);
  fm_free(NULL);
  return check_report();
}
