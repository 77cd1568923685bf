/*
 * frontsvc.h - the process-wide services of the front half, set up by the executables that
 * run it (mtproxy, mtproxy-front) before their workers start: the replay cache, the
 * connection policy, the certificate-flight probe, the proxy's own addresses (for fronting's
 * loop check), the per-listener client counters (front/lstats.h), and the admin endpoint's
 * hooks for them (policy tables, policy, replay and per-listener metrics, /status).
 * Everything here lives on the main thread; the workers get the shared struct (front.h) whose
 * parts are thread-safe. A reload (cmd/reload.c) calls mtp_frontsvc_reconfigure before the
 * workers switch and hands them the updated shared struct with the new generation.
 *
 * Admin output (the listener names are those of the configuration in force, then any removed
 * listener while clients it accepted are still open):
 *   mtproxy_listener_client_connections{listener}          gauge: client connections open now
 *   mtproxy_listener_connections_total{listener}           counter: connections accepted
 *   mtproxy_listener_handshakes_total{listener,protocol}   counter: successful handshakes by
 *       outer protocol: abridged, intermediate, secure (plain obfuscated2) or fake_tls
 *   /status: "clients" in each entry of "listeners"; "closed_listeners": [{"name", "clients"}]
 *       for removed listeners that still have clients (absent when there are none)
 */
#ifndef MTP_CMD_FRONTSVC_H
#define MTP_CMD_FRONTSVC_H

#include "app.h"
#include "config.h"
#include "front.h"
#include "replay.h"

struct mtp_frontsvc {
  struct mtp_app *app;             /* borrows */
  struct mtp_replay replay;        /* owns */
  struct mtp_policy *policy;       /* owns */
  struct mtp_tlsprobe *tlsprobe;   /* owns; NULL until a configuration has fake-TLS */
  struct mtp_lstats *lstats;       /* owns */
  struct mtp_front_shared shared;  /* what the workers get */
};

/* Sets everything up for cfg (borrowed; it must outlive svc) on app's main loop. Logs and
 * returns an error naming what failed. svc is zeroed first; mtp_frontsvc_free is always safe. */
int mtp_frontsvc_setup(struct mtp_frontsvc *svc, struct mtp_app *app, const struct mtp_config *cfg);
/*
 * A reload, main thread, after the app committed cfg (the new configuration; only read during
 * the call): recomputes the public addresses (public_host may change),
 * reconfigures the certificate-flight probe (front/tlsprobe.h), or creates it when cfg is the
 * first configuration with fake-TLS, and updates svc->shared (bound_addrs: the app's, valid
 * until the next reload's commit; the workers use the generation's own bound_addrs). Cannot
 * fail: a probe that cannot follow (out of memory) is logged and keeps its old settings, or
 * stays absent (fake-TLS then draws random flight sizes). The workers see the result when they
 * take svc->shared over with the new generation.
 */
void mtp_frontsvc_reconfigure(struct mtp_frontsvc *svc, const struct mtp_config *cfg);
/* Once every worker has switched to the generation made after the last reconfigure (or at the
 * next reload, when one was late): frees what the workers can no longer be reading
 * (mtp_tlsprobe_reclaim). Main thread. */
void mtp_frontsvc_reclaim(struct mtp_frontsvc *svc);
/* Stops the probe's timers and connections (main thread, when the process stops). */
void mtp_frontsvc_stop(struct mtp_frontsvc *svc);
/* Frees; after the main loop and the workers have finished. */
void mtp_frontsvc_free(struct mtp_frontsvc *svc);

#endif
