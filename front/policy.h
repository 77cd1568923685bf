/*
 * policy.h - connection policy: rules checked in order once a client's handshake is known
 * (fake-TLS: at the ClientHello, so the SNI is a key), tables they refer to, and the counters
 * of max_connections rules. One object per process, shared by all workers (thread-safe).
 *
 * Rules (struct mtp_policy_rule_conf in config.h):
 *   in_table KEY TABLE       reject unless the connection's KEY value is in TABLE
 *   not_in_table KEY TABLE   reject if it is
 *   max_connections [KEYS] N reject if N connections with the same values of KEYS are open
 * A key that does not apply to a connection (tls_domain without SNI, an IPv6 key for an IPv4
 * client) makes its rule pass. A connection admitted by a max_connections rule and rejected by
 * a later rule is released from the earlier counters before mtp_policy_admit returns; an
 * admitted connection is released exactly once with mtp_policy_release.
 *
 * Tables are edited at runtime (admin API) and persisted to a file after each change, so
 * they survive restarts.
 */
#ifndef MTP_FRONT_POLICY_H
#define MTP_FRONT_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "config.h"

struct mtp_policy;
struct mtp_policy_hold; /* the counters one admitted connection holds */

/* What policy looks at for one connection. */
struct mtp_policy_conn {
  const char *listener;                  /* listener name */
  const struct sockaddr_storage *client; /* client address */
  const char *tls_domain;                /* lower-cased SNI, or NULL when not fake-TLS */
};

/* Builds the policy from cfg (rules, tables) and loads the tables file if it exists (its
 * contents win over the config's initial entries). err gets one line naming the bad input. */
int mtp_policy_create(struct mtp_policy **out, const struct mtp_config *cfg, char *err, size_t errlen);

/*
 * Checks the rules in order. Returns MTP_OK with *hold set (NULL when no counter was taken;
 * pass it to mtp_policy_release either way) or MTP_EPOLICY with *rule the index of the rule
 * that rejected (nothing held). Any thread; no lock is held across calls.
 */
int mtp_policy_admit(struct mtp_policy *p, const struct mtp_policy_conn *c, struct mtp_policy_hold **hold,
                     int *rule);

/* Releases what admit took. NULL hold is fine. Any thread. */
void mtp_policy_release(struct mtp_policy *p, struct mtp_policy_hold *hold);

/* Rejections so far by rule index (for metrics: mtproxy_policy_rejects_total{rule="N"}). */
uint64_t mtp_policy_rejects(const struct mtp_policy *p, size_t rule);
size_t mtp_policy_nrules(const struct mtp_policy *p);

/* Table edits; values are normalised for the table's key kind where known (IPs canonical,
 * domains lower-cased). Each successful edit rewrites the tables file atomically (tmp+rename).
 * Return MTP_OK, MTP_ENOTFOUND (no such table / entry), MTP_EEXIST, MTP_EINVAL, MTP_EIO. */
int mtp_policy_table_add(struct mtp_policy *p, const char *table, const char *value);
int mtp_policy_table_del(struct mtp_policy *p, const char *table, const char *value);
/* JSON text of {"table": ["v", ...], ...} or of one table; caller frees with mtp_free. */
int mtp_policy_tables_json(struct mtp_policy *p, const char *table, char **out);

/* Replaces rules (reload) keeping tables' runtime contents and open connection counts. */
int mtp_policy_reconfigure(struct mtp_policy *p, const struct mtp_config *cfg, char *err, size_t errlen);

void mtp_policy_free(struct mtp_policy *p);

#endif
