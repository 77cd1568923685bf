/*
 * test_tgconfig.c - the getProxyConfig parser: a realistic sample (comment, default,
 * negative DCs, several per DC, IPv6), lookups with default fallback, and every malformed
 * case refused with the line named.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "tgconfig.h"
#include "check.h"

/* Shaped like what core.telegram.org/getProxyConfig serves (addresses written for the test). */
static const char SAMPLE[] =
    "# force_probability 10 10\n"
    "default 2;\n"
    "proxy_for 1 149.154.175.50:8888;\n"
    "proxy_for -1 149.154.175.50:8888;\n"
    "proxy_for 2 149.154.161.144:8888;\n"
    "proxy_for 2 149.154.161.145:8888;\n"
    "proxy_for -2 149.154.162.38:80;\n"
    "proxy_for 3 149.154.175.100:8888;\n"
    "proxy_for 4 91.108.4.136:8888;\n"
    "proxy_for -4 149.154.165.109:8888;\n"
    "proxy_for 5 91.108.56.183:8888;\n"
    "proxy_for -5 91.108.56.183:8888;\n";

static const char SAMPLE_V6[] =
    "# IPv6 list\r\n"
    "\r\n"
    "  proxy_for\t1   [2001:b28:f23d:f001::d]:8888 ;  # trailing comment\r\n"
    "proxy_for 1 [2001:db8::1]:443;\r\n"
    "proxy_for 203 [::ffff:198.51.100.7]:8888;\r\n"
    "default   1 ;\r\n"
    "\n"
    "   # indented comment";

static bool is_v4(const struct mtp_tg_addr *a, const char *ip, int port) {
  const struct sockaddr_in *s = (const struct sockaddr_in *)&a->addr;
  char buf[INET_ADDRSTRLEN];
  if (s->sin_family != AF_INET || ntohs(s->sin_port) != port)
    return false;
  inet_ntop(AF_INET, &s->sin_addr, buf, sizeof(buf));
  return strcmp(buf, ip) == 0;
}

static bool is_v6(const struct mtp_tg_addr *a, const char *ip, int port) {
  const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)&a->addr;
  struct in6_addr want;
  if (s->sin6_family != AF_INET6 || ntohs(s->sin6_port) != port)
    return false;
  if (inet_pton(AF_INET6, ip, &want) != 1)
    return false;
  return memcmp(&want, &s->sin6_addr, 16) == 0;
}

static void test_sample(void) {
  struct mtp_tgconfig cfg;
  char err[128] = "x";
  CHECK(mtp_tgconfig_parse(SAMPLE, strlen(SAMPLE), &cfg, err, sizeof(err)) == MTP_OK);
  CHECK(err[0] == '\0');
  CHECK(cfg.naddrs == 10);
  CHECK(cfg.has_default && cfg.default_dc == 2);
  CHECK(cfg.addrs[0].dc == 1 && is_v4(&cfg.addrs[0], "149.154.175.50", 8888));
  CHECK(cfg.addrs[1].dc == -1);
  CHECK(cfg.addrs[4].dc == -2 && is_v4(&cfg.addrs[4], "149.154.162.38", 80));

  const struct mtp_tg_addr *out[8];
  bool def = true;
  /* several per DC, in file order */
  CHECK(mtp_tgconfig_lookup(&cfg, 2, out, 8, &def) == 2 && !def);
  CHECK(is_v4(out[0], "149.154.161.144", 8888) && is_v4(out[1], "149.154.161.145", 8888));
  /* max smaller than the count */
  CHECK(mtp_tgconfig_lookup(&cfg, 2, out, 1, &def) == 1 && !def && is_v4(out[0], "149.154.161.144", 8888));
  /* negative DC */
  CHECK(mtp_tgconfig_lookup(&cfg, -4, out, 8, &def) == 1 && !def && is_v4(out[0], "149.154.165.109", 8888));
  /* unknown DC: default (2) */
  CHECK(mtp_tgconfig_lookup(&cfg, 42, out, 8, &def) == 2 && def);
  CHECK(out[0]->dc == 2);
  CHECK(mtp_tgconfig_lookup(&cfg, -3, out, 8, &def) == 2 && def);
  CHECK(mtp_tgconfig_lookup(&cfg, 5, out, 8, NULL) == 1);
  mtp_tgconfig_free(&cfg);
  CHECK(cfg.addrs == NULL && cfg.naddrs == 0);
  mtp_tgconfig_free(&cfg); /* idempotent */

  /* the sample without its trailing newline is the same */
  CHECK(mtp_tgconfig_parse(SAMPLE, strlen(SAMPLE) - 1, &cfg, err, sizeof(err)) == MTP_OK && cfg.naddrs == 10);
  mtp_tgconfig_free(&cfg);
}

static void test_v6_and_blanks(void) {
  struct mtp_tgconfig cfg;
  char err[128];
  CHECK(mtp_tgconfig_parse(SAMPLE_V6, strlen(SAMPLE_V6), &cfg, err, sizeof(err)) == MTP_OK);
  CHECK(cfg.naddrs == 3 && cfg.has_default && cfg.default_dc == 1);
  CHECK(cfg.addrs[0].dc == 1 && is_v6(&cfg.addrs[0], "2001:b28:f23d:f001::d", 8888));
  CHECK(is_v6(&cfg.addrs[1], "2001:db8::1", 443));
  CHECK(cfg.addrs[2].dc == 203 && is_v6(&cfg.addrs[2], "::ffff:198.51.100.7", 8888));
  const struct mtp_tg_addr *out[4];
  bool def;
  CHECK(mtp_tgconfig_lookup(&cfg, 7, out, 4, &def) == 2 && def);
  mtp_tgconfig_free(&cfg);

  /* no default: unknown DC gives nothing */
  const char *nodef = "proxy_for 1 10.0.0.1:1;\n";
  CHECK(mtp_tgconfig_parse(nodef, strlen(nodef), &cfg, err, sizeof(err)) == MTP_OK);
  CHECK(!cfg.has_default);
  def = true;
  CHECK(mtp_tgconfig_lookup(&cfg, 2, out, 4, &def) == 0 && !def);
  mtp_tgconfig_free(&cfg);

  /* default names a DC without addresses: nothing, and not marked as default */
  const char *baddef = "default 9;\nproxy_for 1 10.0.0.1:1;\n";
  CHECK(mtp_tgconfig_parse(baddef, strlen(baddef), &cfg, err, sizeof(err)) == MTP_OK);
  def = true;
  CHECK(mtp_tgconfig_lookup(&cfg, 2, out, 4, &def) == 0 && !def);
  mtp_tgconfig_free(&cfg);

  /* DC range limits */
  const char *lim = "proxy_for -32768 1.2.3.4:65535;\nproxy_for 32767 1.2.3.4:1;";
  CHECK(mtp_tgconfig_parse(lim, strlen(lim), &cfg, err, sizeof(err)) == MTP_OK);
  CHECK(cfg.addrs[0].dc == -32768 && cfg.addrs[1].dc == 32767 && is_v4(&cfg.addrs[0], "1.2.3.4", 65535));
  mtp_tgconfig_free(&cfg);
}

struct bad {
  const char *text;
  const char *want; /* substring of the error */
};

static void test_malformed(void) {
  static const struct bad cases[] = {
      {"", "no proxy_for"},
      {"# only a comment\n\n", "no proxy_for"},
      {"default 2;\n", "no proxy_for"},
      {"proxy_for 1 1.2.3.4:8888\n", "line 1:"},                       /* no ';' */
      {"proxy_for 1 1.2.3.4:8888;\nproxy_for 2 1.2.3.4;\n", "line 2:"}, /* no port */
      {"proxy_for 1 1.2.3.4:0;\n", "line 1:"},                         /* port 0 */
      {"proxy_for 1 1.2.3.4:65536;\n", "line 1:"},                     /* port too big */
      {"proxy_for 1 1.2.3.4:88a8;\n", "line 1:"},
      {"proxy_for 1 1.2.3:8888;\n", "line 1:"},                        /* short IPv4 */
      {"proxy_for 1 256.2.3.4:8888;\n", "line 1:"},
      {"proxy_for 1 example.org:8888;\n", "line 1:"},                  /* names are not resolved */
      {"proxy_for 1 [2001:db8::1:8888;\n", "line 1:"},                 /* missing ] */
      {"proxy_for 1 [2001:db8::zz]:8888;\n", "line 1:"},
      {"proxy_for 1 2001:db8::1:8888;\n", "line 1:"},                  /* IPv6 without brackets */
      {"#c\n\nproxy_for x 1.2.3.4:8888;\n", "line 3:"},                /* bad DC */
      {"proxy_for 40000 1.2.3.4:8888;\n", "line 1:"},                  /* DC out of range */
      {"proxy_for -32769 1.2.3.4:8888;\n", "line 1:"},
      {"proxy_for 1,1.2.3.4:8888;\n", "line 1:"},
      {"proxy_for 1 1.2.3.4:8888; extra\n", "line 1:"},
      {"proxy_for 1 1.2.3.4:8888;;\n", "line 1:"},
      {"proxy_for 1 1.2.3.4:8888;\nproxy 1 1.2.3.4:8888;\n", "line 2:"}, /* unknown statement */
      {"proxy_for 1 1.2.3.4:8888;\ntimeout 300;\n", "line 2:"},
      {"proxy_for1 1.2.3.4:8888;\n", "line 1:"},
      {"proxy_for 1 1.2.3.4:8888;\ndefault;\n", "line 2:"},
      {"proxy_for 1 1.2.3.4:8888;\ndefault 2\n", "line 2:"},
      {"proxy_for 1 1.2.3.4:8888;\ndefault two;\n", "line 2:"},
      {"<html>502 Bad Gateway</html>\n", "line 1:"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    struct mtp_tgconfig cfg;
    char err[128] = "";
    int rc = mtp_tgconfig_parse(cases[i].text, strlen(cases[i].text), &cfg, err, sizeof(err));
    if (rc != MTP_EPROTO || strstr(err, cases[i].want) == NULL)
      fprintf(stderr, "case %zu: rc=%d err='%s' (want '%s')\n", i, rc, err, cases[i].want);
    CHECK(rc == MTP_EPROTO);
    CHECK(strstr(err, cases[i].want) != NULL);
    CHECK(cfg.addrs == NULL && cfg.naddrs == 0);
  }

  /* a NUL byte inside is refused, naming its line */
  static const char withnul[] = "proxy_for 1 1.2.3.4:8888;\nproxy_for 2 1.2\0.3.4:8888;\n";
  struct mtp_tgconfig cfg;
  char err[128] = "";
  CHECK(mtp_tgconfig_parse(withnul, sizeof(withnul) - 1, &cfg, err, sizeof(err)) == MTP_EPROTO);
  CHECK(strstr(err, "line 2:") != NULL);

  /* a NULL/zero-length error buffer is fine */
  CHECK(mtp_tgconfig_parse("x", 1, &cfg, NULL, 0) == MTP_EPROTO);
  /* a tiny error buffer is truncated, not overrun */
  char tiny[8];
  memset(tiny, 'z', sizeof(tiny));
  CHECK(mtp_tgconfig_parse("x", 1, &cfg, tiny, 4) == MTP_EPROTO);
  CHECK(tiny[3] == '\0' && tiny[4] == 'z');

  /* text that is not NUL-terminated: only len bytes are read */
  char buf[32];
  memcpy(buf, "proxy_for 1 1.2.3.4:88;XXXXXXXXX", 32);
  CHECK(mtp_tgconfig_parse(buf, 23, &cfg, err, sizeof(err)) == MTP_OK);
  CHECK(cfg.naddrs == 1 && is_v4(&cfg.addrs[0], "1.2.3.4", 88));
  mtp_tgconfig_free(&cfg);
}

int main(void) {
  test_sample();
  test_v6_and_blanks();
  test_malformed();
  return check_report();
}
