#include "ctl.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "config.h"
#include "err.h"
#include "links.h"
#include "banned.h"

#define DEFAULT_ADMIN "127.0.0.1:9100"
#define MAX_RESPONSE (16u << 20)

static const char usage[] =
    "usage: mtproxy ctl [--admin ADDR:PORT | --config FILE] [--timeout SECONDS] COMMAND\n"
    "\n"
    "Talks to a running proxy's admin endpoint (--admin, else the config file's \"admin\" key,\n"
    "else $MTPROXY_ADMIN, else " DEFAULT_ADMIN ").\n"
    "\n"
    "commands:\n"
    "  status                    the proxy's state as JSON (listeners, workers, connections, ...)\n"
    "  links [--qr]              every tg:// and t.me link (with QR codes)\n"
    "  tables                    every policy table and its entries\n"
    "  tables NAME               one table's entries, one per line\n"
    "  table add NAME VALUE      add an entry (saved to the tables file)\n"
    "  table del NAME VALUE      remove an entry\n"
    "  reload                    re-read the configuration\n"
    "  log-debug MODULES         debug lines of these modules (comma list; none = off)\n"
    "  log-level LEVEL           error, warn, info or debug\n"
    "  metrics                   the Prometheus text of /metrics\n"
    "\n"
    "exit codes: 0 done, 1 the proxy could not be reached or refused, 2 bad usage\n";

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for events on fd until deadline. Returns 1 ready, 0 timeout, -1 error. */
static int wait_fd(int fd, short events, int64_t deadline) {
  for (;;) {
    int64_t left = deadline - now_ms();
    if (left <= 0)
      return 0;
    struct pollfd p = {.fd = fd, .events = events};
    int r = poll(&p, 1, (int)left);
    if (r < 0 && errno == EINTR)
      continue;
    return r < 0 ? -1 : r;
  }
}

int mtp_ctl_request(const char *addr, const char *method, const char *path, int timeout_ms, char **body,
                    char *err, size_t errlen) {
  *body = NULL;
  struct sockaddr_storage ss;
  if (mtp_parse_addr_port(addr, &ss) != MTP_OK) {
    snprintf(err, errlen, "'%s' is not ADDR:PORT", addr);
    return -1;
  }
  int64_t deadline = now_ms() + timeout_ms;
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    snprintf(err, errlen, "socket: %s", strerror(errno));
    return -1;
  }
  char *resp = NULL;
  int status = -1;
  socklen_t alen = ss.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  if (connect(fd, (struct sockaddr *)&ss, alen) != 0) {
    if (errno != EINPROGRESS) {
      snprintf(err, errlen, "cannot connect to %s: %s", addr, strerror(errno));
      goto out;
    }
    int r = wait_fd(fd, POLLOUT, deadline);
    int soerr = 0;
    socklen_t sl = sizeof(soerr);
    if (r <= 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0) {
      snprintf(err, errlen, "cannot connect to %s: %s", addr, r == 0 ? "timed out" : strerror(soerr ? soerr : errno));
      goto out;
    }
  }
  char req[2048];
  int n = snprintf(req, sizeof(req), "%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                   method, path, addr);
  if (n < 0 || (size_t)n >= sizeof(req)) {
    snprintf(err, errlen, "request too long");
    goto out;
  }
  for (size_t off = 0; off < (size_t)n;) {
    ssize_t w = send(fd, req + off, (size_t)n - off, MSG_NOSIGNAL);
    if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (wait_fd(fd, POLLOUT, deadline) <= 0) {
        snprintf(err, errlen, "%s: timed out sending the request", addr);
        goto out;
      }
      continue;
    }
    if (w < 0) {
      snprintf(err, errlen, "%s: send: %s", addr, strerror(errno));
      goto out;
    }
    off += (size_t)w;
  }
  size_t len = 0, cap = 8192;
  resp = mtp_malloc(cap);
  if (resp == NULL) {
    snprintf(err, errlen, "out of memory");
    goto out;
  }
  for (;;) {
    if (len + 1 >= cap) {
      if (cap >= MAX_RESPONSE) {
        snprintf(err, errlen, "%s: answer over %u bytes", addr, MAX_RESPONSE);
        goto out;
      }
      char *p = mtp_realloc(resp, cap * 2);
      if (p == NULL) {
        snprintf(err, errlen, "out of memory");
        goto out;
      }
      resp = p;
      cap *= 2;
    }
    ssize_t r = recv(fd, resp + len, cap - 1 - len, 0);
    if (r > 0) {
      len += (size_t)r;
      continue;
    }
    if (r == 0)
      break;
    if (errno == EINTR)
      continue;
    if (errno == EAGAIN) {
      int w = wait_fd(fd, POLLIN, deadline);
      if (w <= 0) {
        snprintf(err, errlen, "%s: %s waiting for the answer", addr, w == 0 ? "timed out" : strerror(errno));
        goto out;
      }
      continue;
    }
    snprintf(err, errlen, "%s: recv: %s", addr, strerror(errno));
    goto out;
  }
  resp[len] = '\0';
  int code = 0;
  if (len < 12 || strncmp(resp, "HTTP/1.", 7) != 0 || sscanf(resp + 9, "%3d", &code) != 1) {
    snprintf(err, errlen, "%s: the answer is not HTTP (is this the admin endpoint?)", addr);
    goto out;
  }
  char *hend = strstr(resp, "\r\n\r\n");
  if (hend == NULL) {
    snprintf(err, errlen, "%s: truncated answer", addr);
    goto out;
  }
  char *start = hend + 4;
  size_t blen = len - (size_t)(start - resp);
  /* Content-Length, when given, must match what arrived before the close. */
  for (char *h = strstr(resp, "\r\n"); h != NULL && h < hend; h = strstr(h + 2, "\r\n")) {
    if (strncasecmp(h + 2, "Content-Length:", 15) == 0) {
      unsigned long cl = strtoul(h + 17, NULL, 10);
      if (cl != blen) {
        snprintf(err, errlen, "%s: truncated answer (%zu of %lu bytes)", addr, blen, cl);
        goto out;
      }
    }
  }
  memmove(resp, start, blen);
  resp[blen] = '\0';
  *body = resp;
  resp = NULL;
  status = code;
out:
  mtp_free(resp);
  close(fd);
  return status;
}

/* %-encodes s (everything but unreserved characters) into out. Returns 0 or -1 (too long). */
static int pct_encode(const char *s, char *out, size_t outlen) {
  static const char hex[] = "0123456789ABCDEF";
  size_t o = 0;
  for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
    bool plain = (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-' ||
                 *p == '.' || *p == '_' || *p == '~' || *p == ':';
    if (o + (plain ? 1 : 3) >= outlen)
      return -1;
    if (plain) {
      out[o++] = (char)*p;
    } else {
      out[o++] = '%';
      out[o++] = hex[*p >> 4];
      out[o++] = hex[*p & 15];
    }
  }
  out[o] = '\0';
  return 0;
}

/* Prints the server's error message (from {"error": ...} or the raw body). */
static void print_http_error(int status, const char *body) {
  cJSON *j = cJSON_Parse(body);
  const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
  if (cJSON_IsString(e))
    fprintf(stderr, "mtproxy ctl: HTTP %d: %s\n", status, e->valuestring);
  else
    fprintf(stderr, "mtproxy ctl: HTTP %d: %.300s\n", status, body);
  cJSON_Delete(j);
}

struct ctl {
  const char *admin;
  int timeout_ms;
};

/* Runs one request; on success (2xx) returns 0 with *body; else prints why and returns 1. */
static int call(const struct ctl *c, const char *method, const char *path, char **body) {
  char err[512];
  int st = mtp_ctl_request(c->admin, method, path, c->timeout_ms, body, err, sizeof(err));
  if (st < 0) {
    fprintf(stderr, "mtproxy ctl: %s\n", err);
    if (strstr(err, "cannot connect") != NULL)
      fprintf(stderr, "mtproxy ctl: is the proxy running with its admin endpoint on %s? (--admin ADDR:PORT)\n",
              c->admin);
    return 1;
  }
  if (st < 200 || st > 299) {
    print_http_error(st, *body);
    mtp_free(*body);
    *body = NULL;
    return 1;
  }
  return 0;
}

static int cmd_status(const struct ctl *c) {
  char *body;
  if (call(c, "GET", "/status", &body) != 0)
    return 1;
  cJSON *j = cJSON_Parse(body);
  char *pretty = j != NULL ? cJSON_Print(j) : NULL;
  printf("%s\n", pretty != NULL ? pretty : body);
  cJSON_free(pretty);
  cJSON_Delete(j);
  mtp_free(body);
  return 0;
}

static int cmd_metrics(const struct ctl *c) {
  char *body;
  if (call(c, "GET", "/metrics", &body) != 0)
    return 1;
  fputs(body, stdout);
  mtp_free(body);
  return 0;
}

static int cmd_links(const struct ctl *c, bool qr) {
  char *body;
  if (call(c, "GET", "/links", &body) != 0)
    return 1;
  cJSON *j = cJSON_Parse(body);
  mtp_free(body);
  if (!cJSON_IsArray(j)) {
    fprintf(stderr, "mtproxy ctl: /links did not answer a JSON array\n");
    cJSON_Delete(j);
    return 1;
  }
  const cJSON *e;
  cJSON_ArrayForEach(e, j) {
    const char *l = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "listener"));
    const char *kind = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "kind"));
    const char *dom = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "domain"));
    const char *tg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "tg"));
    const char *tme = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "tme"));
    const char *tme64 = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "tme_base64url"));
    if (l == NULL || kind == NULL || tg == NULL || tme == NULL)
      continue;
    printf("%s %s%s%s:\n  %s\n  %s\n", l, kind, dom ? " " : "", dom ? dom : "", tg, tme);
    if (tme64 != NULL)
      printf("  %s\n", tme64);
    if (qr) {
      char *text = NULL;
      if (mtp_links_qr_render(tme, true, &text, NULL) == MTP_OK)
        printf("%s", text);
      mtp_free(text);
    }
  }
  cJSON_Delete(j);
  return 0;
}

static int cmd_tables(const struct ctl *c, const char *name) {
  char path[1200] = "/tables";
  if (name != NULL) {
    char enc[1024];
    if (pct_encode(name, enc, sizeof(enc)) != 0) {
      fprintf(stderr, "mtproxy ctl: table name too long\n");
      return 2;
    }
    snprintf(path, sizeof(path), "/tables/%s", enc);
  }
  char *body;
  if (call(c, "GET", path, &body) != 0)
    return 1;
  cJSON *j = cJSON_Parse(body);
  mtp_free(body);
  int rc = 0;
  /* One table comes as {"NAME": [...]} (or a bare array). */
  const cJSON *one = name == NULL ? NULL : cJSON_IsArray(j) ? j : cJSON_GetObjectItemCaseSensitive(j, name);
  if (name != NULL && cJSON_IsArray(one)) {
    const cJSON *v;
    cJSON_ArrayForEach(v, one) if (cJSON_IsString(v)) printf("%s\n", v->valuestring);
  } else if (name == NULL && cJSON_IsObject(j)) {
    const cJSON *t;
    if (cJSON_GetArraySize(j) == 0)
      printf("(no tables)\n");
    cJSON_ArrayForEach(t, j) {
      printf("%s (%d)\n", t->string, cJSON_GetArraySize(t));
      const cJSON *v;
      cJSON_ArrayForEach(v, t) if (cJSON_IsString(v)) printf("  %s\n", v->valuestring);
    }
  } else {
    fprintf(stderr, "mtproxy ctl: unexpected answer from /tables\n");
    rc = 1;
  }
  cJSON_Delete(j);
  return rc;
}

static int cmd_table_edit(const struct ctl *c, bool add, const char *name, const char *value) {
  char en[1024], ev[3200], path[4400];
  if (pct_encode(name, en, sizeof(en)) != 0 || pct_encode(value, ev, sizeof(ev)) != 0) {
    fprintf(stderr, "mtproxy ctl: table name or value too long\n");
    return 2;
  }
  snprintf(path, sizeof(path), "/tables/%s/%s", en, ev);
  char *body;
  if (call(c, add ? "POST" : "DELETE", path, &body) != 0)
    return 1;
  mtp_free(body);
  printf("%s %s %s %s\n", add ? "added" : "removed", value, add ? "to" : "from", name);
  return 0;
}

static int cmd_reload(const struct ctl *c) {
  char *body;
  if (call(c, "POST", "/reload", &body) != 0)
    return 1;
  mtp_free(body);
  printf("configuration reloaded\n");
  return 0;
}

static int cmd_log(const struct ctl *c, const char *param, const char *value) {
  char ev[1024], path[1200];
  if (pct_encode(value, ev, sizeof(ev)) != 0) {
    fprintf(stderr, "mtproxy ctl: value too long\n");
    return 2;
  }
  snprintf(path, sizeof(path), "/log?%s=%s", param, ev);
  char *body;
  if (call(c, "POST", path, &body) != 0)
    return 1;
  cJSON *j = cJSON_Parse(body);
  const char *lv = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "level"));
  const char *dbg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "debug"));
  printf("log level %s, debug modules: %s\n", lv ? lv : "?", dbg && dbg[0] ? dbg : "(none)");
  cJSON_Delete(j);
  mtp_free(body);
  return 0;
}

/* The admin address of a config file (its "admin" key). Returns 0 or 2 (printed). */
static int admin_from_config(const char *file, char **out) {
  char *args[] = {"--config", (char *)file, NULL};
  struct mtp_config cfg;
  char err[512];
  bool help = false;
  if (mtp_config_load(2, args, &cfg, &help, err, sizeof(err)) != MTP_OK) {
    fprintf(stderr, "mtproxy ctl: %s\n", err);
    return 2;
  }
  if (cfg.admin == NULL) {
    fprintf(stderr, "mtproxy ctl: %s has no \"admin\" key; give --admin ADDR:PORT\n", file);
    mtp_config_free(&cfg);
    return 2;
  }
  *out = mtp_strdup(cfg.admin);
  mtp_config_free(&cfg);
  return *out != NULL ? 0 : 1;
}

static int bad_usage(const char *fmt, const char *arg) {
  fprintf(stderr, "mtproxy ctl: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, " (see mtproxy ctl --help)\n");
  return 2;
}

int mtp_ctl_main(int argc, char **argv) {
  struct ctl c = {.admin = NULL, .timeout_ms = 10000};
  const char *config = NULL;
  char *from_config = NULL;
  int i = 1;
  for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--help") == 0) {
      fputs(usage, stdout);
      return 0;
    }
    if (strcmp(a, "--admin") != 0 && strcmp(a, "--config") != 0 && strcmp(a, "--timeout") != 0)
      return bad_usage("unknown option '%s'", a);
    if (i + 1 >= argc)
      return bad_usage("%s needs a value", a);
    const char *v = argv[++i];
    if (strcmp(a, "--admin") == 0) {
      c.admin = v;
    } else if (strcmp(a, "--config") == 0) {
      config = v;
    } else {
      char *end = NULL;
      double s = strtod(v, &end);
      if (end == v || *end != '\0' || !(s > 0 && s <= 3600))
        return bad_usage("--timeout '%s' must be seconds, > 0 and <= 3600", v);
      c.timeout_ms = (int)(s * 1000);
    }
  }
  if (i >= argc)
    return bad_usage("%s", "a command is needed");
  if (c.admin != NULL) {
    struct sockaddr_storage ss;
    if (mtp_parse_addr_port(c.admin, &ss) != MTP_OK)
      return bad_usage("--admin '%s' is not ADDR:PORT", c.admin);
  } else if (config != NULL) {
    int rc = admin_from_config(config, &from_config);
    if (rc != 0)
      return rc;
    c.admin = from_config;
  } else {
    c.admin = getenv("MTPROXY_ADMIN");
    if (c.admin == NULL || c.admin[0] == '\0')
      c.admin = DEFAULT_ADMIN;
  }
  const char *cmd = argv[i];
  int nargs = argc - i - 1;
  char **args = argv + i + 1;
  int rc;
  if (strcmp(cmd, "status") == 0 && nargs == 0) {
    rc = cmd_status(&c);
  } else if (strcmp(cmd, "metrics") == 0 && nargs == 0) {
    rc = cmd_metrics(&c);
  } else if (strcmp(cmd, "links") == 0 && (nargs == 0 || (nargs == 1 && strcmp(args[0], "--qr") == 0))) {
    rc = cmd_links(&c, nargs == 1);
  } else if (strcmp(cmd, "tables") == 0 && nargs <= 1) {
    rc = cmd_tables(&c, nargs == 1 ? args[0] : NULL);
  } else if (strcmp(cmd, "table") == 0 && nargs == 3 && (strcmp(args[0], "add") == 0 || strcmp(args[0], "del") == 0)) {
    if (args[1][0] == '\0' || args[2][0] == '\0')
      rc = bad_usage("%s", "table name and value must not be empty");
    else
      rc = cmd_table_edit(&c, strcmp(args[0], "add") == 0, args[1], args[2]);
  } else if (strcmp(cmd, "reload") == 0 && nargs == 0) {
    rc = cmd_reload(&c);
  } else if (strcmp(cmd, "log-debug") == 0 && nargs == 1) {
    rc = cmd_log(&c, "debug", args[0]);
  } else if (strcmp(cmd, "log-level") == 0 && nargs == 1) {
    rc = cmd_log(&c, "level", args[0]);
  } else if (strcmp(cmd, "status") == 0 || strcmp(cmd, "metrics") == 0 || strcmp(cmd, "links") == 0 ||
             strcmp(cmd, "tables") == 0 || strcmp(cmd, "table") == 0 || strcmp(cmd, "reload") == 0 ||
             strcmp(cmd, "log-debug") == 0 || strcmp(cmd, "log-level") == 0) {
    rc = bad_usage("wrong arguments for '%s'", cmd);
  } else {
    rc = bad_usage("unknown command '%s'", cmd);
  }
  mtp_free(from_config);
  fflush(stdout);
  return rc;
}
