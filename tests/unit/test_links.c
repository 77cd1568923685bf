/*
 * test_links - the proxy links of cmd/links.c: secret forms (classic, dd, ee hex, ee
 * base64url), base64url against the RFC 4648 vectors and the URL-safe alphabet, tg:// and
 * t.me URLs (IPv6 hosts in brackets), the links of a whole configuration (which forms each
 * listener gets, per-listener domains, public_host, per-SNI derived secrets computed
 * independently with Python's hashlib), the JSON form, and the terminal QR code (size, quiet
 * zone, the finder pattern in the corner).
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "check.h"
#include "config.h"
#include "crypto.h"
#include "err.h"
#include "links.h"
#include "banned.h"

static const char k_hex[] = "00112233445566778899aabbccddeeff";

static void test_secret_forms(void) {
  uint8_t s[16];
  CHECK(mtp_hex_decode(k_hex, s, 16) == 16);
  char out[MTP_LINKS_SECRET_MAX];
  CHECK(mtp_links_secret_hex(MTP_LINKS_CLASSIC, s, NULL, out, sizeof(out)) == 32);
  CHECK(strcmp(out, k_hex) == 0);
  CHECK(mtp_links_secret_hex(MTP_LINKS_SECURE, s, NULL, out, sizeof(out)) == 34);
  CHECK(strcmp(out, "dd00112233445566778899aabbccddeeff") == 0);
  CHECK(mtp_links_secret_hex(MTP_LINKS_FAKE_TLS, s, "example.com", out, sizeof(out)) == 34 + 22);
  CHECK(strcmp(out, "ee00112233445566778899aabbccddeeff6578616d706c652e636f6d") == 0);
  /* base64url of ee || secret || domain, no padding (vectors from Python's base64 module). */
  CHECK(mtp_links_secret_b64(s, "example.com", out, sizeof(out)) == 38);
  CHECK(strcmp(out, "7gARIjNEVWZ3iJmqu8zd7v9leGFtcGxlLmNvbQ") == 0);
  CHECK(mtp_links_secret_b64(s, "b.org", out, sizeof(out)) > 0);
  CHECK(strcmp(out, "7gARIjNEVWZ3iJmqu8zd7v9iLm9yZw") == 0);
  uint8_t s2[16];
  CHECK(mtp_hex_decode("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0", s2, 16) == 16);
  CHECK(mtp_links_secret_b64(s2, "a.b", out, sizeof(out)) > 0);
  CHECK(strcmp(out, "7v_-_fz7-vn49_b19PPy8fBhLmI") == 0); /* '-' and '_', never '+' '/' '=' */
  /* Errors: no domain for ee, too small a buffer, a domain over 255 bytes. */
  CHECK(mtp_links_secret_hex(MTP_LINKS_FAKE_TLS, s, NULL, out, sizeof(out)) == MTP_EINVAL);
  CHECK(mtp_links_secret_hex(MTP_LINKS_FAKE_TLS, s, "", out, sizeof(out)) == MTP_EINVAL);
  CHECK(mtp_links_secret_hex(MTP_LINKS_SECURE, s, NULL, out, 34) == MTP_EINVAL);
  CHECK(mtp_links_secret_hex(MTP_LINKS_SECURE, s, NULL, out, 35) == 34);
  char longd[300];
  memset(longd, 'a', 256);
  longd[256] = '\0';
  CHECK(mtp_links_secret_hex(MTP_LINKS_FAKE_TLS, s, longd, out, sizeof(out)) == MTP_EINVAL);
  CHECK(mtp_links_secret_b64(s, longd, out, sizeof(out)) == MTP_EINVAL);
  longd[255] = '\0';
  CHECK(mtp_links_secret_hex(MTP_LINKS_FAKE_TLS, s, longd, out, sizeof(out)) == 34 + 510);
  CHECK(mtp_links_secret_b64(s, longd, out, sizeof(out)) == (int)((1 + 16 + 255) * 4 + 2) / 3);
}

static void test_base64url(void) {
  static const struct {
    const char *in, *out;
  } v[] = {{"", ""},         {"f", "Zg"},         {"fo", "Zm8"},          {"foo", "Zm9v"},
           {"foob", "Zm9vYg"}, {"fooba", "Zm9vYmE"}, {"foobar", "Zm9vYmFy"}};
  char out[64];
  for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
    int n = mtp_links_base64url((const uint8_t *)v[i].in, strlen(v[i].in), out, sizeof(out));
    CHECK_MSG(n == (int)strlen(v[i].out) && strcmp(out, v[i].out) == 0, "'%s' -> '%s'", v[i].in, out);
    /* The exact room needed is enough, one byte less is not. */
    CHECK(mtp_links_base64url((const uint8_t *)v[i].in, strlen(v[i].in), out, strlen(v[i].out) + 1) == n);
    if (n > 0)
      CHECK(mtp_links_base64url((const uint8_t *)v[i].in, strlen(v[i].in), out, strlen(v[i].out)) == MTP_EINVAL);
  }
  const uint8_t fbff[] = {0xfb, 0xff};
  CHECK(mtp_links_base64url(fbff, 2, out, sizeof(out)) == 3 && strcmp(out, "-_8") == 0);
}

static void test_urls(void) {
  char out[MTP_LINKS_URL_MAX];
  CHECK(mtp_links_url(false, "1.2.3.4", 443, "dd00", out, sizeof(out)) > 0);
  CHECK(strcmp(out, "tg://proxy?server=1.2.3.4&port=443&secret=dd00") == 0);
  CHECK(mtp_links_url(true, "proxy.example.com", 8443, "ab", out, sizeof(out)) > 0);
  CHECK(strcmp(out, "https://t.me/proxy?server=proxy.example.com&port=8443&secret=ab") == 0);
  CHECK(mtp_links_url(false, "2001:db8::1", 443, "ab", out, sizeof(out)) > 0);
  CHECK(strcmp(out, "tg://proxy?server=[2001:db8::1]&port=443&secret=ab") == 0);
  CHECK(mtp_links_url(false, "1.2.3.4", 443, "ab", out, 20) == MTP_EINVAL);
}

static struct mtp_config load(const char *json) {
  struct mtp_config cfg;
  char err[512] = "";
  mtp_config_defaults(&cfg);
  int rc = mtp_config_parse_json(json, "test.json", &cfg, err, sizeof(err));
  CHECK_MSG(rc == MTP_OK, "config: %s", err);
  return cfg;
}

static const struct mtp_links_entry *find(const struct mtp_links *l, const char *listener, size_t secret,
                                          enum mtp_links_kind kind, const char *domain) {
  for (size_t i = 0; i < l->n; i++) {
    const struct mtp_links_entry *e = &l->v[i];
    if (strcmp(e->listener, listener) == 0 && e->secret_index == secret && e->kind == kind &&
        (domain == NULL ? e->domain == NULL : (e->domain != NULL && strcmp(e->domain, domain) == 0)))
      return e;
  }
  return NULL;
}

static void test_build(void) {
  static const char json[] =
      "{\"tls_domains\": [\"Example.COM\"],"
      " \"listeners\": ["
      "  {\"name\": \"a\", \"listen\": \"1.2.3.4:443\","
      "   \"secrets\": [\"00112233445566778899aabbccddeeff\", \"fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0\"]},"
      "  {\"name\": \"b\", \"listen\": \"[2001:db8::1]:8443\", \"secrets\": [\"00112233445566778899aabbccddeeff\"],"
      "   \"allowed_protocols\": [\"fake_tls\"], \"tls_domains\": [\"b.org\"]},"
      "  {\"name\": \"c\", \"listen\": \"5.6.7.8:80\", \"secrets\": [\"00112233445566778899aabbccddeeff\"],"
      "   \"allowed_protocols\": [\"secure\"]}]}";
  struct mtp_config cfg = load(json);
  struct mtp_links l;
  CHECK(mtp_links_build(&cfg, NULL, &l) == MTP_OK);
  /* a: 2 secrets x (classic, secure, ee example.com); b: ee b.org; c: secure. */
  CHECK_MSG(l.n == 8, "%zu links", l.n);
  const struct mtp_links_entry *e = find(&l, "a", 0, MTP_LINKS_CLASSIC, NULL);
  CHECK(e != NULL && strcmp(e->tg, "tg://proxy?server=1.2.3.4&port=443&secret=00112233445566778899aabbccddeeff") == 0);
  CHECK(strcmp(e->tme, "https://t.me/proxy?server=1.2.3.4&port=443&secret=00112233445566778899aabbccddeeff") == 0);
  CHECK(e->secret_b64[0] == '\0' && e->tme_b64[0] == '\0');
  e = find(&l, "a", 1, MTP_LINKS_SECURE, NULL);
  CHECK(e != NULL && strcmp(e->secret, "ddfffefdfcfbfaf9f8f7f6f5f4f3f2f1f0") == 0);
  e = find(&l, "a", 0, MTP_LINKS_FAKE_TLS, "example.com");
  CHECK(e != NULL);
  CHECK(strcmp(e->secret, "ee00112233445566778899aabbccddeeff6578616d706c652e636f6d") == 0);
  CHECK(strcmp(e->tme_b64, "https://t.me/proxy?server=1.2.3.4&port=443&secret=7gARIjNEVWZ3iJmqu8zd7v9leGFtcGxlLmNvbQ") ==
        0);
  e = find(&l, "b", 0, MTP_LINKS_FAKE_TLS, "b.org");
  CHECK(e != NULL);
  CHECK(strcmp(e->tg, "tg://proxy?server=[2001:db8::1]&port=8443&secret=ee00112233445566778899aabbccddeeff622e6f7267") ==
        0);
  CHECK(find(&l, "b", 0, MTP_LINKS_FAKE_TLS, "example.com") == NULL); /* its own list replaces */
  CHECK(find(&l, "b", 0, MTP_LINKS_SECURE, NULL) == NULL);
  CHECK(find(&l, "c", 0, MTP_LINKS_SECURE, NULL) != NULL);
  CHECK(find(&l, "c", 0, MTP_LINKS_CLASSIC, NULL) == NULL);

  /* JSON: one object per link, base64 fields only for fake-TLS. */
  cJSON *j = mtp_links_json(&l);
  CHECK(cJSON_IsArray(j) && cJSON_GetArraySize(j) == 8);
  const cJSON *first = cJSON_GetArrayItem(j, 0);
  CHECK(strcmp(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first, "kind")), "classic") == 0);
  CHECK(cJSON_GetObjectItemCaseSensitive(first, "secret_base64url") == NULL);
  CHECK(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(first, "port")) == 443);
  const cJSON *third = cJSON_GetArrayItem(j, 2);
  CHECK(strcmp(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(third, "domain")), "example.com") == 0);
  CHECK(strcmp(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(third, "secret_base64url")),
               "7gARIjNEVWZ3iJmqu8zd7v9leGFtcGxlLmNvbQ") == 0);
  cJSON_Delete(j);
  mtp_links_free(&l);
  mtp_links_free(&l); /* idempotent */
  mtp_config_free(&cfg);

  /* public_host wins; bound addresses give the port; per-SNI secrets are derived. */
  static const char json2[] =
      "{\"public_host\": \"proxy.example.net\", \"per_sni_secrets\": true, \"per_sni_salt\": \"pepper\","
      " \"tls_domains\": [\"example.com\", \"b.org\"],"
      " \"listeners\": [{\"listen\": \"0.0.0.0:0\", \"secrets\": [\"00112233445566778899aabbccddeeff\"],"
      "   \"allowed_protocols\": [\"fake_tls\"]}]}";
  cfg = load(json2);
  struct sockaddr_storage bound;
  CHECK(mtp_parse_addr_port("0.0.0.0:4433", &bound) == MTP_OK);
  CHECK(mtp_links_build(&cfg, &bound, &l) == MTP_OK);
  CHECK(l.n == 2);
  e = find(&l, "l0", 0, MTP_LINKS_FAKE_TLS, "example.com");
  CHECK(e != NULL);
  /* SHA-256("pepper" || "00112233445566778899aabbccddeeff" || "example.com")[0:16], by hashlib. */
  CHECK(strcmp(e->tg, "tg://proxy?server=proxy.example.net&port=4433&secret=ee2ec082927ba2c2f97a8266bd8840dbeb"
                      "6578616d706c652e636f6d") == 0);
  e = find(&l, "l0", 0, MTP_LINKS_FAKE_TLS, "b.org");
  CHECK(e != NULL && strncmp(e->secret, "ee9adf64eee76cf7c770d3a70514849a44", 34) == 0);
  mtp_links_free(&l);
  mtp_config_free(&cfg);
}

/* Counts UTF-8 code points in s[0..n). */
static size_t codepoints(const char *s, size_t n) {
  size_t c = 0;
  for (size_t i = 0; i < n; i++)
    if (((unsigned char)s[i] & 0xc0) != 0x80)
      c++;
  return c;
}

/* The glyph at code point col of a line (points into line). */
static const char *glyph_at(const char *line, size_t col) {
  size_t c = 0;
  for (const char *p = line;; p++) {
    if (((unsigned char)*p & 0xc0) != 0x80) {
      if (c == col)
        return p;
      c++;
    }
  }
}

static void test_qr(void) {
  const char *url = "https://t.me/proxy?server=1.2.3.4&port=443&secret=dd00112233445566778899aabbccddeeff";
  char *qr = NULL;
  int w = 0;
  CHECK(mtp_links_qr_render(url, false, &qr, &w) == MTP_OK);
  CHECK(w >= 21 && (w - 17) % 4 == 0); /* a QR code is 17 + 4 * version modules wide */
  size_t full = (size_t)w + 4;           /* 2 modules of quiet zone each side */
  size_t lines = 0;
  const char *line_starts[128];
  for (const char *p = qr; *p != '\0';) {
    const char *nl = strchr(p, '\n');
    CHECK(nl != NULL);
    CHECK_MSG(codepoints(p, (size_t)(nl - p)) == full, "line %zu has %zu glyphs", lines,
              codepoints(p, (size_t)(nl - p)));
    CHECK(lines < 128);
    line_starts[lines++] = p;
    p = nl + 1;
  }
  CHECK(lines == (full + 1) / 2);
  /* Line 0 is quiet zone; line 1 holds symbol rows 0 and 1. The finder's corner module
   * (0,0) and (0,1) are dark: a full block; (1,0) dark above (1,1) light: upper half. */
  for (size_t x = 0; x < full; x++)
    CHECK(*glyph_at(line_starts[0], x) == ' ');
  CHECK(*glyph_at(line_starts[1], 0) == ' ' && *glyph_at(line_starts[1], 1) == ' ');
  CHECK(strncmp(glyph_at(line_starts[1], 2), "\u2588", 3) == 0);
  CHECK(strncmp(glyph_at(line_starts[1], 3), "\u2580", 3) == 0);
  CHECK(strncmp(glyph_at(line_starts[1], 8), "\u2588", 3) == 0); /* (6,0) and (6,1): the ring */
  mtp_free(qr);

  /* ANSI: black on white around every line. */
  CHECK(mtp_links_qr_render(url, true, &qr, NULL) == MTP_OK);
  CHECK(strncmp(qr, "\033[30;47m", 8) == 0);
  CHECK(strstr(qr, "\033[0m\n") != NULL);
  mtp_free(qr);

  /* Too long for any QR code. */
  static char huge[8000];
  memset(huge, 'x', sizeof(huge) - 1);
  CHECK(mtp_links_qr_render(huge, false, &qr, NULL) == MTP_EINVAL);
  CHECK(qr == NULL);
}

int main(void) {
  test_secret_forms();
  test_base64url();
  test_urls();
  test_build();
  test_qr();
  return check_report();
}
