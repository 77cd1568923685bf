/*
 * test_config.c - shared/config: defaults, every JSON key and flag, precedence (file < flags),
 * the error for each bad input (table-driven), the example configs in config/, and an
 * allocation-failure pass (fail the Nth allocation; under ASan this also proves no leaks).
 */
#include "config.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "err.h"
#include "log.h"
#include "obf2.h"
#include "check.h"

#include "banned.h"

#define SECRET_A "0123456789abcdef0123456789abcdef"
#define SECRET_B "fedcba9876543210fedcba9876543210"
#define TAG "a1b2c3d4e5f60718293a4b5c6d7e8f90"

static void hex_to(const char *s, uint8_t out[16]) {
  for (int i = 0; i < 16; i++) {
    unsigned v;
    sscanf(s + 2 * i, "%2x", &v);
    out[i] = (uint8_t)v;
  }
}

static bool secret_is(const uint8_t s[16], const char *hex) {
  uint8_t want[16];
  hex_to(hex, want);
  return memcmp(s, want, 16) == 0;
}

static int argc_of(const char *const *argv) {
  int n = 0;
  while (argv[n] != NULL)
    n++;
  return n;
}

static int load(const char *const *argv, struct mtp_config *cfg, char *err, size_t errlen) {
  bool help = true;
  int rc = mtp_config_load(argc_of(argv), (char **)argv, cfg, &help, err, errlen);
  CHECK(!help);
  return rc;
}

static char *write_temp(const char *text) {
  char *path = malloc(64);
  snprintf(path, 64, "/tmp/mtp_test_config_XXXXXX");
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  size_t n = strlen(text);
  CHECK(write(fd, text, n) == (ssize_t)n);
  close(fd);
  return path;
}

static void addr_is(const struct sockaddr_storage *a, const char *want) {
  char buf[64];
  mtp_format_addr(a, buf, sizeof(buf));
  CHECK_MSG(strcmp(buf, want) == 0, "got %s want %s", buf, want);
}

static long ncpus(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n < 1 ? 1 : n;
}

static void test_defaults(void) {
  struct mtp_config c;
  mtp_config_defaults(&c);
  CHECK(c.nlisteners == 0 && c.listeners == NULL);
  CHECK(c.workers == ncpus());
  CHECK(c.handshake_timeout == 10);
  CHECK(c.idle_timeout == 600);
  CHECK(c.client_send_budget == 4194304);
  CHECK(c.dc_conn_max_clients == 300);
  CHECK(c.dc_connect_timeout == 10);
  CHECK(strcmp(c.proxy_secret, "https://core.telegram.org/getProxySecret") == 0);
  CHECK(strcmp(c.proxy_config, "https://core.telegram.org/getProxyConfig") == 0);
  CHECK(c.config_refresh == 3600);
  CHECK(c.cache_dir == NULL && c.public_host == NULL && c.admin == NULL);
  CHECK(!c.has_nat && !c.has_ad_tag);
  CHECK(c.log_level == MTP_LOG_INFO);
  mtp_config_free(&c);
  CHECK(c.proxy_secret == NULL);
  mtp_config_free(&c); /* idempotent */
  mtp_config_free(NULL);
}

static void test_addr(void) {
  struct sockaddr_storage a;
  static const struct {
    const char *in, *out;
  } ok[] = {
      {"1.2.3.4:443", "1.2.3.4:443"},   {"0.0.0.0:0", "0.0.0.0:0"},     {"[::]:443", "[::]:443"},
      {"[::1]:65535", "[::1]:65535"},   {"443", "0.0.0.0:443"},         {"[2001:db8::5]:8443", "[2001:db8::5]:8443"},
      {"127.0.0.1:9100", "127.0.0.1:9100"},
  };
  for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
    CHECK_MSG(mtp_parse_addr_port(ok[i].in, &a) == MTP_OK, "%s", ok[i].in);
    addr_is(&a, ok[i].out);
  }
  static const char *bad[] = {"",          "1.2.3.4",    "1.2.3.4:",     "1.2.3.4:65536", "1.2.3.4:-1",
                              "1.2.3:443", "::1:443",    "[::1]",        "[::1]443",      "[zz]:443",
                              "host:443",  "1.2.3.4:4a", "99999",        "[]:1",          "1.2.3.4:123456"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    CHECK_MSG(mtp_parse_addr_port(bad[i], &a) == MTP_EINVAL, "'%s' accepted", bad[i]);
  char small[4];
  mtp_parse_addr_port("1.2.3.4:443", &a);
  mtp_format_addr(&a, small, sizeof(small));
  CHECK(strlen(small) == 3);
}

static void test_protocols(void) {
  unsigned b = 0;
  CHECK(mtp_config_parse_protocols("abridged", &b) == MTP_OK && b == MTP_ALLOW_ABRIDGED);
  CHECK(mtp_config_parse_protocols("abridged,intermediate,secure,fake_tls", &b) == MTP_OK && b == MTP_ALLOW_ALL);
  CHECK(mtp_config_parse_protocols("secure, fake_tls", &b) == MTP_OK &&
        b == (MTP_ALLOW_SECURE | MTP_ALLOW_FAKE_TLS));
  CHECK(mtp_config_parse_protocols("intermediate", &b) == MTP_OK && b == MTP_ALLOW_INTERMEDIATE);
  CHECK(mtp_config_parse_protocols("", &b) == MTP_EINVAL);
  CHECK(mtp_config_parse_protocols("abridged,", &b) == MTP_EINVAL);
  CHECK(mtp_config_parse_protocols("obfs", &b) == MTP_EINVAL);
  CHECK(mtp_config_parse_protocols("Secure", &b) == MTP_EINVAL);
}

static void test_help(void) {
  struct mtp_config c;
  memset(&c, 0x5a, sizeof(c));
  bool help = false;
  char err[256];
  const char *argv[] = {"--port", "443", "--help", NULL};
  CHECK(mtp_config_load(3, (char **)argv, &c, &help, err, sizeof(err)) == MTP_OK);
  CHECK(help);
  CHECK(((unsigned char *)&c)[0] == 0x5a && ((unsigned char *)&c)[sizeof(c) - 1] == 0x5a);
  const char *argv2[] = {"-h", NULL};
  help = false;
  CHECK(mtp_config_load(1, (char **)argv2, &c, &help, err, sizeof(err)) == MTP_OK && help);
  /* The usage text names every flag. */
  static const char *flags[] = {"--config", "--port", "--listen", "--secret", "--tag", "--proxy-secret",
                                "--proxy-config", "--nat-info", "--workers", "--allowed-protocols",
                                "--handshake-timeout", "--idle-timeout", "--cache-dir", "--config-refresh",
                                "--public-host", "--admin", "--log-level", "--help"};
  for (size_t i = 0; i < sizeof(flags) / sizeof(flags[0]); i++)
    CHECK_MSG(strstr(mtp_config_usage, flags[i]) != NULL, "usage lacks %s", flags[i]);
}

/* Every flag, in both spellings, is reflected in the struct. */
static void test_all_flags(void) {
  char err[256] = "";
  struct mtp_config c;
  const char *argv[] = {"--port", "8443", "--listen", "127.0.0.1:0", "--listen=[::1]:7000", "--secret", SECRET_A,
                        "--secret=dd" "fedcba9876543210fedcba9876543210", "--tag", TAG,
                        "--proxy-secret", "/tmp/ps", "--proxy-config=http://127.0.0.1:1/cfg",
                        "--nat-info", "10.0.0.5:203.0.113.7", "--workers", "3",
                        "--allowed-protocols", "secure,fake_tls", "--handshake-timeout", "2.5",
                        "--idle-timeout=30", "--cache-dir", "/var/cache/x", "--config-refresh", "60",
                        "--public-host", "proxy.example.com", "--admin", "127.0.0.1:9100",
                        "--log-level=debug", NULL};
  int rc = load(argv, &c, err, sizeof(err));
  CHECK_MSG(rc == MTP_OK, "%s", err);
  CHECK(c.nlisteners == 4);
  CHECK(strcmp(c.listeners[0].name, "v4") == 0);
  addr_is(&c.listeners[0].addr, "0.0.0.0:8443");
  CHECK(strcmp(c.listeners[1].name, "v6") == 0);
  addr_is(&c.listeners[1].addr, "[::]:8443");
  CHECK(strcmp(c.listeners[2].name, "l0") == 0);
  addr_is(&c.listeners[2].addr, "127.0.0.1:0");
  CHECK(strcmp(c.listeners[3].name, "l1") == 0);
  addr_is(&c.listeners[3].addr, "[::1]:7000");
  for (size_t i = 0; i < 4; i++) {
    const struct mtp_listener_conf *l = &c.listeners[i];
    CHECK(l->nsecrets == 2);
    CHECK(secret_is(l->secrets[0], SECRET_A));
    CHECK(secret_is(l->secrets[1], SECRET_B));
    CHECK(l->allowed_protocols == (MTP_ALLOW_SECURE | MTP_ALLOW_FAKE_TLS));
    CHECK(!l->has_ad_tag);
  }
  CHECK(c.has_ad_tag && secret_is(c.ad_tag, TAG));
  CHECK(strcmp(c.proxy_secret, "/tmp/ps") == 0);
  CHECK(strcmp(c.proxy_config, "http://127.0.0.1:1/cfg") == 0);
  CHECK(c.has_nat && c.nat_local == 0x0a000005u && c.nat_public == 0xcb007107u);
  CHECK(c.workers == 3);
  CHECK(c.handshake_timeout == 2.5);
  CHECK(c.idle_timeout == 30);
  CHECK(strcmp(c.cache_dir, "/var/cache/x") == 0);
  CHECK(c.config_refresh == 60);
  CHECK(strcmp(c.public_host, "proxy.example.com") == 0);
  CHECK(strcmp(c.admin, "127.0.0.1:9100") == 0);
  CHECK(c.log_level == MTP_LOG_DEBUG);
  /* File-only settings keep their defaults. */
  CHECK(c.client_send_budget == 4194304 && c.dc_conn_max_clients == 300 && c.dc_connect_timeout == 10);
  mtp_config_free(&c);

  /* Minimal: one --port and one secret; workers 0 = CPUs; bare port in --listen. */
  const char *argv2[] = {"--listen", "443", "--secret", SECRET_A, "--workers", "0", NULL};
  CHECK_MSG(load(argv2, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners == 1 && strcmp(c.listeners[0].name, "l0") == 0);
  addr_is(&c.listeners[0].addr, "0.0.0.0:443");
  CHECK(c.listeners[0].allowed_protocols == MTP_ALLOW_ALL);
  CHECK(c.workers == ncpus());
  CHECK(!c.has_ad_tag && !c.has_nat);
  mtp_config_free(&c);

  /* The last --port wins; ee secrets keep only the key. */
  const char *argv3[] = {"--port", "1", "--port", "2", "--secret",
                         "ee0123456789abcdef0123456789abcdef7777772e676f6f676c652e636f6d", NULL};
  CHECK_MSG(load(argv3, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners == 2);
  addr_is(&c.listeners[0].addr, "0.0.0.0:2");
  addr_is(&c.listeners[1].addr, "[::]:2");
  CHECK(c.listeners[0].nsecrets == 1 && secret_is(c.listeners[0].secrets[0], SECRET_A));
  mtp_config_free(&c);
}

static const char *FULL_JSON =
    "{\n"
    "  \"workers\": 2,\n"
    "  \"handshake_timeout\": 5,\n"
    "  \"idle_timeout\": 120.5,\n"
    "  \"client_send_budget\": 2097152,\n"
    "  \"dc_conn_max_clients\": 50,\n"
    "  \"dc_connect_timeout\": 3,\n"
    "  \"proxy_secret\": \"/etc/mtproxy/proxy-secret\",\n"
    "  \"proxy_config\": \"/etc/mtproxy/proxy-multi.conf\",\n"
    "  \"config_refresh\": 600,\n"
    "  \"cache_dir\": \"/var/cache/mtproxy\",\n"
    "  \"nat_info\": \"10.0.0.5:203.0.113.7\",\n"
    "  \"ad_tag\": \"a1b2c3d4e5f60718293a4b5c6d7e8f90\",\n"
    "  \"public_host\": \"proxy.example.com\",\n"
    "  \"admin\": \"127.0.0.1:9100\",\n"
    "  \"log_level\": \"warn\",\n"
    "  \"listeners\": [\n"
    "    { \"name\": \"main\", \"listen\": \"0.0.0.0:443\",\n"
    "      \"secrets\": [\"0123456789abcdef0123456789abcdef\", \"ddfedcba9876543210fedcba9876543210\"],\n"
    "      \"ad_tag\": \"00112233445566778899aabbccddeeff\",\n"
    "      \"allowed_protocols\": [\"secure\"] },\n"
    "    { \"listen\": \"[::]:443\", \"secrets\": [\"FEDCBA9876543210FEDCBA9876543210\"] }\n"
    "  ]\n"
    "}\n";

static void check_full(const struct mtp_config *c) {
  CHECK(c->workers == 2);
  CHECK(c->handshake_timeout == 5);
  CHECK(c->idle_timeout == 120.5);
  CHECK(c->client_send_budget == 2097152);
  CHECK(c->dc_conn_max_clients == 50);
  CHECK(c->dc_connect_timeout == 3);
  CHECK(strcmp(c->proxy_secret, "/etc/mtproxy/proxy-secret") == 0);
  CHECK(strcmp(c->proxy_config, "/etc/mtproxy/proxy-multi.conf") == 0);
  CHECK(c->config_refresh == 600);
  CHECK(strcmp(c->cache_dir, "/var/cache/mtproxy") == 0);
  CHECK(c->has_nat && c->nat_local == 0x0a000005u && c->nat_public == 0xcb007107u);
  CHECK(c->has_ad_tag && secret_is(c->ad_tag, TAG));
  CHECK(strcmp(c->public_host, "proxy.example.com") == 0);
  CHECK(strcmp(c->admin, "127.0.0.1:9100") == 0);
  CHECK(c->log_level == MTP_LOG_WARN);
  CHECK(c->nlisteners == 2);
  const struct mtp_listener_conf *l = &c->listeners[0];
  CHECK(strcmp(l->name, "main") == 0);
  addr_is(&l->addr, "0.0.0.0:443");
  CHECK(l->nsecrets == 2 && secret_is(l->secrets[0], SECRET_A) && secret_is(l->secrets[1], SECRET_B));
  CHECK(l->has_ad_tag && secret_is(l->ad_tag, "00112233445566778899aabbccddeeff"));
  CHECK(l->allowed_protocols == MTP_ALLOW_SECURE);
  l = &c->listeners[1];
  CHECK(strcmp(l->name, "l1") == 0);
  addr_is(&l->addr, "[::]:443");
  CHECK(l->nsecrets == 1 && secret_is(l->secrets[0], SECRET_B));
  CHECK(!l->has_ad_tag);
  CHECK(l->allowed_protocols == MTP_ALLOW_ALL);
}

static void test_json_keys(void) {
  char err[256] = "";
  struct mtp_config c;
  mtp_config_defaults(&c);
  CHECK_MSG(mtp_config_parse_json(FULL_JSON, "t.json", &c, err, sizeof(err)) == MTP_OK, "%s", err);
  check_full(&c);
  /* null unsets the optional keys. */
  CHECK(mtp_config_parse_json("{\"cache_dir\": null, \"ad_tag\": null, \"nat_info\": null, \"public_host\": null,"
                              " \"admin\": null}",
                              "t.json", &c, err, sizeof(err)) == MTP_OK);
  CHECK(c.cache_dir == NULL && !c.has_ad_tag && !c.has_nat && c.public_host == NULL && c.admin == NULL);
  CHECK(c.nlisteners == 2); /* untouched without "listeners" */
  mtp_config_free(&c);

  /* The same text through --config, then flags override file values. */
  char *path = write_temp(FULL_JSON);
  const char *argv[] = {"--config", path, NULL};
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  check_full(&c);
  mtp_config_free(&c);

  const char *argv2[] = {"--workers", "5", "--config", path, "--log-level", "error", "--idle-timeout", "7",
                         "--tag", SECRET_A, "--cache-dir=/c", "--allowed-protocols", "abridged", NULL};
  CHECK_MSG(load(argv2, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.workers == 5 && c.log_level == MTP_LOG_ERROR && c.idle_timeout == 7);
  CHECK(secret_is(c.ad_tag, SECRET_A) && strcmp(c.cache_dir, "/c") == 0);
  CHECK(c.handshake_timeout == 5); /* not overridden */
  CHECK(c.nlisteners == 2);
  CHECK(c.listeners[0].allowed_protocols == MTP_ALLOW_SECURE); /* has its own */
  CHECK(c.listeners[1].allowed_protocols == MTP_ALLOW_ABRIDGED);
  CHECK(c.listeners[0].nsecrets == 2); /* no --secret: file secrets kept */
  mtp_config_free(&c);

  /* --secret replaces the file listeners' secrets; --port replaces the file's listeners. */
  const char *argv3[] = {"--config", path, "--secret", SECRET_B, NULL};
  CHECK_MSG(load(argv3, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners == 2);
  for (size_t i = 0; i < 2; i++)
    CHECK(c.listeners[i].nsecrets == 1 && secret_is(c.listeners[i].secrets[0], SECRET_B));
  CHECK(strcmp(c.listeners[0].name, "main") == 0 && c.listeners[0].has_ad_tag);
  mtp_config_free(&c);

  const char *argv4[] = {"--config", path, "--port", "0", "--secret", SECRET_A, NULL};
  CHECK_MSG(load(argv4, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners == 2 && strcmp(c.listeners[0].name, "v4") == 0 && strcmp(c.listeners[1].name, "v6") == 0);
  CHECK(c.listeners[0].allowed_protocols == MTP_ALLOW_ALL && !c.listeners[0].has_ad_tag);
  CHECK(c.workers == 2); /* the rest of the file still applies */
  mtp_config_free(&c);

  /* A file listener without secrets is fine when --secret supplies them. */
  char *path2 = write_temp("{\"listeners\": [{\"listen\": \"127.0.0.1:0\"}]}");
  const char *argv5[] = {"--config", path2, "--secret", SECRET_A, NULL};
  CHECK_MSG(load(argv5, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners == 1 && c.listeners[0].nsecrets == 1 && strcmp(c.listeners[0].name, "l0") == 0);
  mtp_config_free(&c);
  const char *argv6[] = {"--config", path2, NULL};
  CHECK(load(argv6, &c, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strstr(err, "listeners[0].secrets") != NULL, "%s", err);
  mtp_config_free(&c); /* safe after an error */

  unlink(path);
  unlink(path2);
  free(path);
  free(path2);
}

struct bad {
  const char *argv[8];
  const char *want; /* substring of the error */
};

static void test_flag_errors(void) {
  static const struct bad cases[] = {
      {{"--foo", NULL}, "unknown option '--foo' (see --help)"},
      {{"--foo=1", NULL}, "unknown option '--foo'"},
      {{"port", "443", NULL}, "unexpected argument 'port'"},
      {{"--port", NULL}, "--port: missing value"},
      {{"--port", "--secret", "x", NULL}, "--port: missing value"},
      {{"--secret", SECRET_A, "--port", NULL}, "--port: missing value"},
      {{"--port", "abc", "--secret", SECRET_A, NULL}, "--port: 'abc' is not a port number"},
      {{"--port", "65536", "--secret", SECRET_A, NULL}, "--port: '65536'"},
      {{"--port=", "--secret", SECRET_A, NULL}, "--port: '' is not a port"},
      {{"--listen", "1.2.3.4", "--secret", SECRET_A, NULL}, "--listen: '1.2.3.4' is not ADDR:PORT"},
      {{"--listen", "example.com:443", "--secret", SECRET_A, NULL}, "--listen: 'example.com:443'"},
      {{"--port", "443", "--secret", "xyz", NULL}, "--secret: 'xyz' is not 32 hex characters"},
      {{"--port", "443", "--secret", "0123456789abcdef0123456789abcdeg", NULL}, "--secret: '0123456789abcdef0123456789abcdeg'"},
      {{"--port", "443", "--secret", "dd0123456789abcdef0123456789abcd", "--secret=x", NULL}, "--secret: 'x'"},
      {{"--port", "443", "--secret", "ee0123456789abcdef0123456789abcdef7", NULL}, "is not 32 hex characters"},
      {{"--port", "443", NULL}, "no secret: give --secret HEX32 or listeners[].secrets"},
      {{"--secret", SECRET_A, NULL}, "no listeners: give --port P or --listen ADDR:PORT or listeners in the config"},
      {{NULL}, "no listeners"},
      {{"--port", "1", "--secret", SECRET_A, "--tag", "abc", NULL}, "--tag: 'abc' is not 32 hex characters"},
      {{"--port", "1", "--secret", SECRET_A, "--workers", "x", NULL}, "--workers: 'x' is not a number"},
      {{"--port", "1", "--secret", SECRET_A, "--workers", "2x", NULL}, "--workers: '2x' is not a number"},
      {{"--port", "1", "--secret", SECRET_A, "--workers", "-1", NULL}, "--workers: '-1' must be"},
      {{"--port", "1", "--secret", SECRET_A, "--workers", "1.5", NULL}, "--workers: '1.5' must be a whole number"},
      {{"--port", "1", "--secret", SECRET_A, "--workers", "5000", NULL}, "--workers: '5000'"},
      {{"--port", "1", "--secret", SECRET_A, "--handshake-timeout", "0", NULL}, "--handshake-timeout: '0' must be"},
      {{"--port", "1", "--secret", SECRET_A, "--handshake-timeout", "nan", NULL}, "--handshake-timeout: 'nan'"},
      {{"--port", "1", "--secret", SECRET_A, "--idle-timeout", "", NULL}, "--idle-timeout: '' is not a number"},
      {{"--port", "1", "--secret", SECRET_A, "--idle-timeout", "-5", NULL}, "--idle-timeout: '-5' must be"},
      {{"--port", "1", "--secret", SECRET_A, "--config-refresh", "9", NULL}, "--config-refresh: '9' must be"},
      {{"--port", "1", "--secret", SECRET_A, "--log-level", "loud", NULL}, "--log-level: 'loud' is not one of"},
      {{"--port", "1", "--secret", SECRET_A, "--allowed-protocols", "abridged,obfs", NULL},
       "--allowed-protocols: 'abridged,obfs' is not a comma list"},
      {{"--port", "1", "--secret", SECRET_A, "--nat-info", "10.0.0.5", NULL}, "--nat-info: '10.0.0.5' is not LOCAL:PUBLIC"},
      {{"--port", "1", "--secret", SECRET_A, "--nat-info", "10.0.0.5:::1", NULL}, "--nat-info: '10.0.0.5:::1'"},
      {{"--port", "1", "--secret", SECRET_A, "--admin", "localhost:9100", NULL}, "--admin: 'localhost:9100' is not ADDR:PORT"},
      {{"--port", "1", "--secret", SECRET_A, "--proxy-secret=", NULL}, "--proxy-secret: must not be empty"},
      {{"--port", "1", "--secret", SECRET_A, "--cache-dir", "", NULL}, "--cache-dir: must not be empty"},
      {{"--port", "1", "--secret", SECRET_A, "--public-host=", NULL}, "--public-host: must not be empty"},
      {{"--port", "1", "--secret", SECRET_A, "--proxy-config", "", NULL}, "--proxy-config: must not be empty"},
      {{"--config", "/nonexistent/mtproxy.json", NULL}, "/nonexistent/mtproxy.json: cannot open"},
      {{"--config=", NULL}, "--config: missing value"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    char err[256] = "";
    struct mtp_config c;
    int rc = load(cases[i].argv, &c, err, sizeof(err));
    CHECK_MSG(rc == MTP_EINVAL, "case %zu: rc %d", i, rc);
    CHECK_MSG(strstr(err, cases[i].want) != NULL, "case %zu: error '%s' lacks '%s'", i, err, cases[i].want);
    CHECK_MSG(strchr(err, '\n') == NULL, "case %zu: multi-line error", i);
    CHECK(c.listeners == NULL && c.proxy_secret == NULL);
    mtp_config_free(&c);
  }
}

struct bad_json {
  const char *text;
  const char *want;
};

#define L0 "{\"listen\": \"0.0.0.0:443\", \"secrets\": [\"0123456789abcdef0123456789abcdef\"]"

static void test_json_errors(void) {
  static const struct bad_json cases[] = {
      {"", "t.json: line 1 column 1: invalid JSON"},
      {"{\n  \"workers\": 1,\n  \"idle_timeout\": }", "t.json: line 3 column"},
      {"{} x", "invalid JSON"},
      {"[]", "t.json: the top level must be a JSON object, not an array"},
      {"{\"worker\": 1}", "t.json: worker: unknown key"},
      {"{\"workers\": 1, \"workers\": 2}", "t.json: workers: duplicate key"},
      {"{\"workers\": \"4\"}", "t.json: workers: must be a number"},
      {"{\"workers\": -1}", "t.json: workers: '-1' must be"},
      {"{\"workers\": 1.5}", "t.json: workers: '1.5' must be a whole number"},
      {"{\"workers\": null}", "t.json: workers: must be a number"},
      {"{\"handshake_timeout\": 0}", "t.json: handshake_timeout: '0' must be seconds, > 0"},
      {"{\"idle_timeout\": -3}", "t.json: idle_timeout: '-3' must be"},
      {"{\"client_send_budget\": 1048576}", "t.json: client_send_budget: '1048576' must be bytes, 1100000"},
      {"{\"dc_conn_max_clients\": 0}", "t.json: dc_conn_max_clients: '0' must be a whole number 1..100000"},
      {"{\"dc_conn_max_clients\": 100001}", "dc_conn_max_clients: '100001'"},
      {"{\"dc_connect_timeout\": 0}", "t.json: dc_connect_timeout: '0' must be"},
      {"{\"config_refresh\": 5}", "t.json: config_refresh: '5' must be seconds, 10.."},
      {"{\"proxy_secret\": 1}", "t.json: proxy_secret: must be a string"},
      {"{\"proxy_secret\": null}", "t.json: proxy_secret: must be a string"},
      {"{\"proxy_config\": \"\"}", "t.json: proxy_config: must not be empty"},
      {"{\"cache_dir\": true}", "t.json: cache_dir: must be a string (a directory) or null, not a boolean"},
      {"{\"nat_info\": \"1.2.3.4\"}", "t.json: nat_info: '1.2.3.4' is not LOCAL:PUBLIC"},
      {"{\"ad_tag\": \"abc\"}", "t.json: ad_tag: 'abc' is not 32 hex characters"},
      {"{\"public_host\": 5}", "t.json: public_host: must be a string"},
      {"{\"admin\": \"9100x\"}", "t.json: admin: '9100x' is not ADDR:PORT"},
      {"{\"log_level\": \"verbose\"}", "t.json: log_level: 'verbose' is not one of"},
      {"{\"listeners\": {}}", "t.json: listeners: must be an array of objects, not an object"},
      {"{\"listeners\": [1]}", "t.json: listeners[0]: must be an object, not a number"},
      {"{\"listeners\": [" L0 "}, {\"secrets\": [\"0123456789abcdef0123456789abcdef\"]}]}",
       "t.json: listeners[1]: missing \"listen\""},
      {"{\"listeners\": [" L0 "}, " L0 ", \"secrets\": [\"abc\"]}]}", "t.json: listeners[1].secrets: duplicate key"},
      {"{\"listeners\": [" L0 "}, {\"listen\": \"0.0.0.0:1\", \"secrets\": [\"0123456789abcdef0123456789abcdef\", \"abc\"]}]}",
       "t.json: listeners[1].secrets[1]: 'abc' is not 32 hex characters"},
      {"{\"listeners\": [{\"listen\": \"0.0.0.0:1\", \"secrets\": [7]}]}", "t.json: listeners[0].secrets[0]: must be a string"},
      {"{\"listeners\": [{\"listen\": \"0.0.0.0:1\", \"secrets\": \"0123456789abcdef0123456789abcdef\"}]}",
       "t.json: listeners[0].secrets: must be an array"},
      {"{\"listeners\": [{\"listen\": \"0.0.0.0:1\", \"secrets\": []}]}",
       "t.json: listeners[0].secrets: a listener needs at least one secret"},
      {"{\"listeners\": [{\"listen\": \"0.0.0.0:1\"}]}", "t.json: listeners[0].secrets: a listener needs"},
      {"{\"listeners\": [" L0 ", \"listen\": \"0.0.0.0:99999\"}]}", "t.json: listeners[0].listen: duplicate key"},
      {"{\"listeners\": [{\"listen\": \"0.0.0.0:99999\", \"secrets\": [\"0123456789abcdef0123456789abcdef\"]}]}",
       "t.json: listeners[0].listen: '0.0.0.0:99999' is not ADDR:PORT"},
      {"{\"listeners\": [{\"listen\": 443, \"secrets\": [\"0123456789abcdef0123456789abcdef\"]}]}",
       "t.json: listeners[0].listen: must be a string"},
      {"{\"listeners\": [" L0 ", \"port\": 1}]}", "t.json: listeners[0].port: unknown key"},
      {"{\"listeners\": [" L0 ", \"name\": \"a\"}, {\"name\": \"a\", \"listen\": \"0.0.0.0:2\", \"secrets\": "
       "[\"0123456789abcdef0123456789abcdef\"]}]}",
       "t.json: listeners[1].name: duplicate listener name 'a'"},
      {"{\"listeners\": [" L0 "}, " L0 ", \"name\": \"l0\"}]}", "duplicate listener name 'l0'"},
      {"{\"listeners\": [" L0 ", \"name\": \"has space\"}]}", "t.json: listeners[0].name: 'has space' must be"},
      {"{\"listeners\": [" L0 ", \"name\": \"\"}]}", "t.json: listeners[0].name: '' must be"},
      {"{\"listeners\": [" L0 ", \"name\": 3}]}", "t.json: listeners[0].name: must be a string"},
      {"{\"listeners\": [" L0 ", \"ad_tag\": \"xyz\"}]}", "t.json: listeners[0].ad_tag: 'xyz' is not 32 hex"},
      {"{\"listeners\": [" L0 ", \"ad_tag\": 1}]}", "t.json: listeners[0].ad_tag: must be a string"},
      {"{\"listeners\": [" L0 ", \"allowed_protocols\": []}]}", "t.json: listeners[0].allowed_protocols: must not be empty"},
      {"{\"listeners\": [" L0 ", \"allowed_protocols\": [\"secure\", \"obfs2\"]}]}",
       "t.json: listeners[0].allowed_protocols[1]: 'obfs2' is not one of"},
      {"{\"listeners\": [" L0 ", \"allowed_protocols\": \"secure\"}]}",
       "t.json: listeners[0].allowed_protocols: must be an array"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    char err[256] = "";
    struct mtp_config c;
    mtp_config_defaults(&c);
    int rc = mtp_config_parse_json(cases[i].text, "t.json", &c, err, sizeof(err));
    CHECK_MSG(rc == MTP_EINVAL, "case %zu: rc %d", i, rc);
    CHECK_MSG(strstr(err, cases[i].want) != NULL, "case %zu: error '%s' lacks '%s'", i, err, cases[i].want);
    mtp_config_free(&c);
  }
  /* Through --config the file's path names the error. */
  char *path = write_temp("{\"listeners\": [{\"listen\": \"0.0.0.0:1\", \"secrets\": [\"0123\"]}]}");
  char err[256] = "", want[128];
  struct mtp_config c;
  const char *argv[] = {"--config", path, "--port", "1", NULL};
  CHECK(load(argv, &c, err, sizeof(err)) == MTP_EINVAL);
  snprintf(want, sizeof(want), "%s: listeners[0].secrets[0]: '0123' is not 32 hex characters", path);
  CHECK_MSG(strcmp(err, want) == 0, "%s", err);
  mtp_config_free(&c);
  unlink(path);
  free(path);
}

/* The example configs in config/ are valid. */
static void test_examples(void) {
  char root[512];
  snprintf(root, sizeof(root), "%s", __FILE__);
  char *cut = strstr(root, "tests/unit/test_config.c");
  if (cut == NULL || root[0] != '/') {
    fprintf(stderr, "skipping example configs: source path unknown\n");
    return;
  }
  *cut = '\0';
  char path[600], err[256] = "";
  struct mtp_config c;
  snprintf(path, sizeof(path), "%sconfig/mtproxy.json", root);
  const char *argv[] = {"--config", path, NULL};
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners == 2);
  CHECK(c.listeners[0].addr.ss_family == AF_INET && c.listeners[1].addr.ss_family == AF_INET6);
  mtp_config_free(&c);
  snprintf(path, sizeof(path), "%sconfig/minimal.json", root);
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners >= 1);
  mtp_config_free(&c);
}

/* Allocation failure: fail the Nth allocation for every N until a load succeeds. Each run must
 * return MTP_OK or MTP_ENOMEM ("out of memory") and leave nothing allocated. */
static long fail_at = -1, alloc_count, live;

static void *t_malloc(size_t n) {
  if (alloc_count++ == fail_at)
    return NULL;
  void *p = malloc(n);
  if (p != NULL)
    live++;
  return p;
}
static void *t_calloc(size_t k, size_t n) {
  if (alloc_count++ == fail_at)
    return NULL;
  void *p = calloc(k, n);
  if (p != NULL)
    live++;
  return p;
}
static void *t_realloc(void *q, size_t n) {
  if (alloc_count++ == fail_at)
    return NULL;
  void *p = realloc(q, n);
  if (p != NULL && q == NULL)
    live++;
  return p;
}
static void t_free(void *p) {
  if (p != NULL)
    live--;
  free(p);
}

static void test_alloc_failures(void) {
  char *path = write_temp(FULL_JSON);
  const char *argv[] = {"--config", path, "--listen", "127.0.0.1:0", "--listen", "[::1]:0", "--port", "1",
                        "--secret", SECRET_A, "--admin", "127.0.0.1:1", NULL};
  mtp_replace_allocator(t_malloc, t_realloc, t_calloc, t_free);
  bool succeeded = false;
  for (long n = 0; n < 1000 && !succeeded; n++) {
    char err[256] = "";
    struct mtp_config c;
    fail_at = n;
    alloc_count = 0;
    live = 0;
    int rc = load(argv, &c, err, sizeof(err));
    if (rc == MTP_OK) {
      succeeded = true;
      CHECK(c.nlisteners == 4);
    } else {
      CHECK_MSG(rc == MTP_ENOMEM && strcmp(err, "out of memory") == 0, "n=%ld rc=%d err=%s", n, rc, err);
    }
    mtp_config_free(&c);
    CHECK_MSG(live == 0, "n=%ld: %ld allocations leaked", n, live);
  }
  CHECK(succeeded);
  mtp_replace_allocator(malloc, realloc, calloc, free);
  unlink(path);
  free(path);
}

int main(void) {
  test_defaults();
  test_addr();
  test_protocols();
  test_help();
  test_all_flags();
  test_json_keys();
  test_flag_errors();
  test_json_errors();
  test_examples();
  test_alloc_failures();
  return check_report();
}
