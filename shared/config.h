/*
 * config.h - the proxy's configuration: JSON file (--config) plus quick command-line flags.
 *
 * Load order: built-in defaults, then the JSON file if --config is given, then the flags
 * (a flag overrides the file's value; --listen/--secret given on the command line replace
 * the file's listeners/secrets, --tls-domain/--tunnel-allow the file's lists). Every value is validated; an error is one line that names
 * the bad flag, file or JSON key and the reason. The result is immutable once loaded; a reload
 * (mtp_config_reload) builds a new one from the same command line.
 * Every key is documented with its default in docs/configuration.md.
 */
#ifndef MTP_CONFIG_H
#define MTP_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct mtp_listener_conf {
  char *name;                    /* owns: unique; default "l0", "l1", ... */
  struct sockaddr_storage addr;  /* IPv4 or IPv6, port may be 0 = any free port */
  uint8_t (*secrets)[16];        /* owns: tried in order */
  size_t nsecrets;
  bool has_ad_tag;               /* falls back to the global ad_tag */
  uint8_t ad_tag[16];
  unsigned allowed_protocols;    /* MTP_ALLOW_* bits (obf2.h) */
  /* Fake-TLS (ee): the domains a ClientHello's SNI may name on this listener (lower-cased,
   * owned). Empty = the global tls_domains. With no domain at all, fake-TLS is off here. */
  char **tls_domains;
  size_t ntls_domains;
};

/* Where connections that fail the fake-TLS checks are spliced (issue 3). */
enum mtp_fronting_mode {
  MTP_FRONTING_OFF = 0,  /* close them after the handshake timeout, like a failed obf2 header */
  MTP_FRONTING_SNI = 1,  /* to the SNI host of the ClientHello, port 443 */
  MTP_FRONTING_HOST = 2, /* to fronting_host:fronting_port (e.g. a local nginx) */
};

/* Policy (issue 5): what a rule or table entry is keyed on. */
enum mtp_policy_key {
  MTP_PKEY_LISTENER = 0,    /* listener name */
  MTP_PKEY_CLIENT_IPV4,     /* "client_ipv4": the client's IPv4 address */
  MTP_PKEY_CLIENT_IPV6,     /* "client_ipv6": the client's IPv6 address */
  MTP_PKEY_IPV4_SUBNET,     /* "ipv4/M": the client's IPv4 /M network (prefix in .prefix) */
  MTP_PKEY_IPV6_SUBNET,     /* "ipv6/M" */
  MTP_PKEY_TLS_DOMAIN,      /* "tls_domain": lower-cased SNI of a fake-TLS client */
};

enum mtp_policy_rule_kind {
  MTP_PRULE_IN_TABLE = 0,   /* allow only if the key's value is in the table */
  MTP_PRULE_NOT_IN_TABLE,   /* reject if the key's value is in the table */
  MTP_PRULE_MAX_CONNECTIONS /* at most max open connections per distinct value of the keys */
};

#define MTP_POLICY_MAX_KEYS 6

/* What the entries of a table may be, by the keys the rules match against it (a set of bits). */
enum {
  MTP_PENTRY_NAME = 1,   /* a listener name */
  MTP_PENTRY_DOMAIN = 2, /* a host name */
  MTP_PENTRY_V4 = 4,     /* an IPv4 address or subnet */
  MTP_PENTRY_V6 = 8,     /* an IPv6 address or subnet */
};

/* The MTP_PENTRY_* bit of the values of key k (the subnet keys take addresses or subnets of
 * their family). */
unsigned mtp_policy_key_entry(enum mtp_policy_key k);

struct mtp_policy_keyspec {
  enum mtp_policy_key key;
  int prefix; /* subnet keys: 0..32 / 0..128; else 0 */
};

struct mtp_policy_rule_conf {
  enum mtp_policy_rule_kind kind;
  struct mtp_policy_keyspec keys[MTP_POLICY_MAX_KEYS]; /* in_table/not_in_table: exactly 1 */
  size_t nkeys;                                        /* max_connections: 0 = one global count */
  char *table;   /* owns: table name (in_table, not_in_table) */
  uint64_t max;  /* max_connections */
};

/* A table as the config file defines it; entries are the textual values (owned). */
struct mtp_table_conf {
  char *name;
  char **entries;
  size_t nentries;
};

struct mtp_config {
  struct mtp_listener_conf *listeners; /* owns */
  size_t nlisteners;
  int workers;                   /* >= 1; default: number of CPUs */
  double handshake_timeout;      /* seconds, default 10 */
  double idle_timeout;           /* seconds, default 600 */
  size_t client_send_budget;     /* bytes queued to one client before it is closed; default 4 MiB */
  size_t dc_conn_max_clients;    /* clients per middle-proxy connection; default 300 */
  double dc_connect_timeout;     /* seconds, default 10 */
  char *proxy_secret;            /* owns: URL (http:// https://) or file path */
  char *proxy_config;            /* owns: URL or file path */
  double config_refresh;         /* seconds between refreshes, default 3600 */
  char *cache_dir;               /* owns: where the last good Telegram config is cached; NULL = none */
  bool has_nat;                  /* --nat-info LOCAL:PUBLIC */
  uint32_t nat_local, nat_public; /* IPv4, host order */
  bool has_ad_tag;
  uint8_t ad_tag[16];
  char *public_host;             /* owns: host printed in links; NULL = guess */
  char *admin;                   /* owns: "ADDR:PORT" of the admin endpoint; NULL = off */
  int log_level;                 /* MTP_LOG_*; default info */
  char *log_debug;               /* owns: comma list of modules logged at debug; NULL = none */

  /* ---- fake-TLS, fronting, replay (issue 3) ---- */
  char **tls_domains;            /* owns: global fake-TLS domains (--tls-domain, repeatable), lower-cased */
  size_t ntls_domains;
  double tls_clock_skew;         /* seconds a ClientHello timestamp may be off either way; default 600 */
  size_t tls_record_size;        /* max payload of records we send after the handshake; default 16384 */
  size_t tls_flight_size;        /* fake certificate flight size; 0 = learn from the fronted host
                                  * (random 2500..4600 until learnt); default 0 */
  double tls_probe_interval;     /* seconds between learning probes; default 3600 */
  enum mtp_fronting_mode fronting_mode; /* default MTP_FRONTING_SNI */
  char *fronting_host;           /* owns: MTP_FRONTING_HOST target host */
  uint16_t fronting_port;
  double fronting_connect_timeout; /* seconds, default 10 */
  double fronting_idle_timeout;  /* seconds, default 120 */
  size_t replay_cache_bytes;     /* "replay_cache_mb"; default 16 MiB */
  uint32_t replay_max_age;       /* seconds; default and minimum 2 * tls_clock_skew */
  bool per_sni_secrets;          /* ee secret per domain: SHA-256(salt || hex(secret) || domain)[0:16] */
  char *per_sni_salt;            /* owns: the salt (required when per_sni_secrets) */

  /* ---- split mode (issue 4) ---- */
  char *back;                    /* owns: front: "HOST:PORT" of the back (--back) */
  char *tunnel_listen;           /* owns: back: "ADDR:PORT" the fronts dial (--tunnel-listen) */
  char *tunnel_cert, *tunnel_key, *tunnel_ca; /* owns: PEM files */
  char **tunnel_allowed_fronts;  /* owns: back: front names (certificate CN) allowed; empty = any from the CA */
  size_t ntunnel_allowed_fronts;
  int tunnel_conns;              /* front: tunnel connections per worker; default 1 */
  double tunnel_heartbeat;       /* seconds between pings; default 5 */
  double tunnel_timeout;         /* seconds without any frame before the peer is dead; default 20 */
  size_t tunnel_window;          /* per-stream credit in bytes each way; default 1 MiB + 64 KiB */
  char *node_name;               /* owns: this node's name in Hello; default the host name */

  /* ---- policy and operations (issue 5) ---- */
  struct mtp_policy_rule_conf *policy; /* owns: rules, checked in order */
  size_t npolicy;
  struct mtp_table_conf *tables; /* owns: tables and their initial entries */
  size_t ntables;
  char *tables_file;             /* owns: where runtime table edits persist; NULL = cache_dir/tables.json or none */
  double drain_timeout;          /* seconds clients may drain after SIGTERM; default 30 */
  char *config_path;             /* owns: the --config file, re-read on reload; NULL = none */

  /* ---- reload (issue 5) ---- */
  char **_argv;                  /* owns: a copy of the argv mtp_config_load was given, NULL-terminated;
                                  * NULL when the config was not made by mtp_config_load */
  int _argc;
  unsigned _flags;               /* the MTP_CONFIG_* flags it was loaded with */
};

/*
 * Builds the configuration from argv (after the program name has been removed, i.e. argv[0]
 * is the first flag). On error returns MTP_EINVAL with one line in err, e.g.
 *   "--secret: 'xyz' is not 32 hex characters"
 *   "config.json: listeners[0].port: must be 0..65535"
 * *show_help is set when --help was given (cfg is then untouched).
 */
int mtp_config_load(int argc, char **argv, struct mtp_config *cfg, bool *show_help, char *err, size_t errlen);

/* For executables that serve no clients (mtproxy-back): client listeners are optional (any
 * given are still validated, secrets included). */
#define MTP_CONFIG_NO_CLIENTS 0x1u
/* mtp_config_load with MTP_CONFIG_* flags; reload keeps them. */
int mtp_config_load_flags(int argc, char **argv, unsigned flags, struct mtp_config *cfg, bool *show_help, char *err,
                          size_t errlen);

/* Parses the JSON text as a config file named `name` onto cfg (start from mtp_config_defaults),
 * then runs the checks that involve several keys and derives replay_max_age, as mtp_config_load
 * does. A replay_max_age already in cfg counts as given unless it equals 2 * tls_clock_skew. */
int mtp_config_parse_json(const char *text, const char *name, struct mtp_config *cfg, char *err, size_t errlen);

/*
 * Builds a fresh configuration the way `old` was built: mtp_config_load on a copy of the same argv,
 * so the --config file is read again and the flags still override it.
 *
 * Settings that cannot change while the proxy runs keep their value from `old`: workers,
 * dc_conn_max_clients, dc_connect_timeout, proxy_secret, proxy_config, config_refresh, cache_dir,
 * nat_info, admin, replay_cache_mb, replay_max_age, back, tunnel_* (all of them), node_name and
 * tables_file. Everything else comes from the new text: listeners, secrets, ad_tags, allowed
 * protocols, tls_domains, timeouts, fake-TLS and fronting settings, per-SNI secrets, policy and
 * tables, log_level, log_debug, drain_timeout, public_host.
 *
 * replay_max_age belongs to the running replay cache, so it stays; a new tls_clock_skew whose
 * 2 * skew exceeds it is an error that names both keys.
 *
 * Returns:
 *   MTP_OK      *out holds the new config (owned by the caller; `out` is overwritten without being
 *               freed and must not be `old`). err holds "" or one line naming the restart-only
 *               settings that differed and were kept, e.g. "workers, admin changed; they keep
 *               their old values until a restart". 512 bytes of err hold the longest such line.
 *   MTP_EINVAL  the new config is invalid (err: one line naming the file or flag and the key), or
 *               `old` was not made by mtp_config_load. *out is untouched; nothing is allocated.
 *   MTP_ENOMEM  "out of memory"; *out untouched.
 * Reads a file: call it from the main thread, outside the workers' loops.
 */
int mtp_config_reload(const struct mtp_config *old, struct mtp_config *out, char *err, size_t errlen);

/*
 * True when listener b of a new config may keep listener a's socket: same name, same address
 * family, IP and port. Port 0 ("any free port") counts as the same port when both have it, so a
 * listener with port 0 that keeps its name and IP keeps the port the OS gave it. A listener whose
 * name or address changed is a new socket; the old one should be closed before the new one binds,
 * since they may share the address.
 */
bool mtp_listener_conf_same_socket(const struct mtp_listener_conf *a, const struct mtp_listener_conf *b);

/* Sets all defaults (no listeners). */
void mtp_config_defaults(struct mtp_config *cfg);
void mtp_config_free(struct mtp_config *cfg);

/* The fake-TLS domains in effect on listener l: its own tls_domains, else the global ones
 * (borrowed from cfg or l; *n may be 0). */
const char *const *mtp_config_tls_domains(const struct mtp_config *cfg, const struct mtp_listener_conf *l,
                                          size_t *n);

/* True when l serves fake-TLS: it has secrets, allows fake_tls and has a domain in effect. */
bool mtp_config_serves_fake_tls(const struct mtp_config *cfg, const struct mtp_listener_conf *l);

/* The --help text. */
extern const char mtp_config_usage[];

/* Parses "abridged,intermediate,secure,fake_tls" into MTP_ALLOW_* bits; MTP_EINVAL names nothing. */
int mtp_config_parse_protocols(const char *list, unsigned *bits);

/* "1.2.3.4:443", "[::1]:443" or "443" (= 0.0.0.0 and [::]) into addr. Returns MTP_OK or MTP_EINVAL. */
int mtp_parse_addr_port(const char *s, struct sockaddr_storage *addr);

/* An IP address optionally followed by "/PREFIX" ("1.2.3.4", "10.0.0.0/8", "2001:db8::/32"; the
 * prefix is 1..3 digits, at most 32 / 128). *family is AF_INET or AF_INET6 as written, addr
 * gets the address (4 or 16 bytes, network order), *prefix the prefix length (the full length
 * when none is given). Returns MTP_OK or MTP_EINVAL. Table entries of policy rules are these
 * (shared/config.c checks them, front/policy.c normalises them). */
int mtp_parse_ip_prefix(const char *s, int *family, uint8_t addr[16], int *prefix);

/* Formats addr as "1.2.3.4:443" or "[::1]:443". */
void mtp_format_addr(const struct sockaddr_storage *addr, char *out, size_t outlen);

/* A duration of the configuration (seconds) as a libuv timeout in milliseconds: rounded, at
 * least 1 (also for 0, a negative value or NaN), at most 1e15. */
uint64_t mtp_config_ms(double seconds);

#endif
