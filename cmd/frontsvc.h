/*
 * frontsvc.h - the process-wide services of the front half, set up by the executables that
 * run it (mtproxy, mtproxy-front) before their workers start: the replay cache, the
 * connection policy, the certificate-flight probe, the proxy's own addresses (for fronting's
 * loop check), and the admin endpoint's hooks for them (policy tables, policy and replay
 * metrics, /status). Everything here lives on the main thread; the workers get the shared
 * struct (front.h) whose parts are thread-safe.
 */
#ifndef MTP_CMD_FRONTSVC_H
#define MTP_CMD_FRONTSVC_H

#include "app.h"
#include "config.h"
#include "front.h"
#include "replay.h"

struct mtp_frontsvc {
  struct mtp_replay replay;        /* owns */
  struct mtp_policy *policy;       /* owns */
  struct mtp_tlsprobe *tlsprobe;   /* owns; NULL when fake-TLS is off */
  struct mtp_front_shared shared;  /* what the workers get */
};

/* Sets everything up for cfg (borrowed; it must outlive svc) on app's main loop. Logs and
 * returns an error naming what failed. svc is zeroed first; mtp_frontsvc_free is always safe. */
int mtp_frontsvc_setup(struct mtp_frontsvc *svc, struct mtp_app *app, const struct mtp_config *cfg);
/* Stops the probe's timers and connections (main thread, when the process stops). */
void mtp_frontsvc_stop(struct mtp_frontsvc *svc);
/* Frees; after the main loop and the workers have finished. */
void mtp_frontsvc_free(struct mtp_frontsvc *svc);

#endif
