/*
 * front.h - the front half on one worker loop: listeners and client sessions.
 *
 * A client session: accept -> read the 64-byte obfuscated2 header (handshake timeout) ->
 * try the listener's secrets -> check allowed_protocols -> open a link stream -> relay packets
 * (idle timeout) -> close. A failed handshake gets no reply at all and is counted by reason.
 */
#ifndef MTP_FRONT_H
#define MTP_FRONT_H

#include <uv.h>

#include "config.h"
#include "link.h"

struct mtp_front_worker;
struct mtp_replay;
struct mtp_policy;
struct mtp_tlsprobe;

/*
 * What every front worker of the process shares. Owned by the main thread (the executable),
 * borrowed by the workers; each part is thread-safe or immutable. Any pointer may be NULL:
 * that feature is then off (unit tests use that).
 */
struct mtp_front_shared {
  struct mtp_replay *replay;     /* replay cache (front/replay.h) */
  struct mtp_policy *policy;     /* connection policy (front/policy.h) */
  struct mtp_tlsprobe *tlsprobe; /* learnt certificate-flight sizes (front/tlsprobe.h) */
  /* The proxy's own addresses, so fronting never dials itself: the concrete bound listener
   * addresses (same order as cfg->listeners) ... */
  const struct sockaddr_storage *bound_addrs;
  size_t nbound;
  /* ... and the public IPv4/IPv6 address the proxy is reached at, if known (port 0). */
  struct sockaddr_storage public_addrs[2];
  size_t npublic;
};

/*
 * Starts the worker's listeners on loop: for each cfg->listeners[i], a socket with
 * SO_REUSEPORT bound to bound_addrs[i] (the concrete address the main thread reserved; same
 * order as cfg->listeners). Clients' packets go to `link`. cfg and link are borrowed and
 * must outlive the worker. Returns MTP_OK or an error (logged, naming the listener).
 */
int mtp_front_worker_setup(struct mtp_front_worker **out, const struct mtp_config *cfg,
                           const struct sockaddr_storage *bound_addrs, uv_loop_t *loop, struct mtp_link *link,
                           int index, const struct mtp_front_shared *shared);

/* Stops accepting and closes every client and listener (asynchronously). Worker's thread. */
void mtp_front_worker_stop(struct mtp_front_worker *w);
/* Frees; after the loop has finished. NULL-safe. */
void mtp_front_worker_free(struct mtp_front_worker *w);

#endif
