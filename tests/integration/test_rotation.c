/*
 * test_rotation - Telegram's periodic rotation: the middle proxy closes its RPC connections
 * (fm_close_all). Semantics the proxy implements (back/worker.c):
 *
 * - A client that is idle at that moment (every packet it sent was answered or acked) is
 *   moved to another RPC connection of its DC, keeping its conn_id; it does not notice, and
 *   its next packet goes out on the new connection (the fake sees a higher rpc_conn serial).
 *   Each move counts in mtproxy_rpc_client_migrations_total.
 * - A client with a packet in flight (sent, no answer yet) is closed (reason "upstream"):
 *   the answer died with the old connection and cannot come over a new one, so the app must
 *   reconnect and resend (its MTProto session lives in the app, not in the proxy).
 *
 * The in-flight client is made with FM_SILENT (the fake records the packet but does not
 * answer), then fm_close_all, then FM_ANSWER again. The test waits for the proxy's log line
 * reporting the move before sending again, because a packet sent between the close and the
 * proxy noticing it would itself be in flight on the dying connection. A second rotation with
 * no packet in flight moves everybody. One worker, so all clients share one RPC connection.
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


#define NIDLE 5

static void echo_ok(struct tclient *c, size_t len) {
  uint8_t pkt[4096];
  tc_make_packet(pkt, len, true);
  CHECK(tc_send(c, pkt, len, false) == MTP_OK);
  struct tc_msg m;
  int rc = tc_recv(c, 5000, &m);
  if (rc != MTP_OK)
    fprintf(stderr, "%s echo: %s\n", mtp_proto_name(c->proto), mtp_strerror(rc));
  CHECK(rc == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == len && memcmp(m.data, pkt, len) == 0);
}

static void client_up(struct tclient *c, enum mtp_proto proto, struct fm_conn_info *ci) {
  tc_init(c);
  CHECK(tc_connect(c, "127.0.0.1", h_env.port, h_env.secret, proto, 2, 5000) == MTP_OK);
  echo_ok(c, 128);
  CHECK(he_find_client(c->fd, ci));
}

int main(void) {
  check_on_fail = he_cleanup;
  he_start("1");
  double v = 0;
  static const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};

  struct tclient idle[NIDLE], busy;
  struct fm_conn_info ci[NIDLE], cb, now;
  for (int i = 0; i < NIDLE; i++)
    client_up(&idle[i], protos[i % 3], &ci[i]);
  client_up(&busy, MTP_PROTO_INTERMEDIATE, &cb);
  unsigned serial1 = cb.rpc_conn;
  for (int i = 0; i < NIDLE; i++)
    CHECK(ci[i].rpc_conn == serial1);
  CHECK(he_metric("mtproxy_rpc_client_migrations_total") == 0);

  /* busy: one packet that the fake takes but does not answer */
  struct fm_stats st;
  fm_get_stats(h_env.fm, &st);
  fm_set_mode(h_env.fm, FM_SILENT);
  uint8_t pkt[512];
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(&busy, pkt, sizeof(pkt), false) == MTP_OK);
  CHECK(fm_wait_proxy_reqs(h_env.fm, st.proxy_reqs + 1, 5000));
  CHECK(fm_conn_find(h_env.fm, cb.conn_id, &now) == MTP_OK && now.packets == 2);

  /* rotation */
  CHECK(fm_close_all(h_env.fm) == 1);
  fm_set_mode(h_env.fm, FM_ANSWER);
  int rc = tc_wait_closed(&busy, 5000);
  if (rc != MTP_ECLOSED)
    fprintf(stderr, "client with a packet in flight after the rotation: %s\n", mtp_strerror(rc));
  CHECK(rc == MTP_ECLOSED);
  tc_close(&busy);
  CHECK(h_wait_log(&h_env.proc, "5 idle clients moved to another middle proxy connection, 1 closed", NULL, 0, 5000) ==
        0);
  CHECK(he_wait_metric("mtproxy_rpc_client_migrations_total", NIDLE, 5000, &v));
  CHECK(he_wait_metric("mtproxy_client_closes_total{reason=\"upstream\"}", 1, 5000, &v));
  CHECK(he_wait_metric("mtproxy_rpc_clients", NIDLE, 5000, &v));

  /* every idle client keeps working, same conn_id, on a new RPC connection */
  unsigned serial2 = 0;
  for (int i = 0; i < NIDLE; i++) {
    echo_ok(&idle[i], 256 + 4 * (size_t)i);
    CHECK(fm_conn_find(h_env.fm, ci[i].conn_id, &now) == MTP_OK);
    if (now.rpc_conn <= serial1)
      fprintf(stderr, "client %d still on rpc conn %u after the rotation\n", i, now.rpc_conn);
    CHECK(now.rpc_conn > serial1);
    CHECK(now.packets == 2);
    CHECK(!now.close_conn);
    if (serial2 == 0)
      serial2 = now.rpc_conn;
    CHECK(now.rpc_conn == serial2);
  }
  fm_get_stats(h_env.fm, &st);
  CHECK(st.accepted == 2 && st.handshakes == 2 && st.open == 1 && st.bad == 0);
  CHECK(st.conn_ids == NIDLE + 1);

  /* a second rotation with nothing in flight: everybody moves */
  CHECK(fm_close_all(h_env.fm) == 1);
  CHECK(h_wait_log(&h_env.proc, "5 idle clients moved to another middle proxy connection, 0 closed", NULL, 0, 5000) ==
        0);
  CHECK(he_wait_metric("mtproxy_rpc_client_migrations_total", 2 * NIDLE, 5000, &v));
  for (int i = 0; i < NIDLE; i++) {
    echo_ok(&idle[i], 1024);
    CHECK(fm_conn_find(h_env.fm, ci[i].conn_id, &now) == MTP_OK);
    CHECK(now.rpc_conn > serial2);
    CHECK(now.packets == 3);
  }
  CHECK(he_metric("mtproxy_client_closes_total{reason=\"upstream\"}") == 1);
  CHECK(he_metric("mtproxy_client_connections") == NIDLE);

  /* Regression: a quick ack is not an answer. The back used to count a quick-acked packet as
   * answered, so a rotation migrated that client and its answer was lost. Now a client whose
   * packet was quick-acked but not answered is still in flight: closed, not migrated. */
  struct tclient acked;
  struct fm_conn_info ca;
  client_up(&acked, MTP_PROTO_ABRIDGED, &ca);
  fm_set_mode(h_env.fm, FM_ACK_ONLY);
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(&acked, pkt, sizeof(pkt), true) == MTP_OK);
  struct tc_msg ack;
  CHECK(tc_recv(&acked, 5000, &ack) == MTP_OK);
  CHECK(ack.kind == TC_QUICKACK);
  CHECK(fm_close_all(h_env.fm) == 1);
  fm_set_mode(h_env.fm, FM_ANSWER);
  CHECK(tc_wait_closed(&acked, 5000) == MTP_ECLOSED);
  tc_close(&acked);
  CHECK(he_wait_metric("mtproxy_client_closes_total{reason=\"upstream\"}", 2, 5000, &v));
  CHECK(he_wait_metric("mtproxy_rpc_client_migrations_total", 3 * NIDLE, 5000, &v));
  for (int i = 0; i < NIDLE; i++)
    echo_ok(&idle[i], 64);

  for (int i = 0; i < NIDLE; i++)
    tc_close(&idle[i]);
  CHECK(fm_wait_close_conns(h_env.fm, NIDLE, 5000));
  CHECK(he_wait_metric("mtproxy_rpc_clients", 0, 5000, &v));
  CHECK(he_finish() == 0);
  return check_report();
}
