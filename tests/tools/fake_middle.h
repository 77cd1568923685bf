/*
 * fake_middle.h - a fake Telegram middle proxy for tests: the server side of the
 * middle-proxy RPC protocol (shared/rpc.h), running in its own thread with its own libuv
 * loop, listening on 127.0.0.1 (port chosen by the OS unless told otherwise).
 *
 * Per RPC connection:
 *
 *   WAIT_NONCE --RPC_NONCE(key_selector, AES)--> replies RPC_NONCE, derives keys as the
 *       |                                        "server" (own ip/port and the peer's from
 *       v                                        the socket), switches to AES-256-CBC
 *   WAIT_HANDSHAKE --RPC_HANDSHAKE--> replies RPC_HANDSHAKE (sender = own ip:port, pid,
 *       |                             start time; peer = the client's sender pid; CRC32C
 *       v                             flag echoed and then used both ways)
 *   READY: RPC_PROXY_REQ -> (RPC_SIMPLE_ACK first when the QUICKACK flag is set)
 *                           RPC_PROXY_ANS(flags 0, same conn_id, the same packet)
 *          RPC_PING(id)  -> RPC_PONG(id)
 *          RPC_CLOSE_CONN(conn_id) -> recorded; stops a push toward that conn_id
 *   Anything malformed closes the connection and counts in fm_stats.bad.
 *
 * Quick-ack token: fm_quickack_token(packet) = the first 4 bytes of SHA-256(packet) read
 * as a little-endian uint32, OR 0x80000000 (the real middle proxy also sends tokens with
 * the top bit set; the proxy forwards them to the client unchanged, byte-swapped for
 * abridged).
 *
 * Threading: every fm_* function may be called from any thread. Getters copy a snapshot
 * under a mutex. Commands (fm_close_ext, fm_close_all, fm_set_mode, fm_push) run on the
 * fake's loop thread; the call returns once the loop has carried them out (frames queued to
 * the socket, closes started).
 */
#ifndef MTP_FAKE_MIDDLE_H
#define MTP_FAKE_MIDDLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct fake_middle;

/* How the fake treats PROXY_REQ. */
enum fm_mode {
  FM_ANSWER = 0, /* echo (default) */
  FM_SILENT = 1, /* keep reading and recording, never answer PROXY_REQ (PING still answered) */
  FM_STALLED = 2, /* stop reading from every RPC socket, as a hung server; new connections too */
  FM_ACK_ONLY = 3 /* send RPC_SIMPLE_ACK for quick-ack requests but never the answer */
};

struct fm_options {
  uint16_t port; /* 0 = OS-chosen */
  /* Called on the fake's thread with one line (no newline) per event; NULL = quiet. */
  void (*log_cb)(void *arg, const char *line);
  void *log_arg; /* borrows */
};

/* Counters since start. */
struct fm_stats {
  unsigned accepted;   /* TCP connections accepted */
  unsigned open;       /* RPC connections currently open */
  unsigned nonces;     /* valid RPC_NONCE received */
  unsigned handshakes; /* RPC_HANDSHAKE received and answered */
  unsigned bad;        /* connections closed for a protocol error (see last_error) */
  unsigned conn_ids;   /* distinct conn_ids seen in RPC_PROXY_REQ */
  uint64_t proxy_reqs; /* RPC_PROXY_REQ received */
  uint64_t proxy_ans;  /* RPC_PROXY_ANS sent (echoes and pushes) */
  uint64_t simple_acks; /* RPC_SIMPLE_ACK sent */
  uint64_t pings;       /* RPC_PING received (each answered by RPC_PONG) */
  uint64_t close_conns; /* RPC_CLOSE_CONN received */
  uint64_t close_exts;  /* RPC_CLOSE_EXT sent */
  uint64_t pushed_bytes; /* packet bytes of fm_push answers whose write completed */
  uint64_t pongs;        /* RPC_PONG received (answers to fm_ping) */
  int64_t last_pong_id;  /* ping_id of the last RPC_PONG */
  uint32_t last_hs_flags; /* flags of the last client RPC_HANDSHAKE */
  uint32_t last_key_selector; /* key_selector of the last client RPC_NONCE */
  char last_error[128]; /* why the last bad connection was closed; "" if none */
};

/* What the fake knows about one conn_id (one client of the proxy). */
struct fm_conn_info {
  uint64_t conn_id;
  uint32_t flags;    /* flags of the last RPC_PROXY_REQ */
  bool has_ad_tag;   /* the last RPC_PROXY_REQ carried a proxy tag */
  uint8_t ad_tag[16];
  uint8_t client_ip[16], proxy_ip[16]; /* as sent (IPv4-mapped for IPv4) */
  uint32_t client_port, proxy_port;
  uint64_t packets;  /* RPC_PROXY_REQ received for it */
  uint64_t bytes;    /* packet bytes received for it */
  bool close_conn;   /* RPC_CLOSE_CONN received for it */
  unsigned rpc_conn; /* serial number (1, 2, ...) of the RPC connection that last carried it */
};

/*
 * Starts a fake middle proxy with the given proxy secret (copied; >= 32 bytes in practice,
 * the first 4 bytes are the key selector). Returns the listening port (> 0) and *out, or a
 * negative error (MTP_EINVAL, MTP_ENOMEM, or a libuv error for bind). fm_start_ex takes
 * options (NULL = defaults).
 */
int fm_start(const uint8_t *proxy_secret, size_t len, struct fake_middle **out);
int fm_start_ex(const uint8_t *proxy_secret, size_t len, const struct fm_options *opt, struct fake_middle **out);

/* The listening port. */
uint16_t fm_port(const struct fake_middle *fm);

/* Closes every connection and the listener and joins the thread. Idempotent. */
void fm_stop(struct fake_middle *fm);
/* fm_stop, then frees. NULL-safe. */
void fm_free(struct fake_middle *fm);

/* Snapshot of the counters. */
void fm_get_stats(struct fake_middle *fm, struct fm_stats *out);
/* Number of distinct conn_ids and the i-th one in order of first appearance. Returns MTP_OK
 * or MTP_EINVAL when i is out of range. */
size_t fm_conn_count(struct fake_middle *fm);
int fm_conn_at(struct fake_middle *fm, size_t i, struct fm_conn_info *out);
/* Looks a conn_id up. Returns MTP_OK or MTP_EINVAL when unknown. */
int fm_conn_find(struct fake_middle *fm, uint64_t conn_id, struct fm_conn_info *out);
/* The newest record of the client whose own (source) port is client_port. Returns true and *out,
 * or false when there is none. */
bool fm_find_client(struct fake_middle *fm, uint16_t client_port, struct fm_conn_info *out);

/*
 * Waits (bounded, no polling sleeps: woken on every change) until pred(stats, arg) is true.
 * Returns true when it became true, false on timeout.
 */
bool fm_wait(struct fake_middle *fm, bool (*pred)(const struct fm_stats *s, void *arg), void *arg,
             int timeout_ms);
/* Shorthands for fm_wait: reached when the counter is >= n (open: == n). */
bool fm_wait_handshakes(struct fake_middle *fm, unsigned n, int timeout_ms);
bool fm_wait_proxy_reqs(struct fake_middle *fm, uint64_t n, int timeout_ms);
bool fm_wait_open(struct fake_middle *fm, unsigned n, int timeout_ms);
bool fm_wait_close_conns(struct fake_middle *fm, uint64_t n, int timeout_ms);

/* Sends RPC_CLOSE_EXT(conn_id) on the RPC connection that last carried conn_id.
 * Returns MTP_OK, MTP_EINVAL (unknown conn_id) or MTP_ECLOSED (that connection is gone). */
int fm_close_ext(struct fake_middle *fm, uint64_t conn_id);
/* Closes every current RPC connection (like Telegram's periodic rotation). Returns how many. */
int fm_close_all(struct fake_middle *fm);
/* Sends RPC_PING(ping_id) on every ready RPC connection, as Telegram does to check a proxy is
 * alive; the proxy must answer RPC_PONG(ping_id) (stats.pongs, last_pong_id). Returns how many
 * pings were sent. */
int fm_ping(struct fake_middle *fm, int64_t ping_id);
/* Changes how PROXY_REQ are treated from now on (see enum fm_mode). */
void fm_set_mode(struct fake_middle *fm, enum fm_mode mode);
/*
 * Starts sending `total` bytes of RPC_PROXY_ANS to conn_id in packets of `chunk` bytes
 * (multiple of 4, >= 8; first 8 bytes zero), on the connection that last carried it, as fast
 * as the socket takes them (at most ~1 MiB queued at a time). Returns at once; progress is
 * stats.pushed_bytes. The push stops early when the connection closes or RPC_CLOSE_CONN
 * arrives for conn_id. Returns MTP_OK, MTP_EINVAL or MTP_ECLOSED.
 */
int fm_push(struct fake_middle *fm, uint64_t conn_id, uint64_t total, size_t chunk);

/* The quick-ack token the fake sends for a packet (see above). */
uint32_t fm_quickack_token(const uint8_t *pkt, size_t len);

/* Writes the proxy-config text pointing every DC (+-1..5) at 127.0.0.1:port and "default 2;"
 * to path. Returns MTP_OK or MTP_EIO. */
int fm_write_proxy_config(const char *path, uint16_t port);

#endif
