/*
 * config.h - the proxy's configuration: JSON file (--config) plus quick command-line flags.
 *
 * Load order: built-in defaults, then the JSON file if --config is given, then the flags
 * (a flag overrides the file's value; --listen/--secret given on the command line replace
 * the file's listeners/secrets). Every value is validated; an error is one line that names
 * the bad flag, file or JSON key and the reason. The result is immutable once loaded.
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
};

/*
 * Builds the configuration from argv (after the program name has been removed, i.e. argv[0]
 * is the first flag). On error returns MTP_EINVAL with one line in err, e.g.
 *   "--secret: 'xyz' is not 32 hex characters"
 *   "config.json: listeners[0].port: must be 0..65535"
 * *show_help is set when --help was given (cfg is then untouched).
 */
int mtp_config_load(int argc, char **argv, struct mtp_config *cfg, bool *show_help, char *err, size_t errlen);

/* Parses the JSON text as a config file named `name` (used by mtp_config_load and tests). */
int mtp_config_parse_json(const char *text, const char *name, struct mtp_config *cfg, char *err, size_t errlen);

/* Sets all defaults (no listeners). */
void mtp_config_defaults(struct mtp_config *cfg);
void mtp_config_free(struct mtp_config *cfg);

/* The --help text. */
extern const char mtp_config_usage[];

/* Parses "abridged,intermediate,secure,fake_tls" into MTP_ALLOW_* bits; MTP_EINVAL names nothing. */
int mtp_config_parse_protocols(const char *list, unsigned *bits);

/* "1.2.3.4:443", "[::1]:443" or "443" (= 0.0.0.0 and [::]) into addr. Returns MTP_OK or MTP_EINVAL. */
int mtp_parse_addr_port(const char *s, struct sockaddr_storage *addr);

/* Formats addr as "1.2.3.4:443" or "[::1]:443". */
void mtp_format_addr(const struct sockaddr_storage *addr, char *out, size_t outlen);

#endif
