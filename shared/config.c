/*
 * config.c - built-in defaults, then the JSON file (--config), then command-line flags.
 *
 * Every scalar setting is described once in `keys[]`: its JSON key, its flag (if any), its
 * type and its allowed range. The JSON reader and the flag reader both go through the same
 * setters, so a value is validated the same way wherever it comes from and the error names
 * where it came from ("--workers: ..." or "mtproxy.json: workers: ...").
 *
 * Startup-only code: the file is read with plain stdio; allocations go through mtp_malloc.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "alloc.h"
#include "err.h"
#include "log.h"
#include "obf2.h"

#include "banned.h"

#define DEFAULT_PROXY_SECRET "https://core.telegram.org/getProxySecret"
#define DEFAULT_PROXY_CONFIG "https://core.telegram.org/getProxyConfig"
#define MAX_CONFIG_FILE (1u << 20)
#define MAX_NAME_LEN 64

const char mtp_config_usage[] =
    "Usage: mtproxy [OPTIONS]\n"
    "\n"
    "Telegram MTProto proxy. Settings come from built-in defaults, then the JSON file given\n"
    "with --config, then these flags (a flag overrides the file). Every flag takes a value,\n"
    "written either as '--flag VALUE' or '--flag=VALUE'. See docs/configuration.md.\n"
    "\n"
    "Listeners and secrets:\n"
    "  --config FILE             JSON configuration file (default: none)\n"
    "  --port P                  listen on 0.0.0.0:P (listener \"v4\") and [::]:P (\"v6\")\n"
    "  --listen ADDR:PORT        listen on ADDR:PORT, e.g. 1.2.3.4:443 or [::1]:443 or 443;\n"
    "                            repeatable; listeners are named l0, l1, ...\n"
    "                            (--port/--listen replace the file's listeners)\n"
    "  --secret HEX              client secret: 32 hex digits (a 'dd' prefix is accepted,\n"
    "                            an 'ee' fake-TLS secret uses its 32 hex digits after 'ee');\n"
    "                            repeatable; applies to every command-line listener, or\n"
    "                            replaces the secrets of the file's listeners if no\n"
    "                            --port/--listen is given\n"
    "  --allowed-protocols LIST  comma list of abridged,intermediate,secure,fake_tls for\n"
    "                            command-line listeners and file listeners that do not set\n"
    "                            their own (default: all)\n"
    "  --tag HEX32               global advertising tag from @MTProxybot (default: none)\n"
    "\n"
    "Telegram:\n"
    "  --proxy-secret FILE|URL   middle-proxy secret\n"
    "                            (default: " DEFAULT_PROXY_SECRET ")\n"
    "  --proxy-config FILE|URL   middle-proxy list\n"
    "                            (default: " DEFAULT_PROXY_CONFIG ")\n"
    "  --config-refresh S        seconds between refreshes of both, >= 10 (default: 3600)\n"
    "  --cache-dir DIR           cache the last good Telegram config here (default: none)\n"
    "  --nat-info LOCAL:PUBLIC   IPv4 addresses when behind NAT, e.g. 10.0.0.5:203.0.113.7\n"
    "                            (default: none)\n"
    "\n"
    "Process:\n"
    "  --workers N               worker processes, 0..1024; 0 = number of CPUs (default: 0)\n"
    "  --handshake-timeout S     seconds a client has to finish its handshake (default: 10)\n"
    "  --idle-timeout S          seconds a client may stay silent (default: 600)\n"
    "  --public-host HOST        host name printed in proxy links (default: guessed)\n"
    "  --admin ADDR:PORT         metrics/status endpoint, e.g. 127.0.0.1:9100 (default: off)\n"
    "  --log-level L             error, warn, info or debug (default: info)\n"
    "  -h, --help                print this help and exit\n";

/* ---- errors ---- */

static int fail(char *err, size_t errlen, int code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static int fail(char *err, size_t errlen, int code, const char *fmt, ...) {
  if (err != NULL && errlen > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return code;
}

#define EINVALF(...) fail(err, errlen, MTP_EINVAL, __VA_ARGS__)
#define ENOMEMF() fail(err, errlen, MTP_ENOMEM, "out of memory")

/* ---- small parsers ---- */

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

static bool is_hex(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (hexval(s[i]) < 0)
      return false;
  return true;
}

static void hex16(const char *s, uint8_t out[16]) {
  for (int i = 0; i < 16; i++)
    out[i] = (uint8_t)(hexval(s[2 * i]) << 4 | hexval(s[2 * i + 1]));
}

/* Exactly 32 hex digits. */
static int parse_hex16(const char *s, uint8_t out[16]) {
  if (strlen(s) != 32 || !is_hex(s, 32))
    return MTP_EINVAL;
  hex16(s, out);
  return MTP_OK;
}

/* 32 hex; "dd" + 32 hex; or "ee" + 32 hex + hex-encoded domain (the domain is ignored). */
static int parse_secret(const char *s, uint8_t out[16]) {
  size_t n = strlen(s);
  if (n == 32 && is_hex(s, 32)) {
    hex16(s, out);
    return MTP_OK;
  }
  if (n == 34 && (s[0] == 'd' || s[0] == 'D') && (s[1] == 'd' || s[1] == 'D') && is_hex(s + 2, 32)) {
    hex16(s + 2, out);
    return MTP_OK;
  }
  if (n >= 34 && (n % 2) == 0 && (s[0] == 'e' || s[0] == 'E') && (s[1] == 'e' || s[1] == 'E') &&
      is_hex(s + 2, n - 2)) {
    hex16(s + 2, out);
    return MTP_OK;
  }
  return MTP_EINVAL;
}

static int parse_port(const char *s, uint16_t *port) {
  size_t n = strlen(s);
  if (n == 0 || n > 5)
    return MTP_EINVAL;
  unsigned v = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9')
      return MTP_EINVAL;
    v = v * 10 + (unsigned)(s[i] - '0');
  }
  if (v > 65535)
    return MTP_EINVAL;
  *port = (uint16_t)v;
  return MTP_OK;
}

int mtp_parse_addr_port(const char *s, struct sockaddr_storage *addr) {
  char host[INET6_ADDRSTRLEN + 1];
  uint16_t port;
  memset(addr, 0, sizeof(*addr));
  if (s[0] == '[') {
    const char *close = strchr(s, ']');
    if (close == NULL || close[1] != ':')
      return MTP_EINVAL;
    size_t hl = (size_t)(close - s - 1);
    if (hl == 0 || hl >= sizeof(host))
      return MTP_EINVAL;
    memcpy(host, s + 1, hl);
    host[hl] = '\0';
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)addr;
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) != 1 || parse_port(close + 2, &port) != MTP_OK) {
      memset(addr, 0, sizeof(*addr));
      return MTP_EINVAL;
    }
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons(port);
    return MTP_OK;
  }
  struct sockaddr_in *a4 = (struct sockaddr_in *)addr;
  const char *colon = strrchr(s, ':');
  if (colon == NULL) {
    if (parse_port(s, &port) != MTP_OK)
      return MTP_EINVAL;
    a4->sin_family = AF_INET;
    a4->sin_addr.s_addr = htonl(INADDR_ANY);
    a4->sin_port = htons(port);
    return MTP_OK;
  }
  size_t hl = (size_t)(colon - s);
  if (hl == 0 || hl >= sizeof(host))
    return MTP_EINVAL;
  memcpy(host, s, hl);
  host[hl] = '\0';
  if (inet_pton(AF_INET, host, &a4->sin_addr) != 1 || parse_port(colon + 1, &port) != MTP_OK) {
    memset(addr, 0, sizeof(*addr));
    return MTP_EINVAL;
  }
  a4->sin_family = AF_INET;
  a4->sin_port = htons(port);
  return MTP_OK;
}

void mtp_format_addr(const struct sockaddr_storage *addr, char *out, size_t outlen) {
  char host[INET6_ADDRSTRLEN];
  if (outlen == 0)
    return;
  if (addr->ss_family == AF_INET) {
    const struct sockaddr_in *a4 = (const struct sockaddr_in *)addr;
    inet_ntop(AF_INET, &a4->sin_addr, host, sizeof(host));
    snprintf(out, outlen, "%s:%u", host, (unsigned)ntohs(a4->sin_port));
  } else if (addr->ss_family == AF_INET6) {
    const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)addr;
    inet_ntop(AF_INET6, &a6->sin6_addr, host, sizeof(host));
    snprintf(out, outlen, "[%s]:%u", host, (unsigned)ntohs(a6->sin6_port));
  } else {
    snprintf(out, outlen, "?");
  }
}

static const struct {
  const char *name;
  unsigned bit;
} protocols[] = {
    {"abridged", MTP_ALLOW_ABRIDGED},
    {"intermediate", MTP_ALLOW_INTERMEDIATE},
    {"secure", MTP_ALLOW_SECURE},
    {"fake_tls", MTP_ALLOW_FAKE_TLS},
};
#define PROTOCOL_NAMES "abridged, intermediate, secure, fake_tls"

static int protocol_bit(const char *s, size_t n, unsigned *bit) {
  for (size_t i = 0; i < sizeof(protocols) / sizeof(protocols[0]); i++) {
    if (strlen(protocols[i].name) == n && strncmp(protocols[i].name, s, n) == 0) {
      *bit = protocols[i].bit;
      return MTP_OK;
    }
  }
  return MTP_EINVAL;
}

int mtp_config_parse_protocols(const char *list, unsigned *bits) {
  unsigned acc = 0;
  const char *p = list;
  for (;;) {
    const char *end = strchr(p, ',');
    if (end == NULL)
      end = p + strlen(p);
    const char *a = p, *b = end;
    while (a < b && (*a == ' ' || *a == '\t'))
      a++;
    while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
      b--;
    unsigned bit;
    if (protocol_bit(a, (size_t)(b - a), &bit) != MTP_OK)
      return MTP_EINVAL;
    acc |= bit;
    if (*end == '\0')
      break;
    p = end + 1;
  }
  *bits = acc;
  return MTP_OK;
}

static int parse_ipv4(const char *s, size_t n, uint32_t *out) {
  char buf[INET_ADDRSTRLEN + 1];
  struct in_addr a;
  if (n == 0 || n >= sizeof(buf))
    return MTP_EINVAL;
  memcpy(buf, s, n);
  buf[n] = '\0';
  if (inet_pton(AF_INET, buf, &a) != 1)
    return MTP_EINVAL;
  *out = ntohl(a.s_addr);
  return MTP_OK;
}

static int parse_nat(const char *s, uint32_t *local, uint32_t *public_) {
  const char *colon = strchr(s, ':');
  if (colon == NULL || strchr(colon + 1, ':') != NULL)
    return MTP_EINVAL;
  if (parse_ipv4(s, (size_t)(colon - s), local) != MTP_OK)
    return MTP_EINVAL;
  return parse_ipv4(colon + 1, strlen(colon + 1), public_);
}

static bool valid_name(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > MAX_NAME_LEN)
    return false;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
          c == '-' || c == '.'))
      return false;
  }
  return true;
}

static int ncpus(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  if (n < 1)
    return 1;
  if (n > 1024)
    return 1024;
  return (int)n;
}

/* ---- lifecycle ---- */

static void listener_free(struct mtp_listener_conf *l) {
  mtp_free(l->name);
  l->name = NULL;
  mtp_free(l->secrets);
  l->secrets = NULL;
  l->nsecrets = 0;
}

static void listeners_free(struct mtp_listener_conf *ls, size_t n) {
  if (ls == NULL)
    return;
  for (size_t i = 0; i < n; i++)
    listener_free(&ls[i]);
  mtp_free(ls);
}

void mtp_config_defaults(struct mtp_config *cfg) {
  memset(cfg, 0, sizeof(*cfg));
  cfg->workers = ncpus();
  cfg->handshake_timeout = 10;
  cfg->idle_timeout = 600;
  cfg->client_send_budget = 4u << 20;
  cfg->dc_conn_max_clients = 300;
  cfg->dc_connect_timeout = 10;
  /* An allocation failure leaves NULL here; mtp_config_load reports it as MTP_ENOMEM. */
  cfg->proxy_secret = mtp_strdup(DEFAULT_PROXY_SECRET);
  cfg->proxy_config = mtp_strdup(DEFAULT_PROXY_CONFIG);
  cfg->config_refresh = 3600;
  cfg->log_level = MTP_LOG_INFO;
}

void mtp_config_free(struct mtp_config *cfg) {
  if (cfg == NULL)
    return;
  listeners_free(cfg->listeners, cfg->nlisteners);
  cfg->listeners = NULL;
  cfg->nlisteners = 0;
  mtp_free(cfg->proxy_secret);
  cfg->proxy_secret = NULL;
  mtp_free(cfg->proxy_config);
  cfg->proxy_config = NULL;
  mtp_free(cfg->cache_dir);
  cfg->cache_dir = NULL;
  mtp_free(cfg->public_host);
  cfg->public_host = NULL;
  mtp_free(cfg->admin);
  cfg->admin = NULL;
}

/* ---- the scalar settings, shared by the JSON reader and the flag reader ---- */

enum key_type {
  KT_WORKERS, /* int, 0 = CPUs */
  KT_INT,     /* size_t, whole number in [lo, hi] */
  KT_SECS,    /* double in (lo, hi] or [lo, hi] */
  KT_STR,     /* owned non-empty string */
  KT_ADDR,    /* owned string that must parse as ADDR:PORT */
  KT_TAG,     /* 32 hex -> has_ad_tag + ad_tag */
  KT_NAT,     /* LOCAL:PUBLIC IPv4 */
  KT_LOG,     /* log level */
};

struct key {
  const char *json;   /* JSON key */
  const char *flag;   /* "--flag", or NULL for file-only settings */
  enum key_type type;
  size_t off;         /* offset of the field in struct mtp_config */
  double lo, hi;
  bool lo_excl;       /* lo < v instead of lo <= v */
  bool nullable;      /* JSON null (and nothing else) unsets it */
  const char *range;  /* human text for errors */
};

#define OFF(f) offsetof(struct mtp_config, f)

static const struct key keys[] = {
    {"workers", "--workers", KT_WORKERS, OFF(workers), 0, 1024, false, false, "a whole number 0..1024 (0 = number of CPUs)"},
    {"handshake_timeout", "--handshake-timeout", KT_SECS, OFF(handshake_timeout), 0, 3600, true, false, "seconds, > 0 and <= 3600"},
    {"idle_timeout", "--idle-timeout", KT_SECS, OFF(idle_timeout), 0, 604800, true, false, "seconds, > 0 and <= 604800"},
    {"client_send_budget", NULL, KT_INT, OFF(client_send_budget), 1100000, 1073741824, false, false,
     "bytes, 1100000..1073741824 (at least two maximum-size packets)"},
    {"dc_conn_max_clients", NULL, KT_INT, OFF(dc_conn_max_clients), 1, 100000, false, false, "a whole number 1..100000"},
    {"dc_connect_timeout", NULL, KT_SECS, OFF(dc_connect_timeout), 0, 3600, true, false, "seconds, > 0 and <= 3600"},
    {"proxy_secret", "--proxy-secret", KT_STR, OFF(proxy_secret), 0, 0, false, false, "a URL or file path"},
    {"proxy_config", "--proxy-config", KT_STR, OFF(proxy_config), 0, 0, false, false, "a URL or file path"},
    {"config_refresh", "--config-refresh", KT_SECS, OFF(config_refresh), 10, 604800, false, false, "seconds, 10..604800"},
    {"cache_dir", "--cache-dir", KT_STR, OFF(cache_dir), 0, 0, false, true, "a directory"},
    {"nat_info", "--nat-info", KT_NAT, 0, 0, 0, false, true, "LOCAL:PUBLIC IPv4 addresses"},
    {"ad_tag", "--tag", KT_TAG, 0, 0, 0, false, true, "32 hex characters"},
    {"public_host", "--public-host", KT_STR, OFF(public_host), 0, 0, false, true, "a host name"},
    {"admin", "--admin", KT_ADDR, OFF(admin), 0, 0, false, true, "ADDR:PORT"},
    {"log_level", "--log-level", KT_LOG, OFF(log_level), 0, 0, false, false, "error, warn, info or debug"},
};
#define NKEYS (sizeof(keys) / sizeof(keys[0]))

static bool is_numeric(enum key_type t) { return t == KT_WORKERS || t == KT_INT || t == KT_SECS; }

/* Sets a numeric key; `shown` is the value as the user wrote it (for the message). */
static int set_number(const struct key *k, const char *where, double v, const char *shown, struct mtp_config *cfg,
                      char *err, size_t errlen) {
  bool integral = k->type != KT_SECS;
  bool ok = isfinite(v) && (k->lo_excl ? v > k->lo : v >= k->lo) && v <= k->hi;
  if (ok && integral && v != floor(v))
    ok = false;
  if (!ok)
    return EINVALF("%s: '%.40s' must be %s", where, shown, k->range);
  char *base = (char *)cfg;
  switch (k->type) {
  case KT_WORKERS:
    *(int *)(base + k->off) = v == 0 ? ncpus() : (int)v;
    break;
  case KT_INT:
    *(size_t *)(base + k->off) = (size_t)v;
    break;
  default:
    *(double *)(base + k->off) = v;
    break;
  }
  return MTP_OK;
}

static int set_owned_string(char **field, const char *s, char *err, size_t errlen) {
  char *copy = mtp_strdup(s);
  if (copy == NULL)
    return ENOMEMF();
  mtp_free(*field);
  *field = copy;
  return MTP_OK;
}

/* Sets any key from its text form (a flag's value or a JSON string). */
static int set_from_text(const struct key *k, const char *where, const char *s, struct mtp_config *cfg, char *err,
                         size_t errlen) {
  char *base = (char *)cfg;
  if (is_numeric(k->type)) {
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (s[0] == '\0' || end == s || *end != '\0' || errno == ERANGE || s[0] == ' ' || s[0] == '\t')
      return EINVALF("%s: '%.40s' is not a number", where, s);
    return set_number(k, where, v, s, cfg, err, errlen);
  }
  switch (k->type) {
  case KT_STR:
    if (s[0] == '\0')
      return EINVALF("%s: must not be empty (%s)", where, k->range);
    return set_owned_string((char **)(base + k->off), s, err, errlen);
  case KT_ADDR: {
    struct sockaddr_storage ss;
    if (mtp_parse_addr_port(s, &ss) != MTP_OK)
      return EINVALF("%s: '%.80s' is not ADDR:PORT (e.g. 127.0.0.1:9100 or [::1]:9100)", where, s);
    return set_owned_string((char **)(base + k->off), s, err, errlen);
  }
  case KT_TAG:
    if (parse_hex16(s, cfg->ad_tag) != MTP_OK)
      return EINVALF("%s: '%.80s' is not 32 hex characters", where, s);
    cfg->has_ad_tag = true;
    return MTP_OK;
  case KT_NAT:
    if (parse_nat(s, &cfg->nat_local, &cfg->nat_public) != MTP_OK)
      return EINVALF("%s: '%.80s' is not LOCAL:PUBLIC IPv4 addresses (e.g. 10.0.0.5:203.0.113.7)", where, s);
    cfg->has_nat = true;
    return MTP_OK;
  case KT_LOG:
    if (mtp_log_parse_level(s, &cfg->log_level) != MTP_OK)
      return EINVALF("%s: '%.40s' is not one of error, warn, info, debug", where, s);
    return MTP_OK;
  default:
    return EINVALF("%s: internal error", where);
  }
}

static void unset_key(const struct key *k, struct mtp_config *cfg) {
  char *base = (char *)cfg;
  switch (k->type) {
  case KT_TAG:
    cfg->has_ad_tag = false;
    memset(cfg->ad_tag, 0, sizeof(cfg->ad_tag));
    break;
  case KT_NAT:
    cfg->has_nat = false;
    cfg->nat_local = cfg->nat_public = 0;
    break;
  case KT_STR:
  case KT_ADDR: {
    char **field = (char **)(base + k->off);
    mtp_free(*field);
    *field = NULL;
    break;
  }
  default:
    break;
  }
}

/* ---- JSON ---- */

static const char *json_type_name(const cJSON *j) {
  if (cJSON_IsNumber(j))
    return "a number";
  if (cJSON_IsString(j))
    return "a string";
  if (cJSON_IsBool(j))
    return "a boolean";
  if (cJSON_IsNull(j))
    return "null";
  if (cJSON_IsArray(j))
    return "an array";
  if (cJSON_IsObject(j))
    return "an object";
  return "invalid";
}

/* cJSON keeps duplicate keys; we reject them (the second would silently win). */
static const cJSON *find_duplicate(const cJSON *obj) {
  for (const cJSON *a = obj->child; a != NULL; a = a->next)
    for (const cJSON *b = a->next; b != NULL; b = b->next)
      if (a->string != NULL && b->string != NULL && strcmp(a->string, b->string) == 0)
        return b;
  return NULL;
}

static int json_scalar(const struct key *k, const char *where, const cJSON *j, struct mtp_config *cfg, char *err,
                       size_t errlen) {
  if (k->nullable && cJSON_IsNull(j)) {
    unset_key(k, cfg);
    return MTP_OK;
  }
  if (is_numeric(k->type)) {
    if (!cJSON_IsNumber(j))
      return EINVALF("%s: must be a number (%s), not %s", where, k->range, json_type_name(j));
    char shown[48];
    snprintf(shown, sizeof(shown), "%.15g", j->valuedouble);
    return set_number(k, where, j->valuedouble, shown, cfg, err, errlen);
  }
  if (!cJSON_IsString(j))
    return EINVALF("%s: must be a string (%s)%s, not %s", where, k->range, k->nullable ? " or null" : "",
                   json_type_name(j));
  return set_from_text(k, where, j->valuestring, cfg, err, errlen);
}

static int json_listener(const cJSON *obj, const char *name, size_t idx, bool allow_no_secrets,
                         struct mtp_listener_conf *l, bool *own_protocols, char *err, size_t errlen) {
  char where[256];
  const cJSON *listen = NULL;
  if (!cJSON_IsObject(obj))
    return EINVALF("%s: listeners[%zu]: must be an object, not %s", name, idx, json_type_name(obj));
  const cJSON *dup = find_duplicate(obj);
  if (dup != NULL)
    return EINVALF("%s: listeners[%zu].%s: duplicate key", name, idx, dup->string);
  l->allowed_protocols = MTP_ALLOW_ALL;
  *own_protocols = false;
  for (const cJSON *it = obj->child; it != NULL; it = it->next) {
    snprintf(where, sizeof(where), "%s: listeners[%zu].%s", name, idx, it->string);
    if (strcmp(it->string, "name") == 0) {
      if (!cJSON_IsString(it))
        return EINVALF("%s: must be a string, not %s", where, json_type_name(it));
      if (!valid_name(it->valuestring))
        return EINVALF("%s: '%.80s' must be 1..%d characters of A-Z a-z 0-9 _ - .", where, it->valuestring,
                       MAX_NAME_LEN);
      int rc = set_owned_string(&l->name, it->valuestring, err, errlen);
      if (rc != MTP_OK)
        return rc;
    } else if (strcmp(it->string, "listen") == 0) {
      if (!cJSON_IsString(it))
        return EINVALF("%s: must be a string \"ADDR:PORT\", not %s", where, json_type_name(it));
      if (mtp_parse_addr_port(it->valuestring, &l->addr) != MTP_OK)
        return EINVALF("%s: '%.80s' is not ADDR:PORT (e.g. 0.0.0.0:443 or [::]:443), port 0..65535", where,
                       it->valuestring);
      listen = it;
    } else if (strcmp(it->string, "secrets") == 0) {
      if (!cJSON_IsArray(it))
        return EINVALF("%s: must be an array of strings, not %s", where, json_type_name(it));
      int n = cJSON_GetArraySize(it);
      if (n > 0) {
        l->secrets = mtp_calloc((size_t)n, sizeof(*l->secrets));
        if (l->secrets == NULL)
          return ENOMEMF();
      }
      size_t i = 0;
      for (const cJSON *s = it->child; s != NULL; s = s->next, i++) {
        if (!cJSON_IsString(s))
          return EINVALF("%s[%zu]: must be a string, not %s", where, i, json_type_name(s));
        if (parse_secret(s->valuestring, l->secrets[i]) != MTP_OK)
          return EINVALF("%s[%zu]: '%.80s' is not 32 hex characters", where, i, s->valuestring);
        l->nsecrets = i + 1;
      }
    } else if (strcmp(it->string, "ad_tag") == 0) {
      if (cJSON_IsNull(it)) {
        l->has_ad_tag = false;
        continue;
      }
      if (!cJSON_IsString(it))
        return EINVALF("%s: must be a string of 32 hex characters, not %s", where, json_type_name(it));
      if (parse_hex16(it->valuestring, l->ad_tag) != MTP_OK)
        return EINVALF("%s: '%.80s' is not 32 hex characters", where, it->valuestring);
      l->has_ad_tag = true;
    } else if (strcmp(it->string, "allowed_protocols") == 0) {
      if (!cJSON_IsArray(it))
        return EINVALF("%s: must be an array of strings, not %s", where, json_type_name(it));
      if (it->child == NULL)
        return EINVALF("%s: must not be empty (choose from %s)", where, PROTOCOL_NAMES);
      unsigned bits = 0, bit;
      size_t i = 0;
      for (const cJSON *p = it->child; p != NULL; p = p->next, i++) {
        if (!cJSON_IsString(p))
          return EINVALF("%s[%zu]: must be a string, not %s", where, i, json_type_name(p));
        if (protocol_bit(p->valuestring, strlen(p->valuestring), &bit) != MTP_OK)
          return EINVALF("%s[%zu]: '%.40s' is not one of %s", where, i, p->valuestring, PROTOCOL_NAMES);
        bits |= bit;
      }
      l->allowed_protocols = bits;
      *own_protocols = true;
    } else {
      return EINVALF("%s: unknown key (known: name, listen, secrets, ad_tag, allowed_protocols)", where);
    }
  }
  if (listen == NULL)
    return EINVALF("%s: listeners[%zu]: missing \"listen\" (e.g. \"0.0.0.0:443\")", name, idx);
  if (l->nsecrets == 0 && !allow_no_secrets)
    return EINVALF("%s: listeners[%zu].secrets: a listener needs at least one secret", name, idx);
  if (l->name == NULL) {
    char def[32];
    snprintf(def, sizeof(def), "l%zu", idx);
    int rc = set_owned_string(&l->name, def, err, errlen);
    if (rc != MTP_OK)
      return rc;
  }
  return MTP_OK;
}

static int json_listeners(const cJSON *arr, const char *name, bool allow_no_secrets, struct mtp_config *cfg,
                          bool **own_out, char *err, size_t errlen) {
  if (!cJSON_IsArray(arr))
    return EINVALF("%s: listeners: must be an array of objects, not %s", name, json_type_name(arr));
  size_t n = (size_t)cJSON_GetArraySize(arr);
  struct mtp_listener_conf *ls = NULL;
  bool *own = NULL;
  int rc = MTP_OK;
  if (n > 0) {
    ls = mtp_calloc(n, sizeof(*ls));
    own = mtp_calloc(n, sizeof(*own));
    if (ls == NULL || own == NULL) {
      rc = ENOMEMF();
      goto out;
    }
  }
  size_t i = 0;
  for (const cJSON *it = arr->child; it != NULL; it = it->next, i++) {
    rc = json_listener(it, name, i, allow_no_secrets, &ls[i], &own[i], err, errlen);
    if (rc != MTP_OK)
      goto out;
    for (size_t j = 0; j < i; j++) {
      if (strcmp(ls[j].name, ls[i].name) == 0) {
        rc = EINVALF("%s: listeners[%zu].name: duplicate listener name '%s' (also listeners[%zu])", name, i,
                     ls[i].name, j);
        goto out;
      }
    }
  }
  listeners_free(cfg->listeners, cfg->nlisteners);
  cfg->listeners = ls;
  cfg->nlisteners = n;
  ls = NULL;
  if (own_out != NULL) {
    mtp_free(*own_out);
    *own_out = own;
    own = NULL;
  }
out:
  listeners_free(ls, n);
  mtp_free(own);
  return rc;
}

/* Applies the JSON text onto cfg. own_out (may be NULL) receives, per listener, whether it set
 * its own allowed_protocols. */
static int parse_json(const char *text, const char *name, bool allow_no_secrets, struct mtp_config *cfg,
                      bool **own_out, char *err, size_t errlen) {
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
  int rc = MTP_OK;
  if (root == NULL) {
    unsigned line = 1, col = 1;
    if (end == NULL)
      end = text;
    for (const char *p = text; p < end && *p != '\0'; p++) {
      if (*p == '\n') {
        line++;
        col = 1;
      } else {
        col++;
      }
    }
    return EINVALF("%s: line %u column %u: invalid JSON", name, line, col);
  }
  if (!cJSON_IsObject(root)) {
    rc = EINVALF("%s: the top level must be a JSON object, not %s", name, json_type_name(root));
    goto out;
  }
  const cJSON *dup = find_duplicate(root);
  if (dup != NULL) {
    rc = EINVALF("%s: %s: duplicate key", name, dup->string);
    goto out;
  }
  for (const cJSON *it = root->child; it != NULL; it = it->next) {
    char where[256];
    snprintf(where, sizeof(where), "%s: %s", name, it->string);
    if (strcmp(it->string, "listeners") == 0) {
      rc = json_listeners(it, name, allow_no_secrets, cfg, own_out, err, errlen);
    } else {
      const struct key *k = NULL;
      for (size_t i = 0; i < NKEYS; i++)
        if (strcmp(keys[i].json, it->string) == 0)
          k = &keys[i];
      if (k == NULL)
        rc = EINVALF("%s: unknown key (see docs/configuration.md)", where);
      else
        rc = json_scalar(k, where, it, cfg, err, errlen);
    }
    if (rc != MTP_OK)
      goto out;
  }
out:
  cJSON_Delete(root);
  return rc;
}

int mtp_config_parse_json(const char *text, const char *name, struct mtp_config *cfg, char *err, size_t errlen) {
  return parse_json(text, name, false, cfg, NULL, err, errlen);
}

/* Reads the whole file into a NUL-terminated mtp_malloc buffer (*out, transferred). */
static int read_file(const char *path, char **out, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return EINVALF("%s: cannot open: %s", path, strerror(errno));
  char *buf = mtp_malloc(MAX_CONFIG_FILE + 1);
  if (buf == NULL) {
    fclose(f);
    return ENOMEMF();
  }
  size_t n = fread(buf, 1, MAX_CONFIG_FILE + 1, f);
  int rc = MTP_OK;
  if (ferror(f))
    rc = EINVALF("%s: cannot read: %s", path, strerror(errno));
  else if (n > MAX_CONFIG_FILE)
    rc = EINVALF("%s: larger than %u bytes", path, MAX_CONFIG_FILE);
  else if (memchr(buf, '\0', n) != NULL)
    rc = EINVALF("%s: contains a NUL byte; not a JSON text file", path);
  fclose(f);
  if (rc != MTP_OK) {
    mtp_free(buf);
    return rc;
  }
  buf[n] = '\0';
  *out = buf;
  return MTP_OK;
}

/* ---- command line ---- */

enum flag_id { F_CONFIG, F_PORT, F_LISTEN, F_SECRET, F_PROTOCOLS, F_KEY };

struct flag {
  const char *name;
  enum flag_id id;
};

static const struct flag special_flags[] = {
    {"--config", F_CONFIG},
    {"--port", F_PORT},
    {"--listen", F_LISTEN},
    {"--secret", F_SECRET},
    {"--allowed-protocols", F_PROTOCOLS},
};

struct opt {
  enum flag_id id;
  const struct key *key; /* F_KEY only */
  const char *name;      /* borrows: static flag name */
  const char *val;       /* borrows: argv */
};

static bool lookup_flag(const char *name, size_t n, struct opt *o) {
  for (size_t i = 0; i < sizeof(special_flags) / sizeof(special_flags[0]); i++) {
    if (strlen(special_flags[i].name) == n && strncmp(special_flags[i].name, name, n) == 0) {
      o->id = special_flags[i].id;
      o->name = special_flags[i].name;
      o->key = NULL;
      return true;
    }
  }
  for (size_t i = 0; i < NKEYS; i++) {
    if (keys[i].flag != NULL && strlen(keys[i].flag) == n && strncmp(keys[i].flag, name, n) == 0) {
      o->id = F_KEY;
      o->name = keys[i].flag;
      o->key = &keys[i];
      return true;
    }
  }
  return false;
}

/* Pass 1: splits argv into (flag, value) pairs without interpreting values. */
static int scan_args(int argc, char **argv, struct opt *opts, size_t *nopts, bool *help, char *err,
                     size_t errlen) {
  size_t n = 0;
  *help = false;
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      *help = true;
      continue;
    }
    if (strncmp(a, "--", 2) != 0)
      return EINVALF("unexpected argument '%.80s' (options start with --; see --help)", a);
    const char *eq = strchr(a, '=');
    size_t nl = eq != NULL ? (size_t)(eq - a) : strlen(a);
    struct opt o;
    if (!lookup_flag(a, nl, &o))
      return EINVALF("unknown option '%.*s' (see --help)", (int)(nl > 80 ? 80 : nl), a);
    if (eq != NULL) {
      o.val = eq + 1;
    } else {
      if (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0)
        return EINVALF("%s: missing value", o.name);
      o.val = argv[++i];
    }
    opts[n++] = o;
  }
  *nopts = n;
  return MTP_OK;
}

static int add_listener(struct mtp_listener_conf **ls, size_t *n, const char *name, const struct sockaddr_storage *addr,
                        char *err, size_t errlen) {
  struct mtp_listener_conf *grown = mtp_realloc(*ls, (*n + 1) * sizeof(**ls));
  if (grown == NULL)
    return ENOMEMF();
  *ls = grown;
  struct mtp_listener_conf *l = &grown[*n];
  memset(l, 0, sizeof(*l));
  l->name = mtp_strdup(name);
  if (l->name == NULL)
    return ENOMEMF();
  l->addr = *addr;
  l->allowed_protocols = MTP_ALLOW_ALL;
  (*n)++;
  return MTP_OK;
}

static int set_secrets(struct mtp_listener_conf *l, const uint8_t (*secrets)[16], size_t n, char *err,
                       size_t errlen) {
  uint8_t(*copy)[16] = mtp_calloc(n, sizeof(*copy));
  if (copy == NULL)
    return ENOMEMF();
  memcpy(copy, secrets, n * sizeof(*copy));
  mtp_free(l->secrets);
  l->secrets = copy;
  l->nsecrets = n;
  return MTP_OK;
}

int mtp_config_load(int argc, char **argv, struct mtp_config *cfg, bool *show_help, char *err, size_t errlen) {
  struct opt *opts = NULL;
  size_t nopts = 0;
  struct mtp_config tmp;
  bool *own_protocols = NULL;
  char *text = NULL;
  struct mtp_listener_conf *cli = NULL; /* listeners from --port/--listen */
  size_t ncli = 0;
  uint8_t(*secrets)[16] = NULL;         /* from --secret */
  size_t nsecrets = 0;
  struct mtp_listener_conf port_pair[2];
  bool have_port = false, have_protocols = false;
  unsigned protocols_bits = MTP_ALLOW_ALL;
  const char *config_path = NULL;
  int rc;

  if (err != NULL && errlen > 0)
    err[0] = '\0';
  *show_help = false;
  memset(port_pair, 0, sizeof(port_pair));
  memset(&tmp, 0, sizeof(tmp));
  if (argc > 0) {
    opts = mtp_calloc((size_t)argc, sizeof(*opts));
    if (opts == NULL) {
      rc = ENOMEMF();
      goto out;
    }
  }
  bool help = false;
  rc = scan_args(argc, argv, opts, &nopts, &help, err, errlen);
  if (rc == MTP_OK && help) {
    *show_help = true;
    mtp_free(opts);
    return MTP_OK;
  }
  if (rc != MTP_OK)
    goto out;

  mtp_config_defaults(&tmp);
  if (tmp.proxy_secret == NULL || tmp.proxy_config == NULL) {
    rc = ENOMEMF();
    goto out;
  }

  for (size_t i = 0; i < nopts; i++) {
    if (opts[i].id == F_CONFIG)
      config_path = opts[i].val;
    if (opts[i].id == F_SECRET)
      nsecrets++;
  }
  if (nsecrets > 0) {
    secrets = mtp_calloc(nsecrets, sizeof(*secrets));
    if (secrets == NULL) {
      rc = ENOMEMF();
      goto out;
    }
    nsecrets = 0;
  }

  if (config_path != NULL) {
    if (config_path[0] == '\0') {
      rc = EINVALF("--config: missing value");
      goto out;
    }
    rc = read_file(config_path, &text, err, errlen);
    if (rc != MTP_OK)
      goto out;
    rc = parse_json(text, config_path, secrets != NULL, &tmp, &own_protocols, err, errlen);
    if (rc != MTP_OK)
      goto out;
  }

  for (size_t i = 0; i < nopts; i++) {
    const struct opt *o = &opts[i];
    switch (o->id) {
    case F_CONFIG:
      break;
    case F_KEY:
      rc = set_from_text(o->key, o->name, o->val, &tmp, err, errlen);
      break;
    case F_PORT: {
      uint16_t port;
      if (parse_port(o->val, &port) != MTP_OK) {
        rc = EINVALF("%s: '%.40s' is not a port number 0..65535", o->name, o->val);
        break;
      }
      /* The last --port wins. */
      struct sockaddr_in *a4 = (struct sockaddr_in *)&port_pair[0].addr;
      struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&port_pair[1].addr;
      memset(port_pair, 0, sizeof(port_pair));
      a4->sin_family = AF_INET;
      a4->sin_addr.s_addr = htonl(INADDR_ANY);
      a4->sin_port = htons(port);
      a6->sin6_family = AF_INET6;
      a6->sin6_addr = in6addr_any;
      a6->sin6_port = htons(port);
      have_port = true;
      break;
    }
    case F_LISTEN: {
      struct sockaddr_storage ss;
      char name[32];
      if (mtp_parse_addr_port(o->val, &ss) != MTP_OK) {
        rc = EINVALF("%s: '%.80s' is not ADDR:PORT (e.g. 0.0.0.0:443, [::]:443 or 443)", o->name, o->val);
        break;
      }
      snprintf(name, sizeof(name), "l%zu", ncli);
      rc = add_listener(&cli, &ncli, name, &ss, err, errlen);
      break;
    }
    case F_SECRET:
      if (parse_secret(o->val, secrets[nsecrets]) != MTP_OK)
        rc = EINVALF("%s: '%.80s' is not 32 hex characters", o->name, o->val);
      else
        nsecrets++;
      break;
    case F_PROTOCOLS:
      if (mtp_config_parse_protocols(o->val, &protocols_bits) != MTP_OK)
        rc = EINVALF("%s: '%.80s' is not a comma list of %s", o->name, o->val, PROTOCOL_NAMES);
      else
        have_protocols = true;
      break;
    }
    if (rc != MTP_OK)
      goto out;
  }

  if (have_port) {
    /* --port's pair goes first: "v4", "v6", then l0, l1, ... from --listen. */
    struct mtp_listener_conf *ls = NULL;
    size_t n = 0;
    rc = add_listener(&ls, &n, "v4", &port_pair[0].addr, err, errlen);
    if (rc == MTP_OK)
      rc = add_listener(&ls, &n, "v6", &port_pair[1].addr, err, errlen);
    for (size_t i = 0; rc == MTP_OK && i < ncli; i++)
      rc = add_listener(&ls, &n, cli[i].name, &cli[i].addr, err, errlen);
    listeners_free(cli, ncli);
    cli = ls;
    ncli = n;
    if (rc != MTP_OK)
      goto out;
  }

  if (ncli > 0) {
    /* Command-line listeners replace the file's. */
    for (size_t i = 0; i < ncli; i++) {
      cli[i].allowed_protocols = protocols_bits;
      if (nsecrets > 0 && (rc = set_secrets(&cli[i], (const uint8_t(*)[16])secrets, nsecrets, err, errlen)) != MTP_OK)
        goto out;
    }
    listeners_free(tmp.listeners, tmp.nlisteners);
    tmp.listeners = cli;
    tmp.nlisteners = ncli;
    cli = NULL;
    ncli = 0;
  } else {
    for (size_t i = 0; i < tmp.nlisteners; i++) {
      struct mtp_listener_conf *l = &tmp.listeners[i];
      if (nsecrets > 0 && (rc = set_secrets(l, (const uint8_t(*)[16])secrets, nsecrets, err, errlen)) != MTP_OK)
        goto out;
      if (have_protocols && (own_protocols == NULL || !own_protocols[i]))
        l->allowed_protocols = protocols_bits;
    }
  }

  if (tmp.nlisteners == 0) {
    rc = EINVALF("no listeners: give --port P or --listen ADDR:PORT or listeners in the config");
    goto out;
  }
  for (size_t i = 0; i < tmp.nlisteners; i++) {
    if (tmp.listeners[i].nsecrets == 0) {
      rc = EINVALF("no secret: give --secret HEX32 or listeners[].secrets (listener '%s' has none)",
                   tmp.listeners[i].name);
      goto out;
    }
  }
  if (tmp.workers < 1)
    tmp.workers = ncpus();

  *cfg = tmp;
  memset(&tmp, 0, sizeof(tmp));
  rc = MTP_OK;

out:
  if (rc != MTP_OK) {
    mtp_config_free(&tmp);
    memset(cfg, 0, sizeof(*cfg)); /* safe to mtp_config_free */
  }
  listeners_free(cli, ncli);
  mtp_free(secrets);
  mtp_free(own_protocols);
  mtp_free(text);
  mtp_free(opts);
  return rc;
}
