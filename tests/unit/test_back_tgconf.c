/*
 * test_back_tgconf.c - the back's Telegram config: loading from files and URLs (a tiny HTTP
 * server on 127.0.0.1 in a thread), validation (short secret, malformed list), the rule that
 * a failed or malformed load never replaces the last good snapshot, the on-disk cache
 * (atomic write, modes, loading at start), snapshot references, and a clean stop. Also what
 * the status page and metrics say about the config in force: source, location (URL
 * credentials and query removed), load time and age (a cache's age from its file), and the
 * fetch history (last success, last error, counts).
 */
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>
#include <dirent.h>

#include "alloc.h"
#include "back.h"
#include "config.h"
#include "err.h"
#include "log.h"
#include "metrics.h"
#include "tgconf.h"
#include "check.h"

static const char CONF2[] = "# test\nproxy_for 2 127.0.0.1:1111;\nproxy_for -2 127.0.0.1:2222;\ndefault 2;\n";
static const char CONF3[] =
    "proxy_for 1 127.0.0.1:1;\nproxy_for 2 127.0.0.1:2;\nproxy_for 3 127.0.0.1:3;\ndefault 2;\n";
static const char BADCONF[] = "proxy_for 2 127.0.0.1:1111;\nthis is not a config line\n";
static uint8_t SECRET[128];

static int64_t metric(enum mtp_metric m) {
  int64_t v[MTP_M__COUNT];
  mtp_metrics_sum(v);
  return v[m];
}

static void init_cfg(struct mtp_config *cfg) {
  memset(cfg, 0, sizeof(*cfg));
  cfg->workers = 1;
  cfg->dc_conn_max_clients = 300;
  cfg->dc_connect_timeout = 5;
  cfg->config_refresh = 3600;
}

struct fetches {
  struct mtp_back *b;
  unsigned n;
};
static bool p_fetches(void *arg) {
  struct fetches *f = arg;
  return mtp_back_fetches_done(f->b) >= f->n;
}

/* Runs loop until b has completed `n` fetches (bounded). */
static void run_until_fetches(uv_loop_t *loop, struct mtp_back *b, unsigned n) {
  struct fetches f = {b, n};
  CHECK(check_run_until(loop, p_fetches, &f, 10000));
}

/* Starts one more fetch at once and waits for it. */
static void refresh_and_wait(uv_loop_t *loop, struct mtp_back *b) {
  unsigned n = mtp_back_fetches_done(b);
  mtp_back_refresh_now(b);
  run_until_fetches(loop, b, n + 1);
}

/* Sets up a back on a new `loop` reading the given sources (cfg is the caller's: it must outlive
 * the back, and changes to it are seen by later fetches). */
static struct mtp_back *start_back(uv_loop_t *loop, struct mtp_config *cfg, char *secret, char *conf, char *cache) {
  uv_loop_init(loop);
  init_cfg(cfg);
  cfg->proxy_secret = secret;
  cfg->proxy_config = conf;
  cfg->cache_dir = cache;
  struct mtp_back *b = NULL;
  CHECK(mtp_back_setup(&b, cfg, loop) == MTP_OK);
  return b;
}

/* The back's current snapshot has `naddrs` addresses and, unless secret_len is 0, that long a secret. */
static void expect_snapshot(struct mtp_back *b, size_t naddrs, size_t secret_len) {
  struct mtp_tg_snapshot *s = mtp_back_snapshot(b);
  CHECK(s != NULL && s->cfg.naddrs == naddrs && (secret_len == 0 || s->secret_len == secret_len));
  mtp_tg_snapshot_release(s);
}

/* Stops and frees the back, then closes its loop (which must have no handle left). */
static void finish(uv_loop_t *loop, struct mtp_back *b) {
  mtp_back_stop(b);
  uv_run(loop, UV_RUN_DEFAULT);
  mtp_back_free(b);
  CHECK(uv_loop_close(loop) == 0);
}

/* ---- status and metrics ---- */

/* The back's "telegram" status, printed and parsed back. Caller deletes the returned root. */
static cJSON *status_of(struct mtp_back *b, cJSON **tg) {
  cJSON *st = cJSON_CreateObject();
  mtp_back_status_json(b, st);
  char *txt = cJSON_PrintUnformatted(st);
  cJSON_Delete(st);
  cJSON *root = txt != NULL ? cJSON_Parse(txt) : NULL;
  cJSON_free(txt);
  CHECK(root != NULL);
  *tg = cJSON_GetObjectItemCaseSensitive(root, "telegram");
  CHECK(cJSON_IsObject(*tg));
  return root;
}

/* A string member, or NULL when it is null (CHECKs it is one or the other). */
static const char *str_of(const cJSON *o, const char *name) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
  CHECK(cJSON_IsString(v) || cJSON_IsNull(v));
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* A number member, or -1 when it is null (CHECKs it is one or the other). */
static double num_of(const cJSON *o, const char *name) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
  CHECK(cJSON_IsNumber(v) || cJSON_IsNull(v));
  return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

static bool str_is(const char *a, const char *b) { return a != NULL && b != NULL && strcmp(a, b) == 0; }

/* The unlabelled sample `name` of the back's metrics, or -1 when there is none. */
static int64_t back_metric(struct mtp_back *b, const char *name) {
  char *text = mtp_back_metrics_text(b);
  CHECK(text != NULL);
  if (text == NULL)
    return -2;
  char key[128];
  snprintf(key, sizeof(key), "\n%s ", name);
  const char *p = strstr(text, key);
  int64_t v = p != NULL ? strtoll(p + strlen(key), NULL, 10) : -1;
  mtp_free(text);
  return v;
}

/* Sets a file's modification time to `ago` seconds before now. */
static void age_file(const char *path, int64_t ago) {
  struct timeval tv[2];
  tv[0].tv_sec = tv[1].tv_sec = (time_t)((int64_t)time(NULL) - ago);
  tv[0].tv_usec = tv[1].tv_usec = 0;
  CHECK(utimes(path, tv) == 0);
}

/* ---- tiny HTTP server ---- */

static int http_fd;
static uint16_t http_port;
static pthread_t http_thread;

static void http_reply(int c, int status, const char *extra, const void *body, size_t len) {
  char hdr[512];
  int n = snprintf(hdr, sizeof(hdr), "HTTP/1.1 %d X\r\nContent-Length: %zu\r\nConnection: close\r\n%s\r\n", status,
                   len, extra);
  (void)!write(c, hdr, (size_t)n);
  size_t off = 0;
  while (off < len) {
    ssize_t w = write(c, (const char *)body + off, len - off);
    if (w <= 0)
      break;
    off += (size_t)w;
  }
}

static void *http_main(void *arg) {
  (void)arg;
  for (;;) {
    int c = accept(http_fd, NULL, NULL);
    if (c < 0)
      return NULL;
    char req[2048];
    size_t got = 0;
    while (got < sizeof(req) - 1) {
      ssize_t r = read(c, req + got, sizeof(req) - 1 - got);
      if (r <= 0)
        break;
      got += (size_t)r;
      req[got] = 0;
      if (strstr(req, "\r\n\r\n"))
        break;
    }
    req[got] = 0;
    if (strncmp(req, "GET /secret ", 12) == 0) {
      http_reply(c, 200, "", SECRET, sizeof(SECRET));
    } else if (strncmp(req, "GET /conf ", 10) == 0 || strncmp(req, "GET /conf?", 10) == 0) {
      http_reply(c, 200, "", CONF2, strlen(CONF2));
    } else if (strncmp(req, "GET /redir ", 11) == 0) {
      http_reply(c, 302, "Location: /secret\r\n", "", 0);
    } else if (strncmp(req, "GET /big ", 9) == 0) {
      size_t n = (1u << 20) + 4096;
      char *big = calloc(1, n);
      http_reply(c, 200, "", big, n);
      free(big);
    } else if (strncmp(req, "GET /quit ", 10) == 0) {
      http_reply(c, 200, "", "bye", 3);
      close(c);
      return NULL;
    } else {
      http_reply(c, 500, "", "oops", 4);
    }
    close(c);
  }
}

static void http_start(void) {
  http_fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(http_fd >= 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  CHECK(bind(http_fd, (struct sockaddr *)&a, sizeof(a)) == 0);
  CHECK(listen(http_fd, 16) == 0);
  socklen_t al = sizeof(a);
  CHECK(getsockname(http_fd, (struct sockaddr *)&a, &al) == 0);
  http_port = ntohs(a.sin_port);
  CHECK(pthread_create(&http_thread, NULL, http_main, NULL) == 0);
}

static void http_stop(void) {
  char url[128], err[256];
  uint8_t *out = NULL;
  size_t len = 0;
  snprintf(url, sizeof(url), "http://127.0.0.1:%u/quit", http_port);
  CHECK(mtp_tgconf_read_source(url, &out, &len, NULL, err, sizeof(err)) == MTP_OK);
  free(out);
  pthread_join(http_thread, NULL);
  close(http_fd);
}

static char *url_of(const char *path) {
  static char bufs[8][128];
  static int k;
  char *p = bufs[k++ % 8];
  snprintf(p, 128, "http://127.0.0.1:%u%s", http_port, path);
  return p;
}

/* ---- tests ---- */

static void test_read_source_files(void) {
  char err[256];
  uint8_t *out = NULL;
  size_t len = 0;
  check_write_file("a.conf", CONF2, strlen(CONF2));
  CHECK(mtp_tgconf_read_source(check_path("a.conf"), &out, &len, NULL, err, sizeof(err)) == MTP_OK);
  CHECK(len == strlen(CONF2) && memcmp(out, CONF2, len) == 0 && out[len] == 0);
  free(out);
  CHECK(mtp_tgconf_read_source(check_path("missing"), &out, &len, NULL, err, sizeof(err)) == MTP_EIO);
  CHECK(strstr(err, "cannot open") != NULL && out == NULL);
  check_write_file("empty", "", 0);
  CHECK(mtp_tgconf_read_source(check_path("empty"), &out, &len, NULL, err, sizeof(err)) == MTP_EIO);
  CHECK(strstr(err, "empty") != NULL);
  size_t bign = (1u << 20) + 1;
  char *big = calloc(1, bign);
  check_write_file("big", big, bign);
  free(big);
  CHECK(mtp_tgconf_read_source(check_path("big"), &out, &len, NULL, err, sizeof(err)) == MTP_ETOOBIG);
  CHECK(mtp_tgconf_read_source("", &out, &len, NULL, err, sizeof(err)) == MTP_EINVAL);
}

static void test_build(void) {
  char err[256];
  struct mtp_tg_snapshot *s = NULL;
  CHECK(mtp_tgconf_build(SECRET, sizeof(SECRET), (const uint8_t *)CONF2, strlen(CONF2), &s, err, sizeof(err)) ==
        MTP_OK);
  CHECK(s != NULL && s->secret_len == sizeof(SECRET) && memcmp(s->secret, SECRET, sizeof(SECRET)) == 0);
  CHECK(s->cfg.naddrs == 2 && s->cfg.has_default && s->cfg.default_dc == 2);
  mtp_tg_snapshot_release(s);
  CHECK(mtp_tgconf_build(SECRET, 8, (const uint8_t *)CONF2, strlen(CONF2), &s, err, sizeof(err)) == MTP_EPROTO);
  CHECK(s == NULL && strstr(err, "8 bytes") != NULL);
  CHECK(mtp_tgconf_build(SECRET, 16, (const uint8_t *)BADCONF, strlen(BADCONF), &s, err, sizeof(err)) ==
        MTP_EPROTO);
  CHECK(s == NULL && strstr(err, "bad proxy config") != NULL);
  CHECK(mtp_tgconf_check_secret(15, err, sizeof(err)) == MTP_EPROTO);
  CHECK(mtp_tgconf_check_secret(16, err, sizeof(err)) == MTP_OK);
}

static void test_redact(void) {
  static const struct {
    const char *in, *out;
  } v[] = {
      {"https://core.telegram.org/getProxyConfig", "https://core.telegram.org/getProxyConfig"},
      {"https://user:pw@example.com:8443/a/b?token=1#frag", "https://example.com:8443/a/b"},
      {"HTTP://a@b@host/x", "HTTP://host/x"},
      {"http://host?q=1", "http://host"},
      {"http://u:p@host", "http://host"},
      {"/etc/mtproxy/proxy-multi.conf", "/etc/mtproxy/proxy-multi.conf"},
      {"relative?not-a-query", "relative?not-a-query"},
  };
  for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
    char out[128];
    mtp_tgconf_redact_source(v[i].in, out, sizeof(out));
    CHECK(strcmp(out, v[i].out) == 0);
  }
  char small[8];
  mtp_tgconf_redact_source("https://example.com/", small, sizeof(small));
  CHECK(strcmp(small, "https:/") == 0); /* truncated, terminated */
}

static int count_entries(const char *dir) {
  DIR *d = opendir(dir);
  CHECK(d != NULL);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

static void test_cache_write_read(void) {
  char err[256];
  const char *dir = check_path("newcache");
  CHECK(mtp_tgconf_cache_write(dir, "x", (const uint8_t *)"hello", 5, err, sizeof(err)) == MTP_OK);
  struct stat st;
  CHECK(stat(dir, &st) == 0 && S_ISDIR(st.st_mode));
  CHECK(stat(check_path("newcache/x"), &st) == 0 && (st.st_mode & 0777) == 0644 && st.st_size == 5);
  CHECK(mtp_tgconf_cache_write(dir, "x", (const uint8_t *)"world!!", 7, err, sizeof(err)) == MTP_OK);
  CHECK(count_entries(dir) == 1); /* no temporary left behind */
  uint8_t *out = NULL;
  size_t len = 0;
  CHECK(mtp_tgconf_cache_read(dir, "x", &out, &len, err, sizeof(err)) == MTP_OK);
  CHECK(len == 7 && memcmp(out, "world!!", 7) == 0);
  free(out);
  CHECK(mtp_tgconf_cache_read(dir, "nope", &out, &len, err, sizeof(err)) == MTP_EIO);
  /* a directory that cannot be created */
  CHECK(mtp_tgconf_cache_write(check_path("missing/parent/dir"), "x", (const uint8_t *)"a", 1, err, sizeof(err)) ==
        MTP_EIO);
}

static void test_back_files_and_refresh(void) {
  check_write_file("secret", SECRET, sizeof(SECRET));
  check_write_file("conf", CONF2, strlen(CONF2));
  int64_t ok0 = metric(MTP_M_TGCONF_FETCH_OK), fail0 = metric(MTP_M_TGCONF_FETCH_FAIL);

  uv_loop_t loop;
  struct mtp_config cfg;
  int64_t t0 = (int64_t)time(NULL);
  struct mtp_back *b = start_back(&loop, &cfg, check_path("secret"), check_path("conf"), check_path("cache1"));
  CHECK(mtp_back_snapshot(b) == NULL); /* nothing cached yet, nothing fetched yet */
  cJSON *tg, *root = status_of(b, &tg);
  CHECK(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(tg, "config_loaded")));
  CHECK(str_of(tg, "source") == NULL && num_of(tg, "loaded_at") == -1 && num_of(tg, "age_s") == -1);
  CHECK(num_of(tg, "fetches_ok") == 0 && num_of(tg, "last_fetch_ok") == -1);
  cJSON_Delete(root);
  CHECK(mtp_back_wait_ready(b, 5000) == MTP_OK);
  /* in force: from the files, loaded just now; the fetch is recorded */
  root = status_of(b, &tg);
  int64_t now = (int64_t)time(NULL);
  CHECK(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(tg, "config_loaded")));
  CHECK(str_is(str_of(tg, "source"), "file") && str_is(str_of(tg, "secret_source"), "file"));
  CHECK(str_is(str_of(tg, "location"), check_path("conf")));
  CHECK(num_of(tg, "loaded_at") >= (double)t0 && num_of(tg, "loaded_at") <= (double)now);
  CHECK(num_of(tg, "age_s") >= 0 && num_of(tg, "age_s") <= (double)(now - t0));
  double last_ok = num_of(tg, "last_fetch_ok");
  CHECK(last_ok >= (double)t0 && last_ok <= (double)now);
  CHECK(str_of(tg, "last_fetch_error") == NULL);
  CHECK(num_of(tg, "fetches_ok") == 1 && num_of(tg, "fetches_failed") == 0);
  CHECK(num_of(tg, "middle_proxies") == 2 && num_of(tg, "default_dc") == 2);
  cJSON_Delete(root);
  CHECK(back_metric(b, "mtproxy_telegram_config_loaded") == 1);
  CHECK(back_metric(b, "mtproxy_telegram_config_age_seconds") >= 0 &&
        back_metric(b, "mtproxy_telegram_config_age_seconds") <= now - t0 + 1);
  struct mtp_tg_snapshot *s1 = mtp_back_snapshot(b);
  CHECK(s1 != NULL && s1->cfg.naddrs == 2 && s1->secret_len == sizeof(SECRET));
  CHECK(memcmp(s1->secret, SECRET, sizeof(SECRET)) == 0);
  CHECK(metric(MTP_M_TGCONF_FETCH_OK) == ok0 + 2);
  /* wait_ready left no handle of its own behind, and the fetch wrote the cache */
  run_until_fetches(&loop, b, 1);
  struct stat st;
  CHECK(stat(check_path("cache1/" MTP_TGCONF_CACHE_SECRET), &st) == 0 && st.st_size == (off_t)sizeof(SECRET));
  CHECK(stat(check_path("cache1/" MTP_TGCONF_CACHE_CONFIG), &st) == 0 && st.st_size == (off_t)strlen(CONF2));

  /* malformed list: the last good one stays (and the cache keeps it too) */
  check_write_file("conf", BADCONF, strlen(BADCONF));
  refresh_and_wait(&loop, b);
  struct mtp_tg_snapshot *s2 = mtp_back_snapshot(b);
  CHECK(s2 != NULL && s2->cfg.naddrs == 2 && s2->cfg.default_dc == 2);
  CHECK(metric(MTP_M_TGCONF_FETCH_FAIL) == fail0 + 1);
  CHECK(stat(check_path("cache1/" MTP_TGCONF_CACHE_CONFIG), &st) == 0 && st.st_size == (off_t)strlen(CONF2));
  mtp_tg_snapshot_release(s2);
  /* the status says why; the secret did load, but the config in force is still the first */
  root = status_of(b, &tg);
  const char *why = str_of(tg, "last_fetch_error");
  CHECK(why != NULL && strstr(why, "proxy config: malformed") != NULL && strstr(why, "proxy secret") == NULL);
  CHECK(num_of(tg, "fetches_ok") == 1 && num_of(tg, "fetches_failed") == 1);
  CHECK(num_of(tg, "last_fetch_ok") == last_ok && str_is(str_of(tg, "source"), "file"));
  cJSON_Delete(root);

  /* missing sources: still the last good snapshot */
  remove(check_path("conf"));
  check_write_file("secret", "short", 5);
  refresh_and_wait(&loop, b);
  expect_snapshot(b, 2, sizeof(SECRET));
  CHECK(metric(MTP_M_TGCONF_FETCH_FAIL) == fail0 + 3);
  root = status_of(b, &tg);
  why = str_of(tg, "last_fetch_error");
  CHECK(why != NULL && strstr(why, "proxy secret: proxy secret is 5 bytes") != NULL &&
        strstr(why, "; proxy config: cannot open") != NULL);
  CHECK(num_of(tg, "fetches_failed") == 2);
  cJSON_Delete(root);

  /* a good new list replaces it; the old snapshot stays valid while referenced */
  check_write_file("secret", SECRET, sizeof(SECRET));
  check_write_file("conf", CONF3, strlen(CONF3));
  refresh_and_wait(&loop, b);
  s2 = mtp_back_snapshot(b);
  CHECK(s2 != NULL && s2 != s1 && s2->cfg.naddrs == 3);
  CHECK(s1->cfg.naddrs == 2 && memcmp(s1->secret, SECRET, 16) == 0); /* still readable */
  CHECK(atomic_load(&s1->_refs) == 1);                               /* only ours is left */
  mtp_tg_snapshot_release(s1);
  mtp_tg_snapshot_release(s2);
  CHECK(stat(check_path("cache1/" MTP_TGCONF_CACHE_CONFIG), &st) == 0 && st.st_size == (off_t)strlen(CONF3));
  /* a good fetch clears the error */
  root = status_of(b, &tg);
  CHECK(str_of(tg, "last_fetch_error") == NULL && num_of(tg, "fetches_ok") == 2 && num_of(tg, "middle_proxies") == 3);
  CHECK(num_of(tg, "last_fetch_ok") >= last_ok);
  cJSON_Delete(root);

  finish(&loop, b);
}

static void test_back_cache_first(void) {
  uv_loop_t loop;
  struct mtp_config cfg;
  /* the cache was written by the previous test (CONF3): make its list 2000 s old, its secret 1000 s */
  age_file(check_path("cache1/" MTP_TGCONF_CACHE_CONFIG), 2000);
  age_file(check_path("cache1/" MTP_TGCONF_CACHE_SECRET), 1000);
  int64_t t0 = (int64_t)time(NULL);
  struct mtp_back *b = start_back(&loop, &cfg, check_path("no-such-secret"), check_path("no-such-conf"),
                                  check_path("cache1"));
  expect_snapshot(b, 3, sizeof(SECRET)); /* before the loop ran at all */
  /* in force from the cache: the age is the older file's, the load time is now */
  cJSON *tg, *root = status_of(b, &tg);
  int64_t now = (int64_t)time(NULL);
  CHECK(str_is(str_of(tg, "source"), "cache") && str_is(str_of(tg, "secret_source"), "cache"));
  CHECK(str_is(str_of(tg, "location"), check_path("cache1/" MTP_TGCONF_CACHE_CONFIG)));
  CHECK(num_of(tg, "loaded_at") >= (double)t0 && num_of(tg, "loaded_at") <= (double)now);
  CHECK(num_of(tg, "age_s") >= 2000 && num_of(tg, "age_s") <= (double)(2000 + now - t0 + 1));
  CHECK(num_of(tg, "fetches_ok") == 0 && num_of(tg, "fetches_failed") == 0);
  CHECK(num_of(tg, "last_fetch_ok") == -1 && str_of(tg, "last_fetch_error") == NULL);
  cJSON_Delete(root);
  int64_t age = back_metric(b, "mtproxy_telegram_config_age_seconds");
  CHECK(age >= 2000 && age <= 2000 + now - t0 + 1);
  CHECK(mtp_back_wait_ready(b, 10) == MTP_OK);
  int64_t fail0 = metric(MTP_M_TGCONF_FETCH_FAIL);
  run_until_fetches(&loop, b, 1);
  CHECK(metric(MTP_M_TGCONF_FETCH_FAIL) == fail0 + 2);
  expect_snapshot(b, 3, 0);
  /* the sources failed: said so, and the cache stays in force */
  root = status_of(b, &tg);
  const char *why = str_of(tg, "last_fetch_error");
  CHECK(why != NULL && strstr(why, "proxy secret: cannot open") != NULL && strstr(why, "proxy config: cannot open"));
  CHECK(num_of(tg, "fetches_ok") == 0 && num_of(tg, "fetches_failed") == 1 && num_of(tg, "last_fetch_ok") == -1);
  CHECK(str_is(str_of(tg, "source"), "cache") && num_of(tg, "age_s") >= 2000);
  cJSON_Delete(root);
  finish(&loop, b);

  /* the age is the older part's: now the secret's */
  age_file(check_path("cache1/" MTP_TGCONF_CACHE_CONFIG), 500);
  age_file(check_path("cache1/" MTP_TGCONF_CACHE_SECRET), 3000);
  t0 = (int64_t)time(NULL);
  uv_loop_init(&loop);
  CHECK(mtp_back_setup(&b, &cfg, &loop) == MTP_OK);
  age = back_metric(b, "mtproxy_telegram_config_age_seconds");
  CHECK(age >= 3000 && age <= 3000 + (int64_t)time(NULL) - t0 + 1);
  finish(&loop, b);

  /* a corrupt cache is ignored */
  check_write_file("cache1/" MTP_TGCONF_CACHE_CONFIG, BADCONF, strlen(BADCONF));
  uv_loop_init(&loop);
  CHECK(mtp_back_setup(&b, &cfg, &loop) == MTP_OK);
  CHECK(mtp_back_snapshot(b) == NULL);
  finish(&loop, b);
}

static void test_back_short_secret(void) {
  check_write_file("short", "0123456789", 10);
  check_write_file("conf", CONF2, strlen(CONF2));
  uv_loop_t loop;
  struct mtp_config cfg;
  struct mtp_back *b = start_back(&loop, &cfg, check_path("short"), check_path("conf"), NULL);
  CHECK(mtp_back_wait_ready(b, 300) == MTP_ENOCONFIG);
  CHECK(mtp_back_snapshot(b) == NULL);
  run_until_fetches(&loop, b, 1);
  /* nothing in force: no age sample, the reason in the status */
  CHECK(back_metric(b, "mtproxy_telegram_config_loaded") == 0);
  CHECK(back_metric(b, "mtproxy_telegram_config_age_seconds") == -1);
  cJSON *tg, *root = status_of(b, &tg);
  CHECK(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(tg, "config_loaded")));
  CHECK(str_of(tg, "source") == NULL && num_of(tg, "age_s") == -1 && num_of(tg, "last_fetch_ok") == -1);
  const char *why = str_of(tg, "last_fetch_error");
  CHECK(why != NULL && strstr(why, "10 bytes") != NULL);
  CHECK(num_of(tg, "fetches_failed") == 1);
  CHECK(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(tg, "dcs")) == 0);
  cJSON_Delete(root);
  finish(&loop, b);
}

static void test_http(void) {
  char err[256];
  uint8_t *out = NULL;
  size_t len = 0;
  CHECK(mtp_tgconf_read_source(url_of("/secret"), &out, &len, NULL, err, sizeof(err)) == MTP_OK);
  CHECK(len == sizeof(SECRET) && memcmp(out, SECRET, len) == 0);
  free(out);
  CHECK(mtp_tgconf_read_source(url_of("/redir"), &out, &len, NULL, err, sizeof(err)) == MTP_OK);
  CHECK(len == sizeof(SECRET) && memcmp(out, SECRET, len) == 0);
  free(out);
  CHECK(mtp_tgconf_read_source(url_of("/fail"), &out, &len, NULL, err, sizeof(err)) == MTP_EIO);
  CHECK(strstr(err, "500") != NULL && out == NULL);
  CHECK(mtp_tgconf_read_source(url_of("/big"), &out, &len, NULL, err, sizeof(err)) == MTP_ETOOBIG);
  CHECK(out == NULL);

  /* the whole back through URLs; then the config URL starts failing */
  uv_loop_t loop;
  struct mtp_config cfg;
  /* credentials and a query in the URL: never shown */
  char conf_url[160], shown[160];
  snprintf(conf_url, sizeof(conf_url), "http://user:pw@127.0.0.1:%u/conf?token=abc#x", http_port);
  snprintf(shown, sizeof(shown), "http://127.0.0.1:%u/conf", http_port);
  struct mtp_back *b = start_back(&loop, &cfg, url_of("/secret"), conf_url, NULL);
  CHECK(mtp_back_wait_ready(b, 10000) == MTP_OK);
  expect_snapshot(b, 2, sizeof(SECRET));
  run_until_fetches(&loop, b, 1);
  cJSON *tg, *root = status_of(b, &tg);
  CHECK(str_is(str_of(tg, "source"), "url") && str_is(str_of(tg, "secret_source"), "url"));
  CHECK(str_is(str_of(tg, "location"), shown));
  char *txt = cJSON_PrintUnformatted(root);
  CHECK(txt != NULL && strstr(txt, "pw") == NULL && strstr(txt, "token") == NULL);
  cJSON_free(txt);
  cJSON_Delete(root);
  cfg.proxy_config = url_of("/fail");
  int64_t fail0 = metric(MTP_M_TGCONF_FETCH_FAIL);
  refresh_and_wait(&loop, b);
  CHECK(metric(MTP_M_TGCONF_FETCH_FAIL) == fail0 + 1);
  expect_snapshot(b, 2, 0);
  root = status_of(b, &tg);
  const char *why = str_of(tg, "last_fetch_error");
  CHECK(why != NULL && strstr(why, "proxy config: HTTP status 500") != NULL);
  CHECK(str_is(str_of(tg, "source"), "url") && num_of(tg, "fetches_failed") == 1 && num_of(tg, "fetches_ok") == 1);
  cJSON_Delete(root);
  finish(&loop, b);
}

static void test_stop_during_fetch(void) {
  /* stop right after setup: the queued fetch completes or is cancelled, the loop ends */
  uv_loop_t loop;
  struct mtp_config cfg;
  struct mtp_back *b = start_back(&loop, &cfg, url_of("/secret"), url_of("/conf"), NULL);
  finish(&loop, b);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN); /* the HTTP thread writes to sockets curl gave up on */
  mtp_log_level = MTP_LOG_ERROR;
  if (getenv("MTP_TEST_VERBOSE"))
    mtp_log_level = MTP_LOG_DEBUG;
  for (size_t i = 0; i < sizeof(SECRET); i++)
    SECRET[i] = (uint8_t)(i * 7 + 3);
  check_tmpdir_make("test_back_tgconf");
  http_start();
  test_read_source_files();
  test_build();
  test_redact();
  test_cache_write_read();
  test_back_files_and_refresh();
  test_back_cache_first();
  test_back_short_secret();
  test_http();
  test_stop_during_fetch();
  http_stop();
  check_tmpdir_remove();
  return check_report();
}
