/*
 * test_back_worker.c - the back's worker against the fake middle proxy (tests/tools), in one
 * process and one loop: the RPC handshake, packets both ways with the client/proxy addresses
 * and ad_tag, quick acks, RPC_CLOSE_EXT, RPC_CLOSE_CONN (also from inside on_packet),
 * migration of idle streams when Telegram closes a connection, UPSTREAM for streams with a
 * packet in flight, NO_DC after bounded retries, the handshake timeout, backpressure
 * (MTP_LINK_FULL then on_writable), and a clean shutdown. Also the per-DC numbers of
 * mtp_back_metrics_text / mtp_back_status_json (connections, clients, pool growth, rotations)
 * and that the gauges return to 0.
 */
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "alloc.h"
#include "back.h"
#include "err.h"
#include "fake_middle.h"
#include "log.h"
#include "metrics.h"
#include "rpc.h"
#include "check.h"
#include "link_front.h"

static uint8_t SECRET[128];
static uv_loop_t loop;
static struct fake_middle *fm;

static int64_t metric(enum mtp_metric m) {
  int64_t v[MTP_M__COUNT];
  mtp_metrics_sum(v);
  return v[m];
}

/* ---- the back's metrics text and status ---- */

/* Checks the exposition format: HELP then TYPE once per family, a family's samples right after
 * its TYPE (families contiguous), each sample "name{labels} integer" or "name integer". */
static void check_prom_text(const char *text) {
  char seen[32][64];
  int nseen = 0;
  char cur[64] = "";
  const char *p = text;
  while (*p != 0) {
    const char *nl = strchr(p, '\n');
    CHECK(nl != NULL); /* every line ends with a newline */
    if (nl == NULL)
      return;
    char line[512];
    snprintf(line, sizeof(line), "%.*s", (int)(nl - p), p);
    p = nl + 1;
    char name[64], type[16];
    if (strncmp(line, "# HELP ", 7) == 0) {
      CHECK(sscanf(line + 7, "%63s", name) == 1);
      continue;
    }
    if (strncmp(line, "# TYPE ", 7) == 0) {
      CHECK(sscanf(line + 7, "%63s %15s", name, type) == 2);
      CHECK(strcmp(type, "gauge") == 0 || strcmp(type, "counter") == 0);
      for (int i = 0; i < nseen; i++)
        CHECK(strcmp(seen[i], name) != 0); /* one block per family */
      if (nseen < 32)
        snprintf(seen[nseen++], sizeof(seen[0]), "%s", name);
      snprintf(cur, sizeof(cur), "%s", name);
      continue;
    }
    size_t n = strcspn(line, "{ ");
    CHECK(n == strlen(cur) && strncmp(line, cur, n) == 0); /* a sample of the current family */
    const char *v = strrchr(line, ' ');
    CHECK(v != NULL);
    char *end = NULL;
    (void)strtoll(v + 1, &end, 10);
    CHECK(end != NULL && *end == 0 && end > v + 1);
  }
}

/* The sample family{dc="dc"} of the back's metrics, or -1 when there is none. */
static int64_t dc_metric(struct mtp_back *b, const char *family, const char *dc) {
  char *text = mtp_back_metrics_text(b);
  CHECK(text != NULL);
  if (text == NULL)
    return -2;
  check_prom_text(text);
  char key[128];
  snprintf(key, sizeof(key), "\n%s{dc=\"%s\"} ", family, dc);
  const char *p = strstr(text, key);
  int64_t v = p != NULL ? strtoll(p + strlen(key), NULL, 10) : -1;
  mtp_free(text);
  return v;
}

/* The back's "telegram" status, printed and parsed back (so it is valid JSON). Caller deletes
 * the returned root. */
static cJSON *status_of(struct mtp_back *b, cJSON **tg) {
  cJSON *st = cJSON_CreateObject();
  mtp_back_status_json(b, st);
  char *txt = cJSON_PrintUnformatted(st);
  cJSON_Delete(st);
  CHECK(txt != NULL);
  cJSON *root = cJSON_Parse(txt);
  cJSON_free(txt);
  CHECK(root != NULL);
  *tg = cJSON_GetObjectItemCaseSensitive(root, "telegram");
  CHECK(cJSON_IsObject(*tg));
  return root;
}

static double num(const cJSON *o, const char *name) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
  CHECK(cJSON_IsNumber(v));
  return cJSON_IsNumber(v) ? v->valuedouble : -1e9;
}

/* The dcs entry for dc (a number, or "other" when other is true), or NULL. */
static const cJSON *status_dc(const cJSON *tg, int dc, bool other) {
  const cJSON *dcs = cJSON_GetObjectItemCaseSensitive(tg, "dcs"), *e;
  CHECK(cJSON_IsArray(dcs));
  cJSON_ArrayForEach(e, dcs) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(e, "dc");
    if (other ? cJSON_IsString(v) && strcmp(v->valuestring, "other") == 0
              : cJSON_IsNumber(v) && (int)v->valuedouble == dc)
      return e;
  }
  return NULL;
}

/* ---- a fake front: struct lf_front (tests/tools/link_front.h) ---- */

/* ---- driving the loop ---- */

static int want_packets = 1;
static bool p_packets(void *a) { return ((struct lf_front *)a)->packets >= want_packets; }
static bool p_quickack(void *a) { return ((struct lf_front *)a)->quickacks > 0; }
static bool p_closed(void *a) { return ((struct lf_front *)a)->closes > 0; }
static bool p_writable(void *a) { return ((struct lf_front *)a)->writables > 0; }
static uint64_t want;
static bool p_fm_reqs(void *a) {
  struct fm_stats st;
  fm_get_stats(fm, &st);
  return st.proxy_reqs >= want;
}
static bool p_fm_close_conns(void *a) {
  struct fm_stats st;
  fm_get_stats(fm, &st);
  return st.close_conns >= want;
}
static bool p_fm_handshakes(void *a) {
  struct fm_stats st;
  fm_get_stats(fm, &st);
  return st.handshakes >= want;
}

static struct lf_front *open_front(struct mtp_link *link, int dc) {
  struct lf_front *f = calloc(1, sizeof(*f));
  struct mtp_link_open o;
  lf_make_open(&o, dc, 40000);
  int err = 0;
  f->link = link;
  f->stream = link->open(link, &o, f, &lf_ops, &err);
  CHECK(f->stream != NULL && err == MTP_OK);
  CHECK(f->packets == 0 && f->closes == 0); /* open never calls ops */
  return f;
}

static uint8_t pkt[1044480];

static int send_pkt(struct lf_front *f, size_t len, uint8_t seed, bool quickack) {
  memset(pkt, 0, 8); /* auth_key_id 0 */
  for (size_t i = 8; i < len; i++)
    pkt[i] = (uint8_t)(seed + i);
  return f->link->send(f->link, f->stream, pkt, len, quickack);
}

static void init_cfg(struct mtp_config *cfg) {
  memset(cfg, 0, sizeof(*cfg));
  cfg->workers = 1;
  cfg->dc_conn_max_clients = 300;
  cfg->dc_connect_timeout = 5;
  cfg->config_refresh = 3600;
}

/* The usual config: the secret and `conf` from the scratch dir (callers may change it before start). */
static void cfg_for(struct mtp_config *cfg, const char *conf) {
  init_cfg(cfg);
  cfg->proxy_secret = check_path("secret");
  cfg->proxy_config = check_path(conf);
}

/* Sets up the back (waiting for its first config when `wait`) and worker `index`; returns its link.
 * cfg must outlive the back. */
static struct mtp_link *start(const struct mtp_config *cfg, bool wait, int index, struct mtp_back **b,
                              struct mtp_back_worker **w) {
  *b = NULL;
  *w = NULL;
  CHECK(mtp_back_setup(b, cfg, &loop) == MTP_OK);
  if (wait)
    CHECK(mtp_back_wait_ready(*b, 5000) == MTP_OK);
  CHECK(mtp_back_worker_setup(w, *b, &loop, index) == MTP_OK);
  return mtp_back_worker_link(*w);
}

/* Stops the worker and the back, lets every handle close, frees both. */
static void stop(struct mtp_back *b, struct mtp_back_worker *w) {
  mtp_back_worker_stop(w);
  mtp_back_stop(b);
  uv_run(&loop, UV_RUN_DEFAULT);
  mtp_back_worker_free(w);
  mtp_back_free(b);
}

static void test_main_flow(void) {
  struct mtp_config cfg;
  cfg_for(&cfg, "conf");
  struct mtp_back *b;
  struct mtp_back_worker *w;
  struct mtp_link *link = start(&cfg, true, 0, &b, &w);
  int64_t opened0 = metric(MTP_M_RPC_CONNS_OPENED), mig0 = metric(MTP_M_RPC_MIGRATIONS);

  /* 1. a packet while connecting, echoed back once ready */
  struct lf_front *f1 = open_front(link, 2);
  CHECK(metric(MTP_M_RPC_STREAMS) == 1);
  CHECK(send_pkt(f1, 64, 1, false) == MTP_OK);
  CHECK(check_run_until(&loop, p_packets, f1, 5000));
  CHECK(f1->last_len == 64 && memcmp(f1->last, pkt, 64) == 0);
  CHECK(metric(MTP_M_RPC_CONNS_OPENED) == opened0 + 1 && metric(MTP_M_RPC_CONNS) == 1);
  struct fm_conn_info info;
  CHECK(fm_conn_count(fm) == 1 && fm_conn_at(fm, 0, &info) == MTP_OK);
  uint64_t id1 = info.conn_id;
  static const uint8_t client_ip[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3};
  static const uint8_t proxy_ip[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7};
  CHECK(memcmp(info.client_ip, client_ip, 16) == 0 && info.client_port == 40000);
  CHECK(memcmp(info.proxy_ip, proxy_ip, 16) == 0 && info.proxy_port == 443);
  CHECK(info.has_ad_tag && info.ad_tag[0] == 0xa0 && info.ad_tag[15] == 0xaf);
  CHECK((info.flags & MTP_RPC_FLAG_NOT_ENCRYPTED) && (info.flags & MTP_RPC_FLAG_INTERMEDIATE));
  CHECK(!(info.flags & MTP_RPC_FLAG_QUICKACK));

  /* 2. quick ack */
  CHECK(send_pkt(f1, 32, 2, true) == MTP_OK);
  CHECK(check_run_until(&loop, p_quickack, f1, 5000));
  CHECK(f1->last_token == fm_quickack_token(pkt, 32));
  want_packets = 2;
  CHECK(check_run_until(&loop, p_packets, f1, 5000));
  want_packets = 1;

  /* 3. a second stream shares the connection; RPC_CLOSE_EXT closes it */
  struct lf_front *f2 = open_front(link, 2);
  CHECK(send_pkt(f2, 16, 3, false) == MTP_OK);
  CHECK(check_run_until(&loop, p_packets, f2, 5000));
  struct fm_stats st;
  fm_get_stats(fm, &st);
  CHECK(st.accepted == 1);
  CHECK(fm_conn_count(fm) == 2 && fm_conn_at(fm, 1, &info) == MTP_OK);
  CHECK(fm_close_ext(fm, info.conn_id) == MTP_OK);
  CHECK(check_run_until(&loop, p_closed, f2, 5000));
  CHECK(f2->close_reason == MTP_LINK_CLOSE_NORMAL);
  CHECK(metric(MTP_M_RPC_STREAMS) == 1);

  /* 4. close() from inside on_packet sends RPC_CLOSE_CONN */
  struct lf_front *f3 = open_front(link, -2);
  f3->close_in_packet = true;
  CHECK(send_pkt(f3, 16, 4, false) == MTP_OK);
  CHECK(check_run_until(&loop, p_packets, f3, 5000));
  want = 1;
  CHECK(check_run_until(&loop, p_fm_close_conns, NULL, 5000));
  CHECK(metric(MTP_M_RPC_STREAMS) == 1 && f3->closes == 0);

  /* 5. Telegram closes the connection: the idle stream moves, transparently */
  CHECK(fm_close_all(fm) == 2); /* dc 2's and dc -2's */
  want = 3;
  CHECK(check_run_until(&loop, p_fm_handshakes, NULL, 5000));
  fm_get_stats(fm, &st);
  uint64_t reqs = st.proxy_reqs;
  f1->packets = 0;
  CHECK(send_pkt(f1, 24, 5, false) == MTP_OK);
  CHECK(check_run_until(&loop, p_packets, f1, 5000));
  CHECK(f1->closes == 0 && metric(MTP_M_RPC_MIGRATIONS) == mig0 + 1);
  CHECK(fm_conn_find(fm, id1, &info) == MTP_OK && info.rpc_conn == 3);
  CHECK(reqs + 1 == (fm_get_stats(fm, &st), st.proxy_reqs));

  /* 6. a stream with a packet in flight is closed with UPSTREAM */
  fm_set_mode(fm, FM_SILENT);
  CHECK(send_pkt(f1, 24, 6, false) == MTP_OK);
  want = reqs + 2;
  CHECK(check_run_until(&loop, p_fm_reqs, NULL, 5000));
  CHECK(fm_close_all(fm) >= 1);
  CHECK(check_run_until(&loop, p_closed, f1, 5000));
  CHECK(f1->close_reason == MTP_LINK_CLOSE_UPSTREAM);
  fm_set_mode(fm, FM_ANSWER);
  CHECK(metric(MTP_M_RPC_STREAMS) == 0);

  /* 7. backpressure: a stalled middle proxy fills the queue; on_writable once it drains */
  struct lf_front *f4 = open_front(link, 2);
  CHECK(send_pkt(f4, 16, 7, false) == MTP_OK);
  CHECK(check_run_until(&loop, p_packets, f4, 5000));
  fm_set_mode(fm, FM_STALLED);
  int rc = MTP_OK, sent = 0;
  for (sent = 0; sent < 200 && rc == MTP_OK; sent++)
    rc = send_pkt(f4, sizeof(pkt), 8, false);
  CHECK(rc == MTP_LINK_FULL);
  CHECK(sent >= 8); /* at least the 8 MiB high-water mark */
  CHECK(f4->writables == 0);
  fm_set_mode(fm, FM_ANSWER);
  CHECK(check_run_until(&loop, p_writable, f4, 20000));
  CHECK(f4->writables == 1 && f4->closes == 0);

  /* 8. shutdown: every stream gets SHUTDOWN, every handle closes */
  struct lf_front *f5 = open_front(link, 3);
  mtp_back_worker_stop(w);
  CHECK(f4->closes == 1 && f4->close_reason == MTP_LINK_CLOSE_SHUTDOWN);
  CHECK(f5->closes == 1 && f5->close_reason == MTP_LINK_CLOSE_SHUTDOWN);
  int err = 0;
  struct mtp_link_open o;
  lf_make_open(&o, 2, 40000);
  CHECK(link->open(link, &o, f5, &lf_ops, &err) == NULL && err == MTP_ECLOSED);
  mtp_back_stop(b);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(metric(MTP_M_RPC_CONNS) == 0 && metric(MTP_M_RPC_STREAMS) == 0);
  mtp_back_worker_free(w);
  mtp_back_free(b);
  free(f1);
  free(f2);
  free(f3);
  free(f4);
  free(f5);
}

static uint16_t closed_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  CHECK(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
  socklen_t al = sizeof(a);
  CHECK(getsockname(fd, (struct sockaddr *)&a, &al) == 0);
  close(fd);
  return ntohs(a.sin_port);
}

static void test_no_dc(void) {
  char conf[256];
  snprintf(conf, sizeof(conf), "proxy_for 2 127.0.0.1:%u;\nproxy_for 2 127.0.0.1:%u;\ndefault 2;\n", closed_port(),
           closed_port());
  check_write_file("conf-dead", conf, strlen(conf));
  struct mtp_config cfg;
  cfg_for(&cfg, "conf-dead");
  struct mtp_back *b;
  struct mtp_back_worker *w;
  struct mtp_link *link = start(&cfg, true, 1, &b, &w);
  int64_t failed0 = metric(MTP_M_RPC_CONNS_FAILED);
  struct lf_front *f = open_front(link, 5); /* unknown DC: the default's addresses */
  CHECK(send_pkt(f, 16, 1, false) == MTP_OK);
  CHECK(check_run_until(&loop, p_closed, f, 5000));
  CHECK(f->close_reason == MTP_LINK_CLOSE_NO_DC);
  CHECK(metric(MTP_M_RPC_CONNS_FAILED) == failed0 + 3);
  CHECK(metric(MTP_M_RPC_STREAMS) == 0);
  stop(b, w);
  free(f);
}

static void test_handshake_timeout(void) {
  struct mtp_config cfg;
  cfg_for(&cfg, "conf");
  cfg.dc_connect_timeout = 0.2;
  struct mtp_back *b;
  struct mtp_back_worker *w;
  struct mtp_link *link = start(&cfg, true, 2, &b, &w);
  fm_set_mode(fm, FM_STALLED); /* accepts, never answers the nonce */
  int64_t failed0 = metric(MTP_M_RPC_CONNS_FAILED);
  struct lf_front *f = open_front(link, 2);
  /* packets taken while not ready are bounded: FULL above 1 MiB, refused above 4 MiB */
  CHECK(send_pkt(f, sizeof(pkt), 1, false) == MTP_OK);
  CHECK(send_pkt(f, sizeof(pkt), 2, false) == MTP_LINK_FULL);
  CHECK(send_pkt(f, sizeof(pkt), 3, false) == MTP_LINK_FULL);
  CHECK(send_pkt(f, sizeof(pkt), 4, false) == MTP_LINK_FULL);
  CHECK(send_pkt(f, sizeof(pkt), 5, false) == MTP_EBACKPRESSURE);
  CHECK(send_pkt(f, 6, 5, false) == MTP_EPROTO); /* not a multiple of 4 */
  /* The hard limit is per stream: a neighbour waiting for the same connection is told FULL,
   * never refused because of f's bytes. */
  struct lf_front *g = open_front(link, 2);
  CHECK(send_pkt(g, sizeof(pkt), 6, false) == MTP_LINK_FULL);
  CHECK(check_run_until(&loop, p_closed, f, 5000));
  CHECK(check_run_until(&loop, p_closed, g, 5000));
  CHECK(f->close_reason == MTP_LINK_CLOSE_NO_DC && f->writables == 0);
  CHECK(g->close_reason == MTP_LINK_CLOSE_NO_DC);
  free(g);
  CHECK(metric(MTP_M_RPC_CONNS_FAILED) == failed0 + 3);
  fm_set_mode(fm, FM_ANSWER);
  stop(b, w);
  free(f);
}

static void test_max_clients(void) {
  struct mtp_config cfg;
  cfg_for(&cfg, "conf");
  cfg.dc_conn_max_clients = 2;
  struct mtp_back *b;
  struct mtp_back_worker *w;
  struct mtp_link *link = start(&cfg, true, 4, &b, &w);
  struct fm_stats st;
  fm_get_stats(fm, &st);
  unsigned acc0 = st.accepted;
  int64_t conns0 = metric(MTP_M_RPC_CONNS);
  struct lf_front *f[5];
  for (int i = 0; i < 5; i++)
    f[i] = open_front(link, 1);
  /* 2 + 2 + 1: three connections, the first streams waited on connecting ones */
  CHECK(metric(MTP_M_RPC_CONNS) == conns0 + 3);
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "1") == 3);
  CHECK(dc_metric(b, "mtproxy_rpc_pool_growth_total", "1") == 2); /* the first one is no growth */
  for (int i = 0; i < 5; i++) {
    CHECK(send_pkt(f[i], 16, (uint8_t)i, false) == MTP_OK);
    CHECK(check_run_until(&loop, p_packets, f[i], 5000));
  }
  fm_get_stats(fm, &st);
  CHECK(st.accepted == acc0 + 3);
  /* a closed stream frees a slot: the next one reuses a ready connection */
  f[0]->link->close(f[0]->link, f[0]->stream);
  struct lf_front *g = open_front(link, 1);
  CHECK(metric(MTP_M_RPC_CONNS) == conns0 + 3);
  CHECK(dc_metric(b, "mtproxy_rpc_pool_growth_total", "1") == 2);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "1") == 5);
  mtp_back_worker_stop(w);
  CHECK(g->closes == 1 && f[1]->closes == 1 && f[0]->closes == 0);
  mtp_back_stop(b);
  uv_run(&loop, UV_RUN_DEFAULT);
  mtp_back_worker_free(w);
  mtp_back_free(b);
  for (int i = 0; i < 5; i++)
    free(f[i]);
  free(g);
}

/* With --nat-info 127.0.0.1:1.2.3.4 the keys are derived with the public address: the fake
 * (which sees 127.0.0.1) cannot decrypt our handshake, which shows the substitution happens. */
static void test_nat_used_in_keys(void) {
  struct mtp_config cfg;
  cfg_for(&cfg, "conf");
  cfg.has_nat = true;
  cfg.nat_local = 0x7f000001;
  cfg.nat_public = 0x01020304;
  struct mtp_back *b;
  struct mtp_back_worker *w;
  struct mtp_link *link = start(&cfg, true, 5, &b, &w);
  struct fm_stats st;
  fm_get_stats(fm, &st);
  unsigned bad0 = st.bad, hs0 = st.handshakes;
  struct lf_front *f = open_front(link, 2);
  CHECK(check_run_until(&loop, p_closed, f, 5000));
  CHECK(f->close_reason == MTP_LINK_CLOSE_NO_DC);
  fm_get_stats(fm, &st);
  CHECK(st.handshakes == hs0 && st.bad >= bad0 + 1);
  stop(b, w);
  free(f);
}

static void test_no_config(void) {
  char conf[] = "proxy_for 4 127.0.0.1:1;\n";
  check_write_file("conf-nodefault", conf, strlen(conf));
  struct mtp_config cfg;
  cfg_for(&cfg, "conf-nodefault");
  struct mtp_back *b;
  struct mtp_back_worker *w;
  struct mtp_link *link = start(&cfg, false, 3, &b, &w);
  struct mtp_link_open o;
  lf_make_open(&o, 2, 40000);
  int err = 0;
  struct lf_front f = {0};
  CHECK(link->open(link, &o, &f, &lf_ops, &err) == NULL && err == MTP_ENOCONFIG); /* nothing loaded yet */
  CHECK(mtp_back_wait_ready(b, 5000) == MTP_OK);
  CHECK(link->open(link, &o, &f, &lf_ops, &err) == NULL && err == MTP_ENODC);
  stop(b, w);
}

static bool p_handshakes_at_least(void *a) {
  struct fm_stats st;
  fm_get_stats(fm, &st);
  return st.handshakes >= *(unsigned *)a;
}

/* Per-DC numbers in the metrics text and the status JSON follow clients on DC 2, -2 and an
 * unlisted DC ("other"), count Telegram's rotations, and the gauges return to 0 when the
 * clients close and then the connections. */
static void test_dc_stats(void) {
  struct mtp_config cfg;
  cfg_for(&cfg, "conf");
  struct mtp_back *b;
  struct mtp_back_worker *w;
  int64_t t0 = (int64_t)time(NULL);
  struct mtp_link *link = start(&cfg, true, 6, &b, &w);

  /* the config's DCs are listed at 0 before any client; an unlisted DC is not */
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "2") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "-2") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "5") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "other") == -1);
  cJSON *tg;
  cJSON *root = status_of(b, &tg);
  CHECK(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(tg, "config_loaded")));
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(tg, "source");
  CHECK(cJSON_IsString(v) && strcmp(v->valuestring, "file") == 0);
  v = cJSON_GetObjectItemCaseSensitive(tg, "location");
  CHECK(cJSON_IsString(v) && strcmp(v->valuestring, check_path("conf")) == 0);
  v = cJSON_GetObjectItemCaseSensitive(tg, "secret_source");
  CHECK(cJSON_IsString(v) && strcmp(v->valuestring, "file") == 0);
  int64_t now = (int64_t)time(NULL);
  CHECK(num(tg, "loaded_at") >= (double)t0 && num(tg, "loaded_at") <= (double)now);
  CHECK(num(tg, "last_fetch_ok") >= (double)t0 && num(tg, "last_fetch_ok") <= (double)now);
  CHECK(num(tg, "age_s") >= 0 && num(tg, "age_s") <= (double)(now - t0));
  CHECK(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(tg, "last_fetch_error")));
  CHECK(num(tg, "fetches_ok") == 1 && num(tg, "fetches_failed") == 0);
  CHECK(num(tg, "middle_proxies") == 10 && num(tg, "default_dc") == 2);
  CHECK(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(tg, "dcs")) == 10);
  const cJSON *e = status_dc(tg, -5, false);
  CHECK(e != NULL && num(e, "addrs") == 1 && num(e, "connections") == 0 && num(e, "clients") == 0);
  cJSON_Delete(root);

  /* two clients on DC 2, one on DC -2: one connection each (still connecting, already counted) */
  struct lf_front *a1 = open_front(link, 2), *a2 = open_front(link, 2), *m1 = open_front(link, -2);
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "2") == 1);
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "-2") == 1);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "2") == 2);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "-2") == 1);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "3") == 0);
  struct lf_front *all[] = {a1, a2, m1};
  for (int i = 0; i < 3; i++) {
    CHECK(send_pkt(all[i], 16, (uint8_t)i, false) == MTP_OK);
    CHECK(check_run_until(&loop, p_packets, all[i], 5000));
  }
  /* an unlisted DC uses the default's addresses and is counted as "other" */
  struct lf_front *o1 = open_front(link, 7);
  CHECK(send_pkt(o1, 16, 9, false) == MTP_OK);
  CHECK(check_run_until(&loop, p_packets, o1, 5000));
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "other") == 1);
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "other") == 1);
  root = status_of(b, &tg);
  e = status_dc(tg, 2, false);
  CHECK(e != NULL && num(e, "addrs") == 1 && num(e, "connections") == 1 && num(e, "clients") == 2);
  e = status_dc(tg, -2, false);
  CHECK(e != NULL && num(e, "connections") == 1 && num(e, "clients") == 1);
  e = status_dc(tg, 0, true);
  CHECK(e != NULL && num(e, "addrs") == 0 && num(e, "connections") == 1 && num(e, "clients") == 1);
  CHECK(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(tg, "dcs")) == 11);
  cJSON_Delete(root);

  /* Telegram rotates every connection: counted per DC; the idle clients move, no pool growth */
  CHECK(dc_metric(b, "mtproxy_rpc_rotations_total", "2") == 0);
  struct fm_stats st;
  fm_get_stats(fm, &st);
  unsigned hs = st.handshakes + 3;
  CHECK(fm_close_all(fm) == 3);
  CHECK(check_run_until(&loop, p_handshakes_at_least, &hs, 5000));
  CHECK(dc_metric(b, "mtproxy_rpc_rotations_total", "2") == 1);
  CHECK(dc_metric(b, "mtproxy_rpc_rotations_total", "-2") == 1);
  CHECK(dc_metric(b, "mtproxy_rpc_rotations_total", "other") == 1);
  CHECK(dc_metric(b, "mtproxy_rpc_rotations_total", "3") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_pool_growth_total", "2") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "2") == 2);
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "2") == 1);

  /* the clients close: their gauges return to 0, the connections stay */
  for (int i = 0; i < 3; i++)
    link->close(link, all[i]->stream);
  link->close(link, o1->stream);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "2") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "-2") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_clients_by_dc", "other") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "2") == 1);

  /* shutdown: the connections' gauges return to 0 too; the counters stay */
  mtp_back_worker_stop(w);
  mtp_back_stop(b);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "2") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "-2") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_connections_by_dc", "other") == 0);
  CHECK(dc_metric(b, "mtproxy_rpc_rotations_total", "2") == 1);
  root = status_of(b, &tg);
  e = status_dc(tg, 2, false);
  CHECK(e != NULL && num(e, "connections") == 0 && num(e, "clients") == 0);
  cJSON_Delete(root);
  mtp_back_worker_free(w);
  mtp_back_free(b);
  free(a1);
  free(a2);
  free(m1);
  free(o1);
}

static void fm_log(void *arg, const char *line) { fprintf(stderr, "fake: %s\n", line); }

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  mtp_log_level = getenv("MTP_TEST_VERBOSE") ? MTP_LOG_DEBUG : MTP_LOG_ERROR;
  for (size_t i = 0; i < sizeof(SECRET); i++)
    SECRET[i] = (uint8_t)(i * 13 + 5);
  check_tmpdir_make("test_back_worker");
  struct fm_options fo = {0};
  if (getenv("MTP_TEST_VERBOSE"))
    fo.log_cb = fm_log;
  int port = fm_start_ex(SECRET, sizeof(SECRET), &fo, &fm);
  CHECK(port > 0);
  check_write_file("secret", SECRET, sizeof(SECRET));
  CHECK(fm_write_proxy_config(check_path("conf"), (uint16_t)port) == MTP_OK);
  CHECK(uv_loop_init(&loop) == 0);
  test_main_flow();
  test_no_dc();
  test_handshake_timeout();
  test_max_clients();
  test_nat_used_in_keys();
  test_no_config();
  test_dc_stats();
  CHECK(uv_loop_close(&loop) == 0);
  fm_free(fm);
  check_tmpdir_remove();
  return check_report();
}
