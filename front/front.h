/*
 * front.h - the front half on one worker loop: listeners and client sessions.
 *
 * A client session: accept -> read the 64-byte obfuscated2 header (handshake timeout) ->
 * try the listener's secrets -> check allowed_protocols -> open a link stream -> relay packets
 * (idle timeout) -> close. A failed handshake gets no reply at all and is counted by reason.
 * On a fake-TLS listener a ClientHello comes first (checked, answered with a ServerHello) and
 * the obfuscated2 stream then travels in TLS records; a connection that fails the fake-TLS
 * checks is handed to domain fronting (front/fronting.h), created per worker here when
 * cfg->fronting_mode is not off and some listener has fake-TLS domains. See session.h.
 * A reload hands each worker a new configuration generation (mtp_front_worker_reconfigure):
 * unchanged listeners keep their sockets, sessions keep the generation they were accepted under.
 */
#ifndef MTP_FRONT_H
#define MTP_FRONT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <uv.h>

#include "config.h"
#include "link.h"

struct mtp_front_worker;
struct mtp_replay;
struct mtp_policy;
struct mtp_tlsprobe;
struct mtp_lstats;

/*
 * What every front worker of the process shares. Owned by the main thread (the executable),
 * borrowed by the workers; each part is thread-safe or immutable. Any pointer may be NULL:
 * that feature is then off (unit tests use that).
 */
struct mtp_front_shared {
  struct mtp_replay *replay;     /* replay cache (front/replay.h) */
  struct mtp_policy *policy;     /* connection policy (front/policy.h) */
  struct mtp_tlsprobe *tlsprobe; /* learnt certificate-flight sizes (front/tlsprobe.h) */
  struct mtp_lstats *lstats;     /* client connections by listener (front/lstats.h); a worker
                                  * keeps the one it was set up with for its whole life */
  /* The proxy's own addresses, so fronting never dials itself: the concrete bound listener
   * addresses (same order as cfg->listeners) ... */
  const struct sockaddr_storage *bound_addrs;
  size_t nbound;
  /* ... and the public IPv4/IPv6 address the proxy is reached at, if known (port 0). */
  struct sockaddr_storage public_addrs[2];
  size_t npublic;
};

/*
 * Configuration generations (reload, cmd/reload.h).
 *
 * The configuration a worker starts with (mtp_front_worker_setup's cfg) is generation 0: the
 * worker borrows it and it must outlive the worker. Each reload makes a new generation on the
 * heap and hands it to every worker with mtp_front_worker_reconfigure. A generation is counted:
 * whoever makes it holds the first reference; each worker holds one on its current generation;
 * each session holds one on the generation it was accepted under (its listener conf lives in
 * it) until the session is freed. The last mtp_front_gen_release calls _free, on whichever
 * thread that is (a worker thread when the last old session ends there). Taking and dropping a
 * reference is one atomic add; nothing on the packet path touches it.
 *
 *   made (refs 1) ─► each worker switches to it (+1 each) ─► sessions accepted (+1 each)
 *   next reload: the maker and the workers drop theirs ─► the last old session ends ─► _free
 */
struct mtp_front_gen {
  const struct mtp_config *cfg;               /* borrows: valid while the generation lives */
  const struct sockaddr_storage *bound_addrs; /* borrows: cfg->listeners' concrete addresses */
  unsigned long id;                           /* 1, 2, ... for logs */
  /* The process-wide services as the reload left them (a probe created by this reload, new
   * public addresses), for the workers to take over: used only when has_shared (the maker sets
   * both after mtp_front_gen_init, before handing the generation out; immutable after).
   * Its bound_addrs/nbound and lstats are ignored (bound_addrs above counts). */
  struct mtp_front_shared shared;
  bool has_shared;
  atomic_long _refs;
  void (*_free)(struct mtp_front_gen *g); /* frees cfg, bound_addrs and g; NULL = never freed */
};

/* Sets the fields (has_shared false); the caller holds the one reference. Cannot fail. */
void mtp_front_gen_init(struct mtp_front_gen *g, const struct mtp_config *cfg,
                        const struct sockaddr_storage *bound_addrs, unsigned long id,
                        void (*free_fn)(struct mtp_front_gen *g));
/* Takes / drops a reference; any thread; NULL-safe. The last release calls g->_free. */
void mtp_front_gen_hold(struct mtp_front_gen *g);
void mtp_front_gen_release(struct mtp_front_gen *g);

/*
 * Starts the worker's listeners on loop: for each cfg->listeners[i], a socket with
 * SO_REUSEPORT bound to bound_addrs[i] (the concrete address the main thread reserved; same
 * order as cfg->listeners). Clients' packets go to `link`. cfg and link are borrowed and
 * must outlive the worker. Returns MTP_OK or an error (logged, naming the listener).
 */
int mtp_front_worker_setup(struct mtp_front_worker **out, const struct mtp_config *cfg,
                           const struct sockaddr_storage *bound_addrs, uv_loop_t *loop, struct mtp_link *link,
                           int index, const struct mtp_front_shared *shared);

/*
 * Switches the worker to generation g (reload). Worker's thread; takes its own reference on g
 * and drops the one on the generation it leaves. For each listener of g->cfg:
 *   - one that keeps its socket (mtp_listener_conf_same_socket with a listener the worker has
 *     open) keeps listening on it, and the clients it accepts from now on get g's listener
 *     conf (secrets, ad_tag, protocols, tls_domains) and g's global settings;
 *   - a new one is opened on g->bound_addrs[i] with SO_REUSEPORT, as at setup;
 * and every listener the worker has open that is not in g->cfg is closed (connections still
 * waiting in its accept queue are lost; sessions it accepted go on until they end).
 * Sessions keep the generation they were accepted under for their whole life (timeouts,
 * secrets, fake-TLS settings, ad_tag). With g->has_shared the worker takes g->shared's
 * services and public addresses (a certificate-flight probe a reload created reaches new
 * sessions this way). Domain fronting follows g at once (mtp_fronting_reconfigure: its
 * settings, and g->bound_addrs plus the public addresses as the proxy's own), or is created
 * here if g is the first generation that needs it; fronted connections already running keep
 * their target and timeouts. Per-listener counters (front/lstats.h): new listeners get theirs,
 * and the blocks of removed listeners without clients are dropped. After
 * mtp_front_worker_stop_accepting (drain) no listener is opened. Returns MTP_OK, or the error
 * of the first new listener that could not be opened or of fronting (logged, naming it; this
 * worker then does not serve it, the rest is applied).
 */
int mtp_front_worker_reconfigure(struct mtp_front_worker *w, struct mtp_front_gen *g);
/* The generation the worker is on: NULL while it is on the one it was set up with. */
struct mtp_front_gen *mtp_front_worker_gen(const struct mtp_front_worker *w);
/* The number of listening sockets the worker has open; for tests and logs. Worker's thread. */
size_t mtp_front_worker_nlisteners(const struct mtp_front_worker *w);

/* Stops accepting and closes every client and listener (asynchronously). Worker's thread. */
void mtp_front_worker_stop(struct mtp_front_worker *w);
/* Drain: closes the listeners only (new connections are refused from here on) and leaves the
 * sessions running. Idempotent; mtp_front_worker_stop later closes the rest. Worker's thread. */
void mtp_front_worker_stop_accepting(struct mtp_front_worker *w);
/* Client sessions not yet freed (any state, handshake included). Worker's thread. */
size_t mtp_front_worker_nclients(const struct mtp_front_worker *w);
/* Frees; after the loop has finished. NULL-safe. */
void mtp_front_worker_free(struct mtp_front_worker *w);

#endif
