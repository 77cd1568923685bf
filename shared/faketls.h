/*
 * faketls.h - the fake-TLS ("ee") disguise: sans-IO codecs only, no sockets, no uv.h.
 * Wire facts: docs/PROTOCOLS.md "Fake-TLS (ee)".
 *
 * A fake-TLS connection looks like a TLS 1.3 session to an observer:
 *
 *   client                                   server (us)
 *   ClientHello record  -------------------> hello reader (mtp_faketls_hello_*)
 *                                            + validation against the secrets
 *                       <------------------- ServerHello + CCS + ApplicationData
 *                                            (mtp_faketls_server_hello)
 *   [CCS] AppData(obf2 header, bytes) -----> record reader (mtp_faketls_rx_*)
 *                       <------------------- AppData records (mtp_faketls_wrap)
 *
 * The ClientHello's 32-byte random is HMAC-SHA256(secret, whole record with the random
 * zeroed), except that its last 4 bytes are XORed with the client's unix time (uint32 LE).
 * The server random is HMAC-SHA256(secret, client_random || whole answer with the server
 * random zeroed). Everything after the handshake is obfuscated2 bytes cut into
 * ApplicationData records.
 *
 * The client side (mtp_faketls_client_hello, mtp_faketls_answer_check) exists so the test
 * client and tests can act as a Telegram app.
 *
 * Hello reader states (one feed may cross several):
 *
 *   WANT_HEADER --5 bytes, 16 03 01 len--> WANT_BODY --len bytes--> DONE (parsed, or error)
 *
 * All functions are pure except those that draw randomness (documented); none calls back.
 */
#ifndef MTP_FAKETLS_H
#define MTP_FAKETLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MTP_FAKETLS_RANDOM_LEN 32
#define MTP_FAKETLS_RANDOM_OFFSET 11  /* of the random in both the ClientHello and ServerHello records */
#define MTP_FAKETLS_SESSION_ID_LEN 32 /* Telegram clients always send 32 bytes */
#define MTP_FAKETLS_MAX_PAYLOAD 16384 /* TLS plaintext limit: the most we put in one record */
/* The most a peer may put in one record: TLS 1.3 ciphertext limit (2^14 + 256). */
#define MTP_FAKETLS_MAX_RECORD_PAYLOAD (16384 + 256)
#define MTP_FAKETLS_RECORD_HEADER 5
#define MTP_FAKETLS_MAX_HOST 255
#define MTP_FAKETLS_MAX_SHARES 8 /* key_share entries remembered from a ClientHello */

/* TLS named groups we know the share sizes of. */
#define MTP_TLS_GROUP_SECP256R1 0x0017
#define MTP_TLS_GROUP_SECP384R1 0x0018
#define MTP_TLS_GROUP_SECP521R1 0x0019
#define MTP_TLS_GROUP_X25519 0x001d
#define MTP_TLS_GROUP_X448 0x001e
#define MTP_TLS_GROUP_SECP256R1MLKEM768 0x11eb
#define MTP_TLS_GROUP_X25519MLKEM768 0x11ec

/* What a ClientHello told us. Filled by mtp_faketls_hello_parse. */
struct mtp_faketls_hello {
  const uint8_t *record; /* borrows: the whole record, 5-byte header included */
  size_t record_len;     /* header + payload */
  uint8_t random[MTP_FAKETLS_RANDOM_LEN];         /* as sent (HMAC ^ timestamp) */
  uint8_t session_id[MTP_FAKETLS_SESSION_ID_LEN]; /* to echo in the ServerHello */
  const uint8_t *cipher_suites; /* borrows (into record): the raw list, 2 bytes per suite */
  size_t cipher_suites_len;     /* in bytes, even */
  char sni[MTP_FAKETLS_MAX_HOST + 1]; /* host_name from server_name, NUL-terminated */
  size_t sni_len;
  size_t nshares; /* key_share entries offered (GREASE ones skipped), at most MTP_FAKETLS_MAX_SHARES */
  uint16_t share_group[MTP_FAKETLS_MAX_SHARES];
  uint16_t share_len[MTP_FAKETLS_MAX_SHARES];
  bool has_tls13; /* supported_versions lists 0x0304 (always true after a successful parse) */
  /* Our choices for the answer (a parse fails if none is possible): */
  uint16_t suite;        /* 0x1301 if offered, else the first of 0x1302/0x1303 offered */
  uint16_t group;        /* x25519 if the client sent that share, else the first share we can size */
  size_t server_share_len; /* the size of our key_share for that group */
};

/*
 * Parses one complete ClientHello record rec[0..len) (header included). Checks: record type
 * 0x16, record version 03 01, record length == len - 5 and <= MTP_FAKETLS_MAX_RECORD_PAYLOAD,
 * handshake type 1 with a consistent 3-byte length, a 32-byte session id, well-formed cipher
 * suites / compression / extension lists (every length within its parent), a server_name
 * extension with a non-empty host_name free of NUL bytes, supported_versions listing 0x0304,
 * a TLS 1.3 cipher suite, and a key_share we can answer. Bytes after the extensions inside
 * the handshake are an error; nothing is read outside rec[0..len).
 * Returns MTP_OK with *out filled (out->record borrows rec: keep rec alive and unchanged
 * while out is used), or MTP_EPROTO (malformed / not a ClientHello / missing SNI, TLS 1.3 or
 * usable share), MTP_ETOOBIG (record longer than allowed).
 */
int mtp_faketls_hello_parse(const uint8_t *rec, size_t len, struct mtp_faketls_hello *out);

/*
 * The incremental reader: feed bytes as they arrive. The record may arrive in pieces and other
 * bytes (the client's next records) may follow it in the same feed.
 */
enum mtp_faketls_hello_state {
  MTP_FAKETLS_HELLO_WANT_HEADER = 0, /* waiting for the 5-byte record header */
  MTP_FAKETLS_HELLO_WANT_BODY,       /* header checked, buffer allocated, waiting for the body */
  MTP_FAKETLS_HELLO_DONE,            /* the record is complete and parsed; see .hello */
  MTP_FAKETLS_HELLO_FAILED,          /* an error was returned; the reader stays failed */
};

struct mtp_faketls_hello_reader {
  enum mtp_faketls_hello_state state;
  struct mtp_faketls_hello hello; /* valid in DONE; borrows _buf */
  uint8_t _hdr[MTP_FAKETLS_RECORD_HEADER];
  size_t _got;   /* bytes of the record stored so far (header included) */
  size_t _total; /* header + declared payload length, once known */
  uint8_t *_buf; /* owns (mtp_malloc): the whole record, _total bytes */
};

/* Zeroes r. Cannot fail. */
void mtp_faketls_hello_init(struct mtp_faketls_hello_reader *r);

/*
 * Feeds in[0..len) (borrowed; copied as needed).
 * Returns:
 *   n >= 0      the record is complete and parsed (state DONE, r->hello valid); the first n
 *               bytes of in belonged to it and in[n..len) did not (it is the client's next
 *               record: pass it to the record reader). In DONE further calls return 0.
 *   MTP_AGAIN   all len bytes were taken and more are needed.
 *   MTP_EPROTO  not a TLS ClientHello record (first bytes not 16 03 01) or a malformed one
 *               (see mtp_faketls_hello_parse), MTP_ETOOBIG (declared length over the limit),
 *               MTP_ENOMEM. After an error the state is FAILED and every call returns
 *               MTP_EPROTO. Byte-for-byte what was fed is still available for domain
 *               fronting through mtp_faketls_hello_bytes().
 * Any split of the same input gives the same result.
 */
int mtp_faketls_hello_feed(struct mtp_faketls_hello_reader *r, const uint8_t *in, size_t len);

/* The bytes of the record stored so far (borrows r; valid until the next feed or free). *n
 * gets their count. Useful to forward a rejected hello to the fronting domain. */
const uint8_t *mtp_faketls_hello_bytes(const struct mtp_faketls_hello_reader *r, size_t *n);

/* Releases the buffer. NULL-safe and idempotent; r->hello becomes invalid. */
void mtp_faketls_hello_free(struct mtp_faketls_hello_reader *r);

/* The result of a successful validation. */
struct mtp_faketls_match {
  int secret_index;   /* the first of the secrets that matched */
  uint32_t timestamp; /* the client's unix time, recovered from the random */
};

/*
 * Tries secrets[0..nsecrets) in order: HMAC-SHA256(secret, record with the random zeroed)
 * must equal the client random in its first 28 bytes (constant-time compare; every secret is
 * tried so the time does not tell which matched). The last 4 bytes of the digest XOR the
 * random give the timestamp (uint32 LE).
 * Returns MTP_OK with *m filled (the first matching index), or MTP_EBADSECRET.
 * Does not check the timestamp: see mtp_faketls_time_is_ok.
 */
int mtp_faketls_hello_validate(const struct mtp_faketls_hello *h, const uint8_t (*secrets)[16],
                               size_t nsecrets, struct mtp_faketls_match *m);

/*
 * True when now - max_past <= ts <= now + max_future (inclusive, in seconds; computed
 * without wrap-around). The official proxy uses max_past 600, max_future 3.
 */
bool mtp_faketls_time_is_ok(uint32_t ts, uint64_t now, uint32_t max_past, uint32_t max_future);

/* Options for the server's answer. */
struct mtp_faketls_answer_opts {
  size_t appdata_len;   /* the fake certificate flight: 1..MTP_FAKETLS_MAX_PAYLOAD, one record */
  bool versions_first;  /* supported_versions before key_share (some fronted servers do);
                         * default (false) is key_share first, as the official proxy does */
};

/* The exact size of the answer mtp_faketls_server_hello writes for h and opts. */
size_t mtp_faketls_server_hello_len(const struct mtp_faketls_hello *h,
                                    const struct mtp_faketls_answer_opts *opts);

/*
 * Writes the server's answer into out[0..cap): a ServerHello record (16 03 03, handshake 2,
 * legacy version 03 03, server random, the echoed session id, h->suite, compression 0,
 * extensions key_share (h->group, a well-formed share of h->server_share_len bytes: a real
 * public key for x25519 / P-256 / P-384 parts, random bytes otherwise) and supported_versions
 * 0x0304), then ChangeCipherSpec 14 03 03 00 01 01, then one ApplicationData record
 * 17 03 03 LL LL of opts->appdata_len random bytes. Finally the server random becomes
 * HMAC-SHA256(secret, h->random || answer with the random zeroed).
 * Draws randomness (mtp_random). Returns the bytes written, or MTP_EINVAL (cap too small,
 * appdata_len out of range), MTP_EIO (no randomness).
 */
int mtp_faketls_server_hello(const struct mtp_faketls_hello *h, const uint8_t secret[16],
                             const struct mtp_faketls_answer_opts *opts, uint8_t *out, size_t cap);

/*
 * The record reader after the handshake: ApplicationData records (17 03 03 len, len <=
 * MTP_FAKETLS_MAX_RECORD_PAYLOAD, empty records allowed), optionally preceded by one
 * ChangeCipherSpec 14 03 03 00 01 01 (only before the first ApplicationData record).
 * Both directions use it (the test client reads the server's records the same way).
 */
enum mtp_faketls_rx_state {
  MTP_FAKETLS_RX_HEADER = 0, /* waiting for (the rest of) a 5-byte record header */
  MTP_FAKETLS_RX_CCS,        /* inside the ChangeCipherSpec's one-byte body */
  MTP_FAKETLS_RX_PAYLOAD,    /* inside an ApplicationData payload; _left bytes to go */
  MTP_FAKETLS_RX_FAILED,     /* an error was returned */
};

struct mtp_faketls_rx {
  enum mtp_faketls_rx_state state;
  uint8_t _hdr[MTP_FAKETLS_RECORD_HEADER];
  size_t _hdr_got;
  size_t _left;
  bool _seen_data; /* an ApplicationData header was seen: no more CCS allowed */
  bool _seen_ccs;
};

/* Zeroes r. Cannot fail. */
void mtp_faketls_rx_init(struct mtp_faketls_rx *r);

/*
 * Consumes all of in[0..len) and writes the payload bytes it carries to out (which must have
 * room for len bytes; out == in is allowed and decodes in place). *out_len gets the count.
 * Returns len, or MTP_EPROTO (wrong record type or version, a second or misplaced CCS, a CCS
 * other than 01), MTP_ETOOBIG (record length over the limit). After an error the state is
 * FAILED, every call returns MTP_EPROTO and *out_len is 0. Any split gives the same output.
 */
int mtp_faketls_rx_feed(struct mtp_faketls_rx *r, const uint8_t *in, size_t len, uint8_t *out,
                        size_t *out_len);

/* True when no record is partially read (the stream may end here cleanly). */
bool mtp_faketls_rx_is_idle(const struct mtp_faketls_rx *r);

/*
 * The writer: cuts n payload bytes into ApplicationData records of at most max_payload bytes
 * each (0 or > MTP_FAKETLS_MAX_RECORD_PAYLOAD means MTP_FAKETLS_MAX_PAYLOAD).
 * mtp_faketls_wrap_len gives the output size (n == 0 gives 0: no empty records);
 * mtp_faketls_wrap writes exactly that many bytes to out (no overlap with in) and returns it.
 */
size_t mtp_faketls_wrap_len(size_t n, size_t max_payload);
size_t mtp_faketls_wrap(const uint8_t *in, size_t n, size_t max_payload, uint8_t *out);

/*
 * Per-SNI derived secrets (as mtproto_proxy does it): the secret for domain is
 * SHA-256(salt || hex(base) || domain)[0:16], hex in lower case, domain lower-cased.
 */
void mtp_faketls_derive_secret(const uint8_t base[16], const char *salt, const char *domain, uint8_t out[16]);

/* ---- client side, for the test client and tests ---- */

enum mtp_faketls_hello_kind {
  MTP_FAKETLS_KIND_CLASSIC = 0, /* Chrome-like, x25519 share only, padded to 517 bytes */
  MTP_FAKETLS_KIND_PQ,          /* Chrome-like with an X25519MLKEM768 (1216-byte) share + x25519 */
};

/* The largest hello mtp_faketls_client_hello builds. */
#define MTP_FAKETLS_CLIENT_HELLO_MAX 2048

/*
 * Builds a ClientHello record for secret, sni (1..255 chars) and timestamp into out[0..cap)
 * with the right HMAC random. Draws randomness. Returns the bytes written, or MTP_EINVAL (bad
 * sni, cap too small), MTP_EIO. The client random to keep for mtp_faketls_answer_check is
 * out[MTP_FAKETLS_RANDOM_OFFSET .. +32).
 */
int mtp_faketls_client_hello(const uint8_t secret[16], const char *sni, uint32_t timestamp,
                             enum mtp_faketls_hello_kind kind, uint8_t *out, size_t cap);

/*
 * Checks a server answer that starts in[0..len): a ServerHello record, a ChangeCipherSpec and
 * one ApplicationData record, with server random = HMAC(secret, client_random || answer with
 * the random zeroed). Returns the answer's length (what follows is the server's data
 * records), MTP_AGAIN (incomplete: read more and call again with everything), MTP_EPROTO
 * (malformed) or MTP_EBADSECRET (HMAC mismatch). Pure; in is not modified.
 */
int mtp_faketls_answer_check(const uint8_t secret[16], const uint8_t client_random[32],
                             const uint8_t *in, size_t len);

#endif
