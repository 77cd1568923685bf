/*
 * test_config.c - shared/config: defaults, every JSON key and flag, precedence (file < flags),
 * the error for each bad input (table-driven), the example configs in config/, reload (the file
 * edited between load and reload: what applies, what is kept until a restart, what is refused),
 * and an allocation-failure pass over load and reload (fail the Nth allocation; under ASan or
 * valgrind this also proves no leaks).
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
  CHECK(c.log_debug == NULL);
  /* issue 3 */
  CHECK(c.tls_domains == NULL && c.ntls_domains == 0);
  CHECK(c.tls_clock_skew == 600);
  CHECK(c.tls_record_size == 16384);
  CHECK(c.tls_flight_size == 0);
  CHECK(c.tls_probe_interval == 3600);
  CHECK(c.fronting_mode == MTP_FRONTING_SNI && c.fronting_host == NULL && c.fronting_port == 0);
  CHECK(c.fronting_connect_timeout == 10);
  CHECK(c.fronting_idle_timeout == 120);
  CHECK(c.replay_cache_bytes == 16u * 1048576u);
  CHECK(c.replay_max_age == 1200);
  CHECK(!c.per_sni_secrets && c.per_sni_salt == NULL);
  /* issue 4 */
  CHECK(c.back == NULL && c.tunnel_listen == NULL);
  CHECK(c.tunnel_cert == NULL && c.tunnel_key == NULL && c.tunnel_ca == NULL);
  CHECK(c.tunnel_allowed_fronts == NULL && c.ntunnel_allowed_fronts == 0);
  CHECK(c.tunnel_conns == 1);
  CHECK(c.tunnel_heartbeat == 5);
  CHECK(c.tunnel_timeout == 20);
  CHECK(c.tunnel_window == 1114112);
  char host[256] = "";
  CHECK(c.node_name != NULL);
  if (gethostname(host, sizeof(host)) == 0 && host[0] != '\0' && strlen(host) <= 64)
    CHECK_MSG(strcmp(c.node_name, host) == 0, "node_name %s, host %s", c.node_name, host);
  /* issue 5 */
  CHECK(c.policy == NULL && c.npolicy == 0 && c.tables == NULL && c.ntables == 0);
  CHECK(c.tables_file == NULL);
  CHECK(c.drain_timeout == 30);
  CHECK(c.config_path == NULL);
  mtp_config_free(&c);
  CHECK(c.proxy_secret == NULL && c.node_name == NULL);
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
                                "--public-host", "--admin", "--log-level", "--help", "--log-debug",
                                "--tls-domain", "--tls-clock-skew", "--domain-fronting", "--replay-cache-mb",
                                "--per-sni-secrets", "--per-sni-salt", "--back", "--tunnel-listen",
                                "--tunnel-cert", "--tunnel-key", "--tunnel-ca", "--tunnel-allow", "--node-name",
                                "--tables-file", "--drain-timeout"};
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
    "  \"log_debug\": \"tunnel,policy\",\n"
    "  \"tls_domains\": [\"Example.COM\", \"www.example.org\"],\n"
    "  \"tls_clock_skew\": 300,\n"
    "  \"tls_record_size\": 4096,\n"
    "  \"tls_flight_size\": 3000,\n"
    "  \"tls_probe_interval\": 600,\n"
    "  \"domain_fronting\": \"[::1]:8443\",\n"
    "  \"fronting_connect_timeout\": 3,\n"
    "  \"fronting_idle_timeout\": 60.5,\n"
    "  \"replay_cache_mb\": 32,\n"
    "  \"replay_max_age\": 900,\n"
    "  \"per_sni_secrets\": true,\n"
    "  \"per_sni_salt\": \"pepper\",\n"
    "  \"back\": \"Back.example.com:8444\",\n"
    "  \"tunnel_listen\": \"0.0.0.0:8444\",\n"
    "  \"tunnel_cert\": \"/etc/mtproxy/node.crt\",\n"
    "  \"tunnel_key\": \"/etc/mtproxy/node.key\",\n"
    "  \"tunnel_ca\": \"/etc/mtproxy/ca.crt\",\n"
    "  \"tunnel_allowed_fronts\": [\"front-1\", \"front-2\"],\n"
    "  \"tunnel_conns\": 4,\n"
    "  \"tunnel_heartbeat\": 2,\n"
    "  \"tunnel_timeout\": 10,\n"
    "  \"tunnel_window\": 262144,\n"
    "  \"node_name\": \"front-1\",\n"
    "  \"tables_file\": \"/var/lib/mtproxy/tables.json\",\n"
    "  \"drain_timeout\": 0,\n"
    "  \"tables\": {\"vip\": [\"1.2.3.4\", \"10.0.0.0/8\"], \"customers\": [\"Example.COM\", \"b.example\"],\n"
    "             \"blocked\": [], \"nets6\": [\"2001:db8::/32\", \"::1\"], \"ls\": [\"main\"]},\n"
    "  \"policy\": [\n"
    "    {\"rule\": \"in_table\", \"key\": \"tls_domain\", \"table\": \"customers\"},\n"
    "    {\"rule\": \"not_in_table\", \"key\": \"client_ipv4\", \"table\": \"blocked\"},\n"
    "    {\"rule\": \"max_connections\", \"keys\": [\"listener\", \"ipv4/24\"], \"max\": 100},\n"
    "    {\"rule\": \"max_connections\", \"max\": 5000},\n"
    "    {\"table\": \"nets6\", \"key\": \"ipv6/48\", \"rule\": \"in_table\"},\n"
    "    {\"rule\": \"in_table\", \"key\": \"client_ipv4\", \"table\": \"vip\"},\n"
    "    {\"rule\": \"not_in_table\", \"key\": \"listener\", \"table\": \"ls\"},\n"
    "    {\"rule\": \"max_connections\", \"keys\": [\"client_ipv6\", \"ipv6/128\", \"ipv4/0\", \"tls_domain\"],"
    " \"max\": 1}\n"
    "  ],\n"
    "  \"listeners\": [\n"
    "    { \"name\": \"main\", \"listen\": \"0.0.0.0:443\", \"tls_domains\": [\"Main.Example.net\"],\n"
    "      \"secrets\": [\"0123456789abcdef0123456789abcdef\", \"ddfedcba9876543210fedcba9876543210\"],\n"
    "      \"ad_tag\": \"00112233445566778899aabbccddeeff\",\n"
    "      \"allowed_protocols\": [\"secure\"] },\n"
    "    { \"listen\": \"[::]:443\", \"secrets\": [\"FEDCBA9876543210FEDCBA9876543210\"] }\n"
    "  ]\n"
    "}\n";

static const struct mtp_table_conf *table_named(const struct mtp_config *c, const char *name) {
  for (size_t i = 0; i < c->ntables; i++)
    if (strcmp(c->tables[i].name, name) == 0)
      return &c->tables[i];
  return NULL;
}

static void check_full_policy(const struct mtp_config *c) {
  CHECK(c->ntables == 5);
  const struct mtp_table_conf *t = table_named(c, "vip");
  CHECK(t != NULL && t->nentries == 2 && strcmp(t->entries[0], "1.2.3.4") == 0 &&
        strcmp(t->entries[1], "10.0.0.0/8") == 0);
  t = table_named(c, "customers"); /* matched against tls_domain only: lower-cased */
  CHECK(t != NULL && t->nentries == 2 && strcmp(t->entries[0], "example.com") == 0 &&
        strcmp(t->entries[1], "b.example") == 0);
  t = table_named(c, "blocked");
  CHECK(t != NULL && t->nentries == 0);
  t = table_named(c, "nets6");
  CHECK(t != NULL && t->nentries == 2 && strcmp(t->entries[0], "2001:db8::/32") == 0);
  CHECK(table_named(c, "ls") != NULL);

  CHECK(c->npolicy == 8);
  const struct mtp_policy_rule_conf *r = c->policy;
  CHECK(r[0].kind == MTP_PRULE_IN_TABLE && r[0].nkeys == 1 && r[0].keys[0].key == MTP_PKEY_TLS_DOMAIN &&
        strcmp(r[0].table, "customers") == 0);
  CHECK(r[1].kind == MTP_PRULE_NOT_IN_TABLE && r[1].nkeys == 1 && r[1].keys[0].key == MTP_PKEY_CLIENT_IPV4 &&
        strcmp(r[1].table, "blocked") == 0);
  CHECK(r[2].kind == MTP_PRULE_MAX_CONNECTIONS && r[2].nkeys == 2 && r[2].max == 100 && r[2].table == NULL);
  CHECK(r[2].keys[0].key == MTP_PKEY_LISTENER && r[2].keys[0].prefix == 0);
  CHECK(r[2].keys[1].key == MTP_PKEY_IPV4_SUBNET && r[2].keys[1].prefix == 24);
  CHECK(r[3].kind == MTP_PRULE_MAX_CONNECTIONS && r[3].nkeys == 0 && r[3].max == 5000);
  CHECK(r[4].kind == MTP_PRULE_IN_TABLE && r[4].keys[0].key == MTP_PKEY_IPV6_SUBNET && r[4].keys[0].prefix == 48 &&
        strcmp(r[4].table, "nets6") == 0);
  CHECK(r[5].keys[0].key == MTP_PKEY_CLIENT_IPV4 && strcmp(r[5].table, "vip") == 0);
  CHECK(r[6].kind == MTP_PRULE_NOT_IN_TABLE && r[6].keys[0].key == MTP_PKEY_LISTENER);
  CHECK(r[7].nkeys == 4 && r[7].max == 1);
  CHECK(r[7].keys[0].key == MTP_PKEY_CLIENT_IPV6 && r[7].keys[1].key == MTP_PKEY_IPV6_SUBNET &&
        r[7].keys[1].prefix == 128 && r[7].keys[2].key == MTP_PKEY_IPV4_SUBNET && r[7].keys[2].prefix == 0 &&
        r[7].keys[3].key == MTP_PKEY_TLS_DOMAIN);
}

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
  CHECK(strcmp(c->log_debug, "tunnel,policy") == 0);
  CHECK(c->ntls_domains == 2 && strcmp(c->tls_domains[0], "example.com") == 0 &&
        strcmp(c->tls_domains[1], "www.example.org") == 0);
  CHECK(c->tls_clock_skew == 300 && c->tls_record_size == 4096 && c->tls_flight_size == 3000);
  CHECK(c->tls_probe_interval == 600);
  CHECK(c->fronting_mode == MTP_FRONTING_HOST && strcmp(c->fronting_host, "::1") == 0 && c->fronting_port == 8443);
  CHECK(c->fronting_connect_timeout == 3 && c->fronting_idle_timeout == 60.5);
  CHECK(c->replay_cache_bytes == 32u * 1048576u);
  CHECK(c->replay_max_age == 900);
  CHECK(c->per_sni_secrets && strcmp(c->per_sni_salt, "pepper") == 0);
  CHECK(strcmp(c->back, "Back.example.com:8444") == 0);
  CHECK(strcmp(c->tunnel_listen, "0.0.0.0:8444") == 0);
  CHECK(strcmp(c->tunnel_cert, "/etc/mtproxy/node.crt") == 0 && strcmp(c->tunnel_key, "/etc/mtproxy/node.key") == 0 &&
        strcmp(c->tunnel_ca, "/etc/mtproxy/ca.crt") == 0);
  CHECK(c->ntunnel_allowed_fronts == 2 && strcmp(c->tunnel_allowed_fronts[0], "front-1") == 0 &&
        strcmp(c->tunnel_allowed_fronts[1], "front-2") == 0);
  CHECK(c->tunnel_conns == 4 && c->tunnel_heartbeat == 2 && c->tunnel_timeout == 10 && c->tunnel_window == 262144);
  CHECK(strcmp(c->node_name, "front-1") == 0);
  CHECK(strcmp(c->tables_file, "/var/lib/mtproxy/tables.json") == 0);
  CHECK(c->drain_timeout == 0);
  check_full_policy(c);
  CHECK(c->nlisteners == 2);
  const struct mtp_listener_conf *l = &c->listeners[0];
  CHECK(strcmp(l->name, "main") == 0);
  addr_is(&l->addr, "0.0.0.0:443");
  CHECK(l->nsecrets == 2 && secret_is(l->secrets[0], SECRET_A) && secret_is(l->secrets[1], SECRET_B));
  CHECK(l->has_ad_tag && secret_is(l->ad_tag, "00112233445566778899aabbccddeeff"));
  CHECK(l->allowed_protocols == MTP_ALLOW_SECURE);
  CHECK(l->ntls_domains == 1 && strcmp(l->tls_domains[0], "main.example.net") == 0);
  size_t nd = 0;
  const char *const *d = mtp_config_tls_domains(c, l, &nd);
  CHECK(nd == 1 && strcmp(d[0], "main.example.net") == 0);
  CHECK(!mtp_config_serves_fake_tls(c, l)); /* secure only */
  l = &c->listeners[1];
  CHECK(l->ntls_domains == 0);
  d = mtp_config_tls_domains(c, l, &nd);
  CHECK(nd == 2 && d == (const char *const *)c->tls_domains);
  CHECK(mtp_config_serves_fake_tls(c, l));
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
                         "--tag", SECRET_A, "--cache-dir=/c", "--allowed-protocols", "abridged",
                         "--tls-domain", "A.example", "--domain-fronting", "off", "--replay-cache-mb", "1",
                         "--node-name", "n2", "--tunnel-allow", "back-x", "--per-sni-secrets", "off",
                         "--tls-clock-skew", "450", "--back", "10.1.2.3:1", "--log-debug", "config",
                         "--tables-file", "/t.json", "--drain-timeout", "9", "--tunnel-listen", "[::]:1",
                         "--per-sni-salt", "salt2", "--tunnel-cert", "c2", "--tunnel-key", "k2", "--tunnel-ca", "a2",
                         NULL};
  CHECK_MSG(load(argv2, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  /* The flags replace the file's lists and values. */
  CHECK(c.ntls_domains == 1 && strcmp(c.tls_domains[0], "a.example") == 0);
  CHECK(c.fronting_mode == MTP_FRONTING_OFF && c.fronting_host == NULL);
  CHECK(c.replay_cache_bytes == 1048576);
  CHECK(strcmp(c.node_name, "n2") == 0);
  CHECK(c.ntunnel_allowed_fronts == 1 && strcmp(c.tunnel_allowed_fronts[0], "back-x") == 0);
  CHECK(!c.per_sni_secrets && strcmp(c.per_sni_salt, "salt2") == 0);
  CHECK(c.tls_clock_skew == 450 && c.replay_max_age == 900); /* the file's 900 >= 2 * 450 */
  CHECK(strcmp(c.back, "10.1.2.3:1") == 0 && strcmp(c.tunnel_listen, "[::]:1") == 0);
  CHECK(strcmp(c.log_debug, "config") == 0 && strcmp(c.tables_file, "/t.json") == 0 && c.drain_timeout == 9);
  CHECK(strcmp(c.tunnel_cert, "c2") == 0 && strcmp(c.tunnel_key, "k2") == 0 && strcmp(c.tunnel_ca, "a2") == 0);
  CHECK(c.npolicy == 8 && c.ntables == 5); /* file-only: kept */
  CHECK(c.listeners[0].ntls_domains == 1); /* a listener's own domains are not replaced */
  CHECK(strcmp(c.config_path, path) == 0);
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

#define P1 "--port", "1", "--secret", SECRET_A

struct bad {
  const char *argv[10];
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
      /* issues 3-5 */
      {{P1, "--tls-domain", "bad_domain", NULL}, "--tls-domain: 'bad_domain' is not a host name"},
      {{P1, "--tls-domain", "a..example", NULL}, "--tls-domain: 'a..example' is not a host name"},
      {{P1, "--tls-domain", ".example", NULL}, "--tls-domain: '.example'"},
      {{P1, "--tls-domain", "example.", NULL}, "--tls-domain: 'example.'"},
      {{P1, "--tls-domain=", NULL}, "--tls-domain: '' is not a host name"},
      {{P1, "--tls-domain", "a.example", "--tls-domain", "A.Example", NULL}, "--tls-domain: 'A.Example' is given twice"},
      {{P1, "--tls-clock-skew", "0", NULL}, "--tls-clock-skew: '0' must be seconds, 1..86400"},
      {{P1, "--tls-clock-skew", "86401", NULL}, "--tls-clock-skew: '86401' must be"},
      {{P1, "--domain-fronting", "on", NULL}, "--domain-fronting: 'on' is not off, sni or HOST:PORT"},
      {{P1, "--domain-fronting", "host", NULL}, "--domain-fronting: 'host' is not off, sni or HOST:PORT"},
      {{P1, "--domain-fronting", "host:0", NULL}, "--domain-fronting: 'host:0'"},
      {{P1, "--domain-fronting", "host:65536", NULL}, "--domain-fronting: 'host:65536'"},
      {{P1, "--domain-fronting", "::1:8443", NULL}, "--domain-fronting: '::1:8443'"},
      {{P1, "--domain-fronting", "[::1]", NULL}, "--domain-fronting: '[::1]'"},
      {{P1, "--domain-fronting", "[nope]:443", NULL}, "--domain-fronting: '[nope]:443'"},
      {{P1, "--domain-fronting", "1.2.3:443", NULL}, "--domain-fronting: '1.2.3:443'"},
      {{P1, "--domain-fronting", "bad_host:443", NULL}, "--domain-fronting: 'bad_host:443'"},
      {{P1, "--domain-fronting", "SNI", NULL}, "--domain-fronting: 'SNI'"},
      {{P1, "--replay-cache-mb", "0", NULL}, "--replay-cache-mb: '0' must be a whole number of MiB 1..4096"},
      {{P1, "--replay-cache-mb", "4097", NULL}, "--replay-cache-mb: '4097' must be"},
      {{P1, "--replay-cache-mb", "1.5", NULL}, "--replay-cache-mb: '1.5' must be"},
      {{P1, "--per-sni-secrets", "maybe", NULL}, "--per-sni-secrets: 'maybe' is not on or off"},
      {{P1, "--per-sni-secrets", "on", NULL}, "--per-sni-secrets: needs a salt (give per_sni_salt or --per-sni-salt"},
      {{P1, "--per-sni-salt", "", NULL}, "--per-sni-salt: must not be empty"},
      {{P1, "--back", "back.example", NULL}, "--back: 'back.example' is not HOST:PORT"},
      {{P1, "--back", "[::1]:0", NULL}, "--back: '[::1]:0' is not HOST:PORT"},
      {{P1, "--tunnel-listen", "host:1", NULL}, "--tunnel-listen: 'host:1' is not ADDR:PORT"},
      {{P1, "--tunnel-cert", "", NULL}, "--tunnel-cert: must not be empty"},
      {{P1, "--tunnel-key", "", NULL}, "--tunnel-key: must not be empty"},
      {{P1, "--tunnel-ca", "", NULL}, "--tunnel-ca: must not be empty"},
      {{P1, "--tunnel-allow", "bad name", NULL}, "--tunnel-allow: 'bad name' must be 1..64 characters"},
      {{P1, "--tunnel-allow", "f1", "--tunnel-allow", "f1", NULL}, "--tunnel-allow: 'f1' is given twice"},
      {{P1, "--node-name", "", NULL}, "--node-name: '' must be 1..64 characters"},
      {{P1, "--node-name", "a/b", NULL}, "--node-name: 'a/b' must be"},
      {{P1, "--tables-file", "", NULL}, "--tables-file: must not be empty"},
      {{P1, "--drain-timeout", "-1", NULL}, "--drain-timeout: '-1' must be seconds, 0..3600"},
      {{P1, "--drain-timeout", "3601", NULL}, "--drain-timeout: '3601'"},
      {{P1, "--log-debug", "", NULL}, "--log-debug: must not be empty"},
      {{P1, "--allowed-protocols", "fake_tls", NULL},
       "listener 'v4': allowed_protocols is only fake_tls but no tls domain is set"},
      {{"--listen", "127.0.0.1:0", "--secret", SECRET_A, "--allowed-protocols", "fake_tls", NULL},
       "listener 'l0': allowed_protocols is only fake_tls"},
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

#define LONG_LABEL "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" /* 64 */
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
      /* issue 3 */
      {"{\"tls_domains\": \"a.example\"}", "t.json: tls_domains: must be an array of strings, not a string"},
      {"{\"tls_domains\": [\"a.example\", 1]}", "t.json: tls_domains[1]: must be a string, not a number"},
      {"{\"tls_domains\": [\"a_b.example\"]}", "t.json: tls_domains[0]: 'a_b.example' is not a host name"},
      {"{\"tls_domains\": [\"a.example\", \"A.EXAMPLE\"]}", "t.json: tls_domains[1]: 'A.EXAMPLE' is given twice"},
      {"{\"tls_domains\": [\"" LONG_LABEL ".example\"]}", "t.json: tls_domains[0]: 'aaaa"},
      {"{\"tls_record_size\": 255}", "t.json: tls_record_size: '255' must be bytes, 256..16384"},
      {"{\"tls_record_size\": 16385}", "t.json: tls_record_size: '16385'"},
      {"{\"tls_flight_size\": 63}", "t.json: tls_flight_size: '63' must be 0 (learn from the fronted host) or bytes"},
      {"{\"tls_flight_size\": 16385}", "t.json: tls_flight_size: '16385'"},
      {"{\"tls_flight_size\": 100.5}", "t.json: tls_flight_size: '100.5'"},
      {"{\"tls_probe_interval\": 59}", "t.json: tls_probe_interval: '59' must be seconds, 60..604800"},
      {"{\"tls_clock_skew\": 0.5}", "t.json: tls_clock_skew: '0.5' must be seconds, 1..86400"},
      {"{\"domain_fronting\": 1}", "t.json: domain_fronting: must be a string"},
      {"{\"domain_fronting\": null}", "t.json: domain_fronting: must be a string"},
      {"{\"domain_fronting\": \"example.com\"}", "t.json: domain_fronting: 'example.com' is not off, sni or HOST:PORT"},
      {"{\"fronting_connect_timeout\": 0}", "t.json: fronting_connect_timeout: '0' must be"},
      {"{\"fronting_idle_timeout\": 0}", "t.json: fronting_idle_timeout: '0' must be"},
      {"{\"replay_cache_mb\": 0}", "t.json: replay_cache_mb: '0' must be a whole number of MiB 1..4096"},
      {"{\"replay_max_age\": -1}", "t.json: replay_max_age: '-1' must be"},
      {"{\"replay_max_age\": 1199}", "t.json: replay_max_age: must be at least 2 * tls_clock_skew (1200)"},
      {"{\"replay_max_age\": 500, \"tls_clock_skew\": 300}", "t.json: replay_max_age: must be at least 2 * tls_clock_skew (600)"},
      {"{\"per_sni_secrets\": \"on\"}", "t.json: per_sni_secrets: must be true or false, not a string"},
      {"{\"per_sni_secrets\": true}", "t.json: per_sni_secrets: needs a salt (give per_sni_salt or --per-sni-salt"},
      {"{\"per_sni_secrets\": true, \"per_sni_salt\": null}", "t.json: per_sni_secrets: needs a salt"},
      {"{\"per_sni_salt\": 1}", "t.json: per_sni_salt: must be a string"},
      {"{\"per_sni_salt\": \"\"}", "t.json: per_sni_salt: must not be empty"},
      {"{\"listeners\": [" L0 ", \"tls_domains\": [\"bad_d\"]}]}", "t.json: listeners[0].tls_domains[0]: 'bad_d' is not a host name"},
      {"{\"listeners\": [" L0 ", \"tls_domains\": \"x.example\"}]}", "t.json: listeners[0].tls_domains: must be an array"},
      {"{\"listeners\": [" L0 ", \"allowed_protocols\": [\"fake_tls\"]}]}",
       "listener 'l0': allowed_protocols is only fake_tls but no tls domain is set (give tls_domains or --tls-domain)"},
      {"{\"listeners\": [" L0 "}, " L0 ", \"name\": \"tlsonly\", \"allowed_protocols\": [\"fake_tls\"]}]}",
       "listener 'tlsonly': allowed_protocols is only fake_tls"},
      /* issue 4 */
      {"{\"back\": \"a:1:2\"}", "t.json: back: 'a:1:2' is not HOST:PORT"},
      {"{\"back\": 8444}", "t.json: back: must be a string (HOST:PORT) or null"},
      {"{\"tunnel_listen\": \"back.example:8444\"}", "t.json: tunnel_listen: 'back.example:8444' is not ADDR:PORT"},
      {"{\"tunnel_cert\": \"\"}", "t.json: tunnel_cert: must not be empty"},
      {"{\"tunnel_key\": []}", "t.json: tunnel_key: must be a string"},
      {"{\"tunnel_ca\": 0}", "t.json: tunnel_ca: must be a string"},
      {"{\"tunnel_allowed_fronts\": [\"a b\"]}", "t.json: tunnel_allowed_fronts[0]: 'a b' must be 1..64 characters"},
      {"{\"tunnel_allowed_fronts\": {}}", "t.json: tunnel_allowed_fronts: must be an array of strings"},
      {"{\"tunnel_conns\": 0}", "t.json: tunnel_conns: '0' must be a whole number 1..64"},
      {"{\"tunnel_conns\": 65}", "t.json: tunnel_conns: '65'"},
      {"{\"tunnel_heartbeat\": 0}", "t.json: tunnel_heartbeat: '0' must be seconds, > 0"},
      {"{\"tunnel_timeout\": 0}", "t.json: tunnel_timeout: '0' must be seconds, > 0"},
      {"{\"tunnel_timeout\": 5}", "t.json: tunnel_timeout: 5 must be greater than tunnel_heartbeat (5)"},
      {"{\"tunnel_heartbeat\": 30}", "t.json: tunnel_timeout: 20 must be greater than tunnel_heartbeat (30)"},
      {"{\"tunnel_window\": 65535}", "t.json: tunnel_window: '65535' must be bytes, 65536..67108864"},
      {"{\"tunnel_window\": 67108865}", "t.json: tunnel_window: '67108865'"},
      {"{\"node_name\": \"a b\"}", "t.json: node_name: 'a b' must be 1..64 characters"},
      {"{\"node_name\": null}", "t.json: node_name: must be a string"},
      /* issue 5 */
      {"{\"drain_timeout\": 3601}", "t.json: drain_timeout: '3601' must be seconds, 0..3600"},
      {"{\"tables_file\": \"\"}", "t.json: tables_file: must not be empty"},
      {"{\"log_debug\": 1}", "t.json: log_debug: must be a string"},
      {"{\"policy\": {}}", "t.json: policy: must be an array of objects, not an object"},
      {"{\"policy\": [1]}", "t.json: policy[0]: must be an object, not a number"},
      {"{\"policy\": [{}]}", "t.json: policy[0]: missing \"rule\" (one of in_table, not_in_table, max_connections)"},
      {"{\"policy\": [{\"rule\": 1}]}", "t.json: policy[0].rule: must be a string"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 1}, {\"rule\": \"allow\"}]}",
       "t.json: policy[1].rule: 'allow' is not one of in_table, not_in_table, max_connections"},
      {"{\"tables\": {\"t\": []}, \"policy\": [{\"rule\": \"in_table\", \"table\": \"t\"}]}",
       "t.json: policy[0]: missing \"key\" (one of listener, client_ipv4"},
      {"{\"policy\": [{\"rule\": \"not_in_table\", \"key\": \"client_ipv4\"}]}", "t.json: policy[0]: missing \"table\""},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": \"ipv4/33\", \"table\": \"t\"}]}",
       "t.json: policy[0].key: 'ipv4/33' is not one of"},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": \"ipv6/129\", \"table\": \"t\"}]}", "t.json: policy[0].key: 'ipv6/129'"},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": \"ipv4/\", \"table\": \"t\"}]}", "t.json: policy[0].key: 'ipv4/'"},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": \"ipv4/-1\", \"table\": \"t\"}]}", "t.json: policy[0].key: 'ipv4/-1'"},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": \"ipv4/0024\", \"table\": \"t\"}]}", "t.json: policy[0].key: 'ipv4/0024'"},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": \"client_ip\", \"table\": \"t\"}]}", "t.json: policy[0].key: 'client_ip'"},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": [\"listener\"], \"table\": \"t\"}]}", "t.json: policy[0].key: must be a string"},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": \"listener\", \"table\": \"bad name\"}]}", "t.json: policy[0].table: 'bad name' must be"},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": \"listener\", \"table\": \"nope\"}]}",
       "t.json: policy[0].table: no table 'nope' in \"tables\""},
      {"{\"tables\": {\"a\": []}, \"policy\": [{\"rule\": \"in_table\", \"key\": \"listener\", \"table\": \"a\"},"
       " {\"rule\": \"in_table\", \"key\": \"listener\", \"table\": \"b\"}]}",
       "t.json: policy[1].table: no table 'b'"},
      {"{\"policy\": [{\"rule\": \"max_connections\"}]}", "t.json: policy[0]: missing \"max\" (a whole number >= 1)"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 0}]}", "t.json: policy[0].max: '0' must be a whole number >= 1"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 1.5}]}", "t.json: policy[0].max: '1.5'"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": \"3\"}]}", "t.json: policy[0].max: must be a number"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 3, \"keys\": \"listener\"}]}",
       "t.json: policy[0].keys: must be an array of strings"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 3, \"keys\": [\"listener\", \"listener\"]}]}",
       "t.json: policy[0].keys[1]: 'listener' is given twice"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 3, \"keys\": [\"listener\", \"bogus\"]}]}",
       "t.json: policy[0].keys[1]: 'bogus' is not one of listener, client_ipv4, client_ipv6, ipv4/M"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 3, \"keys\": [\"ipv4/1\", \"ipv4/2\", \"ipv4/3\","
       " \"ipv4/4\", \"ipv4/5\", \"ipv4/6\", \"ipv4/7\"]}]}",
       "t.json: policy[0].keys: at most 6 keys"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 3, \"keys\": [7]}]}", "t.json: policy[0].keys[0]: must be a string"},
      {"{\"policy\": [{\"rule\": \"in_table\", \"key\": \"listener\", \"table\": \"t\", \"max\": 3}]}",
       "t.json: policy[0].max: unknown key (rule in_table takes rule, key, table)"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 3, \"table\": \"t\"}]}",
       "t.json: policy[0].table: unknown key (rule max_connections takes rule, keys, max)"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 3, \"key\": \"listener\"}]}", "t.json: policy[0].key: unknown key"},
      {"{\"policy\": [{\"rule\": \"max_connections\", \"max\": 3, \"max\": 4}]}", "t.json: policy[0].max: duplicate key"},
      {"{\"tables\": []}", "t.json: tables: must be an object of arrays of strings, not an array"},
      {"{\"tables\": {\"bad name\": []}}", "t.json: tables.bad name: a table name must be 1..64 characters"},
      {"{\"tables\": {\"t\": \"x\"}}", "t.json: tables.t: must be an array of strings, not a string"},
      {"{\"tables\": {\"t\": null}}", "t.json: tables.t: must be an array of strings, not null"},
      {"{\"tables\": {\"t\": [1]}}", "t.json: tables.t[0]: must be a string, not a number"},
      {"{\"tables\": {\"t\": [\"\"]}}", "t.json: tables.t[0]: '' must be 1..255 printable characters"},
      {"{\"tables\": {\"t\": [\"a b\"]}}", "t.json: tables.t[0]: 'a b' must be 1..255 printable"},
      {"{\"tables\": {\"t\": [\"a\", \"a\"]}}", "t.json: tables.t[1]: 'a' is given twice"},
      {"{\"tables\": {\"t\": [\"a.example\", \"A.example\"]}, \"policy\": [{\"rule\": \"in_table\", \"key\": "
       "\"tls_domain\", \"table\": \"t\"}]}",
       "t.json: tables.t[1]: 'a.example' is given twice"},
      {"{\"tables\": {\"t\": [], \"t\": []}}", "t.json: tables.t: duplicate key"},
      {"{\"tables\": {\"t\": [\"1.2.3.4\", \"example.com\"]}, \"policy\": [{\"rule\": \"in_table\", \"key\": "
       "\"client_ipv4\", \"table\": \"t\"}]}",
       "t.json: tables.t[1]: 'example.com' is not an IPv4 address or network (policy[0] matches key client_ipv4 against it)"},
      {"{\"tables\": {\"t\": [\"10.0.0.0/33\"]}, \"policy\": [{\"rule\": \"in_table\", \"key\": \"ipv4/8\", \"table\": \"t\"}]}",
       "t.json: tables.t[0]: '10.0.0.0/33' is not an IPv4 address or network (policy[0] matches key ipv4/8"},
      {"{\"tables\": {\"t\": [\"::1\"]}, \"policy\": [{\"rule\": \"in_table\", \"key\": \"client_ipv4\", \"table\": \"t\"}]}",
       "t.json: tables.t[0]: '::1' is not an IPv4"},
      {"{\"tables\": {\"t\": [\"2001:db8::/129\"]}, \"policy\": [{\"rule\": \"in_table\", \"key\": \"client_ipv6\", \"table\": \"t\"}]}",
       "t.json: tables.t[0]: '2001:db8::/129' is not an IPv6 address or network"},
      {"{\"tables\": {\"t\": [\"bad_domain\"]}, \"policy\": [{\"rule\": \"not_in_table\", \"key\": \"tls_domain\", \"table\": \"t\"}]}",
       "t.json: tables.t[0]: 'bad_domain' is not a host name (policy[0] matches key tls_domain"},
      {"{\"tables\": {\"t\": [\"a:b\"]}, \"policy\": [{\"rule\": \"not_in_table\", \"key\": \"listener\", \"table\": \"t\"},"
       " {\"rule\": \"in_table\", \"key\": \"ipv6/64\", \"table\": \"t\"}]}",
       "t.json: tables.t[0]: 'a:b' is not a listener name or an IPv6 address or network (policy[0] matches key listener"},
      {"{\"tables\": {\"t\": [\"1.2.3.4\", \"::1\", \"x\"]}, \"policy\": [{\"rule\": \"max_connections\", \"max\": 1},"
       " {\"rule\": \"in_table\", \"key\": \"client_ipv4\", \"table\": \"t\"},"
       " {\"rule\": \"in_table\", \"key\": \"client_ipv6\", \"table\": \"t\"}]}",
       "t.json: tables.t[2]: 'x' is not an IPv4 address or network or an IPv6 address or network (policy[1]"},
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

/* The new flags of issues 3-5 land in the struct; repeatable ones add. */
static void test_new_flags(void) {
  char err[256] = "";
  struct mtp_config c;
  const char *argv[] = {P1, "--tls-domain", "Www.Example.COM", "--tls-domain=cdn.example.net", "--tls-clock-skew", "30",
                        "--domain-fronting", "Front.example:8443", "--replay-cache-mb", "4096",
                        "--per-sni-secrets", "on", "--per-sni-salt", "s@lt with spaces", "--back", "[2001:db8::7]:8444",
                        "--tunnel-listen", "127.0.0.1:8444", "--tunnel-cert", "/c.pem", "--tunnel-key", "/k.pem",
                        "--tunnel-ca", "/ca.pem", "--tunnel-allow", "front-1", "--tunnel-allow", "front.2",
                        "--node-name", "back_1", "--tables-file", "/var/lib/t.json", "--drain-timeout", "0",
                        "--log-debug", "front,tunnel", NULL};
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.ntls_domains == 2 && strcmp(c.tls_domains[0], "www.example.com") == 0 &&
        strcmp(c.tls_domains[1], "cdn.example.net") == 0);
  CHECK(c.tls_clock_skew == 30 && c.replay_max_age == 60); /* derived: 2 * skew */
  CHECK(c.fronting_mode == MTP_FRONTING_HOST && strcmp(c.fronting_host, "front.example") == 0 &&
        c.fronting_port == 8443);
  CHECK(c.replay_cache_bytes == (size_t)4096 << 20);
  CHECK(c.per_sni_secrets && strcmp(c.per_sni_salt, "s@lt with spaces") == 0);
  CHECK(strcmp(c.back, "[2001:db8::7]:8444") == 0 && strcmp(c.tunnel_listen, "127.0.0.1:8444") == 0);
  CHECK(strcmp(c.tunnel_cert, "/c.pem") == 0 && strcmp(c.tunnel_key, "/k.pem") == 0 && strcmp(c.tunnel_ca, "/ca.pem") == 0);
  CHECK(c.ntunnel_allowed_fronts == 2 && strcmp(c.tunnel_allowed_fronts[0], "front-1") == 0 &&
        strcmp(c.tunnel_allowed_fronts[1], "front.2") == 0);
  CHECK(strcmp(c.node_name, "back_1") == 0);
  CHECK(strcmp(c.tables_file, "/var/lib/t.json") == 0 && c.drain_timeout == 0);
  CHECK(strcmp(c.log_debug, "front,tunnel") == 0);
  CHECK(c.config_path == NULL);
  /* Command-line listeners use the global domains. */
  for (size_t i = 0; i < c.nlisteners; i++)
    CHECK(c.listeners[i].ntls_domains == 0 && mtp_config_serves_fake_tls(&c, &c.listeners[i]));
  mtp_config_free(&c);

  /* Spellings of on/off; a fake_tls-only listener is fine once a domain exists. */
  static const char *const on[] = {"on", "true", "yes", "1"}, *const off[] = {"off", "false", "no", "0"};
  for (size_t i = 0; i < 4; i++) {
    const char *a1[] = {P1, "--per-sni-secrets", on[i], "--per-sni-salt", "x", NULL};
    CHECK_MSG(load(a1, &c, err, sizeof(err)) == MTP_OK && c.per_sni_secrets, "%s", on[i]);
    mtp_config_free(&c);
    const char *a2[] = {P1, "--per-sni-secrets", off[i], NULL};
    CHECK_MSG(load(a2, &c, err, sizeof(err)) == MTP_OK && !c.per_sni_secrets, "%s", off[i]);
    mtp_config_free(&c);
  }
  const char *a3[] = {P1, "--allowed-protocols", "fake_tls", "--tls-domain", "a.example", NULL};
  CHECK_MSG(load(a3, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.listeners[0].allowed_protocols == MTP_ALLOW_FAKE_TLS && mtp_config_serves_fake_tls(&c, &c.listeners[0]));
  mtp_config_free(&c);
  /* Without a domain fake-TLS is simply off (unless it is the only protocol). */
  const char *a4[] = {P1, NULL};
  CHECK_MSG(load(a4, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(!mtp_config_serves_fake_tls(&c, &c.listeners[0]));
  CHECK(c.replay_max_age == 1200);
  mtp_config_free(&c);
  /* A 253-character domain with 63-character labels is the longest allowed. */
  char longest[254], *p = longest;
  for (int i = 0; i < 4; i++) {
    int len = i < 3 ? 63 : 61;
    memset(p, 'a', (size_t)len);
    p += len;
    *p++ = i < 3 ? '.' : '\0';
  }
  CHECK(strlen(longest) == 253);
  const char *a5[] = {P1, "--tls-domain", longest, NULL};
  CHECK_MSG(load(a5, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  mtp_config_free(&c);
  char too_long[256]; /* 254 characters, every label within 63 */
  snprintf(too_long, sizeof(too_long), "%sb", longest);
  const char *a6[] = {P1, "--tls-domain", too_long, NULL};
  CHECK(load(a6, &c, err, sizeof(err)) == MTP_EINVAL && strstr(err, "is not a host name") != NULL);
  mtp_config_free(&c);
}

/* domain_fronting: off, sni, HOST:PORT with a name, IPv4 or [IPv6]. */
static void test_fronting(void) {
  static const struct {
    const char *in;
    enum mtp_fronting_mode mode;
    const char *host;
    uint16_t port;
  } ok[] = {
      {"off", MTP_FRONTING_OFF, NULL, 0},
      {"sni", MTP_FRONTING_SNI, NULL, 0},
      {"127.0.0.1:8443", MTP_FRONTING_HOST, "127.0.0.1", 8443},
      {"[::1]:8443", MTP_FRONTING_HOST, "::1", 8443},
      {"[2001:db8::1]:443", MTP_FRONTING_HOST, "2001:db8::1", 443},
      {"WWW.Example.com:443", MTP_FRONTING_HOST, "www.example.com", 443},
      {"localhost:65535", MTP_FRONTING_HOST, "localhost", 65535},
  };
  for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
    char err[256] = "", json[128];
    struct mtp_config c;
    const char *argv[] = {P1, "--domain-fronting", "10.0.0.1:1", "--domain-fronting", ok[i].in, NULL};
    CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s: %s", ok[i].in, err);
    CHECK_MSG(c.fronting_mode == ok[i].mode && c.fronting_port == ok[i].port, "%s", ok[i].in);
    if (ok[i].host == NULL)
      CHECK_MSG(c.fronting_host == NULL, "%s", ok[i].in);
    else
      CHECK_MSG(c.fronting_host != NULL && strcmp(c.fronting_host, ok[i].host) == 0, "%s", ok[i].in);
    mtp_config_free(&c);
    /* The same through JSON. */
    mtp_config_defaults(&c);
    snprintf(json, sizeof(json), "{\"domain_fronting\": \"%s\"}", ok[i].in);
    CHECK_MSG(mtp_config_parse_json(json, "t.json", &c, err, sizeof(err)) == MTP_OK, "%s", err);
    CHECK(c.fronting_mode == ok[i].mode && c.fronting_port == ok[i].port);
    mtp_config_free(&c);
  }
}

/* replay_max_age: derived as 2 * tls_clock_skew unless given; a given one may not be lower. */
static void test_replay_age(void) {
  char err[256] = "";
  struct mtp_config c;
  const char *a1[] = {P1, "--tls-clock-skew", "1000", NULL};
  CHECK(load(a1, &c, err, sizeof(err)) == MTP_OK && c.replay_max_age == 2000);
  mtp_config_free(&c);
  const char *a2[] = {P1, "--tls-clock-skew", "2.5", NULL};
  CHECK(load(a2, &c, err, sizeof(err)) == MTP_OK && c.replay_max_age == 5);
  mtp_config_free(&c);

  /* File values: 0 derives, a value at or above the minimum is kept. */
  char *path = write_temp("{\"tls_clock_skew\": 300, \"replay_max_age\": 0}");
  const char *a3[] = {"--config", path, P1, NULL};
  CHECK_MSG(load(a3, &c, err, sizeof(err)) == MTP_OK && c.replay_max_age == 600, "%s", err);
  mtp_config_free(&c);
  unlink(path);
  free(path);
  path = write_temp("{\"tls_clock_skew\": 300, \"replay_max_age\": 3600}");
  const char *a4[] = {"--config", path, P1, NULL};
  CHECK_MSG(load(a4, &c, err, sizeof(err)) == MTP_OK && c.replay_max_age == 3600, "%s", err);
  mtp_config_free(&c);
  /* A flag raising the skew above half the file's age is an error that names the file's key. */
  const char *a5[] = {"--config", path, P1, "--tls-clock-skew", "1801", NULL};
  CHECK(load(a5, &c, err, sizeof(err)) == MTP_EINVAL);
  char want[300];
  snprintf(want, sizeof(want), "%s: replay_max_age: must be at least 2 * tls_clock_skew (3602)", path);
  CHECK_MSG(strcmp(err, want) == 0, "%s", err);
  mtp_config_free(&c);
  unlink(path);
  free(path);
  /* The file's skew alone moves the derived age (no file age given). */
  path = write_temp("{\"tls_clock_skew\": 10}");
  const char *a6[] = {"--config", path, P1, "--tls-clock-skew", "20", NULL};
  CHECK_MSG(load(a6, &c, err, sizeof(err)) == MTP_OK && c.replay_max_age == 40, "%s", err);
  CHECK(strcmp(c.config_path, path) == 0);
  mtp_config_free(&c);
  unlink(path);
  free(path);

  /* mtp_config_parse_json applied step by step: a derived age follows the skew; a given one stays. */
  mtp_config_defaults(&c);
  CHECK(c.replay_max_age == 1200);
  CHECK(mtp_config_parse_json("{\"tls_clock_skew\": 100}", "t.json", &c, err, sizeof(err)) == MTP_OK);
  CHECK(c.replay_max_age == 200);
  CHECK(mtp_config_parse_json("{\"tls_clock_skew\": 50}", "t.json", &c, err, sizeof(err)) == MTP_OK);
  CHECK(c.replay_max_age == 100);
  CHECK(mtp_config_parse_json("{\"replay_max_age\": 150}", "t.json", &c, err, sizeof(err)) == MTP_OK);
  CHECK(c.replay_max_age == 150);
  CHECK(mtp_config_parse_json("{\"tls_clock_skew\": 100}", "u.json", &c, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strcmp(err, "u.json: replay_max_age: must be at least 2 * tls_clock_skew (200)") == 0, "%s", err);
  mtp_config_free(&c);
}

/* Per-listener tls_domains, the global list, and which one is in effect. */
static void test_tls_domains(void) {
  char err[256] = "";
  struct mtp_config c;
  char *path = write_temp("{\"tls_domains\": [\"g.example\"], \"listeners\": ["
                          "{\"name\": \"own\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A "\"],"
                          " \"tls_domains\": [\"A.example\", \"b.example\"], \"allowed_protocols\": [\"fake_tls\"]},"
                          "{\"name\": \"global\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A "\"],"
                          " \"allowed_protocols\": [\"fake_tls\"]},"
                          "{\"name\": \"none\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A "\"],"
                          " \"tls_domains\": null, \"allowed_protocols\": [\"secure\"]}]}");
  const char *a1[] = {"--config", path, NULL};
  CHECK_MSG(load(a1, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners == 3 && c.ntls_domains == 1);
  size_t n;
  const char *const *d = mtp_config_tls_domains(&c, &c.listeners[0], &n);
  CHECK(n == 2 && strcmp(d[0], "a.example") == 0 && strcmp(d[1], "b.example") == 0);
  d = mtp_config_tls_domains(&c, &c.listeners[1], &n);
  CHECK(n == 1 && strcmp(d[0], "g.example") == 0);
  CHECK(mtp_config_serves_fake_tls(&c, &c.listeners[0]) && mtp_config_serves_fake_tls(&c, &c.listeners[1]));
  CHECK(!mtp_config_serves_fake_tls(&c, &c.listeners[2]));
  mtp_config_free(&c);
  /* --tls-domain replaces the global list, not the listeners' own. */
  const char *a2[] = {"--config", path, "--tls-domain", "x.example", NULL};
  CHECK_MSG(load(a2, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.ntls_domains == 1 && strcmp(c.tls_domains[0], "x.example") == 0 && c.listeners[0].ntls_domains == 2);
  mtp_config_free(&c);
  unlink(path);
  free(path);
  /* Listener 'global' needs the global list: without it, the error names it. */
  path = write_temp("{\"tls_domains\": [], \"listeners\": ["
                    "{\"name\": \"own\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A "\"],"
                    " \"tls_domains\": [\"a.example\"], \"allowed_protocols\": [\"fake_tls\"]},"
                    "{\"name\": \"global\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A "\"],"
                    " \"allowed_protocols\": [\"fake_tls\"]}]}");
  const char *a3[] = {"--config", path, NULL};
  CHECK(load(a3, &c, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strstr(err, "listener 'global': allowed_protocols is only fake_tls") != NULL, "%s", err);
  mtp_config_free(&c);
  unlink(path);
  free(path);
}

/* Policy details not in FULL_JSON: order of "tables" and "policy", empty lists, null keys. */
static void test_policy(void) {
  char err[256] = "";
  struct mtp_config c;
  mtp_config_defaults(&c);
  CHECK_MSG(mtp_config_parse_json("{\"policy\": [{\"rule\": \"in_table\", \"key\": \"ipv4/16\", \"table\": \"nets\"},"
                                  " {\"rule\": \"max_connections\", \"keys\": [], \"max\": 9007199254740992}],"
                                  " \"tables\": {\"nets\": [\"10.1.0.0/16\", \"10.2.0.0\", \"0.0.0.0/0\"],"
                                  " \"spare\": [\"anything-goes\"]}}",
                                  "t.json", &c, err, sizeof(err)) == MTP_OK,
            "%s", err);
  CHECK(c.npolicy == 2 && c.ntables == 2);
  CHECK(c.policy[0].keys[0].key == MTP_PKEY_IPV4_SUBNET && c.policy[0].keys[0].prefix == 16);
  CHECK(c.policy[1].nkeys == 0 && c.policy[1].max == 9007199254740992ull);
  CHECK(c.tables[0].nentries == 3 && strcmp(c.tables[1].entries[0], "anything-goes") == 0);
  /* A later text replaces the lists; a table that a rule needs must come with it. */
  CHECK(mtp_config_parse_json("{\"policy\": []}", "t.json", &c, err, sizeof(err)) == MTP_OK);
  CHECK(c.npolicy == 0 && c.policy == NULL && c.ntables == 2);
  CHECK(mtp_config_parse_json("{\"tables\": {}}", "t.json", &c, err, sizeof(err)) == MTP_OK);
  CHECK(c.ntables == 0 && c.tables == NULL);
  mtp_config_free(&c);
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
  CHECK(c.ntls_domains == 1 && strcmp(c.tls_domains[0], "www.example.com") == 0);
  CHECK(c.fronting_mode == MTP_FRONTING_SNI && c.replay_max_age == 1200);
  CHECK(mtp_config_serves_fake_tls(&c, &c.listeners[0]) && mtp_config_serves_fake_tls(&c, &c.listeners[1]));
  mtp_config_free(&c);
  snprintf(path, sizeof(path), "%sconfig/minimal.json", root);
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners >= 1);
  mtp_config_free(&c);
}

/* ---- reload ---- */

static void rewrite(const char *path, const char *text) {
  FILE *f = fopen(path, "wb");
  CHECK(f != NULL);
  CHECK(fwrite(text, 1, strlen(text), f) == strlen(text));
  fclose(f);
}

static const struct mtp_listener_conf *listener_named(const struct mtp_config *c, const char *name) {
  for (size_t i = 0; i < c->nlisteners; i++)
    if (strcmp(c->listeners[i].name, name) == 0)
      return &c->listeners[i];
  return NULL;
}

/* A failed reload leaves *out exactly as it was: compare it with a sentinel pattern. */
static void reload_fails(const struct mtp_config *old, const char *want_err) {
  struct mtp_config out;
  unsigned char sentinel[sizeof(out)];
  char err[512] = "";
  memset(&out, 0xa5, sizeof(out));
  memset(sentinel, 0xa5, sizeof(sentinel));
  CHECK(mtp_config_reload(old, &out, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strcmp(err, want_err) == 0, "got '%s' want '%s'", err, want_err);
  CHECK(memcmp(&out, sentinel, sizeof(out)) == 0);
}

/* The loaded config keeps a private copy of its argv. */
static void test_reload_argv(void) {
  char err[256] = "";
  struct mtp_config c;
  char a0[] = "--port", a1[] = "0", a2[] = "--secret", a3[] = SECRET_A;
  char *argv[] = {a0, a1, a2, a3, NULL};
  CHECK_MSG(load((const char *const *)argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c._argc == 4 && c._argv != NULL && c._argv[4] == NULL);
  for (int i = 0; i < 4; i++)
    CHECK(strcmp(c._argv[i], argv[i]) == 0 && c._argv[i] != argv[i]);
  memset(a3, 'x', sizeof(a3) - 1); /* the caller's argv may change afterwards */
  CHECK(strcmp(c._argv[3], SECRET_A) == 0);
  mtp_config_free(&c);
  CHECK(c._argv == NULL && c._argc == 0);
  mtp_config_free(&c);
  /* A config made without mtp_config_load has nothing to re-read. */
  mtp_config_defaults(&c);
  reload_fails(&c, "reload: this configuration was not made by mtp_config_load, so there is nothing to re-read");
  mtp_config_free(&c);
}

/* Edit the file, reload: listeners added and removed, a secret changed, timeouts changed; flags
 * still override the file; listeners that keep name and address keep their socket. */
static void test_reload_edit(void) {
  char err[512] = "";
  struct mtp_config c, r, r2;
  char *path = write_temp("{\"handshake_timeout\": 10, \"log_level\": \"warn\", \"listeners\": ["
                          "{\"name\": \"a\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A "\"]},"
                          "{\"name\": \"gone\", \"listen\": \"127.0.0.1:4430\", \"secrets\": [\"" SECRET_A "\"]}]}");
  const char *argv[] = {"--config", path, "--log-level", "debug", NULL};
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.nlisteners == 2 && c.handshake_timeout == 10 && c.log_level == MTP_LOG_DEBUG);

  /* Unchanged file: same config, nothing to report. */
  snprintf(err, sizeof(err), "junk");
  CHECK_MSG(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK_MSG(err[0] == '\0', "%s", err);
  CHECK(r.nlisteners == 2 && mtp_listener_conf_same_socket(&c.listeners[0], &r.listeners[0]) &&
        mtp_listener_conf_same_socket(&c.listeners[1], &r.listeners[1]));
  CHECK(r._argc == c._argc && r._argv != c._argv && strcmp(r.config_path, path) == 0);
  mtp_config_free(&r);

  /* Listener b added, 'gone' removed, a's secret changed, handshake_timeout and the file's
   * log_level changed (the flag still wins), a global ad_tag added. */
  rewrite(path, "{\"handshake_timeout\": 2.5, \"log_level\": \"error\", \"ad_tag\": \"" TAG "\", \"listeners\": ["
                "{\"name\": \"b\", \"listen\": \"[::1]:0\", \"secrets\": [\"" SECRET_A "\"]},"
                "{\"name\": \"a\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_B "\", \"" SECRET_A "\"]}]}");
  CHECK_MSG(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK_MSG(err[0] == '\0', "%s", err);
  CHECK(r.nlisteners == 2 && r.handshake_timeout == 2.5 && r.log_level == MTP_LOG_DEBUG && r.has_ad_tag);
  const struct mtp_listener_conf *a = listener_named(&r, "a"), *b = listener_named(&r, "b");
  CHECK(a != NULL && b != NULL && listener_named(&r, "gone") == NULL);
  CHECK(a->nsecrets == 2 && secret_is(a->secrets[0], SECRET_B) && secret_is(a->secrets[1], SECRET_A));
  CHECK(mtp_listener_conf_same_socket(&c.listeners[0], a));
  CHECK(!mtp_listener_conf_same_socket(&c.listeners[1], b) && !mtp_listener_conf_same_socket(&c.listeners[0], b));
  addr_is(&b->addr, "[::1]:0");
  /* The old config is untouched and still usable. */
  CHECK(c.nlisteners == 2 && c.handshake_timeout == 10 && c.listeners[0].nsecrets == 1 && !c.has_ad_tag);

  /* A reload of the reloaded config works the same way (it carries its own argv). */
  rewrite(path, "{\"listeners\": [{\"name\": \"b\", \"listen\": \"[::1]:0\", \"secrets\": [\"" SECRET_B "\"]}]}");
  CHECK_MSG(mtp_config_reload(&r, &r2, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(r2.nlisteners == 1 && strcmp(r2.listeners[0].name, "b") == 0 && r2.handshake_timeout == 10);
  CHECK(mtp_listener_conf_same_socket(b, &r2.listeners[0]) && secret_is(r2.listeners[0].secrets[0], SECRET_B));
  mtp_config_free(&r2);
  mtp_config_free(&r);
  mtp_config_free(&c);

  /* --secret on the command line replaces the re-read file's secrets too. */
  rewrite(path, "{\"listeners\": [{\"name\": \"a\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A "\"]}]}");
  const char *argv2[] = {"--config", path, "--secret", SECRET_A, NULL};
  CHECK_MSG(load(argv2, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  rewrite(path, "{\"listeners\": [{\"name\": \"a\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_B "\"]},"
                "{\"name\": \"c\", \"listen\": \"127.0.0.1:0\"}]}");
  CHECK_MSG(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(r.nlisteners == 2 && r.listeners[0].nsecrets == 1 && secret_is(r.listeners[0].secrets[0], SECRET_A));
  CHECK(r.listeners[1].nsecrets == 1 && secret_is(r.listeners[1].secrets[0], SECRET_A));
  mtp_config_free(&r);
  mtp_config_free(&c);
  unlink(path);
  free(path);
}

/* An invalid edit is refused with the reason; the caller keeps the old config. */
static void test_reload_invalid(void) {
  char err[512] = "", want[600];
  struct mtp_config c, r;
  char *path = write_temp("{\"listeners\": [{\"name\": \"a\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A
                          "\"]}]}");
  const char *argv[] = {"--config", path, NULL};
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);

  rewrite(path, "{\"handshake_timeout\": -1, \"listeners\": [{\"name\": \"a\", \"listen\": \"127.0.0.1:0\","
                " \"secrets\": [\"" SECRET_B "\"]}]}");
  snprintf(want, sizeof(want), "%s: handshake_timeout: '-1' must be seconds, > 0 and <= 3600", path);
  reload_fails(&c, want);
  rewrite(path, "{\"listeners\": [{\"name\": \"a\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"xyz\"]}]}");
  snprintf(want, sizeof(want), "%s: listeners[0].secrets[0]: 'xyz' is not 32 hex characters", path);
  reload_fails(&c, want);
  rewrite(path, "{\"listeners\": [\n{\"name\": \"a\",, }]}");
  snprintf(want, sizeof(want), "%s: line 2 column 15: invalid JSON", path);
  reload_fails(&c, want);
  rewrite(path, "{\"policy\": [{\"rule\": \"in_table\", \"key\": \"client_ipv4\", \"table\": \"nope\"}],"
                " \"listeners\": [{\"name\": \"a\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A "\"]}]}");
  snprintf(want, sizeof(want), "%s: policy[0].table: no table 'nope' in \"tables\"", path);
  reload_fails(&c, want);
  rewrite(path, "{\"listeners\": []}");
  reload_fails(&c, "no listeners: give --port P or --listen ADDR:PORT or listeners in the config");
  unlink(path);
  snprintf(want, sizeof(want), "%s: cannot open: No such file or directory", path);
  reload_fails(&c, want);
  /* The old config is intact. */
  CHECK(c.nlisteners == 1 && secret_is(c.listeners[0].secrets[0], SECRET_A) && c.handshake_timeout == 10);
  /* Once the file is fixed, the reload works. */
  rewrite(path, "{\"listeners\": [{\"name\": \"a\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_B "\"]}]}");
  CHECK_MSG(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(secret_is(r.listeners[0].secrets[0], SECRET_B));
  mtp_config_free(&r);
  mtp_config_free(&c);
  unlink(path);
  free(path);
}

/* A config given only by flags (no file) reloads to the same config. */
static void test_reload_flags_only(void) {
  char err[512] = "";
  struct mtp_config c, r;
  const char *argv[] = {"--port", "0", "--listen", "127.0.0.1:0", "--secret", SECRET_A, "--workers", "3",
                        "--tls-domain", "a.example", "--admin", "127.0.0.1:9100", NULL};
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.config_path == NULL);
  CHECK_MSG(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK_MSG(err[0] == '\0', "%s", err);
  CHECK(r.nlisteners == 3 && r.workers == 3 && r.ntls_domains == 1 && strcmp(r.admin, "127.0.0.1:9100") == 0);
  CHECK(r.config_path == NULL);
  for (size_t i = 0; i < 3; i++)
    CHECK(mtp_listener_conf_same_socket(&c.listeners[i], &r.listeners[i]));
  mtp_config_free(&r);
  mtp_config_free(&c);
}

/* A file with every restart-only key and many reloadable ones; v picks one of two value sets. */
static void variant_json(int v, char *out, size_t outlen) {
  int n = snprintf(
      out, outlen,
      "{\"workers\": %d, \"dc_conn_max_clients\": %d, \"dc_connect_timeout\": %d, \"proxy_secret\": \"/ps%d\","
      " \"proxy_config\": \"/pc%d\", \"config_refresh\": %d, \"cache_dir\": \"/cache%d\","
      " \"nat_info\": \"10.0.0.%d:203.0.113.7\", \"admin\": \"127.0.0.1:%d\", \"replay_cache_mb\": %d,"
      " \"replay_max_age\": %d, \"back\": \"back%d.example:8444\", \"tunnel_listen\": \"0.0.0.0:%d\","
      " \"tunnel_cert\": \"/c%d\", \"tunnel_key\": \"/k%d\", \"tunnel_ca\": \"/ca%d\","
      " \"tunnel_allowed_fronts\": [\"f%d\"], \"tunnel_conns\": %d, \"tunnel_heartbeat\": %d, \"tunnel_timeout\": %d,"
      " \"tunnel_window\": %d, \"node_name\": \"n%d\", \"tables_file\": \"/t%d\","
      " \"handshake_timeout\": %d, \"idle_timeout\": %d, \"client_send_budget\": %d, \"drain_timeout\": %d,"
      " \"ad_tag\": %s, \"public_host\": \"h%d.example\", \"log_level\": \"%s\", \"log_debug\": \"m%d\","
      " \"tls_domains\": [\"d%d.example\"], \"tls_clock_skew\": %d, \"tls_record_size\": %d,"
      " \"tls_flight_size\": %d, \"tls_probe_interval\": %d, \"domain_fronting\": \"%s\","
      " \"fronting_connect_timeout\": %d, \"fronting_idle_timeout\": %d, \"per_sni_secrets\": %s,"
      " \"per_sni_salt\": \"s%d\", \"tables\": {\"t%d\": []}, \"policy\": [{\"rule\": \"max_connections\", \"max\": %d}],"
      " \"listeners\": [{\"name\": \"x%d\", \"listen\": \"127.0.0.1:0\", \"secrets\": [\"%s\"]}]}",
      v + 1, v + 10, v + 2, v, v, 600 + v, v, v + 1, 9100 + v, v + 1, 4000 + v * 1000, v, 8444 + v, v, v, v, v,
      v + 1, v + 2, v + 20, 65536 * (v + 1), v, v, 10 + v, 600 + v, 2000000 + v, 30 + v,
      v ? "\"" TAG "\"" : "null", v, v ? "debug" : "warn", v, v, 300 + 100 * v, 4096 + v, 3000 + v, 600 + v,
      v ? "off" : "127.0.0.1:8443", 3 + v, 60 + v, v ? "true" : "false", v, v, 100 + v, v, v ? SECRET_B : SECRET_A);
  CHECK(n > 0 && (size_t)n < outlen);
}

/* Restart-only settings keep their old values and are named in the note; the others apply. */
static void test_reload_restart_only(void) {
  char err[512] = "", text[4096];
  struct mtp_config c, r;
  variant_json(0, text, sizeof(text));
  char *path = write_temp(text);
  const char *argv[] = {"--config", path, NULL};
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  variant_json(1, text, sizeof(text));
  rewrite(path, text);
  CHECK_MSG(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK, "%s", err);
  const char *want = "workers, dc_conn_max_clients, dc_connect_timeout, proxy_secret, proxy_config, config_refresh, "
                     "cache_dir, nat_info, admin, replay_cache_mb, replay_max_age, back, tunnel_listen, tunnel_cert, "
                     "tunnel_key, tunnel_ca, tunnel_conns, tunnel_heartbeat, tunnel_timeout, tunnel_window, "
                     "node_name, tables_file, tunnel_allowed_fronts changed; they keep their old values until a "
                     "restart";
  CHECK_MSG(strcmp(err, want) == 0, "%s", err);
  CHECK(strlen(want) < 512);
  /* Kept. */
  CHECK(r.workers == 1 && r.dc_conn_max_clients == 10 && r.dc_connect_timeout == 2);
  CHECK(strcmp(r.proxy_secret, "/ps0") == 0 && strcmp(r.proxy_config, "/pc0") == 0 && r.config_refresh == 600);
  CHECK(strcmp(r.cache_dir, "/cache0") == 0 && r.has_nat && r.nat_local == 0x0a000001);
  CHECK(strcmp(r.admin, "127.0.0.1:9100") == 0 && r.replay_cache_bytes == (1u << 20) && r.replay_max_age == 4000);
  CHECK(strcmp(r.back, "back0.example:8444") == 0 && strcmp(r.tunnel_listen, "0.0.0.0:8444") == 0);
  CHECK(strcmp(r.tunnel_cert, "/c0") == 0 && strcmp(r.tunnel_key, "/k0") == 0 && strcmp(r.tunnel_ca, "/ca0") == 0);
  CHECK(r.ntunnel_allowed_fronts == 1 && strcmp(r.tunnel_allowed_fronts[0], "f0") == 0);
  CHECK(r.tunnel_conns == 1 && r.tunnel_heartbeat == 2 && r.tunnel_timeout == 20 && r.tunnel_window == 65536);
  CHECK(strcmp(r.node_name, "n0") == 0 && strcmp(r.tables_file, "/t0") == 0);
  /* Applied. */
  CHECK(r.handshake_timeout == 11 && r.idle_timeout == 601 && r.client_send_budget == 2000001 &&
        r.drain_timeout == 31);
  CHECK(r.has_ad_tag && strcmp(r.public_host, "h1.example") == 0 && r.log_level == MTP_LOG_DEBUG);
  CHECK(strcmp(r.log_debug, "m1") == 0 && r.ntls_domains == 1 && strcmp(r.tls_domains[0], "d1.example") == 0);
  CHECK(r.tls_clock_skew == 400 && r.tls_record_size == 4097 && r.tls_flight_size == 3001 &&
        r.tls_probe_interval == 601);
  CHECK(r.fronting_mode == MTP_FRONTING_OFF && r.fronting_host == NULL && r.fronting_port == 0);
  CHECK(r.fronting_connect_timeout == 4 && r.fronting_idle_timeout == 61);
  CHECK(r.per_sni_secrets && strcmp(r.per_sni_salt, "s1") == 0);
  CHECK(r.ntables == 1 && strcmp(r.tables[0].name, "t1") == 0 && r.npolicy == 1 && r.policy[0].max == 101);
  CHECK(r.nlisteners == 1 && strcmp(r.listeners[0].name, "x1") == 0 && secret_is(r.listeners[0].secrets[0], SECRET_B));
  /* The kept strings are the new config's own copies. */
  CHECK(r.admin != c.admin && r.tunnel_allowed_fronts != c.tunnel_allowed_fronts);
  mtp_config_free(&c);
  /* And back to set 0: the restart-only values now match the kept ones, so nothing is reported. */
  struct mtp_config r2;
  variant_json(0, text, sizeof(text));
  rewrite(path, text);
  CHECK_MSG(mtp_config_reload(&r, &r2, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK_MSG(strcmp(err, "") == 0, "%s", err);
  CHECK(r2.fronting_mode == MTP_FRONTING_HOST && strcmp(r2.fronting_host, "127.0.0.1") == 0 && !r2.has_ad_tag);
  mtp_config_free(&r2);
  /* One key: singular wording. */
  variant_json(0, text, sizeof(text));
  char *w = strstr(text, "\"workers\": 1,");
  CHECK(w != NULL);
  w[11] = '5';
  rewrite(path, text);
  CHECK_MSG(mtp_config_reload(&r, &r2, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK_MSG(strcmp(err, "workers changed; it keeps its old value until a restart") == 0, "%s", err);
  CHECK(r2.workers == 1);
  mtp_config_free(&r2);
  mtp_config_free(&r);
  unlink(path);
  free(path);
}

/* replay_max_age belongs to the running replay cache: a reload keeps it, and a tls_clock_skew it
 * cannot cover is refused, naming both keys. */
static void test_reload_replay_age(void) {
  char err[512] = "", want[600];
  struct mtp_config c, r;
  char *path = write_temp("{\"tls_clock_skew\": 600, \"listeners\": [{\"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A
                          "\"]}]}");
  const char *argv[] = {"--config", path, NULL};
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(c.replay_max_age == 1200);
  /* A smaller skew: applied; the cache keeps its longer age, which is reported. */
  rewrite(path, "{\"tls_clock_skew\": 300, \"listeners\": [{\"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A
                "\"]}]}");
  CHECK_MSG(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(r.tls_clock_skew == 300 && r.replay_max_age == 1200);
  CHECK_MSG(strcmp(err, "replay_max_age changed; it keeps its old value until a restart") == 0, "%s", err);
  mtp_config_free(&r);
  /* The largest skew the cache covers. */
  rewrite(path, "{\"tls_clock_skew\": 600, \"replay_max_age\": 1200, \"listeners\": [{\"listen\": \"127.0.0.1:0\","
                " \"secrets\": [\"" SECRET_A "\"]}]}");
  CHECK_MSG(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK && err[0] == '\0', "%s", err);
  mtp_config_free(&r);
  /* A larger skew needs a longer age than the cache has. */
  rewrite(path, "{\"tls_clock_skew\": 700, \"listeners\": [{\"listen\": \"127.0.0.1:0\", \"secrets\": [\"" SECRET_A
                "\"]}]}");
  snprintf(want, sizeof(want),
           "%s: tls_clock_skew: 700 would need replay_max_age >= 1400, but the running replay cache keeps "
           "handshakes for 1200 s until a restart (keep tls_clock_skew <= 600, or restart)",
           path);
  reload_fails(&c, want);
  /* ... even when the new file raises replay_max_age to match: the cache's age is fixed. */
  rewrite(path, "{\"tls_clock_skew\": 700, \"replay_max_age\": 5000, \"listeners\": [{\"listen\": \"127.0.0.1:0\","
                " \"secrets\": [\"" SECRET_A "\"]}]}");
  reload_fails(&c, want);
  mtp_config_free(&c);
  /* A cache started with a long age covers a larger skew. */
  rewrite(path, "{\"tls_clock_skew\": 600, \"replay_max_age\": 5000, \"listeners\": [{\"listen\": \"127.0.0.1:0\","
                " \"secrets\": [\"" SECRET_A "\"]}]}");
  CHECK_MSG(load(argv, &c, err, sizeof(err)) == MTP_OK, "%s", err);
  rewrite(path, "{\"tls_clock_skew\": 2500, \"replay_max_age\": 5000, \"listeners\": [{\"listen\": \"127.0.0.1:0\","
                " \"secrets\": [\"" SECRET_A "\"]}]}");
  CHECK_MSG(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK && err[0] == '\0', "%s", err);
  CHECK(r.tls_clock_skew == 2500 && r.replay_max_age == 5000);
  mtp_config_free(&r);
  mtp_config_free(&c);
  unlink(path);
  free(path);
}

/* Which listener of a new config may keep an old listener's socket. */
static void test_same_socket(void) {
  struct mtp_listener_conf a, b;
  memset(&a, 0, sizeof(a));
  memset(&b, 0, sizeof(b));
  char na[] = "main", nb[] = "main", other[] = "other";
  a.name = na;
  b.name = nb;
  CHECK(mtp_parse_addr_port("127.0.0.1:443", &a.addr) == MTP_OK && mtp_parse_addr_port("127.0.0.1:443", &b.addr) == MTP_OK);
  CHECK(mtp_listener_conf_same_socket(&a, &b));
  b.nsecrets = 3; /* secrets, tags, protocols and domains do not matter */
  b.allowed_protocols = MTP_ALLOW_FAKE_TLS;
  CHECK(mtp_listener_conf_same_socket(&a, &b));
  b.name = other;
  CHECK(!mtp_listener_conf_same_socket(&a, &b));
  b.name = nb;
  CHECK(mtp_parse_addr_port("127.0.0.1:444", &b.addr) == MTP_OK && !mtp_listener_conf_same_socket(&a, &b));
  CHECK(mtp_parse_addr_port("127.0.0.2:443", &b.addr) == MTP_OK && !mtp_listener_conf_same_socket(&a, &b));
  CHECK(mtp_parse_addr_port("[::ffff:127.0.0.1]:443", &b.addr) == MTP_OK && !mtp_listener_conf_same_socket(&a, &b));
  /* Port 0 on both: the socket (and the port the OS chose) is kept. */
  CHECK(mtp_parse_addr_port("127.0.0.1:0", &a.addr) == MTP_OK && mtp_parse_addr_port("127.0.0.1:0", &b.addr) == MTP_OK);
  CHECK(mtp_listener_conf_same_socket(&a, &b));
  CHECK(mtp_parse_addr_port("127.0.0.1:443", &b.addr) == MTP_OK && !mtp_listener_conf_same_socket(&a, &b));
  CHECK(mtp_parse_addr_port("[::1]:0", &a.addr) == MTP_OK && mtp_parse_addr_port("[::1]:0", &b.addr) == MTP_OK);
  CHECK(mtp_listener_conf_same_socket(&a, &b));
  CHECK(mtp_parse_addr_port("[::]:0", &b.addr) == MTP_OK && !mtp_listener_conf_same_socket(&a, &b));
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
                        "--secret", SECRET_A, "--admin", "127.0.0.1:1", "--tls-domain", "a.example",
                        "--tls-domain", "b.example", "--tunnel-allow", "f1", "--domain-fronting", "h.example:1",
                        "--node-name", "n1", NULL};
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
      CHECK(c.nlisteners == 4 && c.ntls_domains == 2 && c.npolicy == 8);
    } else {
      CHECK_MSG(rc == MTP_ENOMEM && strcmp(err, "out of memory") == 0, "n=%ld rc=%d err=%s", n, rc, err);
    }
    mtp_config_free(&c);
    CHECK_MSG(live == 0, "n=%ld: %ld allocations leaked", n, live);
  }
  CHECK(succeeded);

  /* The same for a reload onto a changed file: a failed reload frees everything it made and
   * leaves *out untouched. Every restart-only key differs, so all of them are copied from old. */
  struct mtp_config old;
  char err[512] = "", text[4096];
  variant_json(0, text, sizeof(text));
  char *path2 = write_temp(text);
  const char *argv2[] = {"--config", path2, NULL};
  fail_at = -1;
  live = 0;
  CHECK_MSG(load(argv2, &old, err, sizeof(err)) == MTP_OK, "%s", err);
  long live_old = live;
  variant_json(1, text, sizeof(text));
  rewrite(path2, text);
  succeeded = false;
  for (long n = 0; n < 1000 && !succeeded; n++) {
    struct mtp_config out;
    unsigned char sentinel[sizeof(out)];
    memset(&out, 0x5a, sizeof(out));
    memset(sentinel, 0x5a, sizeof(sentinel));
    fail_at = n;
    alloc_count = 0;
    int rc = mtp_config_reload(&old, &out, err, sizeof(err));
    if (rc == MTP_OK) {
      succeeded = true;
      CHECK_MSG(strstr(err, "workers, ") == err && strstr(err, "tunnel_allowed_fronts changed") != NULL, "%s", err);
      CHECK(out.ntunnel_allowed_fronts == 1 && strcmp(out.tunnel_allowed_fronts[0], "f0") == 0);
      CHECK(strcmp(out.listeners[0].name, "x1") == 0 && strcmp(out.tables_file, "/t0") == 0);
      mtp_config_free(&out);
    } else {
      CHECK_MSG(rc == MTP_ENOMEM && strcmp(err, "out of memory") == 0, "n=%ld rc=%d err=%s", n, rc, err);
      CHECK(memcmp(&out, sentinel, sizeof(out)) == 0);
    }
    CHECK_MSG(live == live_old, "n=%ld: %ld allocations leaked", n, live - live_old);
  }
  CHECK(succeeded);
  fail_at = -1;
  mtp_config_free(&old);
  CHECK(live == 0);
  mtp_replace_allocator(malloc, realloc, calloc, free);
  unlink(path2);
  free(path2);
  unlink(path);
  free(path);
}

/* mtproxy-back loads with MTP_CONFIG_NO_CLIENTS: no listener needed, and reload keeps that. */
static void test_no_clients(void) {
  const char *argv[] = {"--tunnel-listen", "127.0.0.1:0", NULL};
  struct mtp_config c, r;
  char err[512];
  bool help = false;
  CHECK(mtp_config_load(2, (char **)argv, &c, &help, err, sizeof(err)) == MTP_EINVAL);
  CHECK(strstr(err, "no listeners") != NULL);
  CHECK(mtp_config_load_flags(2, (char **)argv, MTP_CONFIG_NO_CLIENTS, &c, &help, err, sizeof(err)) == MTP_OK);
  CHECK(c.nlisteners == 0);
  CHECK(mtp_config_reload(&c, &r, err, sizeof(err)) == MTP_OK);
  CHECK(r.nlisteners == 0);
  mtp_config_free(&r);
  mtp_config_free(&c);
  /* Listeners that are given are still checked. */
  const char *bad[] = {"--tunnel-listen", "127.0.0.1:0", "--port", "1", NULL};
  CHECK(mtp_config_load_flags(4, (char **)bad, MTP_CONFIG_NO_CLIENTS, &c, &help, err, sizeof(err)) == MTP_EINVAL);
  CHECK(strstr(err, "no secret") != NULL);
}

int main(void) {
  test_defaults();
  test_no_clients();
  test_addr();
  test_protocols();
  test_help();
  test_all_flags();
  test_json_keys();
  test_flag_errors();
  test_json_errors();
  test_new_flags();
  test_fronting();
  test_replay_age();
  test_tls_domains();
  test_policy();
  test_examples();
  test_reload_argv();
  test_reload_edit();
  test_reload_invalid();
  test_reload_flags_only();
  test_reload_restart_only();
  test_reload_replay_age();
  test_same_socket();
  test_alloc_failures();
  return check_report();
}
