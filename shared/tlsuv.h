/*
 * tlsuv.h - TLS 1.2 (mbedTLS) over a libuv TCP handle, for the split-mode tunnel. Both peers
 * verify each other against a private CA (MBEDTLS_SSL_VERIFY_REQUIRED); only ECDHE-ECDSA
 * AEAD suites are offered (AES-128-GCM, AES-256-GCM, CHACHA20-POLY1305).
 *
 * mbedTLS never sees the socket (STYLE.md 12): its recv callback reads from an input buffer
 * that libuv reads fill, and its send callback appends ciphertext to write chunks that are
 * handed to uv_write. Plaintext written by the owner is staged in a record-sized buffer and
 * sealed into records when the buffer fills or just before the loop polls (a uv_prepare
 * handle), so many small frames written in one loop iteration share records and one write.
 *
 *   connect/accept ──► CONNECTING ──TCP up──► HANDSHAKE ──verified──► OPEN ──close()──► CLOSING
 *                          │                     │ (handshake timer)    │                  │
 *                          └──── error ──────────┴──────────────────────┴─► CLOSING ──► on_close
 *
 * No plaintext is delivered, and nothing the owner writes is sent, before the handshake has
 * completed and the peer's certificate chain (and, for a client, its name) has been verified.
 *
 * Callbacks are never called synchronously from a function of this module, except on_flush,
 * which only mtp_tlsuv's own prepare handle calls. After mtp_tlsuv_close (or an error) only
 * on_close follows, exactly once, from the close callback of the last handle; the object is
 * freed when on_close returns. Everything happens on the loop's thread.
 *
 * Memory: an input buffer of MTP_TLSUV_IN_CAP bytes, a plaintext staging buffer of one record,
 * mbedTLS's own record buffers, and the ciphertext not yet written. The owner bounds the last
 * one: mtp_tlsuv_is_congested() turns true above MTP_TLSUV_HIGH_WATER queued bytes, and
 * on_writable follows once it has drained below MTP_TLSUV_LOW_WATER.
 */
#ifndef MTP_TLSUV_H
#define MTP_TLSUV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

/* Largest plaintext of one record (mbedTLS's default MBEDTLS_SSL_OUT_CONTENT_LEN). */
#define MTP_TLSUV_RECORD 16384u
/* Ciphertext read buffer. */
#define MTP_TLSUV_IN_CAP 65536u
/* Ciphertext write chunk (one uv_write each). */
#define MTP_TLSUV_CHUNK 65536u
/* Queued bytes (staged plaintext + unwritten ciphertext) above which the owner should stop
 * producing, and below which on_writable is called again. */
#define MTP_TLSUV_HIGH_WATER (4u << 20)
#define MTP_TLSUV_LOW_WATER (1u << 20)
/* How long a lingering close waits for its last bytes to be written. */
#define MTP_TLSUV_LINGER_MS 1000u

enum mtp_tls_role { MTP_TLS_CLIENT = 0, MTP_TLS_SERVER = 1 };

/* What a configuration is made of. Every pointer is borrowed for the call only. */
struct mtp_tls_conf_opts {
  enum mtp_tls_role role;
  const char *cert;      /* PEM: our certificate */
  const char *key;       /* PEM: its private key (must match the certificate) */
  const char *ca;        /* PEM: the CA the peer's certificate must chain to */
  const char *peer_name; /* client: the name the server's certificate must carry; NULL = any */
  /* The names of the options the files came from, for errors ("tunnel_cert" ...). NULL =
   * "cert", "key", "ca". */
  const char *cert_opt, *key_opt, *ca_opt;
  uint64_t handshake_timeout_ms; /* TCP connect + TLS handshake; 0 = 10 s */
};

/*
 * The shared part of many connections: certificates, key, CA, mbedTLS's ssl_config and a
 * CTR-DRBG. Not thread-safe (the DRBG): one per loop. Must outlive every connection made with
 * it. Loads the files with blocking I/O: call at startup only.
 */
struct mtp_tls_conf;

/*
 * Returns MTP_OK and *out, or MTP_EINVAL / MTP_EIO / MTP_ENOMEM with a one-line reason in err
 * that names the option and the file, e.g.
 *   "tunnel_key /etc/mtproxy/front.key: cannot read the private key: PK - Read of file failed"
 *   "tunnel_cert a.crt and tunnel_key b.key do not match"
 */
int mtp_tls_conf_setup(struct mtp_tls_conf **out, const struct mtp_tls_conf_opts *o, char *err, size_t errlen);
/* NULL-safe. After the last connection using it is gone. */
void mtp_tls_conf_free(struct mtp_tls_conf *c);

struct mtp_tlsuv;

struct mtp_tlsuv_cbs {
  /* The handshake completed and the peer was verified; writing is now possible. */
  void (*on_open)(struct mtp_tlsuv *t);
  /* Plaintext from the peer; borrowed for the call (at most MTP_TLSUV_RECORD bytes). */
  void (*on_data)(struct mtp_tlsuv *t, const uint8_t *data, size_t len);
  /* The queue went above MTP_TLSUV_HIGH_WATER and is now below MTP_TLSUV_LOW_WATER. */
  void (*on_writable)(struct mtp_tlsuv *t);
  /* Just before the staged plaintext is sealed and written (after mtp_tlsuv_schedule_flush
   * or any write): the owner may write more (e.g. batched acknowledgements). Optional. */
  void (*on_flush)(struct mtp_tlsuv *t);
  /* The tick timer fired (mtp_tlsuv_set_tick). Optional. */
  void (*on_tick)(struct mtp_tlsuv *t);
  /* The connection is gone: err is MTP_OK after a local close with MTP_OK, else why it failed;
   * why is a one-line description, borrowed for the call. t is freed after this returns. */
  void (*on_close)(struct mtp_tlsuv *t, int err, const char *why);
};

/*
 * Starts a client connection to addr (borrowed). cbs is borrowed and must outlive t; data is
 * the owner's pointer (mtp_tlsuv_data). Returns MTP_OK and *out - then on_close follows
 * eventually in every case, also if connecting fails - or MTP_ENOMEM with nothing started.
 */
int mtp_tlsuv_connect(struct mtp_tlsuv **out, struct mtp_tls_conf *conf, uv_loop_t *loop,
                      const struct sockaddr *addr, const struct mtp_tlsuv_cbs *cbs, void *data);

/*
 * Accepts one pending connection from server as a TLS server. Returns MTP_OK and *out (then
 * on_close follows eventually, also if uv_accept fails), or MTP_ENOMEM with the connection
 * still pending (the caller must accept and drop it).
 */
int mtp_tlsuv_accept(struct mtp_tlsuv **out, struct mtp_tls_conf *conf, uv_stream_t *server,
                     const struct mtp_tlsuv_cbs *cbs, void *data);

void *mtp_tlsuv_data(const struct mtp_tlsuv *t);
bool mtp_tlsuv_is_open(const struct mtp_tlsuv *t);
/* "1.2.3.4:5678" / "[::1]:5678" of the peer, "?" before it is known. Never NULL. */
const char *mtp_tlsuv_peer_addr(const struct mtp_tlsuv *t);
/* The verified peer certificate's CN (printable ASCII), "" before on_open. Never NULL. */
const char *mtp_tlsuv_peer_cn(const struct mtp_tlsuv *t);
/* The negotiated suite ("TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256"), "" before on_open. */
const char *mtp_tlsuv_suite(const struct mtp_tlsuv *t);

/*
 * Queues len plaintext bytes (copied before returning; a part of a large write is sealed
 * straight from data, without a copy). Returns MTP_OK, or MTP_ECLOSED when not OPEN (closing,
 * or the handshake is not done). Never calls back; a sealing failure closes t (on_close later).
 */
int mtp_tlsuv_write(struct mtp_tlsuv *t, const void *data, size_t len);

/*
 * Zero-copy writes of small pieces: reserve returns room for n <= MTP_TLSUV_RECORD bytes
 * inside the staging buffer (sealing what it holds first if needed), or NULL when not OPEN;
 * commit(n) queues the first n bytes written there (n <= the reserved size). No other call
 * on t may come between the two.
 */
uint8_t *mtp_tlsuv_reserve(struct mtp_tlsuv *t, size_t n);
void mtp_tlsuv_commit(struct mtp_tlsuv *t, size_t n);

/* Makes on_flush run (and the queue go out) before the loop next polls. */
void mtp_tlsuv_schedule_flush(struct mtp_tlsuv *t);

/* Bytes queued: staged plaintext plus ciphertext not yet written. */
size_t mtp_tlsuv_queued(const struct mtp_tlsuv *t);
/* Above the high-water mark (on_writable will follow). */
bool mtp_tlsuv_is_congested(const struct mtp_tlsuv *t);

/* Calls on_tick every ms milliseconds while OPEN (0 stops it). Only after on_open. */
void mtp_tlsuv_set_tick(struct mtp_tlsuv *t, uint64_t ms);

/*
 * Closes t; on_close(err, why) follows asynchronously (why is copied). With linger, the staged
 * plaintext and a TLS close_notify are written first and the socket is closed once they are
 * out (or after MTP_TLSUV_LINGER_MS); reading stops at once either way. Calling it again, or
 * after an error, changes nothing. Safe from inside any callback.
 */
void mtp_tlsuv_close(struct mtp_tlsuv *t, int err, const char *why, bool linger);

#endif
