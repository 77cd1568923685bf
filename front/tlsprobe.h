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
 */
#ifndef MTP_FRONT_TLSPROBE_H
#define MTP_FRONT_TLSPROBE_H

#include <stddef.h>
#include <uv.h>

#include "config.h"

struct mtp_tlsprobe;

/* Sets it up on the main loop and starts the first probes. cfg is borrowed and outlives it; the
 * domain list is fixed here. Returns MTP_OK or MTP_ENOMEM (probe failures are only logged). */
int mtp_tlsprobe_setup(struct mtp_tlsprobe **out, const struct mtp_config *cfg, uv_loop_t *main_loop);

/*
 * The size to use for the fake certificate flight for domain (lower-cased). Any thread.
 * cfg->tls_flight_size when set; else the last learnt size for the domain; else a plausible
 * random size in 2500..4600 drawn per call. p may be NULL (no prober: random). Takes no lock.
 */
size_t mtp_tlsprobe_flight_size(struct mtp_tlsprobe *p, const char *domain);

/* The learnt size (0 = not learnt yet); for /status and tests. Any thread. */
size_t mtp_tlsprobe_learnt(struct mtp_tlsprobe *p, const char *domain);

void mtp_tlsprobe_stop(struct mtp_tlsprobe *p);  /* main thread; handles close asynchronously */
void mtp_tlsprobe_free(struct mtp_tlsprobe *p);  /* after the main loop has finished; NULL-safe */

#endif
