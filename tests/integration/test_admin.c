/*
 * test_admin - the admin endpoint and `mtproxy ctl` against a real mtproxy (harness_env):
 * - GET /metrics parses as Prometheus text under a strict parser (names, labels, escapes,
 *   values, one TYPE/HELP per family before its samples, families contiguous, no duplicate
 *   series, counters named *_total), and its counters move when a client does the thing they
 *   count (connections accepted, secure handshakes, bytes and packets each way, the open
 *   connections gauge up then down);
 * - GET /status is JSON with listener l0 at the announced port, the workers, the client count;
 *   GET /links has l0's dd link; GET / lists the endpoints; --qr printed l0's QR code;
 * - HTTP edge cases: 404 unknown path, 405 with Allow, 400 bad request line / version /
 *   header, 431 oversized head, 413 oversized body, 411 chunked, a request sent in pieces and
 *   one with a body, HTTP/1.0, at most 16 connections at once;
 * - policy tables (a config with two not_in_table rules): list, add, delete, 409 / 400 / 404 /
 *   405, a network with '/' raw and as %2F, saved to the tables file at once, and a client from
 *   127.0.0.1 rejected (mtproxy_policy_rejects_total{rule}) exactly while its address or network
 *   is in a table; the same through ctl;
 * - POST /reload: 200 and counted as ok; an invalid config file 422 with the reason, counted as
 *   failed, and clients are still served; ctl reload;
 * - POST /log?debug=admin turns on the admin module's debug lines (seen in the proxy's
 *   output) and debug=none turns them off again; a bad module name is 400;
 * - mtproxy ctl: status, links, tables, log-debug, reload, usage errors (exit 2), an
 *   unreachable endpoint (exit 1).
 */
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "err.h"
#include "harness_env.h"
#include "harness_extra.h"
#include "tclient.h"
#include "banned.h"

/* ---- a strict Prometheus text-format (0.0.4) parser ---- */

#define MAX_FAMILIES 128
#define MAX_SERIES 1024

struct prom {
  char families[MAX_FAMILIES][128];
  char types[MAX_FAMILIES][16];
  bool has_help[MAX_FAMILIES];
  bool has_samples[MAX_FAMILIES];
  size_t nfam;
  char *series[MAX_SERIES]; /* "name{labels}" as written, owned */
  size_t nseries;
  int closed_family; /* families whose samples ended (index), for the contiguity check */
  char err[256];
};

static bool name_start(int ch) { return isalpha(ch) || ch == '_' || ch == ':'; }
static bool name_char(int ch) { return isalnum(ch) || ch == '_' || ch == ':'; }

/* Reads a metric name at *p; returns its length or 0. */
static size_t read_name(const char *p) {
  if (!name_start((unsigned char)*p))
    return 0;
  size_t n = 1;
  while (name_char((unsigned char)p[n]))
    n++;
  return n;
}

static int family_index(struct prom *pr, const char *name, size_t len) {
  for (size_t i = 0; i < pr->nfam; i++)
    if (strlen(pr->families[i]) == len && strncmp(pr->families[i], name, len) == 0)
      return (int)i;
  return -1;
}

static int family_add(struct prom *pr, const char *name, size_t len) {
  int i = family_index(pr, name, len);
  if (i >= 0)
    return i;
  if (pr->nfam == MAX_FAMILIES || len >= sizeof(pr->families[0]))
    return -1;
  memcpy(pr->families[pr->nfam], name, len);
  pr->families[pr->nfam][len] = '\0';
  return (int)pr->nfam++;
}

/* A valid sample value: a float, NaN, +Inf or -Inf. */
static bool value_ok(const char *v, size_t len) {
  char buf[64];
  if (len == 0 || len >= sizeof(buf))
    return false;
  memcpy(buf, v, len);
  buf[len] = '\0';
  if (strcmp(buf, "NaN") == 0 || strcmp(buf, "+Inf") == 0 || strcmp(buf, "-Inf") == 0)
    return true;
  char *end = NULL;
  strtod(buf, &end);
  return end == buf + len && !isspace((unsigned char)buf[0]);
}

static bool prom_fail(struct prom *pr, int line, const char *why) {
  snprintf(pr->err, sizeof(pr->err), "line %d: %s", line, why);
  return false;
}

/* Parses text; true when every line is valid. pr->err says why not. */
static bool prom_parse(const char *text, struct prom *pr) {
  memset(pr, 0, sizeof(*pr));
  pr->closed_family = -1;
  size_t tl = strlen(text);
  if (tl == 0 || text[tl - 1] != '\n')
    return prom_fail(pr, 0, "empty or no final newline");
  int last_family = -1;
  int lineno = 0;
  for (const char *p = text; *p != '\0';) {
    lineno++;
    const char *eol = strchr(p, '\n');
    size_t len = (size_t)(eol - p);
    char line[2048];
    if (len >= sizeof(line))
      return prom_fail(pr, lineno, "line too long");
    memcpy(line, p, len);
    line[len] = '\0';
    p = eol + 1;
    if (len == 0)
      return prom_fail(pr, lineno, "empty line");
    if (line[0] == '#') {
      bool help = strncmp(line, "# HELP ", 7) == 0;
      bool type = strncmp(line, "# TYPE ", 7) == 0;
      if (!help && !type)
        continue; /* a comment */
      const char *n = line + 7;
      size_t nl = read_name(n);
      if (nl == 0 || n[nl] != ' ')
        return prom_fail(pr, lineno, "bad metric name in HELP/TYPE");
      int f = family_add(pr, n, nl);
      if (f < 0)
        return prom_fail(pr, lineno, "too many families");
      if (pr->has_samples[f])
        return prom_fail(pr, lineno, "HELP/TYPE after the family's samples");
      if (help) {
        if (pr->has_help[f])
          return prom_fail(pr, lineno, "second HELP");
        pr->has_help[f] = true;
        /* Escapes allowed in help: \\ and \n only. */
        for (const char *q = n + nl + 1; *q; q++) {
          if (*q != '\\')
            continue;
          if (q[1] != '\\' && q[1] != 'n')
            return prom_fail(pr, lineno, "bad escape in HELP");
          q++;
        }
      } else {
        const char *t = n + nl + 1;
        if (pr->types[f][0] != '\0')
          return prom_fail(pr, lineno, "second TYPE");
        if (strcmp(t, "counter") != 0 && strcmp(t, "gauge") != 0 && strcmp(t, "histogram") != 0 &&
            strcmp(t, "summary") != 0 && strcmp(t, "untyped") != 0)
          return prom_fail(pr, lineno, "unknown TYPE");
        snprintf(pr->types[f], sizeof(pr->types[f]), "%s", t);
        if (strcmp(t, "counter") == 0 && (nl < 6 || strncmp(n + nl - 6, "_total", 6) != 0))
          return prom_fail(pr, lineno, "counter not named *_total");
      }
      continue;
    }
    /* A sample: name [{labels}] value [timestamp] */
    size_t nl = read_name(line);
    if (nl == 0)
      return prom_fail(pr, lineno, "bad metric name");
    const char *q = line + nl;
    if (*q == '{') {
      q++;
      bool first = true;
      char seen[16][64];
      size_t nseen = 0;
      while (*q != '}') {
        if (!first) {
          if (*q != ',')
            return prom_fail(pr, lineno, "expected ',' between labels");
          q++;
          if (*q == '}')
            break; /* trailing comma is allowed */
        }
        first = false;
        if (!(isalpha((unsigned char)*q) || *q == '_'))
          return prom_fail(pr, lineno, "bad label name");
        size_t ln = 0;
        while (isalnum((unsigned char)q[ln]) || q[ln] == '_')
          ln++;
        if (ln >= 64 || nseen == 16)
          return prom_fail(pr, lineno, "label name too long / too many labels");
        for (size_t i = 0; i < nseen; i++)
          if (strlen(seen[i]) == ln && strncmp(seen[i], q, ln) == 0)
            return prom_fail(pr, lineno, "duplicate label");
        memcpy(seen[nseen], q, ln);
        seen[nseen++][ln] = '\0';
        q += ln;
        if (q[0] != '=' || q[1] != '"')
          return prom_fail(pr, lineno, "expected =\"");
        q += 2;
        while (*q != '"') {
          if (*q == '\0')
            return prom_fail(pr, lineno, "unterminated label value");
          if (*q == '\\') {
            if (q[1] != '\\' && q[1] != '"' && q[1] != 'n')
              return prom_fail(pr, lineno, "bad escape in label value");
            q++;
          }
          q++;
        }
        q++;
      }
      q++;
    }
    if (*q != ' ')
      return prom_fail(pr, lineno, "expected one space before the value");
    size_t series_len = (size_t)(q - line);
    q++;
    const char *v = q;
    while (*q != '\0' && *q != ' ')
      q++;
    if (!value_ok(v, (size_t)(q - v)))
      return prom_fail(pr, lineno, "bad value");
    if (*q == ' ') {
      q++;
      char *end = NULL;
      strtoll(q, &end, 10);
      if (end == q || *end != '\0')
        return prom_fail(pr, lineno, "bad timestamp");
    }
    /* The family: the name itself, or for histogram/summary parts the name without suffix. */
    int f = family_index(pr, line, nl);
    if (f < 0) {
      static const char *const suffixes[] = {"_bucket", "_sum", "_count"};
      for (size_t s = 0; f < 0 && s < 3; s++) {
        size_t sl = strlen(suffixes[s]);
        if (nl > sl && strncmp(line + nl - sl, suffixes[s], sl) == 0)
          f = family_index(pr, line, nl - sl);
      }
    }
    if (f < 0)
      f = family_add(pr, line, nl); /* untyped family */
    if (f < 0)
      return prom_fail(pr, lineno, "too many families");
    if (pr->has_samples[f] && last_family != f)
      return prom_fail(pr, lineno, "family's samples are not contiguous");
    pr->has_samples[f] = true;
    last_family = f;
    for (size_t i = 0; i < pr->nseries; i++)
      if (strlen(pr->series[i]) == series_len && strncmp(pr->series[i], line, series_len) == 0)
        return prom_fail(pr, lineno, "duplicate series");
    if (pr->nseries == MAX_SERIES)
      return prom_fail(pr, lineno, "too many series");
    pr->series[pr->nseries] = mtp_malloc(series_len + 1);
    memcpy(pr->series[pr->nseries], line, series_len);
    pr->series[pr->nseries++][series_len] = '\0';
  }
  return true;
}

static void prom_free(struct prom *pr) {
  for (size_t i = 0; i < pr->nseries; i++)
    mtp_free(pr->series[i]);
  pr->nseries = 0;
}

/* The parser itself must reject what is wrong, or passing tells nothing. */
static void test_parser(void) {
  static const char *const bad[] = {
      "x 1",                                     /* no final newline */
      "x 1\n\nx 2\n",                            /* empty line */
      "1x 1\n",                                  /* bad name */
      "x{a=\"1\"} 1\nx{a=\"1\"} 2\n",            /* duplicate series */
      "x{a=\"1\",a=\"2\"} 1\n",                  /* duplicate label */
      "x{a=\"\\q\"} 1\n",                        /* bad escape */
      "x{a=\"1} 1\n",                            /* unterminated */
      "x one\n",                                 /* bad value */
      "x  1\n",                                  /* two spaces */
      "# TYPE x counter\nx 1\n",                 /* counter not *_total */
      "# TYPE x_total gauge\n# TYPE x_total gauge\nx_total 1\n", /* second TYPE */
      "x_total 1\n# TYPE x_total counter\n",     /* TYPE after samples */
      "a 1\nb 1\na{l=\"2\"} 1\n",                /* not contiguous */
      "# TYPE x_total blah\nx_total 1\n",        /* unknown type */
  };
  static const char good[] =
      "# HELP x_total a \\\\ help\\n line\n# TYPE x_total counter\nx_total{a=\"q\\\"\\\\\\n\",b=\"\"} 1.5e3\n"
      "x_total{a=\"r\",} 2 1700000000000\n# a comment\ny NaN\nz +Inf\n";
  struct prom pr;
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    bool ok = prom_parse(bad[i], &pr);
    prom_free(&pr);
    CHECK_MSG(!ok, "the parser accepted bad input %zu", i);
  }
  bool ok = prom_parse(good, &pr);
  CHECK_MSG(ok, "the parser rejected good input: %s", pr.err);
  prom_free(&pr);
}

/* ---- raw HTTP ---- */

/* Sends req to the admin endpoint (in pieces of `piece` bytes when > 0) and reads until the
 * server closes. Returns the status (or -1: nothing / not HTTP; -2: closed without an answer)
 * and *resp. */
static int raw_http(const char *req, size_t len, size_t piece, char **resp) {
  return hx_http_raw(h_env.admin, req, len, piece, 5000, resp);
}

static int raw(const char *req, char **resp) { return raw_http(req, strlen(req), 0, resp); }

/* The body of a raw answer (after the blank line). */
static const char *body_of(const char *resp) {
  const char *b = strstr(resp, "\r\n\r\n");
  return b != NULL ? b + 4 : "";
}

/* Checks status, Content-Length == body length, Connection: close. */
static void expect_status(const char *what, const char *req, int want, const char *needle) {
  char *resp;
  int st = raw(req, &resp);
  if (st != want)
    fprintf(stderr, "%s: got %d, want %d: %.300s\n", what, st, want, resp);
  CHECK(st == want);
  const char *cl = strstr(resp, "Content-Length: ");
  CHECK(cl != NULL);
  CHECK((size_t)atol(cl + 16) == strlen(body_of(resp)));
  CHECK(strstr(resp, "Connection: close\r\n") != NULL);
  if (needle != NULL)
    CHECK_MSG(strstr(resp, needle) != NULL, "%s: '%s' not in %.300s", what, needle, resp);
  mtp_free(resp);
}

/* ---- ctl ---- */

static char g_admin_addr[64];

/* Runs `mtproxy SUB` with the NULL-terminated args; returns the exit code, output in out_buf. */
static int run_sub(const char *sub, char *out_buf, size_t outlen, const char *const *args) {
  char *out = NULL;
  int code = -1;
  CHECK(hx_run_cmd(h_mtproxy_bin(), sub, (char *const *)args, 15000, &out, &code) == 0);
  snprintf(out_buf, outlen, "%s", out != NULL ? out : "");
  mtp_free(out);
  return code;
}
#define ctl(out, outlen, ...) run_sub("ctl", (out), (outlen), (const char *const[]){__VA_ARGS__, NULL})

static cJSON *get_json(const char *path) {
  char *body = NULL;
  int st = h_http_get(h_env.admin, path, &body, 5000);
  CHECK_MSG(st == 200, "GET %s: %d", path, st);
  cJSON *j = cJSON_Parse(body);
  CHECK_MSG(j != NULL, "GET %s: not JSON: %.300s", path, body);
  mtp_free(body);
  return j;
}

/* ---- the checks ---- */

static void test_metrics(void) {
  char *body = NULL;
  CHECK(h_http_get(h_env.admin, "/metrics", &body, 5000) == 200);
  struct prom pr;
  bool ok = prom_parse(body, &pr);
  CHECK_MSG(ok, "/metrics is not valid Prometheus text: %s", pr.err);
  CHECK(pr.nseries >= 40);
  prom_free(&pr);
  mtp_free(body);

  double acc0 = he_metric("mtproxy_client_connections_total");
  double hs0 = he_metric("mtproxy_handshakes_total{protocol=\"secure\"}");
  double in0 = he_metric("mtproxy_client_bytes_total{direction=\"in\"}");
  double out0 = he_metric("mtproxy_client_bytes_total{direction=\"out\"}");
  double pin0 = he_metric("mtproxy_client_packets_total{direction=\"in\"}");
  double pout0 = he_metric("mtproxy_client_packets_total{direction=\"out\"}");
  CHECK(acc0 >= 0 && hs0 >= 0 && in0 >= 0 && out0 >= 0 && pin0 >= 0 && pout0 >= 0);
  CHECK(he_metric("mtproxy_client_connections") == 0);

  struct tclient c;
  tc_init(&c);
  CHECK(tc_connect(&c, "127.0.0.1", h_env.port, h_env.secret, MTP_PROTO_PADDED, 2, 5000) == MTP_OK);
  uint8_t pkt[256];
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(&c, pkt, sizeof(pkt), false) == MTP_OK);
  struct tc_msg m;
  CHECK(tc_recv(&c, 5000, &m) == MTP_OK);
  CHECK(m.kind == TC_PACKET && m.len == sizeof(pkt));

  double v;
  CHECK(he_wait_metric("mtproxy_client_connections_total", acc0 + 1, 5000, &v));
  CHECK(he_wait_metric("mtproxy_handshakes_total{protocol=\"secure\"}", hs0 + 1, 5000, &v));
  CHECK(he_wait_metric("mtproxy_client_connections", 1, 5000, &v));
  CHECK(he_wait_metric("mtproxy_client_packets_total{direction=\"in\"}", pin0 + 1, 5000, &v));
  CHECK(he_wait_metric("mtproxy_client_packets_total{direction=\"out\"}", pout0 + 1, 5000, &v));
  /* 64-byte header + 4-byte length + the packet + 0..15 padding bytes. */
  double in1 = he_metric("mtproxy_client_bytes_total{direction=\"in\"}");
  CHECK_MSG(in1 - in0 >= 64 + 4 + sizeof(pkt) && in1 - in0 <= 64 + 4 + sizeof(pkt) + 15, "in: %g", in1 - in0);
  double out1 = he_metric("mtproxy_client_bytes_total{direction=\"out\"}");
  CHECK_MSG(out1 - out0 >= 4 + sizeof(pkt), "out: %g", out1 - out0);

  /* While connected, /status counts the client too. */
  cJSON *st = get_json("/status");
  const cJSON *conns = cJSON_GetObjectItemCaseSensitive(st, "connections");
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(conns, "clients")) == 1);
  cJSON_Delete(st);

  tc_close(&c);
  CHECK(he_wait_metric("mtproxy_client_connections", 0, 5000, &v));
}

static void test_status(void) {
  cJSON *st = get_json("/status");
  CHECK(cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(st, "pid")));
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(st, "pid")) == (double)h_env.proc.pid);
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(st, "uptime_seconds")) >= 0);
  const char *state = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(st, "state"));
  CHECK(state != NULL && strcmp(state, "running") == 0);
  const cJSON *ls = cJSON_GetObjectItemCaseSensitive(st, "listeners");
  CHECK(cJSON_IsArray(ls) && cJSON_GetArraySize(ls) == 1);
  const cJSON *l0 = cJSON_GetArrayItem(ls, 0);
  CHECK(strcmp(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(l0, "name")), "l0") == 0);
  char want[64];
  snprintf(want, sizeof(want), "127.0.0.1:%u", h_env.port);
  CHECK(strcmp(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(l0, "address")), want) == 0);
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(l0, "secrets")) == 1);
  CHECK(cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(l0, "protocols")));
  const cJSON *ws = cJSON_GetObjectItemCaseSensitive(st, "workers");
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(ws, "count")) == 2);
  CHECK(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(ws, "clients")) == 2);
  const cJSON *tg = cJSON_GetObjectItemCaseSensitive(st, "telegram");
  CHECK(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(tg, "config_loaded")));
  const cJSON *log = cJSON_GetObjectItemCaseSensitive(st, "log");
  CHECK(strcmp(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(log, "level")), "info") == 0);
  /* No secret in the status. */
  char *text = cJSON_PrintUnformatted(st);
  CHECK(strstr(text, "00112233445566778899aabbccddeeff") == NULL);
  cJSON_free(text);
  cJSON_Delete(st);

  cJSON *links = get_json("/links");
  CHECK(cJSON_IsArray(links) && cJSON_GetArraySize(links) >= 1);
  char dd[256];
  snprintf(dd, sizeof(dd), "tg://proxy?server=127.0.0.1&port=%u&secret=dd00112233445566778899aabbccddeeff", h_env.port);
  bool found = false;
  const cJSON *e;
  cJSON_ArrayForEach(e, links) {
    const char *tg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "tg"));
    found = found || (tg != NULL && strcmp(tg, dd) == 0);
  }
  CHECK_MSG(found, "no %s in /links", dd);
  cJSON_Delete(links);

  /* --qr: the QR code of l0's best link (secure here) went to stdout, black on white. */
  char title[200];
  snprintf(title, sizeof(title),
           "l0 secure: https://t.me/proxy?server=127.0.0.1&port=%u&secret=dd00112233445566778899aabbccddeeff\n"
           "\033[30;47m",
           h_env.port);
  CHECK(h_wait_log(&h_env.proc, title, NULL, 0, 5000) == 0);
  CHECK(h_wait_log(&h_env.proc, "\u2588", NULL, 0, 1000) == 0);

  cJSON *idx = get_json("/");
  CHECK(cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(idx, "endpoints")));
  cJSON_Delete(idx);
}

static void test_http_edges(void) {
  expect_status("unknown path", "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, "\"error\"");
  expect_status("unknown path under /status", "GET /status/x HTTP/1.1\r\n\r\n", 404, NULL);
  expect_status("POST /metrics", "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "Allow: GET\r\n");
  expect_status("DELETE /status", "DELETE /status HTTP/1.1\r\n\r\n", 405, "Allow: GET\r\n");
  expect_status("GET /reload", "GET /reload HTTP/1.1\r\n\r\n", 405, "Allow: POST\r\n");
  expect_status("PUT /log", "PUT /log HTTP/1.1\r\n\r\n", 405, "Allow: GET, POST\r\n");
  expect_status("garbage", "hello\r\n\r\n", 400, NULL);
  expect_status("HTTP/2", "GET /metrics HTTP/2.0\r\n\r\n", 400, NULL);
  expect_status("no slash", "GET metrics HTTP/1.1\r\n\r\n", 400, NULL);
  expect_status("bad header", "GET /status HTTP/1.1\r\nno colon here\r\n\r\n", 400, NULL);
  expect_status("bad length", "POST /reload HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", 400, NULL);
  expect_status("chunked", "POST /reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, NULL);
  expect_status("big body", "POST /reload HTTP/1.1\r\nContent-Length: 100000\r\n\r\n", 413, NULL);
  expect_status("HTTP/1.0", "GET /status HTTP/1.0\r\n\r\n", 200, "\"listeners\"");
  expect_status("bare LF", "GET /status HTTP/1.1\nHost: x\n\n", 200, "\"listeners\"");
  expect_status("bad escape", "POST /tables/a%zz/b HTTP/1.1\r\n\r\n", 400, NULL);

  /* An oversized head: 431, not a hang. */
  size_t big = 10000;
  char *req = mtp_malloc(big + 64);
  int n = snprintf(req, big + 64, "GET /status HTTP/1.1\r\nX-Pad: ");
  memset(req + n, 'a', big);
  memcpy(req + n + big, "\r\n\r\n", 5);
  char *resp;
  CHECK(raw_http(req, strlen(req), 0, &resp) == 431);
  mtp_free(resp);
  mtp_free(req);

  /* In pieces (3 bytes at a time), with a body the server must wait for. */
  static const char slow[] = "POST /log?level=info HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
  CHECK(raw_http(slow, strlen(slow), 3, &resp) == 200);
  CHECK(strstr(body_of(resp), "\"level\":\"info\"") != NULL);
  mtp_free(resp);

  /* At most 16 connections at once: the 17th is closed unanswered, and a slot freed is
   * usable again. */
  /* First wait until the connections of the requests above are all closed on the server's side
   * too (the asking one is the only one left). */
  bool idle = false;
  for (int i = 0; i < 500 && !idle; i++) {
    cJSON *st = get_json("/status");
    idle = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(st, "admin_connections")) == 1;
    cJSON_Delete(st);
  }
  CHECK(idle);
  int fds[16];
  for (int i = 0; i < 16; i++) {
    fds[i] = hx_connect(h_env.admin, 5000);
    CHECK(fds[i] >= 0);
    CHECK(hx_write_all(fds[i], "GET", 3) == 0); /* and make sure each is accepted */
  }
  /* Each of the 16 is accepted and waiting: a request on the first one still works after
   * the extra one was refused. */
  int extra = hx_connect(h_env.admin, 5000);
  CHECK(extra >= 0);
  size_t bytes = 0;
  CHECK(hx_wait_eof(extra, 5000, &bytes) == 0 && bytes == 0);
  close(extra);
  CHECK(hx_write_all(fds[0], " /status HTTP/1.1\r\n\r\n", 21) == 0);
  CHECK(hx_wait_eof(fds[0], 5000, &bytes) == 0 && bytes > 100);
  for (int i = 0; i < 16; i++)
    close(fds[i]);
  /* Once they are gone, requests work again (the server frees slots as it sees the closes). */
  char *body = NULL;
  int st = -1;
  for (int i = 0; i < 500 && st != 200; i++) {
    mtp_free(body);
    body = NULL;
    st = h_http_get(h_env.admin, "/status", &body, 5000);
  }
  CHECK(st == 200);
  mtp_free(body);
}

/* A client from 127.0.0.1 that completes its handshake and sends a packet: when `admitted`,
 * its packet must come back and rule's reject counter must not move; else the counter must
 * move (the rejected client gets no answer). */
static void expect_client(bool admitted, int rule) {
  char series[96];
  snprintf(series, sizeof(series), "mtproxy_policy_rejects_total{rule=\"%d\"}", rule);
  double before = he_metric(series);
  struct tclient c;
  tc_init(&c);
  CHECK(tc_connect(&c, "127.0.0.1", h_env.port, h_env.secret, MTP_PROTO_PADDED, 2, 5000) == MTP_OK);
  uint8_t pkt[128];
  tc_make_packet(pkt, sizeof(pkt), true);
  CHECK(tc_send(&c, pkt, sizeof(pkt), false) == MTP_OK);
  if (admitted) {
    struct tc_msg m;
    CHECK(tc_recv(&c, 5000, &m) == MTP_OK && m.kind == TC_PACKET && m.len == sizeof(pkt));
    CHECK(he_metric(series) == before);
  } else {
    double v;
    CHECK_MSG(he_wait_metric(series, before + 1, 5000, &v), "%s: %g, expected %g", series, v, before + 1);
  }
  tc_close(&c);
}
#define client_admitted(rule) (expect_client(true, (rule)), true)
#define client_rejected(rule) (expect_client(false, (rule)), true)

static char g_tables_file[320];

static void test_tables(void) {
  cJSON *t = get_json("/tables");
  CHECK(cJSON_IsObject(t) && cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(t, "blocked")) == 0);
  cJSON_Delete(t);
  CHECK(client_admitted(0));

  /* Block 127.0.0.1: the next client is rejected by rule 0 and counted. */
  expect_status("add", "POST /tables/blocked/127.0.0.1 HTTP/1.1\r\n\r\n", 200, "\"result\":\"added\"");
  expect_status("add again", "POST /tables/blocked/127.0.0.1 HTTP/1.1\r\n\r\n", 409, "already");
  expect_status("add bad value", "POST /tables/blocked/not-an-ip HTTP/1.1\r\n\r\n", 400, NULL);
  expect_status("no such table", "POST /tables/nope/1.2.3.4 HTTP/1.1\r\n\r\n", 404, NULL);
  expect_status("one table", "GET /tables/blocked HTTP/1.1\r\n\r\n", 200, "[\"127.0.0.1\"]");
  expect_status("unknown table", "GET /tables/nope HTTP/1.1\r\n\r\n", 404, NULL);
  expect_status("PUT entry", "PUT /tables/blocked/1.2.3.4 HTTP/1.1\r\n\r\n", 405, "Allow: POST, DELETE\r\n");
  expect_status("POST table", "POST /tables/blocked HTTP/1.1\r\n\r\n", 405, "Allow: GET\r\n");
  CHECK(client_rejected(0));
  double v;
  CHECK(he_wait_metric("mtproxy_handshake_failures_total{reason=\"policy\"}", 1, 5000, &v));
  /* Saved to the tables file at once. */
  char *saved = NULL;
  {
    FILE *f = fopen(g_tables_file, "r");
    CHECK_MSG(f != NULL, "no tables file %s", g_tables_file);
    static char buf[4096];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    saved = buf;
  }
  CHECK_MSG(strstr(saved, "127.0.0.1") != NULL, "%s", saved);

  /* ctl sees and edits the same. */
  char out[8192];
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "tables") == 0);
  CHECK_MSG(strstr(out, "blocked (1)\n  127.0.0.1\n") != NULL, "%s", out);
  CHECK_MSG(ctl(out, sizeof(out), "--admin", g_admin_addr, "tables", "blocked") == 0, "%s", out);
  CHECK(strcmp(out, "127.0.0.1\n") == 0);
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "table", "del", "blocked", "127.0.0.1") == 0);
  CHECK(strstr(out, "removed 127.0.0.1 from blocked") != NULL);
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "table", "del", "blocked", "127.0.0.1") == 1);
  CHECK(strstr(out, "HTTP 404") != NULL);
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "tables", "nope") == 1);
  CHECK(client_admitted(0));

  /* A network as the value: a raw '/' in the path adds it, %2F deletes it. */
  expect_status("add net", "POST /tables/nets/127.0.0.0/8 HTTP/1.1\r\n\r\n", 200, "\"value\":\"127.0.0.0/8\"");
  CHECK(client_rejected(1));
  expect_status("del net", "DELETE /tables/nets/127.0.0.0%2F8 HTTP/1.1\r\n\r\n", 200, "\"result\":\"removed\"");
  CHECK(client_admitted(1));
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "table", "add", "nets", "10.0.0.0/8") == 0);
  expect_status("net listed", "GET /tables/nets HTTP/1.1\r\n\r\n", 200, "[\"10.0.0.0/8\"]");

  /* Policy counters are in /metrics. */
  CHECK(he_metric("mtproxy_policy_rejects_total{rule=\"0\"}") == 1);
  CHECK(he_metric("mtproxy_policy_rejects_total{rule=\"1\"}") == 1);
}

static char g_cfg_path[320];
static const char g_cfg_text[] =
    "{\"tables\": {\"blocked\": [], \"nets\": []},\n"
    " \"policy\": [{\"rule\": \"not_in_table\", \"key\": \"client_ipv4\", \"table\": \"blocked\"},\n"
    "            {\"rule\": \"not_in_table\", \"key\": \"ipv4/8\", \"table\": \"nets\"}]}\n";

static void test_reload_log(void) {
  /* POST /reload: counted, answered when done; an invalid file is refused with the reason and
   * the old configuration stays (clients are still served). */
  const char *ok_series = "mtproxy_config_reloads_total{result=\"ok\"}";
  const char *fail_series = "mtproxy_config_reloads_total{result=\"failed\"}";
  double ok0 = he_metric(ok_series), fail0 = he_metric(fail_series);
  expect_status("reload", "POST /reload HTTP/1.1\r\n\r\n", 200, "\"result\":\"reloaded\"");
  CHECK(he_metric(ok_series) == ok0 + 1);
  CHECK(h_write_file(g_cfg_path, "{\"workers\": ", 12) == 0);
  expect_status("bad reload", "POST /reload HTTP/1.1\r\n\r\n", 422, "the old configuration stays");
  CHECK(he_metric(fail_series) == fail0 + 1);
  CHECK(he_metric(ok_series) == ok0 + 1);
  CHECK(client_admitted(0));
  CHECK(h_write_file(g_cfg_path, g_cfg_text, strlen(g_cfg_text)) == 0);

  expect_status("log: nothing", "POST /log HTTP/1.1\r\n\r\n", 400, NULL);
  expect_status("log: bad module", "POST /log?debug=Bad!Name HTTP/1.1\r\n\r\n", 400, NULL);
  expect_status("log: bad level", "POST /log?level=loud HTTP/1.1\r\n\r\n", 400, NULL);
  /* The admin module's debug line for a request appears only while the module is on. */
  expect_status("status before", "GET /status?before HTTP/1.1\r\n\r\n", 200, NULL);
  expect_status("log: on", "POST /log?debug=admin,policy HTTP/1.1\r\n\r\n", 200, "\"debug\":\"admin,policy\"");
  expect_status("status with debug", "GET /links?marker HTTP/1.1\r\n\r\n", 200, NULL);
  CHECK(h_wait_log(&h_env.proc, "debug admin: GET /links", NULL, 0, 5000) == 0);
  expect_status("log: off", "POST /log?debug=none HTTP/1.1\r\n\r\n", 200, "\"debug\":\"\"");
  expect_status("status after", "GET /metrics HTTP/1.1\r\n\r\n", 200, NULL);
  expect_status("log: marker", "POST /log?level=info HTTP/1.1\r\n\r\n", 200, NULL);
  CHECK(h_wait_log(&h_env.proc, "admin: log level info, debug modules ''", NULL, 0, 5000) == 0);
  char *log = h_log_text(&h_env.proc);
  CHECK(strstr(log, "debug admin: GET /status") == NULL);
  CHECK(strstr(log, "debug admin: GET /metrics") == NULL);
  mtp_free(log);
}

static void test_ctl(void) {
  char out[65536];
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "status") == 0);
  cJSON *j = cJSON_Parse(out);
  CHECK_MSG(j != NULL, "ctl status is not JSON: %.300s", out);
  CHECK(cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(j, "listeners")));
  cJSON_Delete(j);

  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "links") == 0);
  char dd[256];
  snprintf(dd, sizeof(dd), "https://t.me/proxy?server=127.0.0.1&port=%u&secret=dd00112233445566778899aabbccddeeff",
           h_env.port);
  CHECK_MSG(strstr(out, dd) != NULL, "ctl links: %.500s", out);
  CHECK(strstr(out, "l0 secure:") != NULL);

  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "table", "add", "allow", "1.2.3.4") == 1);
  CHECK(strstr(out, "HTTP 404") != NULL);

  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "log-debug", "session,admin") == 0);
  CHECK_MSG(strstr(out, "debug modules: admin,session") != NULL, "%s", out);
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "log-debug", "none") == 0);
  CHECK(strstr(out, "(none)") != NULL);

  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "reload") == 0);
  CHECK(strstr(out, "configuration reloaded") != NULL);

  /* Usage errors: exit 2 with a hint. */
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr) == 2);
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "frobnicate") == 2);
  CHECK(strstr(out, "unknown command 'frobnicate'") != NULL);
  CHECK(ctl(out, sizeof(out), "--admin", g_admin_addr, "table", "add", "x") == 2);
  CHECK(ctl(out, sizeof(out), "--admin", "not-an-address", "status") == 2);
  CHECK(ctl(out, sizeof(out), "--bogus", "status") == 2);
  CHECK(ctl(out, sizeof(out), "--help") == 0);
  CHECK(strstr(out, "usage: mtproxy ctl") != NULL);

  /* Nobody listening: exit 1, says it cannot connect. A port we just had and closed. */
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t al = sizeof(a);
  CHECK(bind(s, (struct sockaddr *)&a, sizeof(a)) == 0 && getsockname(s, (struct sockaddr *)&a, &al) == 0);
  char dead[64];
  snprintf(dead, sizeof(dead), "127.0.0.1:%u", ntohs(a.sin_port));
  CHECK(ctl(out, sizeof(out), "--admin", dead, "status") == 1);
  close(s);
  CHECK_MSG(strstr(out, "cannot connect") != NULL, "%s", out);

  /* The address from the environment. */
  setenv("MTPROXY_ADMIN", g_admin_addr, 1);
  CHECK(ctl(out, sizeof(out), "metrics") == 0);
  unsetenv("MTPROXY_ADMIN");
  CHECK(strstr(out, "mtproxy_client_connections_total ") != NULL);
}

/* `mtproxy link --domain D`: the fake-TLS link of a domain, derived per SNI when asked. */
#define link_cmd(out, outlen, ...) run_sub("link", (out), (outlen), (const char *const[]){__VA_ARGS__, NULL})

static void test_link_cmd(void) {
  char out[8192];
  CHECK(link_cmd(out, sizeof(out), "--domain", "Example.com", "--secret", "00112233445566778899aabbccddeeff", "--port",
                 "443", "--tls-domain", "example.com", "--public-host", "p.example") == 0);
  CHECK_MSG(strstr(out, "tg://proxy?server=p.example&port=443&secret=ee00112233445566778899aabbccddeeff"
                        "6578616d706c652e636f6d") != NULL,
            "%s", out);
  CHECK(strstr(out, "https://t.me/proxy?server=p.example&port=443&secret=7gARIjNEVWZ3iJmqu8zd7v9leGFtcGxlLmNvbQ") !=
        NULL);
  /* Per-SNI: SHA-256("pepper" || hex(secret) || "example.com")[0:16] (computed with hashlib). */
  CHECK(link_cmd(out, sizeof(out), "--domain", "example.com", "--secret", "00112233445566778899aabbccddeeff", "--port",
                 "443", "--tls-domain", "example.com", "--public-host", "p.example", "--per-sni-secrets", "on",
                 "--per-sni-salt", "pepper") == 0);
  CHECK_MSG(strstr(out, "secret=ee2ec082927ba2c2f97a8266bd8840dbeb6578616d706c652e636f6d") != NULL, "%s", out);
  CHECK(link_cmd(out, sizeof(out), "--secret", "00112233445566778899aabbccddeeff", "--port", "443") == 2);
  CHECK(strstr(out, "--domain") != NULL);
  CHECK(link_cmd(out, sizeof(out), "--domain", "example.com", "--secret", "00112233445566778899aabbccddeeff", "--port",
                 "443", "--allowed-protocols", "secure") == 1);
  CHECK(strstr(out, "no listener allows fake_tls") != NULL);
}

static char g_dir[256];

static void cleanup(void) {
  he_cleanup();
  if (g_dir[0])
    h_rmdir(g_dir);
  g_dir[0] = '\0';
}

int main(void) {
  test_parser();
  /* A config with two tables and two rules that use them; listeners come from he_start. */
  CHECK(h_tmpdir(g_dir, sizeof(g_dir)) == 0);
  check_on_fail = cleanup;
  snprintf(g_cfg_path, sizeof(g_cfg_path), "%s/policy.json", g_dir);
  snprintf(g_tables_file, sizeof(g_tables_file), "%s/tables.json", g_dir);
  CHECK(h_write_file(g_cfg_path, g_cfg_text, strlen(g_cfg_text)) == 0);
  const char *extra[] = {"--config", g_cfg_path, "--tables-file", g_tables_file, "--qr", NULL};
  he_start_args("2", extra);
  snprintf(g_admin_addr, sizeof(g_admin_addr), "127.0.0.1:%u", h_env.admin);
  test_metrics();
  test_status();
  test_http_edges();
  test_tables();
  test_reload_log();
  test_ctl();
  test_link_cmd();
  CHECK(he_finish() == 0);
  h_rmdir(g_dir);
  return check_report();
}
