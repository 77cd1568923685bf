/*
 * admin.c - the admin endpoint (see admin.h).
 *
 * A connection goes: READ_HEAD --blank line--> READ_BODY --Content-Length bytes--> answer
 * written --> shutdown, read and discard until the peer closes --> closed. The timer that
 * starts at accept bounds all of it. A connection is freed in the close callback of the last
 * of its two handles (tcp, timer).
 */
#include "admin.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "config.h"
#include "crypto.h"
#include "err.h"
#include "log.h"
#include "metrics.h"
#include "banned.h"

#define MAX_HOOKS 4
#define MAX_LINGER 64

struct admin_conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  struct mtp_admin *a;           /* borrows */
  struct admin_conn *prev, *next; /* in a->conns */
  int open_handles;              /* tcp + timer not yet closed */
  bool closing;
  bool answered;                 /* the answer is written (or being written) */
  bool lingering;                /* answered; waiting for the peer's close (counted in nlinger) */
  size_t len;                    /* bytes in buf */
  size_t head_len;               /* 0 until the blank line is seen */
  size_t body_len;               /* Content-Length */
  char *resp;                    /* owns: the answer being written */
  uv_write_t wr;
  uv_shutdown_t sd;
  char buf[MTP_ADMIN_MAX_HEAD + MTP_ADMIN_MAX_BODY + 1];
};

struct mtp_admin {
  uv_loop_t *loop; /* borrows */
  uv_tcp_t listener;
  bool listener_open;
  bool closing;
  struct admin_conn *conns; /* every connection not yet freed */
  size_t nconns;            /* all of them */
  size_t nactive;           /* those not yet answered: what MTP_ADMIN_MAX_CONNS bounds */
  size_t nlinger;           /* answered, waiting for the peer to close */
  struct mtp_admin_hooks hooks[MAX_HOOKS];
  size_t nhooks;
  uint64_t started_ns;
  char address[80];
};

/* ---- lifetime ---- */

static void admin_maybe_free(struct mtp_admin *a) {
  if (a->closing && !a->listener_open && a->nconns == 0)
    mtp_free(a);
}

static void on_conn_handle_closed(uv_handle_t *h) {
  struct admin_conn *c = h->data;
  if (--c->open_handles > 0)
    return;
  struct mtp_admin *a = c->a;
  if (c->prev != NULL)
    c->prev->next = c->next;
  else
    a->conns = c->next;
  if (c->next != NULL)
    c->next->prev = c->prev;
  a->nconns--;
  if (c->lingering)
    a->nlinger--;
  else
    a->nactive--;
  mtp_free(c->resp);
  mtp_free(c);
  admin_maybe_free(a);
}

static void conn_close(struct admin_conn *c) {
  if (c->closing)
    return;
  c->closing = true;
  uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

static void on_timeout(uv_timer_t *t) {
  struct admin_conn *c = t->data;
  mtp_debugm("admin", "connection timed out after %d ms", MTP_ADMIN_TIMEOUT_MS);
  conn_close(c);
}

/* ---- answers ---- */

static const char *reason_phrase(int code) {
  switch (code) {
  case 200: return "OK";
  case 400: return "Bad Request";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 409: return "Conflict";
  case 411: return "Length Required";
  case 413: return "Content Too Large";
  case 422: return "Unprocessable Content";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 503: return "Service Unavailable";
  default: return "Unknown";
  }
}

static void on_discard_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct admin_conn *c = h->data;
  /* The request is answered; whatever else arrives is dropped into the spare room. */
  buf->base = c->buf;
  buf->len = sizeof(c->buf);
}

static void on_discard_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  if (nread < 0)
    conn_close(s->data);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  struct admin_conn *c = req->data;
  if (status < 0 && !c->closing)
    conn_close(c);
}

static void on_written(uv_write_t *wr, int status) {
  struct admin_conn *c = wr->data;
  if (c->closing)
    return;
  if (status < 0) {
    conn_close(c);
    return;
  }
  /* Lingering close: FIN first, then wait for the peer's close (bounded by the timer), so a
   * client that sent more than we read never gets an RST that could eat the answer. Such a
   * connection no longer counts against MTP_ADMIN_MAX_CONNS; too many of them are closed at
   * once instead. */
  struct mtp_admin *a = c->a;
  if (a->nlinger >= MAX_LINGER) {
    conn_close(c);
    return;
  }
  c->lingering = true;
  a->nactive--;
  a->nlinger++;
  c->sd.data = c;
  if (uv_shutdown(&c->sd, (uv_stream_t *)&c->tcp, on_shutdown) != 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_discard_alloc, on_discard_read) != 0)
    conn_close(c);
}

/* Writes the whole answer; extra_headers are complete "Name: value\r\n" lines or NULL. */
static void respond(struct admin_conn *c, int code, const char *ctype, const char *body, size_t blen,
                    const char *extra_headers) {
  if (c->answered || c->closing)
    return;
  c->answered = true;
  uv_read_stop((uv_stream_t *)&c->tcp);
  size_t cap = blen + 512 + (extra_headers ? strlen(extra_headers) : 0);
  c->resp = mtp_malloc(cap);
  if (c->resp == NULL) {
    conn_close(c);
    return;
  }
  int n = snprintf(c->resp, cap,
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: no-store\r\n"
                   "%sConnection: close\r\n\r\n",
                   code, reason_phrase(code), ctype, blen, extra_headers ? extra_headers : "");
  if (n < 0 || (size_t)n + blen > cap) {
    conn_close(c);
    return;
  }
  memcpy(c->resp + n, body, blen);
  uv_buf_t buf = uv_buf_init(c->resp, (unsigned)((size_t)n + blen));
  c->wr.data = c;
  if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &buf, 1, on_written) != 0)
    conn_close(c);
}

static void respond_json(struct admin_conn *c, int code, cJSON *j) {
  char *text = j != NULL ? cJSON_PrintUnformatted(j) : NULL;
  cJSON_Delete(j);
  if (text == NULL) {
    static const char oom[] = "{\"error\":\"out of memory\"}\n";
    respond(c, 500, "application/json", oom, sizeof(oom) - 1, NULL);
    return;
  }
  size_t n = strlen(text);
  /* One trailing newline, for curl users. */
  char *withnl = mtp_malloc(n + 2);
  if (withnl != NULL) {
    memcpy(withnl, text, n);
    withnl[n] = '\n';
    withnl[n + 1] = '\0';
    respond(c, code, "application/json", withnl, n + 1, NULL);
    mtp_free(withnl);
  } else {
    respond(c, code, "application/json", text, n, NULL);
  }
  cJSON_free(text);
}

static void respond_error_h(struct admin_conn *c, int code, const char *extra_headers, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void respond_error_h(struct admin_conn *c, int code, const char *extra_headers, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  cJSON *j = cJSON_CreateObject();
  char *text = NULL;
  if (j != NULL && cJSON_AddStringToObject(j, "error", msg) != NULL)
    text = cJSON_PrintUnformatted(j);
  cJSON_Delete(j);
  size_t n = text != NULL ? strlen(text) : 0;
  char *body = text != NULL ? mtp_malloc(n + 2) : NULL;
  if (body == NULL) {
    cJSON_free(text);
    static const char oom[] = "{\"error\":\"out of memory\"}\n";
    respond(c, 500, "application/json", oom, sizeof(oom) - 1, NULL);
    return;
  }
  memcpy(body, text, n);
  body[n] = '\n';
  body[n + 1] = '\0';
  cJSON_free(text);
  respond(c, code, "application/json", body, n + 1, extra_headers);
  mtp_free(body);
}

#define respond_error(c, code, ...) respond_error_h((c), (code), NULL, __VA_ARGS__)

/* ---- request parsing helpers ---- */

/* Decodes %XX escapes of in[0..n) into out (room for n+1). Returns MTP_OK, or MTP_EINVAL for
 * a bad escape or an escaped NUL. */
static int pct_decode(const char *in, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (in[i] != '%') {
      out[o++] = in[i];
      continue;
    }
    if (i + 2 >= n)
      return MTP_EINVAL;
    int hi = mtp_hex_digit(in[i + 1]), lo = mtp_hex_digit(in[i + 2]);
    if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
      return MTP_EINVAL;
    out[o++] = (char)(hi << 4 | lo);
    i += 2;
  }
  out[o] = '\0';
  return MTP_OK;
}

/* Finds the query parameter name in query (NULL-safe) and decodes its value into out.
 * Returns 1 found, 0 absent, MTP_EINVAL bad escape / too long. */
static int query_param(const char *query, const char *name, char *out, size_t outlen) {
  if (query == NULL)
    return 0;
  size_t nl = strlen(name);
  for (const char *p = query; *p != '\0';) {
    const char *end = strchr(p, '&');
    size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
    if (len >= nl && strncmp(p, name, nl) == 0 && (len == nl || p[nl] == '=')) {
      const char *v = len == nl ? p + nl : p + nl + 1;
      size_t vl = len == nl ? 0 : len - nl - 1;
      if (vl + 1 > outlen)
        return MTP_EINVAL;
      return pct_decode(v, vl, out) == MTP_OK ? 1 : MTP_EINVAL;
    }
    p += len;
    if (*p == '&')
      p++;
  }
  return 0;
}

static const struct mtp_admin_hooks *first_hook(struct mtp_admin *a, size_t member_off) {
  for (size_t i = 0; i < a->nhooks; i++) {
    const void *fn = *(const void *const *)((const char *)&a->hooks[i] + member_off);
    if (fn != NULL)
      return &a->hooks[i];
  }
  return NULL;
}
#define FIRST_HOOK(a, member) first_hook((a), offsetof(struct mtp_admin_hooks, member))

/* ---- routes ---- */

static void get_metrics(struct admin_conn *c) {
  char *text = NULL;
  size_t len = 0;
  if (mtp_metrics_format(&text, &len) != MTP_OK) {
    respond_error(c, 500, "out of memory");
    return;
  }
  for (size_t i = 0; i < c->a->nhooks; i++) {
    if (c->a->hooks[i].metrics == NULL)
      continue;
    char *more = c->a->hooks[i].metrics(c->a->hooks[i].ctx);
    if (more == NULL)
      continue;
    size_t ml = strlen(more);
    char *p = mtp_realloc(text, len + ml + 1);
    if (p != NULL) {
      memcpy(p + len, more, ml + 1);
      text = p;
      len += ml;
    }
    mtp_free(more);
  }
  respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", text, len, NULL);
  mtp_free(text);
}

static void get_status(struct admin_conn *c) {
  struct mtp_admin *a = c->a;
  cJSON *j = cJSON_CreateObject();
  cJSON *log = cJSON_CreateObject();
  char mods[512];
  mtp_log_debug_modules(mods, sizeof(mods));
  if (j == NULL || log == NULL || cJSON_AddNumberToObject(j, "pid", (double)getpid()) == NULL ||
      cJSON_AddNumberToObject(j, "uptime_seconds", (double)(uv_hrtime() - a->started_ns) / 1e9) == NULL ||
      cJSON_AddNumberToObject(j, "admin_connections", (double)a->nactive) == NULL ||
      cJSON_AddStringToObject(log, "level", mtp_log_level_name(mtp_log_level)) == NULL ||
      cJSON_AddStringToObject(log, "debug", mods) == NULL || !cJSON_AddItemToObject(j, "log", log)) {
    cJSON_Delete(log);
    cJSON_Delete(j);
    respond_error(c, 500, "out of memory");
    return;
  }
  for (size_t i = 0; i < a->nhooks; i++)
    if (a->hooks[i].status != NULL)
      a->hooks[i].status(a->hooks[i].ctx, j);
  respond_json(c, 200, j);
}

static void get_links(struct admin_conn *c) {
  const struct mtp_admin_hooks *h = FIRST_HOOK(c->a, links);
  cJSON *arr = h != NULL ? h->links(h->ctx) : cJSON_CreateArray();
  if (arr == NULL) {
    respond_error(c, 500, "out of memory");
    return;
  }
  respond_json(c, 200, arr);
}

static void log_state(struct admin_conn *c) {
  cJSON *j = cJSON_CreateObject();
  char mods[512];
  mtp_log_debug_modules(mods, sizeof(mods));
  if (j != NULL && (cJSON_AddStringToObject(j, "level", mtp_log_level_name(mtp_log_level)) == NULL ||
                    cJSON_AddStringToObject(j, "debug", mods) == NULL)) {
    cJSON_Delete(j);
    j = NULL;
  }
  respond_json(c, 200, j);
}

static void post_log(struct admin_conn *c, const char *query) {
  char debug[512], level[32];
  int hd = query_param(query, "debug", debug, sizeof(debug));
  int hl = query_param(query, "level", level, sizeof(level));
  if (hd < 0 || hl < 0) {
    respond_error(c, 400, "bad query: %%-escapes or a value too long");
    return;
  }
  if (hd == 0 && hl == 0) {
    respond_error(c, 400, "give debug=MODULE,MODULE (or debug=none) and/or level=error|warn|info|debug");
    return;
  }
  int lv = mtp_log_level;
  if (hl && mtp_log_parse_level(level, &lv) != MTP_OK) {
    respond_error(c, 400, "level '%.31s' is not error, warn, info or debug", level);
    return;
  }
  if (hd) {
    int rc = mtp_log_set_debug_modules(debug);
    if (rc == MTP_EINVAL) {
      respond_error(c, 400, "debug: module names are [a-z0-9_-], at most %d characters, comma-separated",
                    MTP_LOG_MODULE_NAME_MAX);
      return;
    }
    if (rc != MTP_OK) {
      respond_error(c, 400, "debug: more than %d distinct modules", MTP_LOG_MAX_MODULES);
      return;
    }
  }
  if (hl)
    mtp_log_level = lv;
  char mods[512];
  mtp_log_debug_modules(mods, sizeof(mods));
  mtp_log(MTP_LOG_INFO, "admin: log level %s, debug modules '%s'", mtp_log_level_name(mtp_log_level), mods);
  log_state(c);
}

static void post_reload(struct admin_conn *c) {
  const struct mtp_admin_hooks *h = FIRST_HOOK(c->a, reload);
  if (h == NULL) {
    respond_error(c, 501, "reload is not implemented in this build yet; restart the service to apply changes");
    return;
  }
  char err[400] = "";
  int rc = h->reload(h->ctx, err, sizeof(err));
  if (rc != MTP_OK) {
    respond_error(c, rc == MTP_EINVAL ? 422 : 500, "reload failed, the old configuration stays: %s",
                  err[0] ? err : mtp_strerror(rc));
    return;
  }
  cJSON *j = cJSON_CreateObject();
  if (j != NULL && cJSON_AddStringToObject(j, "result", "reloaded") == NULL) {
    cJSON_Delete(j);
    j = NULL;
  }
  respond_json(c, 200, j);
}

static int table_error_code(int rc) {
  switch (rc) {
  case MTP_ENOTFOUND: return 404;
  case MTP_EEXIST: return 409;
  case MTP_EINVAL: return 400;
  default: return 500;
  }
}

/* /tables, /tables/NAME, /tables/NAME/VALUE; rest is the decoded path after "/tables". */
static void route_tables(struct admin_conn *c, const char *method, const char *raw_rest) {
  struct mtp_admin *a = c->a;
  /* Split "/NAME/VALUE" on the undecoded path, so an escaped '/' (%2F) stays in the value. */
  const char *name_start = raw_rest[0] == '/' ? raw_rest + 1 : raw_rest;
  const char *slash = strchr(name_start, '/');
  size_t name_len = slash != NULL ? (size_t)(slash - name_start) : strlen(name_start);
  const char *value_raw = slash != NULL ? slash + 1 : NULL;
  char name[256], value[1024];
  if (name_len >= sizeof(name) || (value_raw != NULL && strlen(value_raw) >= sizeof(value))) {
    respond_error(c, 400, "table name or value too long");
    return;
  }
  if (pct_decode(name_start, name_len, name) != MTP_OK ||
      (value_raw != NULL && pct_decode(value_raw, strlen(value_raw), value) != MTP_OK)) {
    respond_error(c, 400, "bad %%-escape in the path");
    return;
  }
  bool has_name = name[0] != '\0';
  bool has_value = value_raw != NULL && value[0] != '\0';
  if (value_raw != NULL && !has_value) {
    respond_error(c, 400, "empty table value");
    return;
  }
  if (!has_value) {
    if (strcmp(method, "GET") != 0) {
      respond_error_h(c, 405, "Allow: GET\r\n", "%s is not allowed here: GET /tables[/NAME], POST or DELETE /tables/NAME/VALUE",
                      method);
      return;
    }
    const struct mtp_admin_hooks *h = FIRST_HOOK(a, tables_json);
    if (h == NULL) {
      if (has_name) {
        respond_error(c, 404, "no table '%.200s' (no policy tables are configured)", name);
      } else {
        static const char empty[] = "{}\n";
        respond(c, 200, "application/json", empty, sizeof(empty) - 1, NULL);
      }
      return;
    }
    char *text = NULL;
    int rc = h->tables_json(h->ctx, has_name ? name : NULL, &text);
    if (rc != MTP_OK) {
      if (rc == MTP_ENOTFOUND)
        respond_error(c, 404, "no table '%.200s'", name);
      else
        respond_error(c, 500, "%s", mtp_strerror(rc));
      mtp_free(text);
      return;
    }
    size_t tl = strlen(text);
    char *withnl = mtp_realloc(text, tl + 2);
    if (withnl != NULL) {
      text = withnl;
      if (tl == 0 || text[tl - 1] != '\n')
        text[tl++] = '\n';
      text[tl] = '\0';
    }
    respond(c, 200, "application/json", text, tl, NULL);
    mtp_free(text);
    return;
  }
  bool add = strcmp(method, "POST") == 0;
  if (!add && strcmp(method, "DELETE") != 0) {
    respond_error_h(c, 405, "Allow: POST, DELETE\r\n", "%s is not allowed on a table entry: POST adds, DELETE removes",
                    method);
    return;
  }
  const struct mtp_admin_hooks *h = add ? FIRST_HOOK(a, table_add) : FIRST_HOOK(a, table_del);
  if (h == NULL) {
    respond_error(c, 404, "no table '%.200s' (no policy tables are configured)", name);
    return;
  }
  int rc = add ? h->table_add(h->ctx, name, value) : h->table_del(h->ctx, name, value);
  if (rc != MTP_OK) {
    const char *why = rc == MTP_ENOTFOUND ? (add ? "no such table" : "no such table or entry")
                      : rc == MTP_EEXIST   ? "already in the table"
                      : rc == MTP_EINVAL   ? "not a valid value for this table"
                      : rc == MTP_EIO      ? "the change could not be saved to the tables file"
                                           : mtp_strerror(rc);
    respond_error(c, table_error_code(rc), "%s %.200s %.300s: %s", add ? "add to" : "delete from", name, value, why);
    return;
  }
  mtp_log(MTP_LOG_INFO, "admin: table %s: %s an entry", name, add ? "added" : "removed");
  cJSON *j = cJSON_CreateObject();
  if (j != NULL && (cJSON_AddStringToObject(j, "table", name) == NULL ||
                    cJSON_AddStringToObject(j, "value", value) == NULL ||
                    cJSON_AddStringToObject(j, "result", add ? "added" : "removed") == NULL)) {
    cJSON_Delete(j);
    j = NULL;
  }
  respond_json(c, 200, j);
}

static void get_index(struct admin_conn *c) {
  static const char idx[] =
      "{\"endpoints\":[\"GET /metrics\",\"GET /status\",\"GET /links\",\"GET /tables\",\"GET /tables/NAME\","
      "\"POST /tables/NAME/VALUE\",\"DELETE /tables/NAME/VALUE\",\"POST /reload\",\"GET /log\","
      "\"POST /log?debug=MODULES&level=LEVEL\"]}\n";
  respond(c, 200, "application/json", idx, sizeof(idx) - 1, NULL);
}

/* A path served only by `allowed` (e.g. "GET"); answers 405 otherwise. Returns true when the
 * method is allowed. */
static bool method_ok(struct admin_conn *c, const char *method, const char *allowed) {
  char list[32];
  snprintf(list, sizeof(list), "%s", allowed);
  for (char *p = list; *p != '\0';) {
    char *comma = strchr(p, ',');
    size_t n = comma != NULL ? (size_t)(comma - p) : strlen(p);
    if (strlen(method) == n && strncmp(method, p, n) == 0)
      return true;
    p += n;
    while (*p == ',' || *p == ' ')
      p++;
  }
  char hdr[64];
  snprintf(hdr, sizeof(hdr), "Allow: %s\r\n", allowed);
  respond_error_h(c, 405, hdr, "%s is not allowed here (allowed: %s)", method, allowed);
  return false;
}

static void route(struct admin_conn *c, const char *method, char *target) {
  char *query = strchr(target, '?');
  if (query != NULL)
    *query++ = '\0';
  const char *path = target;
  mtp_debugm("admin", "%s %s", method, path);
  if (strcmp(path, "/metrics") == 0) {
    if (method_ok(c, method, "GET"))
      get_metrics(c);
  } else if (strcmp(path, "/status") == 0) {
    if (method_ok(c, method, "GET"))
      get_status(c);
  } else if (strcmp(path, "/links") == 0) {
    if (method_ok(c, method, "GET"))
      get_links(c);
  } else if (strcmp(path, "/log") == 0) {
    if (method_ok(c, method, "GET, POST")) {
      if (strcmp(method, "GET") == 0)
        log_state(c);
      else
        post_log(c, query);
    }
  } else if (strcmp(path, "/reload") == 0) {
    if (method_ok(c, method, "POST"))
      post_reload(c);
  } else if (strcmp(path, "/tables") == 0 || strncmp(path, "/tables/", 8) == 0) {
    route_tables(c, method, path + 7);
  } else if (strcmp(path, "/") == 0) {
    if (method_ok(c, method, "GET"))
      get_index(c);
  } else {
    respond_error(c, 404, "no such endpoint (GET / lists them)");
  }
}

/* ---- reading the request ---- */

static bool is_tchar(char ch) {
  return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || strchr("!#$%&'*+-.^_`|~", ch);
}

/* Finds the end of the head (after the blank line), accepting bare LF line ends. */
static size_t find_head_end(const char *buf, size_t len) {
  for (size_t i = 0; i + 1 < len; i++) {
    if (buf[i] != '\n')
      continue;
    if (buf[i + 1] == '\n')
      return i + 2;
    if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
      return i + 3;
  }
  return 0;
}

/* Parses the head in c->buf[0..head_len). On success returns 0 with method and target cut out
 * (NUL-terminated inside c->buf) and c->body_len set; else answers the error and returns -1. */
static int parse_head(struct admin_conn *c, char **method, char **target) {
  char *h = c->buf;
  if (memchr(h, '\0', c->head_len) != NULL) {
    respond_error(c, 400, "NUL byte in the request");
    return -1;
  }
  /* Request line. */
  char *eol = memchr(h, '\n', c->head_len);
  char *line_end = eol > h && eol[-1] == '\r' ? eol - 1 : eol;
  *line_end = '\0';
  char *sp1 = strchr(h, ' ');
  char *sp2 = sp1 != NULL ? strchr(sp1 + 1, ' ') : NULL;
  if (sp1 == NULL || sp2 == NULL || strchr(sp2 + 1, ' ') != NULL || sp1 == h || sp1 - h > 16) {
    respond_error(c, 400, "malformed request line");
    return -1;
  }
  *sp1 = '\0';
  *sp2 = '\0';
  for (char *p = h; *p != '\0'; p++) {
    if (!is_tchar(*p)) {
      respond_error(c, 400, "malformed method");
      return -1;
    }
  }
  const char *version = sp2 + 1;
  if (strcmp(version, "HTTP/1.1") != 0 && strcmp(version, "HTTP/1.0") != 0) {
    respond_error(c, 400, "only HTTP/1.0 and HTTP/1.1 are served");
    return -1;
  }
  if (sp1[1] != '/') {
    respond_error(c, 400, "the request target must be a path starting with '/'");
    return -1;
  }
  *method = h;
  *target = sp1 + 1;
  /* Header lines. */
  bool has_len = false;
  size_t clen = 0;
  char *p = eol + 1;
  char *end = c->buf + c->head_len;
  while (p < end) {
    char *nl = memchr(p, '\n', (size_t)(end - p));
    if (nl == NULL)
      break;
    char *le = nl > p && nl[-1] == '\r' ? nl - 1 : nl;
    if (le == p)
      break; /* the blank line */
    *le = '\0';
    char *colon = strchr(p, ':');
    if (colon == NULL || colon == p) {
      respond_error(c, 400, "malformed header line");
      return -1;
    }
    for (char *q = p; q < colon; q++) {
      if (!is_tchar(*q)) {
        respond_error(c, 400, "malformed header name");
        return -1;
      }
    }
    char *v = colon + 1;
    while (*v == ' ' || *v == '\t')
      v++;
    size_t nl_name = (size_t)(colon - p);
    if (nl_name == 14 && strncasecmp(p, "Content-Length", 14) == 0) {
      size_t n = 0;
      char *q = v;
      if (*q == '\0') {
        respond_error(c, 400, "empty Content-Length");
        return -1;
      }
      for (; *q >= '0' && *q <= '9'; q++) {
        if (n > MTP_ADMIN_MAX_BODY) {
          respond_error(c, 413, "request body over %d bytes", MTP_ADMIN_MAX_BODY);
          return -1;
        }
        n = n * 10 + (size_t)(*q - '0');
      }
      while (*q == ' ' || *q == '\t')
        q++;
      if (*q != '\0' || (has_len && n != clen)) {
        respond_error(c, 400, "bad Content-Length");
        return -1;
      }
      has_len = true;
      clen = n;
    } else if (nl_name == 17 && strncasecmp(p, "Transfer-Encoding", 17) == 0) {
      respond_error(c, 411, "chunked bodies are not accepted: send Content-Length");
      return -1;
    }
    p = nl + 1;
  }
  if (clen > MTP_ADMIN_MAX_BODY) {
    respond_error(c, 413, "request body over %d bytes", MTP_ADMIN_MAX_BODY);
    return -1;
  }
  c->body_len = clen;
  return 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct admin_conn *c = h->data;
  buf->base = c->buf + c->len;
  buf->len = sizeof(c->buf) - 1 - c->len;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct admin_conn *c = s->data;
  if (nread < 0) {
    conn_close(c);
    return;
  }
  if (c->answered || c->closing)
    return;
  c->len += (size_t)nread;
  c->buf[c->len] = '\0';
  if (c->head_len == 0) {
    size_t e = find_head_end(c->buf, c->len < MTP_ADMIN_MAX_HEAD ? c->len : MTP_ADMIN_MAX_HEAD);
    if (e == 0) {
      if (c->len >= MTP_ADMIN_MAX_HEAD)
        respond_error(c, 431, "request head over %d bytes", MTP_ADMIN_MAX_HEAD);
      return;
    }
    c->head_len = e;
    char *method, *target;
    if (parse_head(c, &method, &target) != 0)
      return;
    /* parse_head cut method/target in place; keep them (they lie before head_len). */
    if (c->len < c->head_len + c->body_len)
      return; /* the body is still coming: route once it is complete */
    route(c, method, target);
    return;
  }
  if (c->len >= c->head_len + c->body_len) {
    /* The head was parsed on an earlier read: method and target are the first two strings. */
    char *method = c->buf;
    char *target = method + strlen(method) + 1;
    route(c, method, target);
  }
}

static void on_connection(uv_stream_t *server, int status) {
  struct mtp_admin *a = server->data;
  if (status < 0 || a->closing)
    return;
  struct admin_conn *c = mtp_calloc(1, sizeof(*c));
  if (c == NULL)
    return;
  c->a = a;
  c->next = a->conns;
  if (a->conns != NULL)
    a->conns->prev = c;
  a->conns = c;
  a->nconns++;
  a->nactive++;
  uv_tcp_init(a->loop, &c->tcp);
  uv_timer_init(a->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->open_handles = 2;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    conn_close(c);
    return;
  }
  if (a->nactive > MTP_ADMIN_MAX_CONNS) {
    mtp_log(MTP_LOG_WARN, "admin: more than %d connections at once; closing a new one", MTP_ADMIN_MAX_CONNS);
    conn_close(c);
    return;
  }
  if (uv_timer_start(&c->timer, on_timeout, MTP_ADMIN_TIMEOUT_MS, 0) != 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0)
    conn_close(c);
}

/* ---- setup and teardown ---- */

static void on_listener_closed(uv_handle_t *h) {
  struct mtp_admin *a = h->data;
  a->listener_open = false;
  admin_maybe_free(a);
}

int mtp_admin_setup(struct mtp_admin **out, uv_loop_t *loop, const char *addr) {
  *out = NULL;
  struct sockaddr_storage ss;
  if (addr == NULL || mtp_parse_addr_port(addr, &ss) != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "admin: '%s' is not ADDR:PORT", addr ? addr : "");
    return MTP_EINVAL;
  }
  struct mtp_admin *a = mtp_calloc(1, sizeof(*a));
  if (a == NULL)
    return MTP_ENOMEM;
  a->loop = loop;
  a->started_ns = uv_hrtime();
  int rc = uv_tcp_init(loop, &a->listener);
  if (rc != 0) {
    mtp_free(a);
    return rc;
  }
  a->listener.data = a;
  a->listener_open = true;
  rc = uv_tcp_bind(&a->listener, (const struct sockaddr *)&ss, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&a->listener, 64, on_connection);
  if (rc != 0) {
    mtp_log(MTP_LOG_ERROR, "admin: cannot listen on %s: %s", addr, uv_strerror(rc));
    a->closing = true;
    uv_close((uv_handle_t *)&a->listener, on_listener_closed);
    return rc;
  }
  struct sockaddr_storage got;
  int glen = sizeof(got);
  uv_tcp_getsockname(&a->listener, (struct sockaddr *)&got, &glen);
  mtp_format_addr(&got, a->address, sizeof(a->address));
  mtp_log(MTP_LOG_INFO, "admin listening on %s", a->address);
  *out = a;
  return MTP_OK;
}

int mtp_admin_add_hooks(struct mtp_admin *a, const struct mtp_admin_hooks *hooks) {
  if (a == NULL)
    return MTP_OK;
  if (a->nhooks == MAX_HOOKS)
    return MTP_ENOMEM;
  a->hooks[a->nhooks++] = *hooks;
  return MTP_OK;
}

void mtp_admin_address(const struct mtp_admin *a, char *out, size_t outlen) {
  snprintf(out, outlen, "%s", a != NULL ? a->address : "");
}

void mtp_admin_close(struct mtp_admin *a) {
  if (a == NULL || a->closing)
    return;
  a->closing = true;
  for (struct admin_conn *c = a->conns; c != NULL; c = c->next)
    conn_close(c);
  if (a->listener_open && !uv_is_closing((uv_handle_t *)&a->listener))
    uv_close((uv_handle_t *)&a->listener, on_listener_closed);
  admin_maybe_free(a);
}
