#include "links.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <qrencode.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "faketls.h"
#include "log.h"
#include "obf2.h"
#include "banned.h"

const char *mtp_links_kind_name(enum mtp_links_kind kind) {
  switch (kind) {
  case MTP_LINKS_CLASSIC:
    return "classic";
  case MTP_LINKS_SECURE:
    return "secure";
  case MTP_LINKS_FAKE_TLS:
    return "fake_tls";
  }
  return "?";
}

int mtp_links_secret_hex(enum mtp_links_kind kind, const uint8_t secret[16], const char *domain, char *out,
                         size_t outlen) {
  size_t dlen = domain != NULL ? strlen(domain) : 0;
  if (kind == MTP_LINKS_FAKE_TLS && (dlen == 0 || dlen > MTP_FAKETLS_MAX_HOST))
    return MTP_EINVAL;
  size_t prefix = kind == MTP_LINKS_CLASSIC ? 0 : 2;
  size_t need = prefix + 32 + (kind == MTP_LINKS_FAKE_TLS ? 2 * dlen : 0) + 1;
  if (outlen < need)
    return MTP_EINVAL;
  if (kind == MTP_LINKS_SECURE)
    memcpy(out, "dd", 2);
  else if (kind == MTP_LINKS_FAKE_TLS)
    memcpy(out, "ee", 2);
  mtp_hex_encode(secret, 16, out + prefix);
  if (kind == MTP_LINKS_FAKE_TLS)
    mtp_hex_encode((const uint8_t *)domain, dlen, out + prefix + 32);
  return (int)(need - 1);
}

int mtp_links_base64url(const uint8_t *in, size_t n, char *out, size_t outlen) {
  static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  size_t need = n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0) + 1;
  if (outlen < need)
    return MTP_EINVAL;
  size_t o = 0;
  size_t i = 0;
  for (; i + 3 <= n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
    out[o++] = abc[v >> 18 & 63];
    out[o++] = abc[v >> 12 & 63];
    out[o++] = abc[v >> 6 & 63];
    out[o++] = abc[v & 63];
  }
  if (n - i == 1) {
    uint32_t v = (uint32_t)in[i] << 16;
    out[o++] = abc[v >> 18 & 63];
    out[o++] = abc[v >> 12 & 63];
  } else if (n - i == 2) {
    uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
    out[o++] = abc[v >> 18 & 63];
    out[o++] = abc[v >> 12 & 63];
    out[o++] = abc[v >> 6 & 63];
  }
  out[o] = '\0';
  return (int)o;
}

int mtp_links_secret_b64(const uint8_t secret[16], const char *domain, char *out, size_t outlen) {
  size_t dlen = domain != NULL ? strlen(domain) : 0;
  if (dlen == 0 || dlen > MTP_FAKETLS_MAX_HOST)
    return MTP_EINVAL;
  uint8_t raw[1 + 16 + MTP_FAKETLS_MAX_HOST];
  raw[0] = 0xee;
  memcpy(raw + 1, secret, 16);
  memcpy(raw + 17, domain, dlen);
  return mtp_links_base64url(raw, 17 + dlen, out, outlen);
}

int mtp_links_url(bool tme, const char *host, int port, const char *secret, char *out, size_t outlen) {
  bool v6 = strchr(host, ':') != NULL;
  int n = snprintf(out, outlen, "%s?server=%s%s%s&port=%d&secret=%s", tme ? "https://t.me/proxy" : "tg://proxy",
                   v6 ? "[" : "", host, v6 ? "]" : "", port, secret);
  if (n < 0 || (size_t)n >= outlen)
    return MTP_EINVAL;
  return n;
}

/* ---- the links of a configuration ---- */

static int addr_port(const struct sockaddr_storage *a) {
  if (a->ss_family == AF_INET6)
    return ntohs(((const struct sockaddr_in6 *)a)->sin6_port);
  return ntohs(((const struct sockaddr_in *)a)->sin_port);
}

void mtp_links_guess_host(const struct mtp_config *cfg, const struct sockaddr_storage *bound, char *out,
                          size_t outlen) {
  if (cfg->public_host != NULL) {
    snprintf(out, outlen, "%s", cfg->public_host);
    return;
  }
  if (cfg->has_nat) {
    struct in_addr a = {htonl(cfg->nat_public)};
    inet_ntop(AF_INET, &a, out, (socklen_t)outlen);
    return;
  }
  /* A specific listen address is what clients dial; for a wildcard, the first global
   * address of this host (no network look-ups). */
  if (bound->ss_family == AF_INET) {
    const struct sockaddr_in *sin = (const struct sockaddr_in *)bound;
    if (sin->sin_addr.s_addr != htonl(INADDR_ANY)) {
      inet_ntop(AF_INET, &sin->sin_addr, out, (socklen_t)outlen);
      return;
    }
  } else if (bound->ss_family == AF_INET6) {
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)bound;
    if (!IN6_IS_ADDR_UNSPECIFIED(&sin6->sin6_addr)) {
      inet_ntop(AF_INET6, &sin6->sin6_addr, out, (socklen_t)outlen);
      return;
    }
  }
  snprintf(out, outlen, "YOUR_SERVER_IP");
  struct ifaddrs *ifs;
  if (getifaddrs(&ifs) != 0)
    return;
  for (struct ifaddrs *i = ifs; i != NULL; i = i->ifa_next) {
    if (i->ifa_addr == NULL || i->ifa_addr->sa_family != AF_INET)
      continue;
    const struct sockaddr_in *sin = (const struct sockaddr_in *)i->ifa_addr;
    if ((ntohl(sin->sin_addr.s_addr) >> 24) == 127)
      continue;
    inet_ntop(AF_INET, &sin->sin_addr, out, (socklen_t)outlen);
    break;
  }
  freeifaddrs(ifs);
}

/* The fake-TLS domains of a listener: its own, else the global ones. */
static char **listener_domains(const struct mtp_config *cfg, const struct mtp_listener_conf *l, size_t *n) {
  if (l->ntls_domains > 0) {
    *n = l->ntls_domains;
    return l->tls_domains;
  }
  *n = cfg->ntls_domains;
  return cfg->tls_domains;
}

static size_t links_of_listener(const struct mtp_config *cfg, const struct mtp_listener_conf *l) {
  size_t ndom = 0;
  listener_domains(cfg, l, &ndom);
  size_t per_secret = 0;
  if (l->allowed_protocols & (MTP_ALLOW_ABRIDGED | MTP_ALLOW_INTERMEDIATE))
    per_secret++;
  if (l->allowed_protocols & MTP_ALLOW_SECURE)
    per_secret++;
  if (l->allowed_protocols & MTP_ALLOW_FAKE_TLS)
    per_secret += ndom;
  return per_secret * l->nsecrets;
}

/* Fills e's secret strings and URLs from its kind, domain and the 16 secret bytes. */
static int fill_entry(struct mtp_links_entry *e, const uint8_t secret[16]) {
  if (mtp_links_secret_hex(e->kind, secret, e->domain, e->secret, sizeof(e->secret)) < 0)
    return MTP_EINVAL;
  if (mtp_links_url(false, e->host, e->port, e->secret, e->tg, sizeof(e->tg)) < 0 ||
      mtp_links_url(true, e->host, e->port, e->secret, e->tme, sizeof(e->tme)) < 0)
    return MTP_EINVAL;
  if (e->kind == MTP_LINKS_FAKE_TLS) {
    if (mtp_links_secret_b64(secret, e->domain, e->secret_b64, sizeof(e->secret_b64)) < 0 ||
        mtp_links_url(true, e->host, e->port, e->secret_b64, e->tme_b64, sizeof(e->tme_b64)) < 0)
      return MTP_EINVAL;
  }
  return MTP_OK;
}

int mtp_links_build(const struct mtp_config *cfg, const struct sockaddr_storage *bound, struct mtp_links *out) {
  out->v = NULL;
  out->n = 0;
  size_t total = 0;
  for (size_t i = 0; i < cfg->nlisteners; i++)
    total += links_of_listener(cfg, &cfg->listeners[i]);
  if (total == 0)
    return MTP_OK;
  out->v = mtp_calloc(total, sizeof(*out->v));
  if (out->v == NULL)
    return MTP_ENOMEM;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const struct mtp_listener_conf *l = &cfg->listeners[i];
    const struct sockaddr_storage *addr = bound != NULL ? &bound[i] : &l->addr;
    char host[MTP_LINKS_HOST_MAX];
    mtp_links_guess_host(cfg, addr, host, sizeof(host));
    size_t ndom = 0;
    char **domains = listener_domains(cfg, l, &ndom);
    for (size_t s = 0; s < l->nsecrets; s++) {
      enum mtp_links_kind kinds[2];
      size_t nk = 0;
      if (l->allowed_protocols & (MTP_ALLOW_ABRIDGED | MTP_ALLOW_INTERMEDIATE))
        kinds[nk++] = MTP_LINKS_CLASSIC;
      if (l->allowed_protocols & MTP_ALLOW_SECURE)
        kinds[nk++] = MTP_LINKS_SECURE;
      size_t nd = (l->allowed_protocols & MTP_ALLOW_FAKE_TLS) ? ndom : 0;
      for (size_t k = 0; k < nk + nd; k++) {
        struct mtp_links_entry *e = &out->v[out->n];
        e->listener = l->name;
        e->secret_index = s;
        e->kind = k < nk ? kinds[k] : MTP_LINKS_FAKE_TLS;
        e->domain = k < nk ? NULL : domains[k - nk];
        snprintf(e->host, sizeof(e->host), "%s", host);
        e->port = addr_port(addr);
        uint8_t secret[16];
        memcpy(secret, l->secrets[s], 16);
        if (e->kind == MTP_LINKS_FAKE_TLS && cfg->per_sni_secrets && cfg->per_sni_salt != NULL)
          mtp_faketls_derive_secret(l->secrets[s], cfg->per_sni_salt, e->domain, secret);
        /* A domain too long for a link is skipped (config validation should stop it). */
        if (fill_entry(e, secret) == MTP_OK)
          out->n++;
        else
          memset(e, 0, sizeof(*e));
        mtp_wipe(secret, sizeof(secret));
      }
    }
  }
  return MTP_OK;
}

void mtp_links_free(struct mtp_links *l) {
  if (l == NULL)
    return;
  mtp_free(l->v);
  l->v = NULL;
  l->n = 0;
}

static void entry_title(const struct mtp_links_entry *e, char *out, size_t outlen) {
  if (e->kind == MTP_LINKS_FAKE_TLS)
    snprintf(out, outlen, "%s %s %s", e->listener, mtp_links_kind_name(e->kind), e->domain);
  else
    snprintf(out, outlen, "%s %s", e->listener, mtp_links_kind_name(e->kind));
}

void mtp_links_log(const struct mtp_links *l) {
  for (size_t i = 0; i < l->n; i++) {
    const struct mtp_links_entry *e = &l->v[i];
    char title[320];
    entry_title(e, title, sizeof(title));
    mtp_log(MTP_LOG_INFO, "link %s: %s", title, e->tg);
    mtp_log(MTP_LOG_INFO, "link %s: %s", title, e->tme);
    if (e->kind == MTP_LINKS_FAKE_TLS)
      mtp_log(MTP_LOG_INFO, "link %s: %s", title, e->tme_b64);
  }
}

cJSON *mtp_links_json(const struct mtp_links *l) {
  cJSON *arr = cJSON_CreateArray();
  if (arr == NULL)
    return NULL;
  for (size_t i = 0; i < l->n; i++) {
    const struct mtp_links_entry *e = &l->v[i];
    cJSON *o = cJSON_CreateObject();
    if (o == NULL || !cJSON_AddItemToArray(arr, o)) {
      cJSON_Delete(o);
      cJSON_Delete(arr);
      return NULL;
    }
    bool ok = cJSON_AddStringToObject(o, "listener", e->listener) != NULL &&
              cJSON_AddNumberToObject(o, "secret_index", (double)e->secret_index) != NULL &&
              cJSON_AddStringToObject(o, "kind", mtp_links_kind_name(e->kind)) != NULL &&
              (e->domain == NULL || cJSON_AddStringToObject(o, "domain", e->domain) != NULL) &&
              cJSON_AddStringToObject(o, "host", e->host) != NULL &&
              cJSON_AddNumberToObject(o, "port", e->port) != NULL &&
              cJSON_AddStringToObject(o, "secret", e->secret) != NULL &&
              cJSON_AddStringToObject(o, "tg", e->tg) != NULL && cJSON_AddStringToObject(o, "tme", e->tme) != NULL;
    if (ok && e->kind == MTP_LINKS_FAKE_TLS)
      ok = cJSON_AddStringToObject(o, "secret_base64url", e->secret_b64) != NULL &&
           cJSON_AddStringToObject(o, "tme_base64url", e->tme_b64) != NULL;
    if (!ok) {
      cJSON_Delete(arr);
      return NULL;
    }
  }
  return arr;
}

/* ---- QR codes ---- */

#define QR_MARGIN 2

/* A growable text buffer for the rendering. */
struct tbuf {
  char *p;
  size_t len, cap;
  bool oom;
};

static void tb_put(struct tbuf *b, const char *s) {
  size_t n = strlen(s);
  if (b->oom)
    return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = (b->len + n + 1) * 2;
    char *p = mtp_realloc(b->p, cap);
    if (p == NULL) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n + 1);
  b->len += n;
}

int mtp_links_qr_render(const char *text, bool ansi, char **out, int *width) {
  *out = NULL;
  QRcode *qr = QRcode_encodeString(text, 0, QR_ECLEVEL_M, QR_MODE_8, 1);
  if (qr == NULL)
    return errno == ENOMEM ? MTP_ENOMEM : MTP_EINVAL;
  int w = qr->width;
  int full = w + 2 * QR_MARGIN;
  struct tbuf b = {0};
  for (int y = 0; y < full; y += 2) {
    if (ansi)
      tb_put(&b, "\033[30;47m");
    for (int x = 0; x < full; x++) {
      int mx = x - QR_MARGIN, my = y - QR_MARGIN;
      bool top = mx >= 0 && mx < w && my >= 0 && my < w && (qr->data[my * w + mx] & 1);
      bool bot = mx >= 0 && mx < w && my + 1 >= 0 && my + 1 < w && (qr->data[(my + 1) * w + mx] & 1);
      tb_put(&b, top && bot ? "\u2588" : top ? "\u2580" : bot ? "\u2584" : " ");
    }
    if (ansi)
      tb_put(&b, "\033[0m");
    tb_put(&b, "\n");
  }
  QRcode_free(qr);
  if (b.oom) {
    mtp_free(b.p);
    return MTP_ENOMEM;
  }
  if (width != NULL)
    *width = w;
  *out = b.p;
  return MTP_OK;
}

void mtp_links_print_qr(FILE *out, const struct mtp_links *l, bool ansi) {
  for (size_t i = 0; i < l->n; i++) {
    const struct mtp_links_entry *e = &l->v[i];
    /* The preferred link of each listener and secret: the first entry of a group is classic
     * or secure, fake-TLS entries come last; pick fake-TLS if any, else secure, else classic. */
    bool first_of_group = i == 0 || l->v[i - 1].listener != e->listener || l->v[i - 1].secret_index != e->secret_index;
    if (!first_of_group)
      continue;
    const struct mtp_links_entry *best = e;
    for (size_t j = i; j < l->n && l->v[j].listener == e->listener && l->v[j].secret_index == e->secret_index; j++) {
      const struct mtp_links_entry *c = &l->v[j];
      if (c->kind == MTP_LINKS_FAKE_TLS) {
        best = c;
        break;
      }
      if (c->kind == MTP_LINKS_SECURE)
        best = c;
    }
    char *qr = NULL;
    if (mtp_links_qr_render(best->tme, ansi, &qr, NULL) != MTP_OK)
      continue;
    char title[320];
    entry_title(best, title, sizeof(title));
    fprintf(out, "%s: %s\n%s\n", title, best->tme, qr);
    mtp_free(qr);
  }
  fflush(out);
}

/* ---- mtproxy link --domain D ---- */

static bool has_domain(char **domains, size_t n, const char *d) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(domains[i], d) == 0)
      return true;
  return false;
}

int mtp_links_main(int argc, char **argv) {
  const char *domains[16];
  size_t ndomains = 0;
  bool qr = false;
  char **rest = mtp_calloc((size_t)argc + 1, sizeof(char *));
  if (rest == NULL)
    return 1;
  int nrest = 0;
  int code = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--domain") == 0 || strncmp(argv[i], "--domain=", 9) == 0) {
      const char *d = argv[i][8] == '=' ? argv[i] + 9 : (i + 1 < argc ? argv[++i] : NULL);
      if (d == NULL || d[0] == '\0' || strlen(d) > MTP_FAKETLS_MAX_HOST) {
        fprintf(stderr, "mtproxy link: --domain needs a host name of 1..255 characters\n");
        code = 2;
        goto out;
      }
      if (ndomains == sizeof(domains) / sizeof(domains[0])) {
        fprintf(stderr, "mtproxy link: at most 16 --domain\n");
        code = 2;
        goto out;
      }
      domains[ndomains++] = d;
    } else if (strcmp(argv[i], "--qr") == 0) {
      qr = true;
    } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      printf("usage: mtproxy link --domain DOMAIN [--domain ...] [--qr] [--config FILE | --secret HEX --port N "
             "...]\n"
             "Prints the fake-TLS (ee) links of DOMAIN for every listener that allows fake_tls; with\n"
             "per_sni_secrets on, the secret in them is the one derived for DOMAIN.\n");
      goto out;
    } else {
      rest[nrest++] = argv[i];
    }
  }
  if (ndomains == 0) {
    fprintf(stderr, "mtproxy link: --domain DOMAIN is required (see mtproxy link --help)\n");
    code = 2;
    goto out;
  }
  struct mtp_config cfg;
  char err[512];
  bool help = false;
  if (mtp_config_load(nrest, rest, &cfg, &help, err, sizeof(err)) != MTP_OK) {
    fprintf(stderr, "mtproxy link: %s\n", err);
    code = 2;
    goto out;
  }
  size_t printed = 0;
  for (size_t d = 0; d < ndomains; d++) {
    char dom[MTP_FAKETLS_MAX_HOST + 1];
    size_t dl = strlen(domains[d]);
    for (size_t k = 0; k <= dl; k++)
      dom[k] = (char)(domains[d][k] >= 'A' && domains[d][k] <= 'Z' ? domains[d][k] + 32 : domains[d][k]);
    for (size_t i = 0; i < cfg.nlisteners; i++) {
      const struct mtp_listener_conf *l = &cfg.listeners[i];
      if (!(l->allowed_protocols & MTP_ALLOW_FAKE_TLS))
        continue;
      size_t nld = 0;
      char **ld = listener_domains(&cfg, l, &nld);
      if (!cfg.per_sni_secrets && !has_domain(ld, nld, dom))
        fprintf(stderr, "mtproxy link: warning: %s is not a tls_domain of listener %s\n", dom, l->name);
      for (size_t s = 0; s < l->nsecrets; s++) {
        struct mtp_links_entry e;
        memset(&e, 0, sizeof(e));
        e.listener = l->name;
        e.secret_index = s;
        e.kind = MTP_LINKS_FAKE_TLS;
        e.domain = dom;
        mtp_links_guess_host(&cfg, &l->addr, e.host, sizeof(e.host));
        e.port = addr_port(&l->addr);
        uint8_t secret[16];
        memcpy(secret, l->secrets[s], 16);
        if (cfg.per_sni_secrets && cfg.per_sni_salt != NULL)
          mtp_faketls_derive_secret(l->secrets[s], cfg.per_sni_salt, dom, secret);
        int rc = fill_entry(&e, secret);
        mtp_wipe(secret, sizeof(secret));
        if (rc != MTP_OK)
          continue;
        printf("%s secret %zu %s: %s\n  %s\n  %s\n", l->name, s, dom, e.tg, e.tme, e.tme_b64);
        if (qr) {
          char *text = NULL;
          if (mtp_links_qr_render(e.tme, true, &text, NULL) == MTP_OK)
            printf("%s", text);
          mtp_free(text);
        }
        printed++;
      }
    }
  }
  if (printed == 0) {
    fprintf(stderr, "mtproxy link: no listener allows fake_tls (add it to allowed_protocols)\n");
    code = 1;
  }
  mtp_config_free(&cfg);
out:
  mtp_free(rest);
  return code;
}
