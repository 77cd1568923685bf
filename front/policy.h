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
 * they survive restarts. docs/policy.md describes rules, keys, tables, the file and memory.
 *
 * Threads: admit/release from any worker thread (they take a rwlock for reading and, for
 * max_connections, one mutex per rule for a moment; nothing is held between calls). Table
 * edits, tables_json and reconfigure come from the admin (main) thread; they take each
 * table's rwlock for writing only around the change itself, so workers keep admitting.
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

/* Builds the policy from cfg (rules, tables) and loads the tables file if it exists: for each
 * table in the file its contents replace the config's initial entries; tables only in the
 * file are kept (and logged at info). Every rule's table must be defined in cfg->tables.
 * Returns MTP_OK, MTP_EINVAL (bad rule/table/entry, or a corrupt tables file: err names the
 * file), MTP_EIO (file unreadable) or MTP_ENOMEM; err gets one line naming the bad input. */
int mtp_policy_create(struct mtp_policy **out, const struct mtp_config *cfg, char *err, size_t errlen);

/*
 * Checks the rules in order. Returns MTP_OK with *hold set (NULL when no counter was taken;
 * pass it to mtp_policy_release either way), MTP_EPOLICY with *rule the index of the rule
 * that rejected (nothing held), or MTP_ENOMEM (nothing held; treat like a reject). rule may
 * be NULL. c and the strings in it are only borrowed during the call. Any thread; no lock is
 * held across calls.
 */
int mtp_policy_admit(struct mtp_policy *p, const struct mtp_policy_conn *c, struct mtp_policy_hold **hold,
                     int *rule);

/* Releases what admit took, exactly once per admitted connection. NULL hold is fine. Any
 * thread. The hold owns references to its counters, so it may be released after a
 * reconfigure replaced its rules, or even after mtp_policy_free (p is then not touched). */
void mtp_policy_release(struct mtp_policy *p, struct mtp_policy_hold *hold);

/* Rejections so far by rule index (for metrics: mtproxy_policy_rejects_total{rule="N"}). */
uint64_t mtp_policy_rejects(const struct mtp_policy *p, size_t rule);
size_t mtp_policy_nrules(const struct mtp_policy *p);
/* Distinct key tuples with open connections in a max_connections rule's counter map (0 for
 * other rules); for /status and tests. */
size_t mtp_policy_counter_entries(const struct mtp_policy *p, size_t rule);

/* Table edits; values are normalised for the kind of key the rules use the table with (IPs
 * and subnets canonical and masked, IPv4-mapped IPv6 as IPv4, domains lower-cased, listener
 * names as is; a table no rule uses: IPs canonical, other text as is). Each successful edit
 * rewrites the tables file atomically (tmp in the same directory, fsync, rename); if that
 * fails the edit is undone. Return MTP_OK, MTP_ENOTFOUND (no such table / entry), MTP_EEXIST,
 * MTP_EINVAL (not a valid value for the table), MTP_EIO, MTP_ENOMEM. */
int mtp_policy_table_add(struct mtp_policy *p, const char *table, const char *value);
int mtp_policy_table_del(struct mtp_policy *p, const char *table, const char *value);
/* JSON text {"table": ["v", ...], ...} of all tables, or {"table": [...]} of the one named
 * (NULL: all); entries sorted. *out is freed by the caller with mtp_free. Returns MTP_OK,
 * MTP_ENOTFOUND, MTP_ENOMEM. */
int mtp_policy_tables_json(struct mtp_policy *p, const char *table, char **out);

/* Replaces rules (reload) keeping tables' runtime contents (tables new in cfg start with
 * cfg's entries) and the counters of max_connections rules whose keys are unchanged. Holds of
 * connections counted by a rule that went away are released into its old counter map, which
 * is freed with the last of them. All or nothing: on error (as for create) nothing changed. */
int mtp_policy_reconfigure(struct mtp_policy *p, const struct mtp_config *cfg, char *err, size_t errlen);

void mtp_policy_free(struct mtp_policy *p);

#endif
