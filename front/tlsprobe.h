/*
 * tlsprobe.h - learns what the fronted site's TLS 1.3 server flight looks like, so the fake
 * ServerHello we send is followed by an ApplicationData record of the same size as the real
 * site's (encrypted extensions + certificate + verify + finished).
 *
 * At start and every cfg->tls_probe_interval seconds, for each fake-TLS domain (global and per
 * listener), it connects to that domain's fronting target (MTP_FRONTING_SNI: DOMAIN:443,
 * MTP_FRONTING_HOST: fronting_host:fronting_port with SNI DOMAIN; nothing when fronting is
 * off), sends a browser-like ClientHello, reads the ServerHello, ChangeCipherSpec and the
 * ApplicationData records of the first flight, and remembers the sum of their payload sizes
 * (clamped to 1..MTP_FAKETLS_MAX_PAYLOAD). Probes run on the main loop; resolution never blocks.
 * The flight is over when nothing arrives for a short while after a whole ApplicationData
 * record, when the server closes there, or when the sum reaches MTP_FAKETLS_MAX_PAYLOAD; the
 * connect and each wait for more bytes are bounded by cfg->fronting_connect_timeout. No probe
 * runs when cfg->tls_flight_size is set (the size is fixed) or fronting is off. Counted in
 * MTP_M_TLS_PROBE_OK / _FAIL; logged "tls probe DOMAIN via HOST:PORT: flight N bytes".
 *
 * Reload (mtp_tlsprobe_reconfigure, main thread): the domain set, the fixed size, the target
 * (fronting mode, host, port), the connect timeout and the interval follow the new
 * configuration. Workers may be asking for sizes meanwhile: they read an immutable domain
 * table through an atomic pointer, and a replaced table is only retired, never freed while a
 * worker might still hold it (see mtp_tlsprobe_reclaim).
 */
#ifndef MTP_FRONT_TLSPROBE_H
#define MTP_FRONT_TLSPROBE_H

#include <stddef.h>
#include <uv.h>

#include "config.h"

struct mtp_tlsprobe;

/* Sets it up on the main loop and starts the first probes. What it needs of cfg is copied
 * (cfg is not used after the call). Returns MTP_OK or MTP_ENOMEM (probe failures are only
 * logged). */
int mtp_tlsprobe_setup(struct mtp_tlsprobe **out, const struct mtp_config *cfg, uv_loop_t *main_loop);

/*
 * Follows a reloaded configuration; main thread (the loop it was set up on). cfg is copied as
 * at setup.
 *   - Domains: cfg's fake-TLS domains from now on. A domain that stays keeps its learnt size
 *     (also when the target changed: the old size is served until the new target's is
 *     learnt); a removed one is forgotten (its probe, if running, is closed and its result
 *     dropped); a new one is probed at once.
 *   - Target (fronting mode, host, port): when it changed, running probes are dropped and
 *     every domain is probed again at once.
 *   - tls_probe_interval: the periodic timer restarts with it when it changed (else it keeps
 *     its phase); fronting turned off or tls_flight_size set: no more probes (sizes then come
 *     from tls_flight_size or are drawn at random), turned back on: probes again.
 *   - fronting_connect_timeout: for probes started from now on.
 * The new domain table is published atomically; the replaced one is retired (kept) until
 * mtp_tlsprobe_reclaim. Returns MTP_OK, or MTP_ENOMEM with nothing changed.
 */
int mtp_tlsprobe_reconfigure(struct mtp_tlsprobe *p, const struct mtp_config *cfg);

/*
 * Frees the domain tables retired by earlier reconfigures. Main thread. Call it only when no
 * other thread can still be inside mtp_tlsprobe_flight_size / _learnt with a table loaded
 * before the last reconfigure: e.g. once every worker loop has run a callback that was queued
 * after it. cmd/reload.c calls it once every worker has applied the reload (posted after the
 * reconfigure), or, when a worker was late, at the next reload (which waits for that worker
 * first): so at most one retired table waits at a time, a few bytes per domain. NULL-safe.
 */
void mtp_tlsprobe_reclaim(struct mtp_tlsprobe *p);
/* Retired tables not yet reclaimed; for tests and logs. Main thread. */
size_t mtp_tlsprobe_nretired(const struct mtp_tlsprobe *p);

/*
 * The size to use for the fake certificate flight for domain (lower-cased). Any thread.
 * cfg->tls_flight_size when set; else the last learnt size for the domain; else a plausible
 * random size in 2500..4600 drawn per call. p may be NULL (no prober: random). Takes no lock.
 */
size_t mtp_tlsprobe_flight_size(struct mtp_tlsprobe *p, const char *domain);

/* The learnt size (0 = not learnt yet, or not one of the current domains); for /status and
 * tests. Any thread. */
size_t mtp_tlsprobe_learnt(struct mtp_tlsprobe *p, const char *domain);

void mtp_tlsprobe_stop(struct mtp_tlsprobe *p);  /* main thread; handles close asynchronously */
/* After the main loop and every worker have finished; frees the retired tables too. NULL-safe. */
void mtp_tlsprobe_free(struct mtp_tlsprobe *p);

#endif
