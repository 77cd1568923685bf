/*
 * test_close_ext - Telegram closes one client: fm_close_ext(conn_id) sends RPC_CLOSE_EXT on
 * the RPC connection that carries it. The proxy must close exactly that client (its socket
 * reaches EOF), while other clients multiplexed over the same RPC connection keep echoing.
 * The close counts in mtproxy_client_closes_total{reason="telegram"}; the rpc and client
 * gauges drop by one. One worker, so all clients share one RPC connection.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "framing.h"
#include "check.h"
#include "harness_env.h"
#include "tclient.h"
#include "banned.h"


/* Connects, echoes one packet and returns the fake's record of the client. */
static void client_up(struct tclient *c, enum mtp_proto proto, struct fm_conn_info *ci) {
  tc_init(c);
  CHECK(tc_connect(c, "127.0.0.1", h_env.port, h_env.secret, proto, 2, 5000) == MTP_OK);
  uint8_t pkt[256];
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(c, pkt, sizeof(pkt), false) == MTP_OK);
  struct tc_msg m;
  CHECK(tc_recv(c, 5000, &m) == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == sizeof(pkt) && memcmp(m.data, pkt, sizeof(pkt)) == 0);
  CHECK(he_find_client(c->fd, ci));
}

static void echo_ok(struct tclient *c, size_t len) {
  uint8_t pkt[4096];
  tc_make_packet(pkt, len, true);
  CHECK(tc_send(c, pkt, len, false) == MTP_OK);
  struct tc_msg m;
  int rc = tc_recv(c, 5000, &m);
  if (rc != MTP_OK)
    fprintf(stderr, "echo: %s\n", mtp_strerror(rc));
  CHECK(rc == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == len && memcmp(m.data, pkt, len) == 0);
}

int main(void) {
  check_on_fail = he_cleanup;
  he_start("1");
  double v = 0;
  CHECK(he_metric("mtproxy_client_closes_total{reason=\"telegram\"}") == 0);

  /* Three clients on one RPC connection. */
  struct tclient a, b, c3;
  struct fm_conn_info ia, ib, ic;
  client_up(&a, MTP_PROTO_INTERMEDIATE, &ia);
  client_up(&b, MTP_PROTO_ABRIDGED, &ib);
  client_up(&c3, MTP_PROTO_PADDED, &ic);
  CHECK(ia.conn_id != ib.conn_id && ib.conn_id != ic.conn_id && ia.conn_id != ic.conn_id);
  CHECK(ia.rpc_conn == ib.rpc_conn && ib.rpc_conn == ic.rpc_conn);
  CHECK(he_metric("mtproxy_rpc_clients") == 3);

  /* Telegram closes a. */
  CHECK(fm_close_ext(h_env.fm, ia.conn_id) == MTP_OK);
  int rc = tc_wait_closed(&a, 5000);
  if (rc != MTP_ECLOSED)
    fprintf(stderr, "client a after RPC_CLOSE_EXT: %s\n", mtp_strerror(rc));
  CHECK(rc == MTP_ECLOSED);
  tc_close(&a);

  /* The others are untouched, on the same RPC connection. */
  for (int i = 0; i < 3; i++) {
    echo_ok(&b, 64 + 4 * (size_t)i);
    echo_ok(&c3, 1024 + 4 * (size_t)i);
  }
  struct fm_conn_info ib2, ic2;
  CHECK(fm_conn_find(h_env.fm, ib.conn_id, &ib2) == MTP_OK && fm_conn_find(h_env.fm, ic.conn_id, &ic2) == MTP_OK);
  CHECK(ib2.rpc_conn == ib.rpc_conn && ic2.rpc_conn == ic.rpc_conn);
  CHECK(ib2.packets == 4 && ic2.packets == 4);
  CHECK(!ib2.close_conn && !ic2.close_conn);

  CHECK(he_wait_metric("mtproxy_client_closes_total{reason=\"telegram\"}", 1, 5000, &v));
  CHECK(he_wait_metric("mtproxy_rpc_clients", 2, 5000, &v));
  CHECK(he_wait_metric("mtproxy_client_connections", 2, 5000, &v));

  /* Telegram closes b too, mid-conversation of c3. */
  CHECK(fm_close_ext(h_env.fm, ib.conn_id) == MTP_OK);
  CHECK(tc_wait_closed(&b, 5000) == MTP_ECLOSED);
  tc_close(&b);
  echo_ok(&c3, 4000);
  CHECK(he_wait_metric("mtproxy_client_closes_total{reason=\"telegram\"}", 2, 5000, &v));
  CHECK(he_wait_metric("mtproxy_rpc_clients", 1, 5000, &v));

  /* No other close kind moved; the RPC connection itself was never replaced. */
  CHECK(he_metric("mtproxy_client_closes_total{reason=\"upstream\"}") == 0);
  CHECK(he_metric("mtproxy_client_closes_total{reason=\"bad_frame\"}") == 0);
  struct fm_stats st;
  fm_get_stats(h_env.fm, &st);
  CHECK(st.accepted == 1 && st.open == 1 && st.bad == 0);
  CHECK(st.close_exts == 2);

  /* The last client leaves by itself: the proxy tells Telegram. */
  uint64_t cc = st.close_conns;
  tc_close(&c3);
  CHECK(fm_wait_close_conns(h_env.fm, cc + 1, 5000));
  CHECK(fm_conn_find(h_env.fm, ic.conn_id, &ic2) == MTP_OK && ic2.close_conn);
  CHECK(he_wait_metric("mtproxy_client_connections", 0, 5000, &v));
  CHECK(he_metric("mtproxy_client_closes_total{reason=\"telegram\"}") == 2);
  CHECK(he_finish() == 0);
  return check_report();
}
