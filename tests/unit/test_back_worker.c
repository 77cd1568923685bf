/*
 * test_back_worker.c - the back's worker against the fake middle proxy (tests/tools), in one
 * process and one loop: the RPC handshake, packets both ways with the client/proxy addresses
 * and ad_tag, quick acks, RPC_CLOSE_EXT, RPC_CLOSE_CONN (also from inside on_packet),
 * migration of idle streams when Telegram closes a connection, UPSTREAM for streams with a
 * packet in flight, NO_DC after bounded retries, the handshake timeout, backpressure
 * (MTP_LINK_FULL then on_writable), and a clean shutdown.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "back.h"
#include "err.h"
#include "fake_middle.h"
#include "log.h"
#include "metrics.h"
#include "rpc.h"
#include "check.h"

static uint8_t SECRET[128];
static uv_loop_t loop;
static struct fake_middle *fm;

static int64_t metric(enum mtp_metric m) {
  int64_t v[MTP_M__COUNT];
  mtp_metrics_sum(v);
  return v[m];
}

/* ---- a fake front ---- */

struct tfront {
  struct mtp_link *link;
  void *stream;
  int packets, quickacks, closes, writables;
  int close_reason;
  uint32_t last_token;
  uint8_t last[64];
  size_t last_len;
  size_t bytes;
  bool close_in_packet; /* calls link->close from inside on_packet */
};

static void f_packet(void *front, const uint8_t *data, size_t len) {
  struct tfront *f = front;
  CHECK(f->closes == 0);
  f->packets++;
  f->bytes += len;
  f->last_len = len < sizeof(f->last) ? len : sizeof(f->last);
  memcpy(f->last, data, f->last_len);
  if (f->close_in_packet) {
    f->link->close(f->link, f->stream);
    f->stream = NULL;
  }
}
static void f_quickack(void *front, uint32_t token) {
  struct tfront *f = front;
  f->quickacks++;
  f->last_token = token;
}
static void f_close(void *front, int reason) {
  struct tfront *f = front;
  CHECK(f->closes == 0);
  f->closes++;
  f->close_reason = reason;
  f->stream = NULL;
}
static void f_writable(void *front) { ((struct tfront *)front)->writables++; }
static const struct mtp_link_front_ops OPS = {f_packet, f_quickack, f_close, f_writable};

/* ---- driving the loop ---- */

static int want_packets = 1;
static bool p_packets(void *a) { return ((struct tfront *)a)->packets >= want_packets; }
static bool p_quickack(void *a) { return ((struct tfront *)a)->quickacks > 0; }
static bool p_closed(void *a) { return ((struct tfront *)a)->closes > 0; }
static bool p_writable(void *a) { return ((struct tfront *)a)->writables > 0; }
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

static void make_open(struct mtp_link_open *o, int dc) {
  memset(o, 0, sizeof(*o));
  o->dc = dc;
  o->proto = MTP_PROTO_INTERMEDIATE;
  struct sockaddr_in *c = (struct sockaddr_in *)&o->client_addr;
  c->sin_family = AF_INET;
  c->sin_port = htons(40000);
  inet_pton(AF_INET, "10.1.2.3", &c->sin_addr);
  struct sockaddr_in *l = (struct sockaddr_in *)&o->local_addr;
  l->sin_family = AF_INET;
  l->sin_port = htons(443);
  inet_pton(AF_INET, "192.0.2.7", &l->sin_addr);
  o->listener = "l0";
  o->has_ad_tag = true;
  for (int i = 0; i < 16; i++)
    o->ad_tag[i] = (uint8_t)(0xa0 + i);
}

static struct tfront *open_front(struct mtp_link *link, int dc) {
  struct tfront *f = calloc(1, sizeof(*f));
  struct mtp_link_open o;
  make_open(&o, dc);
  int err = 0;
  f->link = link;
  f->stream = link->open(link, &o, f, &OPS, &err);
  CHECK(f->stream != NULL && err == MTP_OK);
  CHECK(f->packets == 0 && f->closes == 0); /* open never calls ops */
  return f;
}

static uint8_t pkt[1044480];

static int send_pkt(struct tfront *f, size_t len, uint8_t seed, bool quickack) {
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
  struct tfront *f1 = open_front(link, 2);
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
  struct tfront *f2 = open_front(link, 2);
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
  struct tfront *f3 = open_front(link, -2);
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
  struct tfront *f4 = open_front(link, 2);
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
  struct tfront *f5 = open_front(link, 3);
  mtp_back_worker_stop(w);
  CHECK(f4->closes == 1 && f4->close_reason == MTP_LINK_CLOSE_SHUTDOWN);
  CHECK(f5->closes == 1 && f5->close_reason == MTP_LINK_CLOSE_SHUTDOWN);
  int err = 0;
  struct mtp_link_open o;
  make_open(&o, 2);
  CHECK(link->open(link, &o, f5, &OPS, &err) == NULL && err == MTP_ECLOSED);
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
  struct tfront *f = open_front(link, 5); /* unknown DC: the default's addresses */
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
  struct tfront *f = open_front(link, 2);
  /* packets taken while not ready are bounded: FULL above 1 MiB, refused above 4 MiB */
  CHECK(send_pkt(f, sizeof(pkt), 1, false) == MTP_OK);
  CHECK(send_pkt(f, sizeof(pkt), 2, false) == MTP_LINK_FULL);
  CHECK(send_pkt(f, sizeof(pkt), 3, false) == MTP_LINK_FULL);
  CHECK(send_pkt(f, sizeof(pkt), 4, false) == MTP_LINK_FULL);
  CHECK(send_pkt(f, sizeof(pkt), 5, false) == MTP_EBACKPRESSURE);
  CHECK(send_pkt(f, 6, 5, false) == MTP_EPROTO); /* not a multiple of 4 */
  CHECK(check_run_until(&loop, p_closed, f, 5000));
  CHECK(f->close_reason == MTP_LINK_CLOSE_NO_DC && f->writables == 0);
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
  struct tfront *f[5];
  for (int i = 0; i < 5; i++)
    f[i] = open_front(link, 1);
  /* 2 + 2 + 1: three connections, the first streams waited on connecting ones */
  CHECK(metric(MTP_M_RPC_CONNS) == conns0 + 3);
  for (int i = 0; i < 5; i++) {
    CHECK(send_pkt(f[i], 16, (uint8_t)i, false) == MTP_OK);
    CHECK(check_run_until(&loop, p_packets, f[i], 5000));
  }
  fm_get_stats(fm, &st);
  CHECK(st.accepted == acc0 + 3);
  /* a closed stream frees a slot: the next one reuses a ready connection */
  f[0]->link->close(f[0]->link, f[0]->stream);
  struct tfront *g = open_front(link, 1);
  CHECK(metric(MTP_M_RPC_CONNS) == conns0 + 3);
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
  struct tfront *f = open_front(link, 2);
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
  make_open(&o, 2);
  int err = 0;
  struct tfront f = {0};
  CHECK(link->open(link, &o, &f, &OPS, &err) == NULL && err == MTP_ENOCONFIG); /* nothing loaded yet */
  CHECK(mtp_back_wait_ready(b, 5000) == MTP_OK);
  CHECK(link->open(link, &o, &f, &OPS, &err) == NULL && err == MTP_ENODC);
  stop(b, w);
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
  CHECK(uv_loop_close(&loop) == 0);
  fm_free(fm);
  check_tmpdir_remove();
  return check_report();
}
