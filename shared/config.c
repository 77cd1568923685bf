/*
 * config.c - built-in defaults, then the JSON file (--config), then command-line flags.
 *
 * Every scalar setting is described once in `keys[]`: its JSON key, its flag (if any), its
 * type and its allowed range. The JSON reader and the flag reader both go through the same
 * setters, so a value is validated the same way wherever it comes from and the error names
 * where it came from ("--workers: ..." or "mtproxy.json: workers: ...").
 *
 * Lists of strings (tls_domains, tunnel_allowed_fronts) are described in `lists[]`: a JSON array,
 * or a repeatable flag whose values replace the file's list. "policy" and "tables" are
 * file-only and have their own readers; check_policy() ties them together. Checks that involve
 * several settings, which may come from the file and the flags, run last in finish(), which
 * also derives replay_max_age.
 *
 * mtp_config_load keeps a copy of its argv; mtp_config_reload runs the load again on it and then
 * copies the settings that need a restart from the old config (everything not in reloadable[]).
 *
 * Startup and reload code, never on a worker's loop: the file is read with plain stdio;
 * allocations go through mtp_malloc.
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
#include <strings.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "alloc.h"
#include "crypto.h"
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
    "  --log-debug LIST          comma list of modules logged at debug level (default: none)\n"
    "  --drain-timeout S         seconds clients may finish after SIGTERM, 0..3600 (default: 30)\n"
    "  --tables-file FILE        where runtime policy table edits are kept\n"
    "                            (default: CACHE_DIR/tables.json, or none without --cache-dir)\n"
    "\n"
    "Fake-TLS and domain fronting:\n"
    "  --tls-domain DOMAIN       domain a fake-TLS (ee) client may name in its SNI; repeatable;\n"
    "                            replaces the file's tls_domains (default: none = fake-TLS off)\n"
    "  --tls-clock-skew S        seconds a ClientHello time may be off, 1..86400 (default: 600)\n"
    "  --domain-fronting MODE    where failed fake-TLS connections go: off, sni (the SNI host,\n"
    "                            port 443) or HOST:PORT, e.g. 127.0.0.1:8443 (default: sni)\n"
    "  --replay-cache-mb N       memory for the replay cache in MiB, 1..4096 (default: 16)\n"
    "  --per-sni-secrets on|off  derive a different secret per tls domain (default: off)\n"
    "  --per-sni-salt SALT       the salt for --per-sni-secrets (required with it)\n"
    "\n"
    "Split mode (mtproxy-front / mtproxy-back):\n"
    "  --back HOST:PORT          front: the back's tunnel address (default: none)\n"
    "  --tunnel-listen ADDR:PORT back: where fronts connect, e.g. 0.0.0.0:8444 (default: none)\n"
    "  --tunnel-cert FILE        this node's PEM certificate for the tunnel\n"
    "  --tunnel-key FILE         its PEM private key\n"
    "  --tunnel-ca FILE          the PEM CA that signs every node's certificate\n"
    "  --tunnel-allow NAME       back: a front name (certificate CN) allowed in; repeatable;\n"
    "                            replaces the file's list (default: any front of the CA)\n"
    "  --node-name NAME          this node's name in the tunnel (default: the host name)\n"
    "\n"
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

static bool is_hex(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (mtp_hex_digit(s[i]) < 0)
      return false;
  return true;
}

static void hex16(const char *s, uint8_t out[16]) {
  for (int i = 0; i < 16; i++)
    out[i] = (uint8_t)(mtp_hex_digit(s[2 * i]) << 4 | mtp_hex_digit(s[2 * i + 1]));
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

uint64_t mtp_config_ms(double seconds) {
  if (!(seconds > 0))
    return 1;
  double ms = seconds * 1000.0 + 0.5;
  if (ms > 1e15)
    return (uint64_t)1e15;
  return ms < 1 ? 1 : (uint64_t)ms;
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

#define NAME_RULE "1..64 characters of A-Z a-z 0-9 _ - ."

/* A DNS host name: letters, digits, '-' and '.', 1..253 characters, labels of 1..63. */
static bool valid_hostname(const char *s) {
  size_t n = strlen(s), label = 0;
  if (n == 0 || n > 253)
    return false;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (c == '.') {
      if (label == 0)
        return false;
      label = 0;
      continue;
    }
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-'))
      return false;
    if (++label > 63)
      return false;
  }
  return label > 0;
}

#define HOSTNAME_RULE "a host name: letters, digits, '-' and '.', 1..253 characters, labels of 1..63"

static void lower_ascii(char *s) {
  for (; *s != '\0'; s++)
    if (*s >= 'A' && *s <= 'Z')
      *s = (char)(*s - 'A' + 'a');
}

/* "name:PORT", "1.2.3.4:PORT" or "[IPv6]:PORT" with PORT 1..65535. host (hostlen >= 254) gets
 * the host without brackets; names are lower-cased. A name of digits and dots only must be a
 * valid IPv4 address, so "1.2.3:443" is caught here rather than by the resolver. */
static int parse_host_port(const char *s, char *host, size_t hostlen, uint16_t *port) {
  const char *colon;
  size_t hl;
  if (s[0] == '[') {
    const char *close = strchr(s, ']');
    struct in6_addr a6;
    if (close == NULL || close[1] != ':')
      return MTP_EINVAL;
    hl = (size_t)(close - s - 1);
    if (hl == 0 || hl >= hostlen)
      return MTP_EINVAL;
    memcpy(host, s + 1, hl);
    host[hl] = '\0';
    if (inet_pton(AF_INET6, host, &a6) != 1)
      return MTP_EINVAL;
    colon = close + 1;
  } else {
    colon = strchr(s, ':');
    if (colon == NULL || strchr(colon + 1, ':') != NULL)
      return MTP_EINVAL;
    hl = (size_t)(colon - s);
    if (hl == 0 || hl >= hostlen)
      return MTP_EINVAL;
    memcpy(host, s, hl);
    host[hl] = '\0';
    if (!valid_hostname(host))
      return MTP_EINVAL;
    if (strspn(host, "0123456789.") == hl) {
      struct in_addr a4;
      if (inet_pton(AF_INET, host, &a4) != 1)
        return MTP_EINVAL;
    }
    lower_ascii(host);
  }
  if (parse_port(colon + 1, port) != MTP_OK || *port == 0)
    return MTP_EINVAL;
  return MTP_OK;
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

static void strings_free(char **v, size_t n) {
  if (v == NULL)
    return;
  for (size_t i = 0; i < n; i++)
    mtp_free(v[i]);
  mtp_free(v);
}

static void listener_free(struct mtp_listener_conf *l) {
  mtp_free(l->name);
  l->name = NULL;
  mtp_free(l->secrets);
  l->secrets = NULL;
  l->nsecrets = 0;
  strings_free(l->tls_domains, l->ntls_domains);
  l->tls_domains = NULL;
  l->ntls_domains = 0;
}

static void listeners_free(struct mtp_listener_conf *ls, size_t n) {
  if (ls == NULL)
    return;
  for (size_t i = 0; i < n; i++)
    listener_free(&ls[i]);
  mtp_free(ls);
}

static void rules_free(struct mtp_policy_rule_conf *rules, size_t n) {
  if (rules == NULL)
    return;
  for (size_t i = 0; i < n; i++)
    mtp_free(rules[i].table);
  mtp_free(rules);
}

static void tables_free(struct mtp_table_conf *tables, size_t n) {
  if (tables == NULL)
    return;
  for (size_t i = 0; i < n; i++) {
    mtp_free(tables[i].name);
    strings_free(tables[i].entries, tables[i].nentries);
  }
  mtp_free(tables);
}

/* The default replay_max_age: the least that still covers a ClientHello timestamp `skew` off
 * in either direction. */
static uint32_t min_replay_age(double skew) { return (uint32_t)ceil(2 * skew); }

/* This host's name when it is a valid node name, else "node". */
static char *default_node_name(void) {
  char host[256];
  if (gethostname(host, sizeof(host)) != 0)
    return mtp_strdup("node");
  host[sizeof(host) - 1] = '\0';
  return mtp_strdup(valid_name(host) ? host : "node");
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

  cfg->tls_clock_skew = 600;
  cfg->tls_record_size = 16384;
  cfg->tls_flight_size = 0;
  cfg->tls_probe_interval = 3600;
  cfg->fronting_mode = MTP_FRONTING_SNI;
  cfg->fronting_connect_timeout = 10;
  cfg->fronting_idle_timeout = 120;
  cfg->replay_cache_bytes = (size_t)16 << 20;
  cfg->replay_max_age = min_replay_age(cfg->tls_clock_skew);

  cfg->tunnel_conns = 1;
  cfg->tunnel_heartbeat = 5;
  cfg->tunnel_timeout = 20;
  cfg->tunnel_window = (1u << 20) + (64u << 10);
  cfg->node_name = default_node_name();

  cfg->drain_timeout = 30;
}

void mtp_config_free(struct mtp_config *cfg) {
  if (cfg == NULL)
    return;
  listeners_free(cfg->listeners, cfg->nlisteners);
  cfg->listeners = NULL;
  cfg->nlisteners = 0;
  char **owned[] = {&cfg->proxy_secret, &cfg->proxy_config, &cfg->cache_dir,     &cfg->public_host,
                    &cfg->admin,        &cfg->log_debug,    &cfg->fronting_host, &cfg->per_sni_salt,
                    &cfg->back,         &cfg->tunnel_listen, &cfg->tunnel_cert,  &cfg->tunnel_key,
                    &cfg->tunnel_ca,    &cfg->node_name,    &cfg->tables_file,   &cfg->config_path};
  for (size_t i = 0; i < sizeof(owned) / sizeof(owned[0]); i++) {
    mtp_free(*owned[i]);
    *owned[i] = NULL;
  }
  strings_free(cfg->tls_domains, cfg->ntls_domains);
  cfg->tls_domains = NULL;
  cfg->ntls_domains = 0;
  strings_free(cfg->tunnel_allowed_fronts, cfg->ntunnel_allowed_fronts);
  cfg->tunnel_allowed_fronts = NULL;
  cfg->ntunnel_allowed_fronts = 0;
  rules_free(cfg->policy, cfg->npolicy);
  cfg->policy = NULL;
  cfg->npolicy = 0;
  tables_free(cfg->tables, cfg->ntables);
  cfg->tables = NULL;
  cfg->ntables = 0;
  strings_free(cfg->_argv, (size_t)cfg->_argc);
  cfg->_argv = NULL;
  cfg->_argc = 0;
}

const char *const *mtp_config_tls_domains(const struct mtp_config *cfg, const struct mtp_listener_conf *l,
                                          size_t *n) {
  if (l != NULL && l->ntls_domains > 0) {
    *n = l->ntls_domains;
    return (const char *const *)l->tls_domains;
  }
  *n = cfg->ntls_domains;
  return (const char *const *)cfg->tls_domains;
}

bool mtp_config_serves_fake_tls(const struct mtp_config *cfg, const struct mtp_listener_conf *l) {
  size_t n;
  mtp_config_tls_domains(cfg, l, &n);
  return (l->allowed_protocols & MTP_ALLOW_FAKE_TLS) != 0 && n > 0 && l->nsecrets > 0;
}

/* ---- the scalar settings, shared by the JSON reader and the flag reader ---- */

enum key_type {
  KT_WORKERS,  /* int, 0 = CPUs */
  KT_INT,      /* size_t, whole number in [lo, hi] */
  KT_INT0,     /* size_t, 0 or a whole number in [lo, hi] */
  KT_INTI,     /* int, whole number in [lo, hi] */
  KT_U32,      /* uint32_t, whole number in [lo, hi] */
  KT_MB,       /* size_t bytes, given as a whole number of MiB in [lo, hi] */
  KT_SECS,     /* double in (lo, hi] or [lo, hi] */
  KT_STR,      /* owned non-empty string */
  KT_ADDR,     /* owned string that must parse as ADDR:PORT */
  KT_HOSTPORT, /* owned string that must parse as HOST:PORT (a name, IPv4 or [IPv6]; port 1..65535) */
  KT_NAME,     /* owned string of NAME_RULE */
  KT_BOOL,     /* bool; JSON true/false, text on/off */
  KT_TAG,      /* 32 hex -> has_ad_tag + ad_tag */
  KT_NAT,      /* LOCAL:PUBLIC IPv4 */
  KT_LOG,      /* log level */
  KT_FRONTING, /* off | sni | HOST:PORT -> fronting_mode, fronting_host, fronting_port */
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
    {"log_debug", "--log-debug", KT_STR, OFF(log_debug), 0, 0, false, true, "a comma list of module names"},
    /* fake-TLS, fronting, replay (issue 3) */
    {"tls_clock_skew", "--tls-clock-skew", KT_SECS, OFF(tls_clock_skew), 1, 86400, false, false, "seconds, 1..86400"},
    {"tls_record_size", NULL, KT_INT, OFF(tls_record_size), 256, 16384, false, false, "bytes, 256..16384"},
    {"tls_flight_size", NULL, KT_INT0, OFF(tls_flight_size), 64, 16384, false, false,
     "0 (learn from the fronted host) or bytes 64..16384"},
    {"tls_probe_interval", NULL, KT_SECS, OFF(tls_probe_interval), 60, 604800, false, false, "seconds, 60..604800"},
    {"domain_fronting", "--domain-fronting", KT_FRONTING, 0, 0, 0, false, false,
     "off, sni or HOST:PORT (e.g. 127.0.0.1:8443 or [::1]:8443)"},
    {"fronting_connect_timeout", NULL, KT_SECS, OFF(fronting_connect_timeout), 0, 3600, true, false,
     "seconds, > 0 and <= 3600"},
    {"fronting_idle_timeout", NULL, KT_SECS, OFF(fronting_idle_timeout), 0, 604800, true, false,
     "seconds, > 0 and <= 604800"},
    {"replay_cache_mb", "--replay-cache-mb", KT_MB, OFF(replay_cache_bytes), 1, 4096, false, false,
     "a whole number of MiB 1..4096"},
    {"replay_max_age", NULL, KT_U32, OFF(replay_max_age), 0, 2592000, false, false,
     "seconds, a whole number 0..2592000 (0 = 2 * tls_clock_skew)"},
    {"per_sni_secrets", "--per-sni-secrets", KT_BOOL, OFF(per_sni_secrets), 0, 0, false, false, "on or off"},
    {"per_sni_salt", "--per-sni-salt", KT_STR, OFF(per_sni_salt), 0, 0, false, true, "a salt string"},
    /* split mode (issue 4) */
    {"back", "--back", KT_HOSTPORT, OFF(back), 0, 0, false, true, "HOST:PORT"},
    {"tunnel_listen", "--tunnel-listen", KT_ADDR, OFF(tunnel_listen), 0, 0, false, true, "ADDR:PORT"},
    {"tunnel_cert", "--tunnel-cert", KT_STR, OFF(tunnel_cert), 0, 0, false, true, "a PEM file path"},
    {"tunnel_key", "--tunnel-key", KT_STR, OFF(tunnel_key), 0, 0, false, true, "a PEM file path"},
    {"tunnel_ca", "--tunnel-ca", KT_STR, OFF(tunnel_ca), 0, 0, false, true, "a PEM file path"},
    {"tunnel_conns", NULL, KT_INTI, OFF(tunnel_conns), 1, 64, false, false, "a whole number 1..64"},
    {"tunnel_heartbeat", NULL, KT_SECS, OFF(tunnel_heartbeat), 0, 3600, true, false, "seconds, > 0 and <= 3600"},
    {"tunnel_timeout", NULL, KT_SECS, OFF(tunnel_timeout), 0, 86400, true, false, "seconds, > 0 and <= 86400"},
    {"tunnel_window", NULL, KT_INT, OFF(tunnel_window), 65536, 67108864, false, false, "bytes, 65536..67108864"},
    {"node_name", "--node-name", KT_NAME, OFF(node_name), 0, 0, false, false, NAME_RULE},
    /* policy and operations (issue 5) */
    {"tables_file", "--tables-file", KT_STR, OFF(tables_file), 0, 0, false, true, "a file path"},
    {"drain_timeout", "--drain-timeout", KT_SECS, OFF(drain_timeout), 0, 3600, false, false, "seconds, 0..3600"},
};
#define NKEYS (sizeof(keys) / sizeof(keys[0]))

/* Settings that are lists of strings: a JSON array, or a repeatable flag whose values replace
 * the file's list. */
enum list_kind {
  LK_DOMAIN, /* HOSTNAME_RULE, lower-cased */
  LK_NAME,   /* NAME_RULE */
  LK_VALUE,  /* a table entry: 1..255 printable characters; checked against its key by check_policy */
};

struct list_key {
  const char *json;
  const char *flag;
  enum list_kind kind;
  size_t off, noff; /* char ** and its size_t count in struct mtp_config */
};

static const struct list_key lists[] = {
    {"tls_domains", "--tls-domain", LK_DOMAIN, OFF(tls_domains), OFF(ntls_domains)},
    {"tunnel_allowed_fronts", "--tunnel-allow", LK_NAME, OFF(tunnel_allowed_fronts), OFF(ntunnel_allowed_fronts)},
};
#define NLISTS (sizeof(lists) / sizeof(lists[0]))

static bool is_numeric(enum key_type t) {
  return t == KT_WORKERS || t == KT_INT || t == KT_INT0 || t == KT_INTI || t == KT_U32 || t == KT_MB ||
         t == KT_SECS;
}

/* Sets a numeric key; `shown` is the value as the user wrote it (for the message). */
static int set_number(const struct key *k, const char *where, double v, const char *shown, struct mtp_config *cfg,
                      char *err, size_t errlen) {
  bool integral = k->type != KT_SECS;
  bool ok = isfinite(v) && (k->lo_excl ? v > k->lo : v >= k->lo) && v <= k->hi;
  if (k->type == KT_INT0 && v == 0)
    ok = true;
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
  case KT_INT0:
    *(size_t *)(base + k->off) = (size_t)v;
    break;
  case KT_INTI:
    *(int *)(base + k->off) = (int)v;
    break;
  case KT_U32:
    *(uint32_t *)(base + k->off) = (uint32_t)v;
    break;
  case KT_MB:
    *(size_t *)(base + k->off) = (size_t)v << 20;
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

static int parse_bool(const char *s, bool *out) {
  static const char *const yes[] = {"on", "true", "yes", "1"}, *const no[] = {"off", "false", "no", "0"};
  for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
    if (strcmp(s, yes[i]) == 0) {
      *out = true;
      return MTP_OK;
    }
    if (strcmp(s, no[i]) == 0) {
      *out = false;
      return MTP_OK;
    }
  }
  return MTP_EINVAL;
}

static int set_fronting(const char *where, const char *s, struct mtp_config *cfg, char *err, size_t errlen) {
  char host[256];
  uint16_t port;
  if (strcmp(s, "off") == 0 || strcmp(s, "sni") == 0) {
    cfg->fronting_mode = s[0] == 'o' ? MTP_FRONTING_OFF : MTP_FRONTING_SNI;
    mtp_free(cfg->fronting_host);
    cfg->fronting_host = NULL;
    cfg->fronting_port = 0;
    return MTP_OK;
  }
  if (parse_host_port(s, host, sizeof(host), &port) != MTP_OK)
    return EINVALF("%s: '%.80s' is not off, sni or HOST:PORT (e.g. 127.0.0.1:8443 or [::1]:8443; port 1..65535)",
                   where, s);
  int rc = set_owned_string(&cfg->fronting_host, host, err, errlen);
  if (rc != MTP_OK)
    return rc;
  cfg->fronting_mode = MTP_FRONTING_HOST;
  cfg->fronting_port = port;
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
  case KT_HOSTPORT: {
    char host[256];
    uint16_t port;
    if (parse_host_port(s, host, sizeof(host), &port) != MTP_OK)
      return EINVALF("%s: '%.80s' is not HOST:PORT (e.g. back.example.com:8444, 192.0.2.7:8444 or "
                     "[2001:db8::7]:8444; port 1..65535)",
                     where, s);
    return set_owned_string((char **)(base + k->off), s, err, errlen);
  }
  case KT_NAME:
    if (!valid_name(s))
      return EINVALF("%s: '%.80s' must be %s", where, s, NAME_RULE);
    return set_owned_string((char **)(base + k->off), s, err, errlen);
  case KT_BOOL:
    if (parse_bool(s, (bool *)(base + k->off)) != MTP_OK)
      return EINVALF("%s: '%.40s' is not on or off", where, s);
    return MTP_OK;
  case KT_FRONTING:
    return set_fronting(where, s, cfg, err, errlen);
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
  case KT_ADDR:
  case KT_HOSTPORT:
  case KT_NAME: {
    char **field = (char **)(base + k->off);
    mtp_free(*field);
    *field = NULL;
    break;
  }
  default:
    break;
  }
}

/* ---- lists of strings ---- */

static char ***list_items(const struct list_key *lk, void *base) { return (char ***)((char *)base + lk->off); }
static size_t *list_count(const struct list_key *lk, void *base) { return (size_t *)((char *)base + lk->noff); }

/* Validates s for `kind` and appends a normalised copy to (*items, *n). */
static int list_add(enum list_kind kind, const char *where, const char *s, char ***items, size_t *n, char *err,
                    size_t errlen) {
  if (kind == LK_DOMAIN && !valid_hostname(s))
    return EINVALF("%s: '%.80s' is not %s", where, s, HOSTNAME_RULE);
  if (kind == LK_NAME && !valid_name(s))
    return EINVALF("%s: '%.80s' must be %s", where, s, NAME_RULE);
  if (kind == LK_VALUE) {
    size_t len = strlen(s);
    bool printable = len > 0 && len <= 255;
    for (size_t i = 0; printable && i < len; i++)
      printable = (unsigned char)s[i] > ' ' && s[i] != 0x7f;
    if (!printable)
      return EINVALF("%s: '%.80s' must be 1..255 printable characters without spaces", where, s);
  }
  for (size_t i = 0; i < *n; i++)
    if ((kind == LK_DOMAIN ? strcasecmp((*items)[i], s) : strcmp((*items)[i], s)) == 0)
      return EINVALF("%s: '%.80s' is given twice", where, s);
  char *copy = mtp_strdup(s);
  if (copy == NULL)
    return ENOMEMF();
  if (kind == LK_DOMAIN)
    lower_ascii(copy);
  char **grown = mtp_realloc(*items, (*n + 1) * sizeof(*grown));
  if (grown == NULL) {
    mtp_free(copy);
    return ENOMEMF();
  }
  grown[*n] = copy;
  *items = grown;
  (*n)++;
  return MTP_OK;
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
  if (k->type == KT_BOOL) {
    if (!cJSON_IsBool(j))
      return EINVALF("%s: must be true or false, not %s", where, json_type_name(j));
    *(bool *)((char *)cfg + k->off) = cJSON_IsTrue(j);
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

/* A JSON array of strings (or null = empty) replaces (*items, *n). */
static int json_list(enum list_kind kind, const char *where, const cJSON *j, char ***items, size_t *n, char *err,
                     size_t errlen) {
  char **v = NULL;
  size_t nv = 0, i = 0;
  int rc = MTP_OK;
  if (!cJSON_IsArray(j) && !cJSON_IsNull(j))
    return EINVALF("%s: must be an array of strings, not %s", where, json_type_name(j));
  for (const cJSON *p = cJSON_IsArray(j) ? j->child : NULL; p != NULL; p = p->next, i++) {
    char w[320];
    snprintf(w, sizeof(w), "%.300s[%zu]", where, i);
    if (!cJSON_IsString(p)) {
      rc = EINVALF("%s: must be a string, not %s", w, json_type_name(p));
      goto out;
    }
    rc = list_add(kind, w, p->valuestring, &v, &nv, err, errlen);
    if (rc != MTP_OK)
      goto out;
  }
  strings_free(*items, *n);
  *items = v;
  *n = nv;
  v = NULL;
  nv = 0;
out:
  strings_free(v, nv);
  return rc;
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
    } else if (strcmp(it->string, "tls_domains") == 0) {
      int rc = json_list(LK_DOMAIN, where, it, &l->tls_domains, &l->ntls_domains, err, errlen);
      if (rc != MTP_OK)
        return rc;
    } else {
      return EINVALF("%s: unknown key (known: name, listen, secrets, ad_tag, allowed_protocols, tls_domains)",
                     where);
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

/* ---- policy and tables (file only) ---- */

#define RULE_NAMES "in_table, not_in_table, max_connections"
#define PKEY_NAMES "listener, client_ipv4, client_ipv6, ipv4/M (M 0..32), ipv6/M (M 0..128), tls_domain"
#define MAX_RULE_MAX 9007199254740992.0 /* 2^53: every whole number up to here is exact in JSON */

static const char *const rule_names[] = {"in_table", "not_in_table", "max_connections"};

static const struct {
  const char *name;
  enum mtp_policy_key key;
} plain_pkeys[] = {
    {"listener", MTP_PKEY_LISTENER},
    {"client_ipv4", MTP_PKEY_CLIENT_IPV4},
    {"client_ipv6", MTP_PKEY_CLIENT_IPV6},
    {"tls_domain", MTP_PKEY_TLS_DOMAIN},
};

/* A prefix length: 1..3 digits, at most max. */
static int parse_prefix(const char *d, int max, int *out) {
  size_t n = strlen(d);
  if (n == 0 || n > 3 || strspn(d, "0123456789") != n)
    return MTP_EINVAL;
  int v = 0;
  for (size_t i = 0; i < n; i++)
    v = v * 10 + (d[i] - '0');
  if (v > max)
    return MTP_EINVAL;
  *out = v;
  return MTP_OK;
}

static int parse_pkey(const char *s, struct mtp_policy_keyspec *k) {
  for (size_t i = 0; i < sizeof(plain_pkeys) / sizeof(plain_pkeys[0]); i++) {
    if (strcmp(s, plain_pkeys[i].name) == 0) {
      k->key = plain_pkeys[i].key;
      k->prefix = 0;
      return MTP_OK;
    }
  }
  bool v4 = strncmp(s, "ipv4/", 5) == 0, v6 = strncmp(s, "ipv6/", 5) == 0;
  if (!v4 && !v6)
    return MTP_EINVAL;
  if (parse_prefix(s + 5, v4 ? 32 : 128, &k->prefix) != MTP_OK)
    return MTP_EINVAL;
  k->key = v4 ? MTP_PKEY_IPV4_SUBNET : MTP_PKEY_IPV6_SUBNET;
  return MTP_OK;
}

static void pkey_str(const struct mtp_policy_keyspec *k, char *out, size_t outlen) {
  if (k->key == MTP_PKEY_IPV4_SUBNET || k->key == MTP_PKEY_IPV6_SUBNET) {
    snprintf(out, outlen, "ipv%c/%d", k->key == MTP_PKEY_IPV4_SUBNET ? '4' : '6', k->prefix);
    return;
  }
  for (size_t i = 0; i < sizeof(plain_pkeys) / sizeof(plain_pkeys[0]); i++)
    if (plain_pkeys[i].key == k->key)
      snprintf(out, outlen, "%s", plain_pkeys[i].name);
}

/* One element of "policy". r is zeroed by the caller; what it owns is freed by the caller. */
static int json_rule(const cJSON *obj, const char *name, size_t idx, struct mtp_policy_rule_conf *r, char *err,
                     size_t errlen) {
  char where[320];
  if (!cJSON_IsObject(obj))
    return EINVALF("%s: policy[%zu]: must be an object, not %s", name, idx, json_type_name(obj));
  const cJSON *dup = find_duplicate(obj);
  if (dup != NULL)
    return EINVALF("%s: policy[%zu].%s: duplicate key", name, idx, dup->string);
  const cJSON *rule = cJSON_GetObjectItemCaseSensitive(obj, "rule");
  if (rule == NULL)
    return EINVALF("%s: policy[%zu]: missing \"rule\" (one of %s)", name, idx, RULE_NAMES);
  if (!cJSON_IsString(rule))
    return EINVALF("%s: policy[%zu].rule: must be a string, not %s", name, idx, json_type_name(rule));
  size_t kind = 0;
  while (kind < 3 && strcmp(rule->valuestring, rule_names[kind]) != 0)
    kind++;
  if (kind == 3)
    return EINVALF("%s: policy[%zu].rule: '%.40s' is not one of %s", name, idx, rule->valuestring, RULE_NAMES);
  r->kind = (enum mtp_policy_rule_kind)kind;
  bool table_rule = r->kind != MTP_PRULE_MAX_CONNECTIONS, have_max = false;
  for (const cJSON *it = obj->child; it != NULL; it = it->next) {
    snprintf(where, sizeof(where), "%.200s: policy[%zu].%.64s", name, idx, it->string);
    if (strcmp(it->string, "rule") == 0) {
      continue;
    } else if (table_rule && strcmp(it->string, "key") == 0) {
      if (!cJSON_IsString(it))
        return EINVALF("%s: must be a string, not %s", where, json_type_name(it));
      if (parse_pkey(it->valuestring, &r->keys[0]) != MTP_OK)
        return EINVALF("%s: '%.40s' is not one of %s", where, it->valuestring, PKEY_NAMES);
      r->nkeys = 1;
    } else if (table_rule && strcmp(it->string, "table") == 0) {
      if (!cJSON_IsString(it))
        return EINVALF("%s: must be a string, not %s", where, json_type_name(it));
      if (!valid_name(it->valuestring))
        return EINVALF("%s: '%.80s' must be %s", where, it->valuestring, NAME_RULE);
      int rc = set_owned_string(&r->table, it->valuestring, err, errlen);
      if (rc != MTP_OK)
        return rc;
    } else if (!table_rule && strcmp(it->string, "keys") == 0) {
      if (!cJSON_IsArray(it))
        return EINVALF("%s: must be an array of strings, not %s", where, json_type_name(it));
      if (cJSON_GetArraySize(it) > MTP_POLICY_MAX_KEYS)
        return EINVALF("%s: at most %d keys", where, MTP_POLICY_MAX_KEYS);
      r->nkeys = 0;
      for (const cJSON *p = it->child; p != NULL; p = p->next) {
        size_t i = r->nkeys;
        if (!cJSON_IsString(p))
          return EINVALF("%s[%zu]: must be a string, not %s", where, i, json_type_name(p));
        if (parse_pkey(p->valuestring, &r->keys[i]) != MTP_OK)
          return EINVALF("%s[%zu]: '%.40s' is not one of %s", where, i, p->valuestring, PKEY_NAMES);
        for (size_t j = 0; j < i; j++)
          if (r->keys[j].key == r->keys[i].key && r->keys[j].prefix == r->keys[i].prefix)
            return EINVALF("%s[%zu]: '%.40s' is given twice", where, i, p->valuestring);
        r->nkeys = i + 1;
      }
    } else if (!table_rule && strcmp(it->string, "max") == 0) {
      if (!cJSON_IsNumber(it))
        return EINVALF("%s: must be a number (a whole number >= 1), not %s", where, json_type_name(it));
      double v = it->valuedouble;
      if (!isfinite(v) || v < 1 || v > MAX_RULE_MAX || v != floor(v))
        return EINVALF("%s: '%.15g' must be a whole number >= 1", where, v);
      r->max = (uint64_t)v;
      have_max = true;
    } else {
      return EINVALF("%s: unknown key (rule %s takes %s)", where, rule_names[kind],
                     table_rule ? "rule, key, table" : "rule, keys, max");
    }
  }
  if (table_rule && r->nkeys == 0)
    return EINVALF("%s: policy[%zu]: missing \"key\" (one of %s)", name, idx, PKEY_NAMES);
  if (table_rule && r->table == NULL)
    return EINVALF("%s: policy[%zu]: missing \"table\" (a name in \"tables\")", name, idx);
  if (!table_rule && !have_max)
    return EINVALF("%s: policy[%zu]: missing \"max\" (a whole number >= 1)", name, idx);
  return MTP_OK;
}

static int json_policy(const cJSON *arr, const char *name, struct mtp_config *cfg, char *err, size_t errlen) {
  if (!cJSON_IsArray(arr))
    return EINVALF("%s: policy: must be an array of objects, not %s", name, json_type_name(arr));
  size_t n = (size_t)cJSON_GetArraySize(arr), i = 0;
  struct mtp_policy_rule_conf *rules = NULL;
  int rc = MTP_OK;
  if (n > 0 && (rules = mtp_calloc(n, sizeof(*rules))) == NULL)
    return ENOMEMF();
  for (const cJSON *it = arr->child; it != NULL; it = it->next, i++) {
    rc = json_rule(it, name, i, &rules[i], err, errlen);
    if (rc != MTP_OK)
      goto out;
  }
  rules_free(cfg->policy, cfg->npolicy);
  cfg->policy = rules;
  cfg->npolicy = n;
  rules = NULL;
out:
  rules_free(rules, n);
  return rc;
}

static int json_tables(const cJSON *obj, const char *name, struct mtp_config *cfg, char *err, size_t errlen) {
  if (!cJSON_IsObject(obj))
    return EINVALF("%s: tables: must be an object of arrays of strings, not %s", name, json_type_name(obj));
  const cJSON *dup = find_duplicate(obj);
  if (dup != NULL)
    return EINVALF("%s: tables.%s: duplicate key", name, dup->string);
  size_t n = (size_t)cJSON_GetArraySize(obj), i = 0;
  struct mtp_table_conf *ts = NULL;
  int rc = MTP_OK;
  if (n > 0 && (ts = mtp_calloc(n, sizeof(*ts))) == NULL)
    return ENOMEMF();
  for (const cJSON *it = obj->child; it != NULL; it = it->next, i++) {
    char where[320];
    snprintf(where, sizeof(where), "%.200s: tables.%.80s", name, it->string);
    if (!valid_name(it->string)) {
      rc = EINVALF("%s: a table name must be %s", where, NAME_RULE);
      goto out;
    }
    if (!cJSON_IsArray(it)) {
      rc = EINVALF("%s: must be an array of strings, not %s", where, json_type_name(it));
      goto out;
    }
    rc = set_owned_string(&ts[i].name, it->string, err, errlen);
    if (rc == MTP_OK)
      rc = json_list(LK_VALUE, where, it, &ts[i].entries, &ts[i].nentries, err, errlen);
    if (rc != MTP_OK)
      goto out;
  }
  tables_free(cfg->tables, cfg->ntables);
  cfg->tables = ts;
  cfg->ntables = n;
  ts = NULL;
out:
  tables_free(ts, n);
  return rc;
}

/* What a table's entries must look like, from the keys the rules match against it. */
enum { TK_NAME = MTP_PENTRY_NAME, TK_DOMAIN = MTP_PENTRY_DOMAIN, TK_V4 = MTP_PENTRY_V4, TK_V6 = MTP_PENTRY_V6 };

unsigned mtp_policy_key_entry(enum mtp_policy_key k) {
  switch (k) {
  case MTP_PKEY_LISTENER:
    return MTP_PENTRY_NAME;
  case MTP_PKEY_TLS_DOMAIN:
    return MTP_PENTRY_DOMAIN;
  case MTP_PKEY_CLIENT_IPV4:
  case MTP_PKEY_IPV4_SUBNET:
    return MTP_PENTRY_V4;
  default:
    return MTP_PENTRY_V6;
  }
}

int mtp_parse_ip_prefix(const char *s, int *family, uint8_t addr[16], int *prefix) {
  char buf[INET6_ADDRSTRLEN]; /* the longest address text fits */
  const char *slash = strchr(s, '/');
  size_t hl = slash != NULL ? (size_t)(slash - s) : strlen(s);
  if (hl == 0 || hl >= sizeof(buf))
    return MTP_EINVAL;
  memcpy(buf, s, hl);
  buf[hl] = '\0';
  int af = inet_pton(AF_INET, buf, addr) == 1 ? AF_INET : inet_pton(AF_INET6, buf, addr) == 1 ? AF_INET6 : 0;
  if (af == 0)
    return MTP_EINVAL;
  int max = af == AF_INET ? 32 : 128, pfx = max;
  if (slash != NULL && parse_prefix(slash + 1, max, &pfx) != MTP_OK)
    return MTP_EINVAL;
  *family = af;
  *prefix = pfx;
  return MTP_OK;
}

/* An address of family af, optionally followed by "/PREFIX". */
static bool ip_entry(const char *s, int af) {
  uint8_t a[16];
  int fam, prefix;
  return mtp_parse_ip_prefix(s, &fam, a, &prefix) == MTP_OK && fam == af;
}

static bool entry_fits(const char *v, unsigned kinds) {
  return ((kinds & TK_NAME) && valid_name(v)) || ((kinds & TK_DOMAIN) && valid_hostname(v)) ||
         ((kinds & TK_V4) && ip_entry(v, AF_INET)) || ((kinds & TK_V6) && ip_entry(v, AF_INET6));
}

static void kinds_str(unsigned kinds, char *out, size_t outlen) {
  static const char *const what[] = {"a listener name", "a host name", "an IPv4 address or network",
                                     "an IPv6 address or network"};
  size_t used = 0;
  out[0] = '\0';
  for (int b = 0; b < 4; b++) {
    if ((kinds & (1u << b)) && used < outlen) {
      int w = snprintf(out + used, outlen - used, "%s%s", used > 0 ? " or " : "", what[b]);
      used += w > 0 ? (size_t)w : 0;
    }
  }
}

/* Every rule's table exists, and every entry of a table fits the keys the rules match against
 * it (host names are lower-cased when the table is only matched against tls_domain). */
static int check_policy(struct mtp_config *cfg, const char *name, char *err, size_t errlen) {
  for (size_t i = 0; i < cfg->npolicy; i++) {
    const struct mtp_policy_rule_conf *r = &cfg->policy[i];
    if (r->table == NULL)
      continue;
    size_t t = 0;
    while (t < cfg->ntables && strcmp(cfg->tables[t].name, r->table) != 0)
      t++;
    if (t == cfg->ntables)
      return EINVALF("%s: policy[%zu].table: no table '%s' in \"tables\"", name, i, r->table);
  }
  for (size_t t = 0; t < cfg->ntables; t++) {
    struct mtp_table_conf *tab = &cfg->tables[t];
    unsigned kinds = 0;
    size_t first = 0;
    for (size_t i = cfg->npolicy; i-- > 0;) {
      const struct mtp_policy_rule_conf *r = &cfg->policy[i];
      if (r->table != NULL && strcmp(r->table, tab->name) == 0) {
        kinds |= mtp_policy_key_entry(r->keys[0].key);
        first = i;
      }
    }
    if (kinds == 0)
      continue;
    for (size_t e = 0; e < tab->nentries; e++) {
      if (!entry_fits(tab->entries[e], kinds)) {
        char want[160], key[32];
        kinds_str(kinds, want, sizeof(want));
        pkey_str(&cfg->policy[first].keys[0], key, sizeof(key));
        return EINVALF("%s: tables.%s[%zu]: '%.80s' is not %s (policy[%zu] matches key %s against it)", name,
                       tab->name, e, tab->entries[e], want, first, key);
      }
      if (kinds == TK_DOMAIN) {
        lower_ascii(tab->entries[e]);
        for (size_t f = 0; f < e; f++)
          if (strcmp(tab->entries[f], tab->entries[e]) == 0)
            return EINVALF("%s: tables.%s[%zu]: '%.80s' is given twice", name, tab->name, e, tab->entries[e]);
      }
    }
  }
  return MTP_OK;
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
    } else if (strcmp(it->string, "policy") == 0) {
      rc = json_policy(it, name, cfg, err, errlen);
    } else if (strcmp(it->string, "tables") == 0) {
      rc = json_tables(it, name, cfg, err, errlen);
    } else {
      const struct key *k = NULL;
      const struct list_key *lk = NULL;
      for (size_t i = 0; i < NKEYS; i++)
        if (strcmp(keys[i].json, it->string) == 0)
          k = &keys[i];
      for (size_t i = 0; i < NLISTS; i++)
        if (strcmp(lists[i].json, it->string) == 0)
          lk = &lists[i];
      if (k != NULL)
        rc = json_scalar(k, where, it, cfg, err, errlen);
      else if (lk != NULL)
        rc = json_list(lk->kind, where, it, list_items(lk, cfg), list_count(lk, cfg), err, errlen);
      else
        rc = EINVALF("%s: unknown key (see docs/configuration.md)", where);
    }
    if (rc != MTP_OK)
      goto out;
  }
  rc = check_policy(cfg, name, err, errlen);
out:
  cJSON_Delete(root);
  return rc;
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

enum flag_id { F_CONFIG, F_PORT, F_LISTEN, F_SECRET, F_PROTOCOLS, F_KEY, F_LIST };

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
  const struct list_key *list; /* F_LIST only */
  const char *name;      /* borrows: static flag name */
  const char *val;       /* borrows: argv */
};

static bool lookup_flag(const char *name, size_t n, struct opt *o) {
  for (size_t i = 0; i < sizeof(special_flags) / sizeof(special_flags[0]); i++) {
    if (strlen(special_flags[i].name) == n && strncmp(special_flags[i].name, name, n) == 0) {
      o->id = special_flags[i].id;
      o->name = special_flags[i].name;
      o->key = NULL;
      o->list = NULL;
      return true;
    }
  }
  for (size_t i = 0; i < NKEYS; i++) {
    if (keys[i].flag != NULL && strlen(keys[i].flag) == n && strncmp(keys[i].flag, name, n) == 0) {
      o->id = F_KEY;
      o->name = keys[i].flag;
      o->key = &keys[i];
      o->list = NULL;
      return true;
    }
  }
  for (size_t i = 0; i < NLISTS; i++) {
    if (strlen(lists[i].flag) == n && strncmp(lists[i].flag, name, n) == 0) {
      o->id = F_LIST;
      o->name = lists[i].flag;
      o->key = NULL;
      o->list = &lists[i];
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

/* Where a setting came from, for a message about it: its flag if the command line gave it,
 * else "FILE: key" (or just the key without a file). */
struct origin {
  const char *file;       /* borrows; NULL = no file */
  const struct opt *opts; /* borrows; the command line, or NULL */
  size_t nopts;
};

static const char *origin_of(const struct origin *o, const char *json, const char *flag, char *buf, size_t buflen) {
  for (size_t i = 0; flag != NULL && i < o->nopts; i++)
    if (strcmp(o->opts[i].name, flag) == 0)
      return flag;
  if (o->file != NULL)
    snprintf(buf, buflen, "%.200s: %s", o->file, json);
  else
    snprintf(buf, buflen, "%s", json);
  return buf;
}

/* A NULL-terminated copy of argv[0..argc) (*out, transferred), kept for mtp_config_reload. */
static int argv_copy(int argc, char *const *argv, char ***out, char *err, size_t errlen) {
  char **v = mtp_calloc((size_t)argc + 1, sizeof(*v));
  if (v == NULL)
    return ENOMEMF();
  for (int i = 0; i < argc; i++) {
    v[i] = mtp_strdup(argv[i]);
    if (v[i] == NULL) {
      strings_free(v, (size_t)i);
      return ENOMEMF();
    }
  }
  *out = v;
  return MTP_OK;
}

/* The checks that involve several settings, once the file and the flags are applied; then the
 * derived defaults. cfg->replay_max_age == 0 means it was not given. */
static int finish(struct mtp_config *cfg, const struct origin *o, char *err, size_t errlen) {
  char buf[256];
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const struct mtp_listener_conf *l = &cfg->listeners[i];
    if (l->allowed_protocols == MTP_ALLOW_FAKE_TLS && l->ntls_domains == 0 && cfg->ntls_domains == 0)
      return EINVALF("listener '%s': allowed_protocols is only fake_tls but no tls domain is set (give tls_domains "
                     "or --tls-domain)",
                     l->name);
  }
  if (cfg->per_sni_secrets && cfg->per_sni_salt == NULL)
    return EINVALF("%s: needs a salt (give per_sni_salt or --per-sni-salt SALT)",
                   origin_of(o, "per_sni_secrets", "--per-sni-secrets", buf, sizeof(buf)));
  uint32_t min_age = min_replay_age(cfg->tls_clock_skew);
  if (cfg->replay_max_age == 0)
    cfg->replay_max_age = min_age;
  else if (cfg->replay_max_age < min_age)
    return EINVALF("%s: must be at least 2 * tls_clock_skew (%u)",
                   origin_of(o, "replay_max_age", NULL, buf, sizeof(buf)), (unsigned)min_age);
  if (cfg->tunnel_timeout <= cfg->tunnel_heartbeat)
    return EINVALF("%s: %g must be greater than tunnel_heartbeat (%g)",
                   origin_of(o, "tunnel_timeout", NULL, buf, sizeof(buf)), cfg->tunnel_timeout,
                   cfg->tunnel_heartbeat);
  return MTP_OK;
}

int mtp_config_parse_json(const char *text, const char *name, struct mtp_config *cfg, char *err, size_t errlen) {
  /* A replay_max_age equal to the derived one was derived, not given: derive it again, so that
   * a tls_clock_skew in this text moves it along. */
  if (cfg->replay_max_age == min_replay_age(cfg->tls_clock_skew))
    cfg->replay_max_age = 0;
  int rc = parse_json(text, name, false, cfg, NULL, err, errlen);
  const struct origin o = {name, NULL, 0};
  if (rc == MTP_OK)
    rc = finish(cfg, &o, err, errlen);
  if (cfg->replay_max_age == 0)
    cfg->replay_max_age = min_replay_age(cfg->tls_clock_skew);
  return rc;
}

int mtp_config_load(int argc, char **argv, struct mtp_config *cfg, bool *show_help, char *err, size_t errlen) {
  return mtp_config_load_flags(argc, argv, 0, cfg, show_help, err, errlen);
}

int mtp_config_load_flags(int argc, char **argv, unsigned flags, struct mtp_config *cfg, bool *show_help, char *err,
                          size_t errlen) {
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
  bool list_given[NLISTS] = {false};
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
  if (tmp.proxy_secret == NULL || tmp.proxy_config == NULL || tmp.node_name == NULL) {
    rc = ENOMEMF();
    goto out;
  }
  tmp.replay_max_age = 0; /* derived by finish() unless the file gives it */
  rc = argv_copy(argc, argv, &tmp._argv, err, errlen);
  if (rc != MTP_OK)
    goto out;
  tmp._argc = argc;
  tmp._flags = flags;

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
    rc = set_owned_string(&tmp.config_path, config_path, err, errlen);
    if (rc != MTP_OK)
      goto out;
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
    case F_LIST: {
      /* The first one replaces the file's list; each one adds an entry. */
      size_t li = (size_t)(o->list - lists);
      char ***items = list_items(o->list, &tmp);
      size_t *count = list_count(o->list, &tmp);
      if (!list_given[li]) {
        strings_free(*items, *count);
        *items = NULL;
        *count = 0;
        list_given[li] = true;
      }
      rc = list_add(o->list->kind, o->name, o->val, items, count, err, errlen);
      break;
    }
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

  if (tmp.nlisteners == 0 && (flags & MTP_CONFIG_NO_CLIENTS) == 0) {
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
  const struct origin origin = {config_path, opts, nopts};
  rc = finish(&tmp, &origin, err, errlen);
  if (rc != MTP_OK)
    goto out;

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

/* ---- reload ---- */

/* The settings a reload applies. Every other key of keys[] and lists[] is restart-only: the
 * reloaded config keeps its old value and the caller is told. So a key added later stays
 * restart-only until it is listed here (once the runtime can apply it). listeners, policy and
 * tables are not in keys[] and always reload; replay_max_age has its own rule (keep_replay_age). */
static const char *const reloadable[] = {
    /* clients */
    "handshake_timeout", "idle_timeout", "client_send_budget", "drain_timeout", "ad_tag", "public_host",
    /* logging */
    "log_level", "log_debug",
    /* fake-TLS and fronting */
    "tls_domains", "tls_clock_skew", "tls_record_size", "tls_flight_size", "tls_probe_interval", "domain_fronting",
    "fronting_connect_timeout", "fronting_idle_timeout", "per_sni_secrets", "per_sni_salt",
};

static bool is_reloadable(const char *json) {
  for (size_t i = 0; i < sizeof(reloadable) / sizeof(reloadable[0]); i++)
    if (strcmp(reloadable[i], json) == 0)
      return true;
  return false;
}

static bool str_eq(const char *a, const char *b) { return a == NULL || b == NULL ? a == b : strcmp(a, b) == 0; }

/* *dst becomes a copy of src (NULL stays NULL). */
static int copy_string(char **dst, const char *src, char *err, size_t errlen) {
  char *copy = NULL;
  if (src != NULL && (copy = mtp_strdup(src)) == NULL)
    return ENOMEMF();
  mtp_free(*dst);
  *dst = copy;
  return MTP_OK;
}

/* Whether key k has the same value in a and b. */
static bool key_same(const struct key *k, const struct mtp_config *a, const struct mtp_config *b) {
  const char *pa = (const char *)a + k->off, *pb = (const char *)b + k->off;
  switch (k->type) {
  case KT_WORKERS:
  case KT_INTI:
  case KT_LOG:
    return *(const int *)pa == *(const int *)pb;
  case KT_INT:
  case KT_INT0:
  case KT_MB:
    return *(const size_t *)pa == *(const size_t *)pb;
  case KT_U32:
    return *(const uint32_t *)pa == *(const uint32_t *)pb;
  case KT_SECS:
    return *(const double *)pa == *(const double *)pb;
  case KT_BOOL:
    return *(const bool *)pa == *(const bool *)pb;
  case KT_STR:
  case KT_ADDR:
  case KT_HOSTPORT:
  case KT_NAME:
    return str_eq(*(char *const *)pa, *(char *const *)pb);
  case KT_TAG:
    return a->has_ad_tag == b->has_ad_tag && (!a->has_ad_tag || memcmp(a->ad_tag, b->ad_tag, sizeof(a->ad_tag)) == 0);
  case KT_NAT:
    return a->has_nat == b->has_nat && a->nat_local == b->nat_local && a->nat_public == b->nat_public;
  case KT_FRONTING:
    return a->fronting_mode == b->fronting_mode && str_eq(a->fronting_host, b->fronting_host) &&
           a->fronting_port == b->fronting_port;
  }
  return false;
}

/* Key k of dst takes its value from src. */
static int key_copy(const struct key *k, struct mtp_config *dst, const struct mtp_config *src, char *err,
                    size_t errlen) {
  char *pd = (char *)dst + k->off;
  const char *ps = (const char *)src + k->off;
  switch (k->type) {
  case KT_WORKERS:
  case KT_INTI:
  case KT_LOG:
    *(int *)pd = *(const int *)ps;
    break;
  case KT_INT:
  case KT_INT0:
  case KT_MB:
    *(size_t *)pd = *(const size_t *)ps;
    break;
  case KT_U32:
    *(uint32_t *)pd = *(const uint32_t *)ps;
    break;
  case KT_SECS:
    *(double *)pd = *(const double *)ps;
    break;
  case KT_BOOL:
    *(bool *)pd = *(const bool *)ps;
    break;
  case KT_STR:
  case KT_ADDR:
  case KT_HOSTPORT:
  case KT_NAME:
    return copy_string((char **)pd, *(char *const *)ps, err, errlen);
  case KT_TAG:
    dst->has_ad_tag = src->has_ad_tag;
    memcpy(dst->ad_tag, src->ad_tag, sizeof(dst->ad_tag));
    break;
  case KT_NAT:
    dst->has_nat = src->has_nat;
    dst->nat_local = src->nat_local;
    dst->nat_public = src->nat_public;
    break;
  case KT_FRONTING:
    dst->fronting_mode = src->fronting_mode;
    dst->fronting_port = src->fronting_port;
    return copy_string(&dst->fronting_host, src->fronting_host, err, errlen);
  }
  return MTP_OK;
}

static char *const *list_items_c(const struct list_key *lk, const struct mtp_config *cfg) {
  return *(char **const *)((const char *)cfg + lk->off);
}
static size_t list_count_c(const struct list_key *lk, const struct mtp_config *cfg) {
  return *(const size_t *)((const char *)cfg + lk->noff);
}

static bool list_same(const struct list_key *lk, const struct mtp_config *a, const struct mtp_config *b) {
  size_t n = list_count_c(lk, a);
  if (n != list_count_c(lk, b))
    return false;
  for (size_t i = 0; i < n; i++)
    if (strcmp(list_items_c(lk, a)[i], list_items_c(lk, b)[i]) != 0)
      return false;
  return true;
}

/* List lk of dst becomes a copy of src's. */
static int list_copy(const struct list_key *lk, struct mtp_config *dst, const struct mtp_config *src, char *err,
                     size_t errlen) {
  size_t n = list_count_c(lk, src);
  char **v = NULL;
  if (n > 0 && (v = mtp_calloc(n, sizeof(*v))) == NULL)
    return ENOMEMF();
  for (size_t i = 0; i < n; i++) {
    v[i] = mtp_strdup(list_items_c(lk, src)[i]);
    if (v[i] == NULL) {
      strings_free(v, i);
      return ENOMEMF();
    }
  }
  strings_free(*list_items(lk, dst), *list_count(lk, dst));
  *list_items(lk, dst) = v;
  *list_count(lk, dst) = n;
  return MTP_OK;
}

/* The names of the restart-only settings that differed, "a, b, c". */
struct kept {
  char names[512];
  size_t len;
  size_t n;
};

static void kept_add(struct kept *kp, const char *name) {
  int w = snprintf(kp->names + kp->len, sizeof(kp->names) - kp->len, "%s%s", kp->n > 0 ? ", " : "", name);
  if (w > 0)
    kp->len = kp->len + (size_t)w < sizeof(kp->names) ? kp->len + (size_t)w : sizeof(kp->names) - 1;
  kp->n++;
}

/* The replay cache was made with old's replay_max_age and keeps it until a restart. A new
 * tls_clock_skew must fit inside it: a ClientHello is accepted while its timestamp is within
 * the skew either way, so the cache must remember it for 2 * skew or a replay gets through.
 * tls_clock_skew can only have changed in the file: a flag has the same value as before. */
static int keep_replay_age(const struct mtp_config *old, struct mtp_config *cfg, struct kept *kp, char *err,
                           size_t errlen) {
  uint32_t need = min_replay_age(cfg->tls_clock_skew);
  if (old->replay_max_age < need) {
    char where[256];
    if (cfg->config_path != NULL)
      snprintf(where, sizeof(where), "%.200s: tls_clock_skew", cfg->config_path);
    else
      snprintf(where, sizeof(where), "tls_clock_skew");
    return EINVALF("%s: %g would need replay_max_age >= %u, but the running replay cache keeps handshakes for "
                   "%u s until a restart (keep tls_clock_skew <= %g, or restart)",
                   where, cfg->tls_clock_skew, (unsigned)need, (unsigned)old->replay_max_age,
                   old->replay_max_age / 2.0);
  }
  if (cfg->replay_max_age != old->replay_max_age) {
    kept_add(kp, "replay_max_age");
    cfg->replay_max_age = old->replay_max_age;
  }
  return MTP_OK;
}

int mtp_config_reload(const struct mtp_config *old, struct mtp_config *out, char *err, size_t errlen) {
  struct mtp_config tmp;
  struct kept kp = {.len = 0, .n = 0};
  bool help = false;
  kp.names[0] = '\0';
  if (err != NULL && errlen > 0)
    err[0] = '\0';
  if (old->_argv == NULL)
    return EINVALF("reload: this configuration was not made by mtp_config_load, so there is nothing to re-read");
  int rc = mtp_config_load_flags(old->_argc, old->_argv, old->_flags, &tmp, &help, err, errlen);
  if (rc != MTP_OK)
    return rc; /* tmp was zeroed by the load */
  if (help)
    return EINVALF("reload: the command line asks for --help"); /* tmp untouched: nothing to free */
  for (size_t i = 0; rc == MTP_OK && i < NKEYS; i++) {
    const struct key *k = &keys[i];
    if (strcmp(k->json, "replay_max_age") == 0) {
      rc = keep_replay_age(old, &tmp, &kp, err, errlen);
    } else if (!is_reloadable(k->json) && !key_same(k, old, &tmp)) {
      kept_add(&kp, k->json);
      rc = key_copy(k, &tmp, old, err, errlen);
    }
  }
  for (size_t i = 0; rc == MTP_OK && i < NLISTS; i++) {
    const struct list_key *lk = &lists[i];
    if (!is_reloadable(lk->json) && !list_same(lk, old, &tmp)) {
      kept_add(&kp, lk->json);
      rc = list_copy(lk, &tmp, old, err, errlen);
    }
  }
  if (rc != MTP_OK) {
    mtp_config_free(&tmp);
    return rc;
  }
  *out = tmp;
  if (kp.n > 0 && err != NULL && errlen > 0)
    snprintf(err, errlen, "%s changed; %s until a restart", kp.names,
             kp.n == 1 ? "it keeps its old value" : "they keep their old values");
  return MTP_OK;
}

bool mtp_listener_conf_same_socket(const struct mtp_listener_conf *a, const struct mtp_listener_conf *b) {
  if (a->name == NULL || b->name == NULL || strcmp(a->name, b->name) != 0)
    return false;
  if (a->addr.ss_family != b->addr.ss_family)
    return false;
  if (a->addr.ss_family == AF_INET) {
    const struct sockaddr_in *x = (const struct sockaddr_in *)&a->addr, *y = (const struct sockaddr_in *)&b->addr;
    return x->sin_addr.s_addr == y->sin_addr.s_addr && x->sin_port == y->sin_port;
  }
  if (a->addr.ss_family == AF_INET6) {
    const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)&a->addr, *y = (const struct sockaddr_in6 *)&b->addr;
    return memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0 && x->sin6_port == y->sin6_port &&
           x->sin6_scope_id == y->sin6_scope_id;
  }
  return false;
}
