/*
 * test_policy.c - the connection policy (front/policy.c): in_table / not_in_table with every
 * key kind (listener, client_ipv4/6, ipv4/M, ipv6/M subnets, tls_domain, IPv4-mapped clients),
 * keys that do not apply, max_connections per key tuple, release of earlier counters when a
 * later rule rejects, open/close storms from 4 threads (exact counts, empty maps afterwards)
 * with reloads and table edits running alongside, table edits and normalisation, the tables
 * file (survives destroy/create, atomic rewrite, corrupt files), reconfigure (tables and
 * unchanged counters kept), and config validation.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "check.h"

#include "alloc.h"
#include "config.h"
#include "err.h"
#include "log.h"
#include "policy.h"

/* ---- building configs by hand (config.c's JSON parsing is tested elsewhere) ---- */

static struct mtp_policy_rule_conf rule_table(enum mtp_policy_rule_kind kind, enum mtp_policy_key key, int prefix,
                                              const char *table) {
  struct mtp_policy_rule_conf r;
  memset(&r, 0, sizeof(r));
  r.kind = kind;
  r.keys[0].key = key;
  r.keys[0].prefix = prefix;
  r.nkeys = 1;
  r.table = (char *)table;
  return r;
}

static struct mtp_policy_rule_conf rule_in(enum mtp_policy_key key, int prefix, const char *table) {
  return rule_table(MTP_PRULE_IN_TABLE, key, prefix, table);
}

static struct mtp_policy_rule_conf rule_not_in(enum mtp_policy_key key, int prefix, const char *table) {
  return rule_table(MTP_PRULE_NOT_IN_TABLE, key, prefix, table);
}

/* max_connections with nkeys keys given as (key, prefix) pairs. */
static struct mtp_policy_rule_conf rule_max(uint64_t max, size_t nkeys, ...) {
  struct mtp_policy_rule_conf r;
  memset(&r, 0, sizeof(r));
  r.kind = MTP_PRULE_MAX_CONNECTIONS;
  r.max = max;
  r.nkeys = nkeys;
  va_list ap;
  va_start(ap, nkeys);
  for (size_t i = 0; i < nkeys; i++) {
    r.keys[i].key = (enum mtp_policy_key)va_arg(ap, int);
    r.keys[i].prefix = va_arg(ap, int);
  }
  va_end(ap);
  return r;
}

static struct mtp_table_conf table(const char *name, char **entries, size_t n) {
  struct mtp_table_conf t = {.name = (char *)name, .entries = entries, .nentries = n};
  return t;
}

static struct mtp_config mkcfg(struct mtp_policy_rule_conf *rules, size_t nrules, struct mtp_table_conf *tables,
                               size_t ntables) {
  struct mtp_config c;
  memset(&c, 0, sizeof(c));
  c.policy = rules;
  c.npolicy = nrules;
  c.tables = tables;
  c.ntables = ntables;
  return c;
}

static struct mtp_policy *create_ok(const struct mtp_config *cfg) {
  struct mtp_policy *p = NULL;
  char err[512] = "";
  int rc = mtp_policy_create(&p, cfg, err, sizeof(err));
  CHECK_MSG(rc == MTP_OK, "%s (%s)", mtp_strerror(rc), err);
  return p;
}

/* ---- connections ---- */

static struct sockaddr_storage addr_of(const char *ip) {
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof(ss));
  struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
  if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET;
    a4->sin_port = htons(40000);
  } else {
    CHECK(inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1);
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons(40000);
  }
  return ss;
}

/* Admits a connection; returns the status, *rule the rejecting rule (or -1). */
static int admit(struct mtp_policy *p, const char *listener, const char *ip, const char *sni,
                 struct mtp_policy_hold **hold, int *rule) {
  struct sockaddr_storage ss;
  if (ip != NULL)
    ss = addr_of(ip);
  struct mtp_policy_conn c = {.listener = listener, .client = ip ? &ss : NULL, .tls_domain = sni};
  int r = -2;
  int rc = mtp_policy_admit(p, &c, hold, &r);
  if (rc == MTP_OK)
    CHECK(r == -1);
  else
    CHECK(*hold == NULL);
  if (rule != NULL)
    *rule = r;
  return rc;
}

/* Admits and releases at once; returns -1 when admitted, else the rejecting rule's index. */
static int verdict(struct mtp_policy *p, const char *listener, const char *ip, const char *sni) {
  struct mtp_policy_hold *h = NULL;
  int rule;
  int rc = admit(p, listener, ip, sni, &h, &rule);
  CHECK(rc == MTP_OK || rc == MTP_EPOLICY);
  mtp_policy_release(p, h);
  return rc == MTP_OK ? -1 : rule;
}

#define ADMITTED(p, l, ip, sni) CHECK(verdict((p), (l), (ip), (sni)) == -1)
#define REJECTED(p, l, ip, sni, r) CHECK(verdict((p), (l), (ip), (sni)) == (r))

/* ---- in_table / not_in_table, every key ---- */

static void test_table_rules(void) {
  char *listeners[] = {"main"};
  char *v4[] = {"10.0.0.1", "192.168.0.0/16"};
  char *v6[] = {"2001:db8::1", "2001:db8:1::/48"};
  char *net4[] = {"10.1.2.0/24", "172.16.0.0/12", "10.9.9.9"};
  char *net6[] = {"2001:db8:5:6::/64", "2001:db8:7::7"};
  char *domains[] = {"Example.COM"};
  struct mtp_table_conf tabs[] = {table("ls", listeners, 1), table("v4", v4, 2),     table("v6", v6, 2),
                                  table("n4", net4, 3),      table("n6", net6, 2), table("dom", domains, 1)};
  struct {
    enum mtp_policy_key key;
    int prefix;
    const char *table;
  } cases[] = {
      {MTP_PKEY_LISTENER, 0, "ls"},       {MTP_PKEY_CLIENT_IPV4, 0, "v4"}, {MTP_PKEY_CLIENT_IPV6, 0, "v6"},
      {MTP_PKEY_IPV4_SUBNET, 24, "n4"},   {MTP_PKEY_IPV6_SUBNET, 64, "n6"}, {MTP_PKEY_TLS_DOMAIN, 0, "dom"},
  };
  for (int neg = 0; neg < 2; neg++) {
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
      struct mtp_policy_rule_conf r = neg ? rule_not_in(cases[k].key, cases[k].prefix, cases[k].table)
                                          : rule_in(cases[k].key, cases[k].prefix, cases[k].table);
      struct mtp_config cfg = mkcfg(&r, 1, tabs, 6);
      struct mtp_policy *p = create_ok(&cfg);
      CHECK(mtp_policy_nrules(p) == 1);
      /* ins: values in the table; outs: values not in it; nas: the key does not apply. */
      const char *ins[4][3] = {{NULL}}, *outs[4][3] = {{NULL}}, *nas[4][3] = {{NULL}};
      switch (cases[k].key) {
      case MTP_PKEY_LISTENER:
        ins[0][0] = "main", ins[0][1] = "1.2.3.4";
        outs[0][0] = "other", outs[0][1] = "1.2.3.4";
        outs[1][0] = "Main", outs[1][1] = "1.2.3.4"; /* listener names are case-sensitive */
        nas[0][0] = NULL, nas[0][1] = "1.2.3.4";
        break;
      case MTP_PKEY_CLIENT_IPV4:
        ins[0][1] = "10.0.0.1", ins[1][1] = "192.168.77.1", ins[2][1] = "::ffff:10.0.0.1";
        ins[3][1] = "::ffff:192.168.0.9";
        outs[0][1] = "10.0.0.2", outs[1][1] = "192.169.0.1", outs[2][1] = "::ffff:10.0.0.2";
        nas[0][1] = "2001:db8::1", nas[1][1] = NULL, nas[2][1] = "::1";
        break;
      case MTP_PKEY_CLIENT_IPV6:
        ins[0][1] = "2001:db8::1", ins[1][1] = "2001:db8:1:ffff::5", ins[2][1] = "2001:DB8:0::1";
        outs[0][1] = "2001:db8::2", outs[1][1] = "2001:db8:2::1";
        nas[0][1] = "10.0.0.1", nas[1][1] = "::ffff:10.0.0.1", nas[2][1] = NULL;
        break;
      case MTP_PKEY_IPV4_SUBNET:
        /* as for client_ipv4: the address is an entry or inside one (the /24 plays no part) */
        ins[0][1] = "10.1.2.77", ins[1][1] = "172.31.255.1", ins[2][1] = "::ffff:10.1.2.1";
        ins[3][1] = "10.9.9.9";
        outs[0][1] = "10.1.3.1", outs[1][1] = "172.32.0.1", outs[2][1] = "10.9.9.8";
        nas[0][1] = "2001:db8:5:6::1", nas[1][1] = NULL;
        break;
      case MTP_PKEY_IPV6_SUBNET:
        ins[0][1] = "2001:db8:5:6:ffff::1", ins[1][1] = "2001:db8:5:6::", ins[2][1] = "2001:db8:7::7";
        outs[0][1] = "2001:db8:5:7::1", outs[1][1] = "2001:db8:7::8";
        nas[0][1] = "10.1.2.3", nas[1][1] = "::ffff:1.2.3.4";
        break;
      case MTP_PKEY_TLS_DOMAIN:
        ins[0][1] = "1.2.3.4", ins[0][2] = "example.com";
        ins[1][1] = "1.2.3.4", ins[1][2] = "EXAMPLE.com"; /* lower-cased before the lookup */
        outs[0][1] = "1.2.3.4", outs[0][2] = "example.org";
        outs[1][1] = "1.2.3.4", outs[1][2] = "www.example.com";
        nas[0][1] = "1.2.3.4", nas[0][2] = NULL;
        nas[1][1] = "1.2.3.4", nas[1][2] = "";
        break;
      }
      uint64_t expect_rejects = 0;
      for (int i = 0; i < 4; i++) {
        if (ins[i][0] || ins[i][1] || ins[i][2]) {
          const char *l = ins[i][0] ? ins[i][0] : "main";
          if (neg) {
            REJECTED(p, l, ins[i][1], ins[i][2], 0);
            expect_rejects++;
          } else {
            ADMITTED(p, l, ins[i][1], ins[i][2]);
          }
        }
        if (outs[i][0] || outs[i][1] || outs[i][2]) {
          const char *l = outs[i][0] ? outs[i][0] : "main";
          if (neg) {
            ADMITTED(p, l, outs[i][1], outs[i][2]);
          } else {
            REJECTED(p, l, outs[i][1], outs[i][2], 0);
            expect_rejects++;
          }
        }
        if (nas[i][1] || nas[i][2] || i == 0) /* nas[0] exists for every key */
          ADMITTED(p, nas[i][0], nas[i][1], nas[i][2]);
      }
      CHECK_MSG(mtp_policy_rejects(p, 0) == expect_rejects, "key %zu neg %d: %llu", k, neg,
                (unsigned long long)mtp_policy_rejects(p, 0));
      CHECK(mtp_policy_rejects(p, 1) == 0); /* out of range */
      mtp_policy_free(p);
    }
  }
}

/* An empty table used as an allow-list rejects everyone the key applies to. */
static void test_rule_order_and_empty(void) {
  char *deny[] = {"6.6.6.6"};
  struct mtp_table_conf tabs[] = {table("empty", NULL, 0), table("deny", deny, 1)};
  struct mtp_policy_rule_conf rules[] = {rule_not_in(MTP_PKEY_CLIENT_IPV4, 0, "deny"),
                                         rule_in(MTP_PKEY_CLIENT_IPV6, 0, "empty")};
  struct mtp_config cfg = mkcfg(rules, 2, tabs, 2);
  struct mtp_policy *p = create_ok(&cfg);
  REJECTED(p, "l", "6.6.6.6", NULL, 0);
  ADMITTED(p, "l", "6.6.6.7", NULL);
  REJECTED(p, "l", "2001:db8::1", NULL, 1);
  CHECK(mtp_policy_rejects(p, 0) == 1 && mtp_policy_rejects(p, 1) == 1);
  mtp_policy_free(p);

  /* No rules at all: everything passes, no hold. */
  struct mtp_config none = mkcfg(NULL, 0, NULL, 0);
  p = create_ok(&none);
  struct mtp_policy_hold *h = (struct mtp_policy_hold *)1;
  CHECK(admit(p, "l", "1.2.3.4", "x.com", &h, NULL) == MTP_OK && h == NULL);
  mtp_policy_release(p, NULL);
  CHECK(mtp_policy_nrules(p) == 0);
  mtp_policy_free(p);
}

/* ---- max_connections ---- */

struct maxcase {
  const char *name;
  struct mtp_policy_rule_conf rule;
  /* a, a2 share the tuple; b has another; na: the rule does not apply */
  const char *a[3], *a2[3], *b[3], *na[3];
};

static void test_max_connections(void) {
  struct maxcase cases[] = {
      {"global", rule_max(2, 0), {"l1", "1.1.1.1", NULL}, {"l2", "2001:db8::1", "x.com"}, {NULL}, {NULL}},
      {"listener", rule_max(2, 1, MTP_PKEY_LISTENER, 0), {"l1", "1.1.1.1", NULL}, {"l1", "2.2.2.2", NULL},
       {"l2", "1.1.1.1", NULL}, {NULL, "1.1.1.1", NULL}},
      {"client_ipv4", rule_max(2, 1, MTP_PKEY_CLIENT_IPV4, 0), {"l1", "1.1.1.1", NULL},
       {"l2", "::ffff:1.1.1.1", NULL}, {"l1", "1.1.1.2", NULL}, {"l1", "2001:db8::1", NULL}},
      {"client_ipv6", rule_max(2, 1, MTP_PKEY_CLIENT_IPV6, 0), {"l1", "2001:db8::1", NULL},
       {"l1", "2001:db8:0:0::1", NULL}, {"l1", "2001:db8::2", NULL}, {"l1", "::ffff:1.1.1.1", NULL}},
      {"ipv4/24", rule_max(2, 1, MTP_PKEY_IPV4_SUBNET, 24), {"l1", "10.1.2.3", NULL}, {"l1", "::ffff:10.1.2.200", NULL},
       {"l1", "10.1.3.3", NULL}, {"l1", "2001:db8::1", NULL}},
      {"ipv6/48", rule_max(2, 1, MTP_PKEY_IPV6_SUBNET, 48), {"l1", "2001:db8:1::1", NULL},
       {"l1", "2001:db8:1:ffff::9", NULL}, {"l1", "2001:db8:2::1", NULL}, {"l1", "10.0.0.1", NULL}},
      {"tls_domain", rule_max(2, 1, MTP_PKEY_TLS_DOMAIN, 0), {"l1", "1.1.1.1", "a.com"}, {"l1", "1.1.1.2", "A.COM"},
       {"l1", "1.1.1.1", "b.com"}, {"l1", "1.1.1.1", NULL}},
      {"listener+ipv4", rule_max(2, 2, MTP_PKEY_LISTENER, 0, MTP_PKEY_CLIENT_IPV4, 0), {"l1", "1.1.1.1", NULL},
       {"l1", "1.1.1.1", "z.com"}, {"l2", "1.1.1.1", NULL}, {"l1", "2001:db8::1", NULL}},
      {"ipv4/0+domain", rule_max(2, 2, MTP_PKEY_IPV4_SUBNET, 0, MTP_PKEY_TLS_DOMAIN, 0), {"l1", "1.1.1.1", "a.com"},
       {"l2", "9.9.9.9", "a.com"}, {"l1", "1.1.1.1", "b.com"}, {"l1", "1.1.1.1", NULL}},
  };
  for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
    struct maxcase *mc = &cases[k];
    struct mtp_config cfg = mkcfg(&mc->rule, 1, NULL, 0);
    struct mtp_policy *p = create_ok(&cfg);
    struct mtp_policy_hold *h1 = NULL, *h2 = NULL, *h3 = NULL, *hb = NULL, *hn = NULL;
    int rule;
    CHECK(admit(p, mc->a[0], mc->a[1], mc->a[2], &h1, NULL) == MTP_OK && h1 != NULL);
    CHECK(mtp_policy_counter_entries(p, 0) == 1);
    CHECK(admit(p, mc->a2[0], mc->a2[1], mc->a2[2], &h2, NULL) == MTP_OK && h2 != NULL);
    CHECK(mtp_policy_counter_entries(p, 0) == 1);
    CHECK_MSG(admit(p, mc->a[0], mc->a[1], mc->a[2], &h3, &rule) == MTP_EPOLICY && rule == 0, "%s", mc->name);
    CHECK_MSG(admit(p, mc->a2[0], mc->a2[1], mc->a2[2], &h3, &rule) == MTP_EPOLICY, "%s", mc->name);
    CHECK(mtp_policy_rejects(p, 0) == 2);
    if (mc->b[1] != NULL) {
      CHECK_MSG(admit(p, mc->b[0], mc->b[1], mc->b[2], &hb, NULL) == MTP_OK && hb != NULL, "%s", mc->name);
      CHECK(mtp_policy_counter_entries(p, 0) == 2);
    }
    if (mc->na[1] != NULL) { /* the rule does not apply: admitted, nothing counted */
      for (int i = 0; i < 5; i++) {
        CHECK_MSG(admit(p, mc->na[0], mc->na[1], mc->na[2], &hn, NULL) == MTP_OK && hn == NULL, "%s", mc->name);
      }
    }
    mtp_policy_release(p, h1);
    CHECK(admit(p, mc->a[0], mc->a[1], mc->a[2], &h3, NULL) == MTP_OK);
    mtp_policy_release(p, h2);
    mtp_policy_release(p, h3);
    mtp_policy_release(p, hb);
    CHECK_MSG(mtp_policy_counter_entries(p, 0) == 0, "%s", mc->name);
    mtp_policy_free(p);
  }

  /* max 0 rejects everyone the rule applies to. */
  struct mtp_policy_rule_conf zero = rule_max(0, 1, MTP_PKEY_CLIENT_IPV6, 0);
  struct mtp_config cfg = mkcfg(&zero, 1, NULL, 0);
  struct mtp_policy *p = create_ok(&cfg);
  REJECTED(p, "l", "2001:db8::1", NULL, 0);
  ADMITTED(p, "l", "1.2.3.4", NULL);
  CHECK(mtp_policy_counter_entries(p, 0) == 0);
  mtp_policy_free(p);
}

/* A connection counted by earlier rules and rejected by a later one is released at once. */
static void test_later_reject_releases(void) {
  char *deny[] = {"bad.com"};
  struct mtp_table_conf tabs[] = {table("deny", deny, 1)};
  struct mtp_policy_rule_conf rules[] = {rule_max(2, 1, MTP_PKEY_LISTENER, 0), rule_max(1, 1, MTP_PKEY_CLIENT_IPV4, 0),
                                         rule_not_in(MTP_PKEY_TLS_DOMAIN, 0, "deny")};
  struct mtp_config cfg = mkcfg(rules, 3, tabs, 1);
  struct mtp_policy *p = create_ok(&cfg);
  /* Rejected by rule 2 after rules 0 and 1 counted it, a hundred times. */
  for (int i = 0; i < 100; i++)
    REJECTED(p, "l", "1.1.1.1", "bad.com", 2);
  CHECK(mtp_policy_counter_entries(p, 0) == 0 && mtp_policy_counter_entries(p, 1) == 0);
  struct mtp_policy_hold *a = NULL, *b = NULL, *c = NULL;
  int rule;
  CHECK(admit(p, "l", "1.1.1.1", "good.com", &a, NULL) == MTP_OK);
  /* Counted by rule 0 (listener: 2 now), rejected by rule 1: rule 0 goes back to 1. */
  CHECK(admit(p, "l", "1.1.1.1", NULL, &c, &rule) == MTP_EPOLICY && rule == 1);
  CHECK(admit(p, "l", "2.2.2.2", NULL, &b, NULL) == MTP_OK); /* would fail if rule 0 leaked */
  CHECK(admit(p, "l", "3.3.3.3", NULL, &c, &rule) == MTP_EPOLICY && rule == 0);
  CHECK(mtp_policy_counter_entries(p, 0) == 1 && mtp_policy_counter_entries(p, 1) == 2);
  CHECK(mtp_policy_rejects(p, 0) == 1 && mtp_policy_rejects(p, 1) == 1 && mtp_policy_rejects(p, 2) == 100);
  mtp_policy_release(p, a);
  mtp_policy_release(p, b);
  CHECK(mtp_policy_counter_entries(p, 0) == 0 && mtp_policy_counter_entries(p, 1) == 0);
  mtp_policy_free(p);
}

/* ---- open/close storms ---- */

#define STORM_THREADS 4
#define STORM_OPS 10000
#define STORM_IPS 16
#define MAX_IP 3
#define MAX_NET 6
#define MAX_ALL 40

struct storm {
  struct mtp_policy *p;
  atomic_int ip_open[STORM_IPS];
  atomic_int net_open[2][2]; /* [listener][/24] */
  atomic_int all_open;
  atomic_long admitted, rejected, released;
  atomic_int done;
};

struct storm_thread {
  struct storm *s;
  uint64_t rng;
};

static uint64_t xs(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

struct held {
  struct mtp_policy_hold *h;
  int ip, l;
};

static void storm_release(struct storm *s, struct held *x) {
  /* The model drops the connection before the policy does, so it never over-counts. */
  atomic_fetch_sub(&s->ip_open[x->ip], 1);
  atomic_fetch_sub(&s->net_open[x->l][x->ip / 8], 1);
  atomic_fetch_sub(&s->all_open, 1);
  mtp_policy_release(s->p, x->h);
  atomic_fetch_add(&s->released, 1);
}

static void *storm_main(void *arg) {
  struct storm_thread *t = arg;
  struct storm *s = t->s;
  struct held held[64];
  size_t nheld = 0;
  static const char *const listeners[2] = {"alpha", "beta"};
  for (int op = 0; op < STORM_OPS; op++) {
    uint64_t r = xs(&t->rng);
    if (nheld == 0 || (nheld < 64 && (r & 1))) {
      int ip = (int)((r >> 8) % STORM_IPS), l = (int)((r >> 16) & 1);
      bool mapped = (r >> 17) & 1, bad = ((r >> 18) & 15) == 0;
      char txt[64];
      snprintf(txt, sizeof(txt), "%s10.0.%d.%d", mapped ? "::ffff:" : "", ip / 8, ip % 8 + 1);
      struct mtp_policy_hold *h = NULL;
      int rule;
      int rc = admit(s->p, listeners[l], txt, bad ? "bad.example" : "ok.example", &h, &rule);
      if (rc == MTP_OK) {
        int a = atomic_fetch_add(&s->ip_open[ip], 1) + 1;
        int b = atomic_fetch_add(&s->net_open[l][ip / 8], 1) + 1;
        int c = atomic_fetch_add(&s->all_open, 1) + 1;
        CHECK_MSG(a <= MAX_IP && b <= MAX_NET && c <= MAX_ALL, "over the limit: %d %d %d", a, b, c);
        CHECK(!bad);
        CHECK(h != NULL);
        held[nheld++] = (struct held){.h = h, .ip = ip, .l = l};
        atomic_fetch_add(&s->admitted, 1);
      } else {
        CHECK(rc == MTP_EPOLICY && rule >= 0 && rule < 4);
        atomic_fetch_add(&s->rejected, 1);
      }
    } else {
      size_t i = (size_t)((r >> 8) % nheld);
      storm_release(s, &held[i]);
      held[i] = held[--nheld];
    }
  }
  while (nheld > 0)
    storm_release(s, &held[--nheld]);
  atomic_fetch_add(&s->done, 1);
  return NULL;
}

static void test_storm(void) {
  char *deny[] = {"bad.example"};
  struct mtp_table_conf tabs[] = {table("deny", deny, 1)};
  struct mtp_policy_rule_conf rules[] = {
      rule_max(MAX_IP, 1, MTP_PKEY_CLIENT_IPV4, 0),
      rule_max(MAX_NET, 2, MTP_PKEY_LISTENER, 0, MTP_PKEY_IPV4_SUBNET, 24),
      rule_not_in(MTP_PKEY_TLS_DOMAIN, 0, "deny"),
      rule_max(MAX_ALL, 0),
  };
  struct mtp_config cfg = mkcfg(rules, 4, tabs, 1);
  static struct storm s;
  memset(&s, 0, sizeof(s));
  s.p = create_ok(&cfg);
  pthread_t th[STORM_THREADS];
  struct storm_thread st[STORM_THREADS];
  for (int i = 0; i < STORM_THREADS; i++) {
    st[i] = (struct storm_thread){.s = &s, .rng = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1)};
    CHECK(pthread_create(&th[i], NULL, storm_main, &st[i]) == 0);
  }
  /* Meanwhile the admin thread edits a table the rules use and reloads the same rules: the
   * counters must stay exact through both. */
  int reloads = 0;
  while (atomic_load(&s.done) < STORM_THREADS) {
    CHECK(mtp_policy_table_add(s.p, "deny", "other.example") == MTP_OK);
    CHECK(mtp_policy_table_del(s.p, "deny", "other.example") == MTP_OK);
    char err[256];
    CHECK(mtp_policy_reconfigure(s.p, &cfg, err, sizeof(err)) == MTP_OK);
    reloads++;
  }
  for (int i = 0; i < STORM_THREADS; i++)
    CHECK(pthread_join(th[i], NULL) == 0);
  long total = atomic_load(&s.admitted) + atomic_load(&s.rejected);
  printf("storm: %ld admitted, %ld rejected, %d reloads alongside\n", atomic_load(&s.admitted),
         atomic_load(&s.rejected), reloads);
  CHECK(atomic_load(&s.admitted) == atomic_load(&s.released));
  CHECK(atomic_load(&s.admitted) > 1000 && atomic_load(&s.rejected) > 1000);
  CHECK(total > STORM_THREADS * STORM_OPS / 4);
  uint64_t rej = 0;
  for (size_t i = 0; i < 4; i++)
    rej += mtp_policy_rejects(s.p, i);
  CHECK(rej == (uint64_t)atomic_load(&s.rejected)); /* rejects survive a reload of the same rule */
  CHECK(mtp_policy_rejects(s.p, 0) > 0 && mtp_policy_rejects(s.p, 2) > 0);
  for (size_t i = 0; i < 4; i++)
    CHECK_MSG(mtp_policy_counter_entries(s.p, i) == 0, "rule %zu: %zu left", i, mtp_policy_counter_entries(s.p, i));
  for (int i = 0; i < STORM_IPS; i++)
    CHECK(atomic_load(&s.ip_open[i]) == 0);
  /* And the counts are really back at zero: exactly MAX_IP more for one address. */
  struct mtp_policy_hold *h[MAX_IP + 1];
  for (int i = 0; i < MAX_IP; i++)
    CHECK(admit(s.p, "alpha", "10.0.0.1", NULL, &h[i], NULL) == MTP_OK);
  int rule;
  CHECK(admit(s.p, "alpha", "10.0.0.1", NULL, &h[MAX_IP], &rule) == MTP_EPOLICY && rule == 0);
  for (int i = 0; i < MAX_IP; i++)
    mtp_policy_release(s.p, h[i]);
  CHECK(mtp_policy_counter_entries(s.p, 0) == 0);
  mtp_policy_free(s.p);
}

/* ---- table edits ---- */

static char *tables_json(struct mtp_policy *p, const char *t) {
  char *out = NULL;
  int rc = mtp_policy_tables_json(p, t, &out);
  CHECK_MSG(rc == MTP_OK, "%s", mtp_strerror(rc));
  return out;
}

#define JSON_IS(p, t, want)                                                 \
  do {                                                                      \
    char *j_ = tables_json((p), (t));                                       \
    CHECK_MSG(strcmp(j_, (want)) == 0, "got %s want %s", j_, (want));      \
    mtp_free(j_);                                                           \
  } while (0)

static void test_table_edits(void) {
  char *ips[] = {"10.1.2.3/8", "10.1.2.3/8"}; /* duplicates after normalisation collapse */
  struct mtp_table_conf tabs[] = {table("ips", ips, 2), table("doms", NULL, 0), table("names", NULL, 0),
                                  table("loose", NULL, 0)};
  struct mtp_policy_rule_conf rules[] = {rule_in(MTP_PKEY_IPV4_SUBNET, 16, "ips"),
                                         rule_not_in(MTP_PKEY_TLS_DOMAIN, 0, "doms"),
                                         rule_not_in(MTP_PKEY_LISTENER, 0, "names"),
                                         rule_in(MTP_PKEY_CLIENT_IPV6, 0, "ips")};
  struct mtp_config cfg = mkcfg(rules, 4, tabs, 4);
  struct mtp_policy *p = create_ok(&cfg);
  JSON_IS(p, "ips", "{\"ips\":[\"10.0.0.0/8\"]}");

  CHECK(mtp_policy_table_add(p, "ips", "10.0.0.0/8") == MTP_EEXIST);
  CHECK(mtp_policy_table_add(p, "ips", "10.200.1.1/8") == MTP_EEXIST);
  CHECK(mtp_policy_table_add(p, "ips", "2001:DB8:0:0::1") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "ips", "2001:db8::1/128") == MTP_EEXIST);
  CHECK(mtp_policy_table_add(p, "ips", "2001:db8:ffff::1/32") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "ips", "::ffff:192.0.2.7") == MTP_OK);   /* mapped: stored as IPv4 */
  CHECK(mtp_policy_table_add(p, "ips", "192.0.2.7/32") == MTP_EEXIST);
  CHECK(mtp_policy_table_add(p, "ips", "::ffff:198.51.100.0/120") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "ips", "0.0.0.0/0") == MTP_OK);
  JSON_IS(p, "ips",
          "{\"ips\":[\"0.0.0.0/0\",\"10.0.0.0/8\",\"192.0.2.7\",\"198.51.100.0/24\",\"2001:db8::/32\","
          "\"2001:db8::1\"]}");
  CHECK(mtp_policy_table_del(p, "ips", "0.0.0.0/0") == MTP_OK);
  CHECK(mtp_policy_table_del(p, "ips", "0.0.0.0/0") == MTP_ENOTFOUND);
  /* bad values */
  const char *bad_ips[] = {"10.1.2.300", "1.2.3.4/33", "1.2.3.4/", "1.2.3.4/-1", "1.2.3.4/ 8", " 1.2.3.4", "",
                           "example.com", "::1/129", "1.2.3.4/0008", "1.2.3.4/8/8"};
  for (size_t i = 0; i < sizeof(bad_ips) / sizeof(bad_ips[0]); i++)
    CHECK_MSG(mtp_policy_table_add(p, "ips", bad_ips[i]) == MTP_EINVAL, "'%s'", bad_ips[i]);
  CHECK(mtp_policy_table_del(p, "ips", "bogus") == MTP_EINVAL);
  CHECK(mtp_policy_table_add(p, "nope", "1.2.3.4") == MTP_ENOTFOUND);
  CHECK(mtp_policy_table_del(p, "nope", "1.2.3.4") == MTP_ENOTFOUND);
  char *dummy = (char *)1;
  CHECK(mtp_policy_tables_json(p, "nope", &dummy) == MTP_ENOTFOUND && dummy == NULL);

  /* The allow-list reflects edits at once. */
  ADMITTED(p, "l", "10.5.5.5", NULL);
  ADMITTED(p, "l", "198.51.100.9", NULL);
  REJECTED(p, "l", "198.51.101.9", NULL, 0);
  ADMITTED(p, "l", "2001:db8:1234::1", NULL); /* inside 2001:db8::/32 */
  REJECTED(p, "l", "2001:db9::1", NULL, 3);
  REJECTED(p, "l", "198.51.101.1", NULL, 0);
  ADMITTED(p, "l", "::ffff:192.0.2.7", NULL);
  REJECTED(p, "l", "192.0.2.8", NULL, 0);
  ADMITTED(p, "l", "2001:db8::1", NULL);
  CHECK(mtp_policy_table_del(p, "ips", "10.0.0.0/8") == MTP_OK);
  REJECTED(p, "l", "10.5.5.5", NULL, 0);
  CHECK(mtp_policy_table_add(p, "ips", "10.5.0.0/16") == MTP_OK);
  ADMITTED(p, "l", "10.5.5.5", NULL);

  /* domains: lower-cased */
  CHECK(mtp_policy_table_add(p, "doms", "EXAMPLE.com") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "doms", "example.COM") == MTP_EEXIST);
  CHECK(mtp_policy_table_add(p, "doms", "a b.com") == MTP_EINVAL);
  CHECK(mtp_policy_table_add(p, "doms", "") == MTP_EINVAL);
  CHECK(mtp_policy_table_add(p, "doms", "x\ty.com") == MTP_EINVAL);
  JSON_IS(p, "doms", "{\"doms\":[\"example.com\"]}");
  REJECTED(p, "l", "10.5.1.1", "example.com", 1);
  CHECK(mtp_policy_table_del(p, "doms", "Example.Com") == MTP_OK);
  ADMITTED(p, "l", "10.5.1.1", "example.com");

  /* listener names: as is */
  CHECK(mtp_policy_table_add(p, "names", "Old-Listener") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "names", "old-listener") == MTP_OK);
  REJECTED(p, "Old-Listener", "10.5.1.1", NULL, 2);
  ADMITTED(p, "OLD-LISTENER", "10.5.1.1", NULL);

  /* a table no rule uses: IPs canonical, other text as is */
  CHECK(mtp_policy_table_add(p, "loose", "10.1.2.3/8") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "loose", "Foo") == MTP_OK);
  JSON_IS(p, "loose", "{\"loose\":[\"10.0.0.0/8\",\"Foo\"]}");

  JSON_IS(p, NULL,
          "{\"ips\":[\"10.5.0.0/16\",\"192.0.2.7\",\"198.51.100.0/24\",\"2001:db8::/32\",\"2001:db8::1\"],"
          "\"doms\":[],\"names\":[\"Old-Listener\",\"old-listener\"],\"loose\":[\"10.0.0.0/8\",\"Foo\"]}");
  mtp_policy_free(p);
}

/* ---- the tables file ---- */

static char *slurp(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  static char buf[65536];
  size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = '\0';
  return buf;
}

static int count_dir_entries(const char *dir) {
  DIR *d = opendir(dir);
  CHECK(d != NULL);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
      n++;
  closedir(d);
  return n;
}

static struct mtp_policy *create_err(const struct mtp_config *cfg, int want, const char *needle) {
  struct mtp_policy *p = (struct mtp_policy *)1;
  char err[512] = "";
  int rc = mtp_policy_create(&p, cfg, err, sizeof(err));
  CHECK_MSG(rc == want, "%s (%s)", mtp_strerror(rc), err);
  CHECK(p == NULL);
  CHECK_MSG(strstr(err, needle) != NULL, "'%s' lacks '%s'", err, needle);
  return NULL;
}

static void test_persistence(void) {
  check_tmpdir_make("test_policy");
  char dir[300];
  snprintf(dir, sizeof(dir), "%s/tables", check_tmpdir);
  CHECK(mkdir(dir, 0755) == 0);
  char file[320];
  snprintf(file, sizeof(file), "%s/t.json", dir);

  char *allow[] = {"1.1.1.1"};
  char *doms[] = {"cfg.example"};
  struct mtp_table_conf tabs[] = {table("allow", allow, 1), table("doms", doms, 1)};
  struct mtp_policy_rule_conf rules[] = {rule_in(MTP_PKEY_CLIENT_IPV4, 0, "allow"),
                                         rule_not_in(MTP_PKEY_TLS_DOMAIN, 0, "doms")};
  struct mtp_config cfg = mkcfg(rules, 2, tabs, 2);
  cfg.tables_file = file;

  struct mtp_policy *p = create_ok(&cfg);
  CHECK(access(file, F_OK) != 0); /* nothing written until an edit */
  CHECK(mtp_policy_table_add(p, "allow", "2.2.2.2") == MTP_OK);
  struct stat st1, st2;
  CHECK(stat(file, &st1) == 0);
  CHECK(mtp_policy_table_add(p, "allow", "3.3.3.0/24") == MTP_OK);
  CHECK(stat(file, &st2) == 0);
  CHECK(st1.st_ino != st2.st_ino);    /* replaced by rename, never rewritten in place */
  CHECK(count_dir_entries(dir) == 1); /* no temporary left behind */
  CHECK(mtp_policy_table_del(p, "allow", "1.1.1.1") == MTP_OK);
  const char *text = slurp(file);
  CHECK(text != NULL);
  cJSON *j = cJSON_Parse(text);
  CHECK(j != NULL);
  CHECK(cJSON_GetObjectItem(j, "version")->valueint == 1);
  char *compact = cJSON_PrintUnformatted(cJSON_GetObjectItem(j, "tables"));
  CHECK_MSG(strcmp(compact, "{\"allow\":[\"2.2.2.2\",\"3.3.3.0/24\"],\"doms\":[\"cfg.example\"]}") == 0, "%s",
            compact);
  cJSON_free(compact);
  cJSON_Delete(j);
  mtp_policy_free(p);

  /* A restart: the file's contents replace the config's entries. */
  p = create_ok(&cfg);
  JSON_IS(p, NULL, "{\"allow\":[\"2.2.2.2\",\"3.3.3.0/24\"],\"doms\":[\"cfg.example\"]}");
  REJECTED(p, "l", "1.1.1.1", NULL, 0);
  ADMITTED(p, "l", "2.2.2.2", NULL);
  ADMITTED(p, "l", "3.3.3.9", NULL);
  REJECTED(p, "l", "2.2.2.2", "CFG.example", 1);
  mtp_policy_free(p);

  /* Tables in the config but not in the file keep the config's entries; tables only in the
   * file are kept (and written back). */
  const char *partial = "{\"version\":1,\"tables\":{\"allow\":[\"9.9.9.9\"],\"old\":[\"KeepMe\",\"10.1.1.1/8\"]}}";
  check_write_file("tables/t.json", partial, strlen(partial));
  p = create_ok(&cfg);
  JSON_IS(p, NULL, "{\"allow\":[\"9.9.9.9\"],\"doms\":[\"cfg.example\"],\"old\":[\"10.0.0.0/8\",\"KeepMe\"]}");
  CHECK(mtp_policy_table_add(p, "old", "x") == MTP_OK);
  text = slurp(file);
  CHECK(strstr(text, "\"KeepMe\"") != NULL && strstr(text, "\"x\"") != NULL);
  mtp_policy_free(p);

  /* A failed write leaves memory as it was and says so. */
  struct mtp_config bad = cfg;
  char badfile[300];
  snprintf(badfile, sizeof(badfile), "%s/missing-dir/t.json", check_tmpdir);
  bad.tables_file = badfile;
  p = create_ok(&bad);
  CHECK(mtp_policy_table_add(p, "allow", "4.4.4.4") == MTP_EIO);
  JSON_IS(p, "allow", "{\"allow\":[\"1.1.1.1\"]}");
  CHECK(mtp_policy_table_del(p, "allow", "1.1.1.1") == MTP_EIO);
  JSON_IS(p, "allow", "{\"allow\":[\"1.1.1.1\"]}");
  mtp_policy_free(p);

  /* Corrupt files are errors that name the file, never silently dropped. */
  struct {
    const char *text, *needle;
  } corrupt[] = {
      {"{\"version\":1,\"tables\":{\"allow\":[\"2.2.2.2\"", "not valid JSON"},
      {"", "not valid JSON"},
      {"[]", "not a JSON object"},
      {"{\"version\":2,\"tables\":{}}", "\"version\" must be 1"},
      {"{\"tables\":{}}", "\"version\" must be 1"},
      {"{\"version\":1,\"tables\":[]}", "\"tables\" must be an object"},
      {"{\"version\":1,\"tables\":{\"allow\":\"1.1.1.1\"}}", "must be an array"},
      {"{\"version\":1,\"tables\":{\"allow\":[\"1.1.1.1\",7]}}", "allow[1] is not a string"},
      {"{\"version\":1,\"tables\":{\"allow\":[\"not-an-ip\"]}}", "'not-an-ip' is not an IPv4 address or subnet"},
      {"{\"version\":1,\"tables\":{\"allow\":[],\"allow\":[]}}", "appears twice"},
  };
  for (size_t i = 0; i < sizeof(corrupt) / sizeof(corrupt[0]); i++) {
    check_write_file("tables/t.json", corrupt[i].text, strlen(corrupt[i].text));
    create_err(&cfg, MTP_EINVAL, corrupt[i].needle);
    create_err(&cfg, MTP_EINVAL, file);
  }
  CHECK(chmod(file, 0) == 0);
  if (access(file, R_OK) != 0) /* (root reads anyway) */
    create_err(&cfg, MTP_EIO, file);
  CHECK(unlink(file) == 0);

  /* No tables_file: cache_dir/tables.json, the directory created on the first write. */
  struct mtp_config viacache = cfg;
  char cache[300], cachefile[320];
  snprintf(cache, sizeof(cache), "%s/cache", check_tmpdir);
  snprintf(cachefile, sizeof(cachefile), "%s/tables.json", cache);
  viacache.tables_file = NULL;
  viacache.cache_dir = cache;
  p = create_ok(&viacache);
  CHECK(mtp_policy_table_add(p, "allow", "5.5.5.5") == MTP_OK);
  CHECK(access(cachefile, R_OK) == 0);
  mtp_policy_free(p);
  p = create_ok(&viacache);
  JSON_IS(p, "allow", "{\"allow\":[\"1.1.1.1\",\"5.5.5.5\"]}");
  mtp_policy_free(p);

  /* Neither: edits work and nothing is written. */
  struct mtp_config nofile = cfg;
  nofile.tables_file = NULL;
  p = create_ok(&nofile);
  CHECK(mtp_policy_table_add(p, "allow", "6.6.6.6") == MTP_OK);
  mtp_policy_free(p);
  CHECK(count_dir_entries(dir) == 0);
  check_tmpdir_remove();
}

/* ---- reconfigure ---- */

static int reconf(struct mtp_policy *p, const struct mtp_config *cfg, char *err, size_t errlen) {
  err[0] = '\0';
  return mtp_policy_reconfigure(p, cfg, err, errlen);
}

static void test_reconfigure(void) {
  char err[512];
  char *allow1[] = {"1.1.1.1"};
  struct mtp_table_conf tabs1[] = {table("allow", allow1, 1)};
  struct mtp_policy_rule_conf rules1[] = {rule_in(MTP_PKEY_CLIENT_IPV4, 0, "allow"),
                                          rule_max(1, 1, MTP_PKEY_CLIENT_IPV4, 0),
                                          rule_max(1, 1, MTP_PKEY_LISTENER, 0)};
  struct mtp_config cfg1 = mkcfg(rules1, 3, tabs1, 1);
  struct mtp_policy *p = create_ok(&cfg1);
  CHECK(mtp_policy_table_add(p, "allow", "2.2.2.2") == MTP_OK);
  struct mtp_policy_hold *h1 = NULL, *h2 = NULL, *h3 = NULL;
  CHECK(admit(p, "l1", "1.1.1.1", NULL, &h1, NULL) == MTP_OK);
  REJECTED(p, "l2", "1.1.1.1", NULL, 1);
  REJECTED(p, "l1", "2.2.2.2", NULL, 2);
  REJECTED(p, "l1", "3.3.3.3", NULL, 0);

  /* New config: a rule in front (indices move), the client_ipv4 counter rule kept (same
   * keys: its counters carry on), the listener one now keyed on ipv4/8 (fresh counters), a
   * new table with its config entries; the old table's config entries change but its
   * runtime contents win. */
  char *allow2[] = {"9.9.9.9"};
  char *deny2[] = {"Evil.example"};
  struct mtp_table_conf tabs2[] = {table("deny", deny2, 1), table("allow", allow2, 1)};
  struct mtp_policy_rule_conf rules2[] = {rule_not_in(MTP_PKEY_TLS_DOMAIN, 0, "deny"),
                                          rule_in(MTP_PKEY_CLIENT_IPV4, 0, "allow"),
                                          rule_max(2, 1, MTP_PKEY_IPV4_SUBNET, 8),
                                          rule_max(1, 1, MTP_PKEY_CLIENT_IPV4, 0)};
  struct mtp_config cfg2 = mkcfg(rules2, 4, tabs2, 2);
  CHECK_MSG(reconf(p, &cfg2, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(mtp_policy_nrules(p) == 4);
  JSON_IS(p, NULL, "{\"allow\":[\"1.1.1.1\",\"2.2.2.2\"],\"deny\":[\"evil.example\"]}");
  CHECK(mtp_policy_counter_entries(p, 3) == 1); /* kept: h1's count */
  CHECK(mtp_policy_counter_entries(p, 2) == 0); /* fresh */
  REJECTED(p, "l2", "1.1.1.1", NULL, 3);         /* the kept counter still knows h1 */
  REJECTED(p, "l1", "9.9.9.9", NULL, 1);
  REJECTED(p, "l1", "2.2.2.2", "EVIL.example", 0);
  CHECK(admit(p, "l1", "2.2.2.2", NULL, &h2, NULL) == MTP_OK); /* listener limit is gone */
  CHECK(mtp_policy_rejects(p, 3) == 1);
  CHECK(mtp_policy_rejects(p, 1) == 1); /* rule 1 is new at this index: counts from 0 */
  mtp_policy_release(p, h1); /* into the kept map and the old listener map */
  CHECK(mtp_policy_counter_entries(p, 3) == 1);
  CHECK(admit(p, "l1", "1.1.1.1", NULL, &h3, NULL) == MTP_OK);
  CHECK(mtp_policy_counter_entries(p, 2) == 2); /* h2 and h3 in 1/8 and 2/8 */

  /* An invalid config changes nothing. */
  struct mtp_policy_rule_conf bad_rules[] = {rule_in(MTP_PKEY_CLIENT_IPV4, 0, "nope")};
  struct mtp_config bad = mkcfg(bad_rules, 1, tabs2, 2);
  CHECK(reconf(p, &bad, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strstr(err, "policy[0]") != NULL && strstr(err, "'nope'") != NULL, "%s", err);
  CHECK(mtp_policy_nrules(p) == 4 && mtp_policy_counter_entries(p, 3) == 2);

  /* The domain table used with an IP key: its entries are not IPs, so the reload is refused
   * and names the entry. */
  CHECK(mtp_policy_table_add(p, "deny", "EVIL2.example") == MTP_OK);
  struct mtp_policy_rule_conf rules3[] = {rule_in(MTP_PKEY_CLIENT_IPV4, 0, "deny")};
  struct mtp_config cfg3 = mkcfg(rules3, 1, tabs2, 2);
  CHECK(reconf(p, &cfg3, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strstr(err, "'evil") != NULL && strstr(err, "not an IPv4 address or subnet") != NULL, "%s", err);
  CHECK(mtp_policy_nrules(p) == 4);

  /* A reload that removes every rule: old holds are still released correctly (ASan checks
   * the memory), tables stay. */
  struct mtp_config empty = mkcfg(NULL, 0, NULL, 0);
  CHECK(reconf(p, &empty, err, sizeof(err)) == MTP_OK);
  CHECK(mtp_policy_nrules(p) == 0);
  ADMITTED(p, "l1", "1.1.1.1", NULL);
  JSON_IS(p, NULL, "{\"allow\":[\"1.1.1.1\",\"2.2.2.2\"],\"deny\":[\"evil.example\",\"evil2.example\"]}");
  CHECK(mtp_policy_table_add(p, "allow", "MixedCase") == MTP_OK); /* untyped now: as is */
  mtp_policy_release(p, h2);

  /* Back to the original rules: the untyped entry is not an IP, so this is refused... */
  CHECK(reconf(p, &cfg1, err, sizeof(err)) == MTP_EINVAL);
  CHECK_MSG(strstr(err, "tables.allow") != NULL && strstr(err, "'MixedCase'") != NULL, "%s", err);
  CHECK(mtp_policy_table_del(p, "allow", "MixedCase") == MTP_OK);
  /* ...until it is gone. */
  CHECK_MSG(reconf(p, &cfg1, err, sizeof(err)) == MTP_OK, "%s", err);
  CHECK(mtp_policy_counter_entries(p, 1) == 0);
  mtp_policy_release(p, h3);

  /* A hold outlives the policy. */
  struct mtp_policy_hold *h4 = NULL;
  CHECK(admit(p, "l9", "2.2.2.2", NULL, &h4, NULL) == MTP_OK && h4 != NULL);
  mtp_policy_free(p);
  mtp_policy_release(NULL, h4);

  /* Only max changes: the counts carry on (they count the same tuples), the new limit
   * applies to them at once. */
  struct mtp_policy_rule_conf one = rule_max(1, 1, MTP_PKEY_CLIENT_IPV4, 0), two = rule_max(2, 1, MTP_PKEY_CLIENT_IPV4, 0);
  struct mtp_config cfg_one = mkcfg(&one, 1, NULL, 0), cfg_two = mkcfg(&two, 1, NULL, 0);
  p = create_ok(&cfg_one);
  struct mtp_policy_hold *m1 = NULL, *m2 = NULL;
  CHECK(admit(p, "l", "5.5.5.5", NULL, &m1, NULL) == MTP_OK);
  REJECTED(p, "l", "5.5.5.5", NULL, 0);
  CHECK(reconf(p, &cfg_two, err, sizeof(err)) == MTP_OK);
  CHECK(mtp_policy_rejects(p, 0) == 0); /* another rule (max differs): its own count */
  CHECK(admit(p, "l", "5.5.5.5", NULL, &m2, NULL) == MTP_OK);
  REJECTED(p, "l", "5.5.5.5", NULL, 0);
  CHECK(reconf(p, &cfg_one, err, sizeof(err)) == MTP_OK);
  REJECTED(p, "l", "5.5.5.5", NULL, 0); /* 2 open, limit 1 */
  mtp_policy_release(p, m1);
  REJECTED(p, "l", "5.5.5.5", NULL, 0); /* 1 open, limit 1 */
  mtp_policy_release(p, m2);
  ADMITTED(p, "l", "5.5.5.5", NULL);
  CHECK(mtp_policy_counter_entries(p, 0) == 0);
  mtp_policy_free(p);

  /* Changing tables_file on reload writes the current tables there. */
  check_tmpdir_make("test_policy_reconf");
  char file[300];
  snprintf(file, sizeof(file), "%s/moved.json", check_tmpdir);
  p = create_ok(&cfg1);
  CHECK(mtp_policy_table_add(p, "allow", "7.7.7.7") == MTP_OK);
  struct mtp_config moved = cfg1;
  moved.tables_file = file;
  CHECK(reconf(p, &moved, err, sizeof(err)) == MTP_OK);
  const char *text = slurp(file);
  CHECK(text != NULL && strstr(text, "\"7.7.7.7\"") != NULL);
  mtp_policy_free(p);
  check_tmpdir_remove();
}

/* ---- config validation ---- */

static void test_config_errors(void) {
  char *ips[] = {"1.2.3.4"};
  char *junk[] = {"not-an-ip"};
  struct mtp_table_conf tabs[] = {table("ips", ips, 1), table("junk", junk, 1)};
  struct mtp_policy_rule_conf r;

  r = rule_in(MTP_PKEY_CLIENT_IPV4, 0, "missing");
  struct mtp_config cfg = mkcfg(&r, 1, tabs, 2);
  create_err(&cfg, MTP_EINVAL, "policy[0]: table 'missing' is not defined");

  r = rule_in(MTP_PKEY_CLIENT_IPV4, 0, "junk");
  create_err(&cfg, MTP_EINVAL, "tables.junk: 'not-an-ip' is not an IPv4 address or subnet");

  /* One table for two kinds of key (as config.c allows): an entry may be either. */
  struct mtp_policy_rule_conf two[] = {rule_not_in(MTP_PKEY_CLIENT_IPV4, 0, "ips"),
                                       rule_not_in(MTP_PKEY_TLS_DOMAIN, 0, "ips")};
  cfg = mkcfg(two, 2, tabs, 2);
  struct mtp_policy *p = create_ok(&cfg);
  CHECK(mtp_policy_table_add(p, "ips", "Bad.Example") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "ips", "10.1.2.3/16") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "ips", "2001:db8::1") == MTP_EINVAL); /* no IPv6 key uses it */
  CHECK(mtp_policy_table_add(p, "ips", "a b") == MTP_EINVAL);
  JSON_IS(p, "ips", "{\"ips\":[\"1.2.3.4\",\"10.1.0.0/16\",\"bad.example\"]}");
  REJECTED(p, "l", "10.1.9.9", NULL, 0);
  REJECTED(p, "l", "9.9.9.9", "BAD.example", 1);
  ADMITTED(p, "l", "9.9.9.9", "good.example");
  mtp_policy_free(p);
  /* With a listener key too, host names are kept as they are (listener names are
   * case-sensitive); IPs still canonical. */
  struct mtp_policy_rule_conf three[] = {rule_not_in(MTP_PKEY_LISTENER, 0, "ips"),
                                         rule_not_in(MTP_PKEY_TLS_DOMAIN, 0, "ips"),
                                         rule_not_in(MTP_PKEY_CLIENT_IPV6, 0, "ips")};
  cfg = mkcfg(three, 3, tabs, 2);
  p = create_ok(&cfg);
  CHECK(mtp_policy_table_add(p, "ips", "Main") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "ips", "2001:DB8::1/64") == MTP_OK);
  CHECK(mtp_policy_table_add(p, "ips", "a b") == MTP_EINVAL);
  JSON_IS(p, "ips", "{\"ips\":[\"1.2.3.4\",\"2001:db8::/64\",\"Main\"]}"); /* 1.2.3.4: a name here */
  REJECTED(p, "Main", "1.1.1.1", NULL, 0);
  ADMITTED(p, "main", "1.1.1.1", NULL);
  REJECTED(p, "x", "2001:db8::5", NULL, 2);
  mtp_policy_free(p);

  r = rule_in(MTP_PKEY_IPV4_SUBNET, 33, "ips");
  cfg = mkcfg(&r, 1, tabs, 2);
  create_err(&cfg, MTP_EINVAL, "prefix 33 out of range");
  r = rule_max(1, 1, MTP_PKEY_IPV6_SUBNET, 129);
  create_err(&cfg, MTP_EINVAL, "prefix 129 out of range");

  r = rule_max(1, 2, MTP_PKEY_CLIENT_IPV4, 0, MTP_PKEY_LISTENER, 0);
  r.kind = MTP_PRULE_IN_TABLE;
  r.table = "ips";
  create_err(&cfg, MTP_EINVAL, "in_table takes exactly one key");

  struct mtp_table_conf dup[] = {table("ips", ips, 1), table("ips", NULL, 0)};
  cfg = mkcfg(NULL, 0, dup, 2);
  create_err(&cfg, MTP_EINVAL, "'ips' is defined twice");
}

/* ---- allocation failures: every failure point is an error, never a crash or leak ---- */

static atomic_long alloc_countdown = -1;
static atomic_long alloc_live;
static bool should_fail(void) {
  long v = atomic_load(&alloc_countdown);
  return v >= 0 && atomic_fetch_sub(&alloc_countdown, 1) == 0;
}
static void *t_malloc(size_t n) { return should_fail() ? NULL : malloc(n); }
static void *t_calloc(size_t c, size_t n) { return should_fail() ? NULL : calloc(c, n); }
static void *t_realloc(void *p, size_t n) { return should_fail() ? NULL : realloc(p, n); }
static void t_free(void *p) { free(p); }

static void test_alloc_failures(void) {
  char *allow[] = {"1.1.1.1", "10.0.0.0/8"};
  struct mtp_table_conf tabs[] = {table("allow", allow, 2)};
  struct mtp_policy_rule_conf rules[] = {rule_in(MTP_PKEY_CLIENT_IPV4, 0, "allow"),
                                         rule_max(2, 2, MTP_PKEY_LISTENER, 0, MTP_PKEY_CLIENT_IPV4, 0)};
  struct mtp_config cfg = mkcfg(rules, 2, tabs, 1);
  int ok_at = -1;
  for (long n = 0; n < 200 && ok_at < 0; n++) {
    atomic_store(&alloc_countdown, n);
    struct mtp_policy *p = NULL;
    char err[256];
    int rc = mtp_policy_create(&p, &cfg, err, sizeof(err));
    if (rc == MTP_OK) {
      struct mtp_policy_hold *h = NULL;
      rc = admit(p, "l", "10.1.1.1", NULL, &h, NULL);
      CHECK(rc == MTP_OK || rc == MTP_ENOMEM);
      mtp_policy_release(p, h);
      rc = mtp_policy_reconfigure(p, &cfg, err, sizeof(err));
      CHECK(rc == MTP_OK || rc == MTP_ENOMEM);
      rc = mtp_policy_table_add(p, "allow", "2.2.2.2");
      CHECK(rc == MTP_OK || rc == MTP_ENOMEM);
      atomic_store(&alloc_countdown, -1);
      CHECK(mtp_policy_counter_entries(p, 1) == 0);
      if (rc == MTP_OK)
        ok_at = (int)n;
      mtp_policy_free(p);
    } else {
      CHECK_MSG(rc == MTP_ENOMEM, "%s", mtp_strerror(rc));
      CHECK(p == NULL);
    }
  }
  atomic_store(&alloc_countdown, -1);
  CHECK(ok_at > 5);
  (void)alloc_live;
}

int main(void) {
  mtp_log_level = MTP_LOG_WARN;
  CHECK(mtp_replace_allocator(t_malloc, t_realloc, t_calloc, t_free) == MTP_OK);
  test_table_rules();
  test_rule_order_and_empty();
  test_max_connections();
  test_later_reject_releases();
  test_table_edits();
  test_persistence();
  test_reconfigure();
  test_config_errors();
  test_alloc_failures();
  test_storm();
  return check_report();
}
