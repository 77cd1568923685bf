/*
 * tgconfig.c - strict parser for Telegram's middle-proxy list (getProxyConfig).
 *
 * What Telegram serves looks like this (one statement per line):
 *   # force_probability 10 10
 *   default 2;
 *   proxy_for 1 149.154.175.50:8888;
 *   proxy_for -1 149.154.175.50:8888;
 * The official proxy reads it with a general tokenizer that also knows timeout and
 * min/max_connections and resolves host names; we accept only what Telegram actually sends:
 * comments, blank lines, "proxy_for DC ADDR:PORT;" and "default DC;", with IP literals only
 * (IPv6 in brackets), DC in -32768..32767 (the official limit) and ports 1..65535. Blanks
 * (space, tab) may surround the tokens; a '#' comment may follow the ';'. Everything else is
 * refused, naming the line, so a truncated or garbled download never replaces a good list.
 */
#include "tgconfig.h"

#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "err.h"
#include "banned.h"

struct cursor {
  const char *p, *end;
};

static bool is_blank(char ch) { return ch == ' ' || ch == '\t' || ch == '\r'; }

static void skip_blanks(struct cursor *c) {
  while (c->p < c->end && is_blank(*c->p))
    c->p++;
}

static bool at_end(const struct cursor *c) { return c->p >= c->end; }

/* Consumes a keyword that must be followed by a blank. */
static bool eat_word(struct cursor *c, const char *w) {
  size_t n = strlen(w);
  if ((size_t)(c->end - c->p) <= n || memcmp(c->p, w, n) != 0 || !is_blank(c->p[n]))
    return false;
  c->p += n;
  return true;
}

/* An unsigned decimal of at most max_digits digits. */
static bool eat_uint(struct cursor *c, long *out, int max_digits) {
  long v = 0;
  int digits = 0;
  while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
    if (++digits > max_digits)
      return false;
    v = v * 10 + (*c->p - '0');
    c->p++;
  }
  *out = v;
  return digits > 0;
}

static bool eat_dc(struct cursor *c, int *dc) {
  bool neg = false;
  long v;
  if (c->p < c->end && *c->p == '-') {
    neg = true;
    c->p++;
  }
  if (!eat_uint(c, &v, 6))
    return false;
  if (neg)
    v = -v;
  if (v < -32768 || v > 32767)
    return false;
  *dc = (int)v;
  return true;
}

/* ";" then optional blanks and an optional comment, then the end of the line. */
static bool eat_statement_end(struct cursor *c) {
  skip_blanks(c);
  if (at_end(c) || *c->p != ';')
    return false;
  c->p++;
  skip_blanks(c);
  return at_end(c) || *c->p == '#';
}

static void set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* Parses "a.b.c.d:port" or "[v6]:port" into ss. Returns a reason on failure, NULL on success. */
static const char *eat_addr(struct cursor *c, struct sockaddr_storage *ss) {
  char host[INET6_ADDRSTRLEN + 1];
  const char *start;
  size_t n;
  bool v6 = false;
  if (!at_end(c) && *c->p == '[') {
    v6 = true;
    start = ++c->p;
    while (c->p < c->end && *c->p != ']')
      c->p++;
    if (at_end(c))
      return "missing ']' in IPv6 address";
    n = (size_t)(c->p - start);
    c->p++; /* ']' */
  } else {
    start = c->p;
    while (c->p < c->end && ((*c->p >= '0' && *c->p <= '9') || *c->p == '.'))
      c->p++;
    n = (size_t)(c->p - start);
  }
  if (n == 0 || n >= sizeof(host))
    return "bad address";
  memcpy(host, start, n);
  host[n] = '\0';
  if (at_end(c) || *c->p != ':')
    return "expected ':' and a port after the address";
  c->p++;
  long port;
  if (!eat_uint(c, &port, 5) || port < 1 || port > 65535)
    return "bad port";
  memset(ss, 0, sizeof(*ss));
  if (v6) {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
      return "bad IPv6 address";
    a->sin6_family = AF_INET6;
    a->sin6_port = htons((uint16_t)port);
  } else {
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
      return "bad IPv4 address";
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
  }
  return NULL;
}

static int push_addr(struct mtp_tgconfig *cfg, size_t *cap, int dc, const struct sockaddr_storage *ss) {
  if (cfg->naddrs == *cap) {
    size_t ncap = *cap ? *cap * 2 : 16;
    struct mtp_tg_addr *na = mtp_realloc(cfg->addrs, ncap * sizeof(*na));
    if (na == NULL)
      return MTP_ENOMEM;
    cfg->addrs = na;
    *cap = ncap;
  }
  cfg->addrs[cfg->naddrs].dc = dc;
  cfg->addrs[cfg->naddrs].addr = *ss;
  cfg->naddrs++;
  return MTP_OK;
}

/* One line without its '\n'. Returns MTP_OK or an error with err set. */
static int parse_line(struct mtp_tgconfig *cfg, size_t *cap, struct cursor *c, unsigned lineno, char *err,
                      size_t errlen) {
  skip_blanks(c);
  if (at_end(c) || *c->p == '#')
    return MTP_OK;
  int dc;
  if (eat_word(c, "proxy_for")) {
    skip_blanks(c);
    if (!eat_dc(c, &dc)) {
      set_err(err, errlen, "line %u: bad DC number (expected -32768..32767)", lineno);
      return MTP_EPROTO;
    }
    if (at_end(c) || !is_blank(*c->p)) {
      set_err(err, errlen, "line %u: expected a blank after the DC number", lineno);
      return MTP_EPROTO;
    }
    skip_blanks(c);
    struct sockaddr_storage ss;
    const char *why = eat_addr(c, &ss);
    if (why != NULL) {
      set_err(err, errlen, "line %u: %s", lineno, why);
      return MTP_EPROTO;
    }
    if (!eat_statement_end(c)) {
      set_err(err, errlen, "line %u: expected ';' at the end of proxy_for", lineno);
      return MTP_EPROTO;
    }
    int rc = push_addr(cfg, cap, dc, &ss);
    if (rc != MTP_OK)
      set_err(err, errlen, "line %u: out of memory", lineno);
    return rc;
  }
  if (eat_word(c, "default")) {
    skip_blanks(c);
    if (!eat_dc(c, &dc)) {
      set_err(err, errlen, "line %u: bad DC number (expected -32768..32767)", lineno);
      return MTP_EPROTO;
    }
    if (!eat_statement_end(c)) {
      set_err(err, errlen, "line %u: expected ';' at the end of default", lineno);
      return MTP_EPROTO;
    }
    cfg->default_dc = dc; /* the official parser lets a later default win */
    cfg->has_default = true;
    return MTP_OK;
  }
  set_err(err, errlen, "line %u: unknown statement (expected proxy_for, default or #)", lineno);
  return MTP_EPROTO;
}

int mtp_tgconfig_parse(const char *text, size_t len, struct mtp_tgconfig *cfg, char *err, size_t errlen) {
  memset(cfg, 0, sizeof(*cfg));
  set_err(err, errlen, "%s", "");
  size_t cap = 0;
  const char *p = text, *end = text + len;
  unsigned lineno = 0;
  int rc = MTP_OK;
  while (p < end && rc == MTP_OK) {
    lineno++;
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    const char *le = nl ? nl : end;
    if (memchr(p, '\0', (size_t)(le - p)) != NULL) {
      set_err(err, errlen, "line %u: NUL byte", lineno);
      rc = MTP_EPROTO;
      break;
    }
    struct cursor c = {p, le};
    rc = parse_line(cfg, &cap, &c, lineno, err, errlen);
    p = nl ? nl + 1 : end;
  }
  if (rc == MTP_OK && cfg->naddrs == 0) {
    set_err(err, errlen, "no proxy_for lines (%u lines read)", lineno);
    rc = MTP_EPROTO;
  }
  if (rc != MTP_OK)
    mtp_tgconfig_free(cfg);
  return rc;
}

void mtp_tgconfig_free(struct mtp_tgconfig *cfg) {
  mtp_free(cfg->addrs);
  cfg->addrs = NULL;
  cfg->naddrs = 0;
  cfg->has_default = false;
  cfg->default_dc = 0;
}

static bool has_dc(const struct mtp_tgconfig *cfg, int dc) {
  for (size_t i = 0; i < cfg->naddrs; i++)
    if (cfg->addrs[i].dc == dc)
      return true;
  return false;
}

static size_t collect(const struct mtp_tgconfig *cfg, int dc, const struct mtp_tg_addr **out, size_t max) {
  size_t n = 0;
  for (size_t i = 0; i < cfg->naddrs && n < max; i++)
    if (cfg->addrs[i].dc == dc)
      out[n++] = &cfg->addrs[i];
  return n;
}

size_t mtp_tgconfig_lookup(const struct mtp_tgconfig *cfg, int dc, const struct mtp_tg_addr **out, size_t max,
                           bool *used_default) {
  if (used_default != NULL)
    *used_default = false;
  if (has_dc(cfg, dc))
    return collect(cfg, dc, out, max);
  if (!cfg->has_default || !has_dc(cfg, cfg->default_dc))
    return 0;
  if (used_default != NULL)
    *used_default = true;
  return collect(cfg, cfg->default_dc, out, max);
}
