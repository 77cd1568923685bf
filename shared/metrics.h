/*
 * metrics.h - process counters and gauges. Each thread (worker or main) owns one block and
 * adds to it with relaxed atomics: nothing on the hot path takes a lock or shares a cache
 * line with another thread. A scrape sums the blocks (mtp_metrics_sum).
 *
 * The table below is the list of metrics: id, Prometheus name, labels, type, help.
 */
#ifndef MTP_METRICS_H
#define MTP_METRICS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define MTP_METRICS_MAP(XX)                                                                              \
  XX(CLIENTS_ACCEPTED, "mtproxy_client_connections_total", "", counter, "client TCP connections accepted") \
  XX(CLIENTS_ACTIVE, "mtproxy_client_connections", "", gauge, "client connections open now")            \
  XX(HS_OK_ABRIDGED, "mtproxy_handshakes_total", "protocol=\"abridged\"", counter, "successful client handshakes") \
  XX(HS_OK_INTERMEDIATE, "mtproxy_handshakes_total", "protocol=\"intermediate\"", counter, "")            \
  XX(HS_OK_SECURE, "mtproxy_handshakes_total", "protocol=\"secure\"", counter, "")                        \
  XX(HS_FAIL_BAD_SECRET, "mtproxy_handshake_failures_total", "reason=\"bad_secret\"", counter, "failed client handshakes") \
  XX(HS_FAIL_DISABLED, "mtproxy_handshake_failures_total", "reason=\"protocol_disabled\"", counter, "")   \
  XX(HS_FAIL_TIMEOUT, "mtproxy_handshake_failures_total", "reason=\"timeout\"", counter, "")              \
  XX(HS_FAIL_EOF, "mtproxy_handshake_failures_total", "reason=\"closed_early\"", counter, "")             \
  XX(HS_FAIL_TLS_BAD_HELLO, "mtproxy_handshake_failures_total", "reason=\"tls_bad_hello\"", counter, "") \
  XX(HS_FAIL_TLS_BAD_HMAC, "mtproxy_handshake_failures_total", "reason=\"tls_bad_hmac\"", counter, "")   \
  XX(HS_FAIL_TLS_BAD_SNI, "mtproxy_handshake_failures_total", "reason=\"tls_bad_sni\"", counter, "")     \
  XX(HS_FAIL_TLS_TIME, "mtproxy_handshake_failures_total", "reason=\"tls_bad_time\"", counter, "")       \
  XX(HS_FAIL_TLS_REPLAY, "mtproxy_handshake_failures_total", "reason=\"tls_replay\"", counter, "")       \
  XX(HS_FAIL_OBF2_REPLAY, "mtproxy_handshake_failures_total", "reason=\"obf2_replay\"", counter, "")     \
  XX(HS_FAIL_NOT_TLS, "mtproxy_handshake_failures_total", "reason=\"not_tls\"", counter, "")             \
  XX(HS_FAIL_POLICY, "mtproxy_handshake_failures_total", "reason=\"policy\"", counter, "")               \
  XX(CLOSE_IDLE, "mtproxy_client_closes_total", "reason=\"idle\"", counter, "client connections closed by the proxy") \
  XX(CLOSE_BACKPRESSURE, "mtproxy_client_closes_total", "reason=\"backpressure\"", counter, "")           \
  XX(CLOSE_BAD_FRAME, "mtproxy_client_closes_total", "reason=\"bad_frame\"", counter, "")                 \
  XX(CLOSE_UPSTREAM, "mtproxy_client_closes_total", "reason=\"upstream\"", counter, "")                   \
  XX(CLOSE_TELEGRAM, "mtproxy_client_closes_total", "reason=\"telegram\"", counter, "")                   \
  XX(BYTES_FROM_CLIENTS, "mtproxy_client_bytes_total", "direction=\"in\"", counter, "bytes from/to clients") \
  XX(BYTES_TO_CLIENTS, "mtproxy_client_bytes_total", "direction=\"out\"", counter, "")                    \
  XX(PACKETS_FROM_CLIENTS, "mtproxy_client_packets_total", "direction=\"in\"", counter, "MTProto packets from/to clients") \
  XX(PACKETS_TO_CLIENTS, "mtproxy_client_packets_total", "direction=\"out\"", counter, "")                \
  XX(QUICKACKS, "mtproxy_quickacks_total", "", counter, "quick acks delivered to clients")               \
  XX(RPC_CONNS, "mtproxy_rpc_connections", "", gauge, "middle-proxy RPC connections open now")           \
  XX(RPC_CONNS_OPENED, "mtproxy_rpc_connections_opened_total", "", counter, "middle-proxy connections opened") \
  XX(RPC_CONNS_FAILED, "mtproxy_rpc_connection_failures_total", "", counter, "middle-proxy connections that failed or were closed by the peer") \
  XX(RPC_STREAMS, "mtproxy_rpc_clients", "", gauge, "clients carried over middle-proxy connections now")  \
  XX(RPC_MIGRATIONS, "mtproxy_rpc_client_migrations_total", "", counter, "idle clients moved to another connection after theirs closed") \
  XX(TGCONF_FETCH_OK, "mtproxy_telegram_config_fetches_total", "result=\"ok\"", counter, "Telegram config/secret loads") \
  XX(TGCONF_FETCH_FAIL, "mtproxy_telegram_config_fetches_total", "result=\"failed\"", counter, "")  \
  /* fake-TLS, replay, fronting (issue 3) */                                                             \
  XX(HS_OK_FAKE_TLS, "mtproxy_fake_tls_handshakes_total", "", counter, "fake-TLS handshakes accepted (the obf2 protocol inside is counted in mtproxy_handshakes_total)") \
  XX(FRONTED_TOTAL, "mtproxy_fronted_connections_total", "", counter, "connections spliced to the fronting target") \
  XX(FRONTED_ACTIVE, "mtproxy_fronted_connections", "", gauge, "fronted connections open now")          \
  XX(FRONTED_FAILED, "mtproxy_fronting_failures_total", "", counter, "fronting attempts that could not reach the target or were refused (loop)") \
  XX(FRONTED_BYTES_IN, "mtproxy_fronted_bytes_total", "direction=\"in\"", counter, "bytes spliced client->target / target->client") \
  XX(FRONTED_BYTES_OUT, "mtproxy_fronted_bytes_total", "direction=\"out\"", counter, "")               \
  XX(TLS_PROBE_OK, "mtproxy_tls_probes_total", "result=\"ok\"", counter, "probes of the fronted host that learnt its certificate flight size") \
  XX(TLS_PROBE_FAIL, "mtproxy_tls_probes_total", "result=\"failed\"", counter, "")                     \
  /* split-mode tunnel (issue 4) */                                                                      \
  XX(TUNNEL_UP, "mtproxy_tunnel_connections", "", gauge, "tunnel connections established now (front: to the back; back: from fronts)") \
  XX(TUNNEL_CONNECTS, "mtproxy_tunnel_connects_total", "", counter, "tunnel connections established (front: includes reconnects)") \
  XX(TUNNEL_FAILS, "mtproxy_tunnel_failures_total", "", counter, "tunnel connections that failed: connect, TLS handshake, peer check, protocol or heartbeat") \
  XX(TUNNEL_STREAMS, "mtproxy_tunnel_streams", "", gauge, "client streams carried over tunnels now")    \
  XX(TUNNEL_STREAMS_OPENED, "mtproxy_tunnel_streams_opened_total", "", counter, "client streams opened over tunnels") \
  XX(TUNNEL_BYTES_OUT, "mtproxy_tunnel_bytes_total", "direction=\"out\"", counter, "tunnel bytes sent / received (TLS payload)") \
  XX(TUNNEL_BYTES_IN, "mtproxy_tunnel_bytes_total", "direction=\"in\"", counter, "")                     \
  /* policy and lifecycle (issue 5) */                                                                   \
  XX(RELOADS_OK, "mtproxy_config_reloads_total", "result=\"ok\"", counter, "configuration reloads")    \
  XX(RELOADS_FAIL, "mtproxy_config_reloads_total", "result=\"failed\"", counter, "")

enum mtp_metric {
#define XX(id, name, labels, type, help) MTP_M_##id,
  MTP_METRICS_MAP(XX)
#undef XX
  MTP_M__COUNT
};

struct mtp_metrics {
  _Atomic int64_t v[MTP_M__COUNT];
};

/* The calling thread's block (set by mtp_metrics_thread_register; a process-wide fallback
 * block before that). */
extern _Thread_local struct mtp_metrics *mtp_metrics_self;

/* Gives the calling thread its own block (static lifetime). Returns MTP_OK or MTP_ENOMEM. */
int mtp_metrics_thread_register(void);

static inline void mtp_metric_add(enum mtp_metric m, int64_t n) {
  atomic_fetch_add_explicit(&mtp_metrics_self->v[m], n, memory_order_relaxed);
}
#define MTP_COUNT(id) mtp_metric_add(MTP_M_##id, 1)

/* Sums all threads' blocks into out[MTP_M__COUNT]. */
void mtp_metrics_sum(int64_t out[MTP_M__COUNT]);

/* Writes the Prometheus text exposition into a mtp_malloc'ed string (*out, *outlen). */
int mtp_metrics_format(char **out, size_t *outlen);

#endif
