/*
 * test_many_clients - 1000 concurrent clients through mtproxy --workers 2, all to one DC.
 *
 * All clients connect and handshake first; then every client sends 3 packets; then every
 * client reads its 3 echoes, so all 1000 streams are open at the same time. Asserts the
 * multiplexing: the fake middle proxy sees 1000 distinct conn_ids, one per client (matched by
 * client port), over a handful of RPC connections: at most workers * (ceil(1000/300) + 1)
 * (300 clients per RPC connection is the default dc_conn_max_clients). The proxy's gauges
 * agree (mtproxy_rpc_clients == mtproxy_client_connections == 1000 while connected). When the
 * clients close, the fake receives RPC_CLOSE_CONN for every conn_id and the gauges return to 0.
 *
 * Raises the RLIMIT_NOFILE soft limit (the proxy inherits it): ~1000 sockets on each side.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <time.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "framing.h"
#include "check.h"
#include "harness_env.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"


#define NCLIENTS 1000
#define NPKT 3
#define WORKERS 2
#define PER_CONN 300
#define MAXLEN 512

static void raise_nofile(void) {
  struct rlimit rl;
  CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
  rlim_t want = 4096;
  if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want) {
    rlim_t lim = (rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want) ? want : rl.rlim_max;
    rl.rlim_cur = lim;
    CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0);
  }
  CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
  if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < 2 * NCLIENTS + 100)
    fprintf(stderr, "RLIMIT_NOFILE hard limit %llu is too low for %d clients\n", (unsigned long long)rl.rlim_max,
            NCLIENTS);
  CHECK(rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= 2 * NCLIENTS + 100);
}

static size_t pkt_len(int i, int k) { return 8 + 4 * (size_t)((i * 7 + k * 13) % ((MAXLEN - 8) / 4 + 1)); }

int main(void) {
  check_on_fail = he_cleanup;
  raise_nofile();
  char workers[8];
  snprintf(workers, sizeof(workers), "%d", WORKERS);
  he_start(workers);
  double v = 0;
  static const enum mtp_proto protos[] = {MTP_PROTO_ABRIDGED, MTP_PROTO_INTERMEDIATE, MTP_PROTO_PADDED};

  struct tclient *cl = mtp_calloc(NCLIENTS, sizeof(*cl));
  uint8_t(*pkts)[NPKT][MAXLEN] = mtp_malloc(sizeof(*pkts) * NCLIENTS);
  uint16_t *ports = mtp_calloc(NCLIENTS, sizeof(*ports));
  uint8_t *seen = mtp_calloc(65536, 1);
  CHECK(cl != NULL && pkts != NULL && ports != NULL && seen != NULL);

  /* 1: connect all */
  for (int i = 0; i < NCLIENTS; i++) {
    tc_init(&cl[i]);
    int rc = tc_connect(&cl[i], "127.0.0.1", h_env.port, h_env.secret, protos[i % 3], 2, 5000);
    if (rc != MTP_OK)
      fprintf(stderr, "client %d: connect: %s\n", i, mtp_strerror(rc));
    CHECK(rc == MTP_OK);
    ports[i] = hx_local_port(cl[i].fd);
    CHECK(ports[i] != 0 && !seen[ports[i]]);
    seen[ports[i]] = 1;
  }
  /* 2: send from all */
  for (int i = 0; i < NCLIENTS; i++) {
    for (int k = 0; k < NPKT; k++) {
      tc_make_packet(pkts[i][k], pkt_len(i, k), k != 0);
      CHECK(tc_send(&cl[i], pkts[i][k], pkt_len(i, k), false) == MTP_OK);
    }
  }
  /* 3: receive from all */
  for (int i = 0; i < NCLIENTS; i++) {
    for (int k = 0; k < NPKT; k++) {
      struct tc_msg m;
      int rc = tc_recv(&cl[i], 10000, &m);
      if (rc != MTP_OK)
        fprintf(stderr, "client %d packet %d: recv: %s\n", i, k, mtp_strerror(rc));
      CHECK(rc == MTP_OK);
      CHECK(m.kind == TC_PACKET && m.len == pkt_len(i, k) && memcmp(m.data, pkts[i][k], m.len) == 0);
    }
  }

  /* multiplexing, as the fake saw it */
  struct fm_stats st;
  fm_get_stats(h_env.fm, &st);
  unsigned max_conns = WORKERS * ((NCLIENTS + PER_CONN - 1) / PER_CONN + 1);
  fprintf(stderr, "%u RPC connections accepted (%u open) for %u conn_ids\n", st.accepted, st.open, st.conn_ids);
  CHECK(st.bad == 0);
  CHECK(st.conn_ids == NCLIENTS);
  CHECK(st.accepted >= 1 && st.accepted <= max_conns);
  CHECK(st.handshakes == st.accepted);
  CHECK(st.open == st.accepted);
  CHECK(st.proxy_reqs == (uint64_t)NCLIENTS * NPKT);
  CHECK(fm_conn_count(h_env.fm) == NCLIENTS);
  for (size_t i = 0; i < NCLIENTS; i++) {
    struct fm_conn_info ci;
    CHECK(fm_conn_at(h_env.fm, i, &ci) == MTP_OK);
    CHECK(ci.packets == NPKT);
    CHECK(ci.client_port < 65536 && seen[ci.client_port] == 1); /* one of ours, once */
    seen[ci.client_port] = 2;
  }

  /* the proxy's gauges, all clients still connected */
  char *body = NULL;
  CHECK(h_http_get(h_env.admin, "/metrics", &body, 5000) == 200 && body != NULL);
  CHECK(h_metric(body, "mtproxy_rpc_clients", &v) == 0 && v == NCLIENTS);
  CHECK(h_metric(body, "mtproxy_client_connections", &v) == 0 && v == NCLIENTS);
  double hs = 0;
  CHECK(h_metric(body, "mtproxy_handshakes_total{protocol=\"abridged\"}", &v) == 0);
  hs += v;
  CHECK(h_metric(body, "mtproxy_handshakes_total{protocol=\"intermediate\"}", &v) == 0);
  hs += v;
  CHECK(h_metric(body, "mtproxy_handshakes_total{protocol=\"secure\"}", &v) == 0);
  hs += v;
  CHECK(hs == NCLIENTS);
  CHECK(h_metric(body, "mtproxy_rpc_connections", &v) == 0 && v == st.open);
  mtp_free(body);

  /* everybody leaves */
  for (int i = 0; i < NCLIENTS; i++)
    tc_close(&cl[i]);
  bool all = fm_wait_close_conns(h_env.fm, NCLIENTS, 15000);
  fm_get_stats(h_env.fm, &st);
  if (!all)
    fprintf(stderr, "RPC_CLOSE_CONN received for %llu of %d clients\n", (unsigned long long)st.close_conns,
            NCLIENTS);
  CHECK(all);
  CHECK(st.close_conns == NCLIENTS);
  for (size_t i = 0; i < NCLIENTS; i++) {
    struct fm_conn_info ci;
    CHECK(fm_conn_at(h_env.fm, i, &ci) == MTP_OK);
    CHECK(ci.close_conn);
  }
  CHECK(he_wait_metric("mtproxy_rpc_clients", 0, 10000, &v));
  CHECK(he_wait_metric("mtproxy_client_connections", 0, 10000, &v));
  /* the RPC connections stay for future clients */
  fm_get_stats(h_env.fm, &st);
  CHECK(st.open >= 1 && st.bad == 0);

  mtp_free(cl);
  mtp_free(pkts);
  mtp_free(ports);
  mtp_free(seen);
  CHECK(he_finish() == 0);
  return check_report();
}
