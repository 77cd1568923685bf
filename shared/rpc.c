/*
 * rpc.c - Telegram's middle-proxy RPC protocol: frame codec, key derivation, messages.
 *
 * Facts, as read from the official MTProxy source (net/net-tcp-rpc-common.c,
 * net/net-tcp-rpc-client.c, net/net-tcp-rpc-server.c, net/net-crypto-aes.c,
 * mtproto/mtproto-proxy.c, net/net-tcp-rpc-ext-server.c). All integers little-endian.
 *
 * Frames
 *   - A frame is len(4) seq(4) body crc(4); len counts all of it (12 + body) and the body
 *     length is a multiple of 4. The CRC covers len, seq and body; it is the usual zlib CRC32
 *     (start ~0, final ~), or CRC32C once both handshakes have been exchanged with flag 0x800.
 *   - A reader takes a 4-byte len first. len == 4 is a filler word and is skipped wherever it
 *     appears (it takes no seq number). len <= 0, len not a multiple of 4, or len above the
 *     maximum kill the connection; so does len < 16 (a body needs at least its type). The CRC
 *     is checked before the seq number.
 *   - seq numbers count per direction: each side's nonce is -2, its handshake -1, then 0, 1, 2
 *     ... (the official writer post-increments a counter that starts at -2; the reader expects
 *     exactly the next number and closes otherwise).
 *   - After the nonce exchange both directions are AES-256-CBC, one continuous chain per
 *     direction (the IV carries over from the last cipher block). The writer only ever hands
 *     whole 16-byte blocks to the cipher: when it flushes, it appends 1..3 filler words
 *     (04 00 00 00) to reach a block boundary. We pad every frame that way, which produces a
 *     stream the official reader accepts.
 *   - CRC32C switch: the server answers the client's handshake (checked and sent with CRC32)
 *     and then switches; the client switches after checking the server's handshake. So both
 *     handshake frames use CRC32 and CRC32C starts at seq 0 in both directions. The official
 *     proxy always asks for CRC32C (engine default flags).
 *
 * Nonce (plaintext, 32 bytes both ways): type, key_select (first 4 bytes of the proxy secret
 * read as an int), crypto schema (1 = AES; the proxy never asks for the DH variant, so the
 * key derivation has no temporary DH key mixed in), crypto_ts (unix time), nonce[16].
 *
 * Handshake (first encrypted frame, 32 bytes): type, flags, sender pid, peer pid; a pid is
 * ip(4, host order int), port(2), pid(2), utime(4). The peer rejects flags & 0xff.
 * Handshake error (20 bytes): type, error code, sender pid.
 *
 * Key derivation (aes_create_keys): a byte string s is assembled as
 *   nonce_srv[16] nonce_clt[16] clt_ts(4) srv_ip(4) clt_port(2) purpose[6] clt_ip(4)
 *   srv_port(2) secret[n] nonce_srv[16] (clt_ipv6[16] srv_ipv6[16], only when srv_ip == 0)
 *   nonce_clt[16]
 * where the IPs are host-order ints stored little-endian (so the network bytes appear
 * reversed) and the ports are 2-byte little-endian. The client side passes its NAT-translated
 * (public) address as clt_ip. Then key = md5(s[1..])[0..12] || sha1(s) and iv = md5(s[2..]).
 * Purpose "CLIENT" gives the keys the client writes with (client -> server), "SERVER" the
 * other direction. Both sides assemble the same string (the server puts its own address in
 * the srv_* fields and the peer's in clt_*).
 *
 * RPC_PROXY_REQ (proxy -> middle server):
 *   type, flags(4), conn_id(8), client addr(16) + client port(4), proxy addr(16) + proxy
 *   port(4), [extra_size(4) extra], packet.
 *   An IPv4 address is 10 zero bytes, ff ff, then the 4 address bytes in network order (the
 *   ::ffff:a.b.c.d form); IPv6 is the 16 raw bytes. Ports are 4-byte ints. The extra block is present when flags & 12 (ad tag or HTTP info); for the ad tag it
 *   holds TL_PROXY_TAG followed by a TL string (one length byte 16, the 16 bytes, zero padding
 *   to a multiple of 4) and extra_size counts those 24 bytes.
 *   Flags of the official proxy for an obfuscated TCP client: ABRIDGED (0x40000000) or
 *   INTERMEDIATE (0x20000000) for the framing, always EXTMODE2 (0x20000) and MAGIC (0x1000),
 *   QUICKACK (0x80000000) per packet when the client asked for it, NOT_ENCRYPTED (0x2) when
 *   the packet's auth_key_id is zero, HAS_AD_TAG (0x8) when a tag is configured. The padded
 *   framing sets no extra bit on the wire: PAD is masked out of what is forwarded.
 *   The official proxy also refuses to forward a packet shorter than 28 bytes or not a
 *   multiple of 4, and unencrypted packets other than the key-exchange calls.
 *
 * Answers (middle server -> proxy): PROXY_ANS type, flags, conn_id, packet (>= 16 bytes);
 * SIMPLE_ACK type, conn_id, token (exactly 16); CLOSE_EXT type, conn_id (exactly 12).
 * PING type, ping_id(8) (exactly 12) is answered by PONG with the same id. The proxy sends
 * CLOSE_CONN type, conn_id when a client is gone.
 */
#include "rpc.h"

#include <string.h>

#include "alloc.h"
#include "err.h"
#include "obf2.h"
#include "banned.h"

/* A buffer this large after a big frame is given back once it is nearly empty. */
#define RX_KEEP_CAP 16384u

static void wr32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
  p[2] = (uint8_t)(v >> 16);
  p[3] = (uint8_t)(v >> 24);
}

static void wr16(uint8_t *p, uint16_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
}

static void wr64(uint8_t *p, uint64_t v) {
  wr32(p, (uint32_t)v);
  wr32(p + 4, (uint32_t)(v >> 32));
}

static uint32_t rd32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

/* ---- frame layer ---- */

void mtp_rpc_codec_init(struct mtp_rpc_codec *c) {
  memset(c, 0, sizeof(*c));
  c->_rx_seq = -2;
  c->_tx_seq = -2;
}

void mtp_rpc_codec_set_rx_key(struct mtp_rpc_codec *c, const uint8_t key[32], const uint8_t iv[16]) {
  if (c->_rx_enc)
    mtp_aes_cbc_free(&c->_rx_cbc);
  mtp_aes_cbc_setup(&c->_rx_cbc, key, iv, false);
  c->_rx_enc = true;
  c->_raw_len = 0;
}

void mtp_rpc_codec_set_tx_key(struct mtp_rpc_codec *c, const uint8_t key[32], const uint8_t iv[16]) {
  if (c->_tx_enc)
    mtp_aes_cbc_free(&c->_tx_cbc);
  mtp_aes_cbc_setup(&c->_tx_cbc, key, iv, true);
  c->_tx_enc = true;
}

void mtp_rpc_codec_free(struct mtp_rpc_codec *c) {
  if (c->_rx_enc)
    mtp_aes_cbc_free(&c->_rx_cbc);
  if (c->_tx_enc)
    mtp_aes_cbc_free(&c->_tx_cbc);
  c->_rx_enc = false;
  c->_tx_enc = false;
  mtp_free(c->_buf);
  c->_buf = NULL;
  c->_len = c->_cap = c->_off = 0;
  c->_raw_len = 0;
  mtp_wipe(c->_raw, sizeof(c->_raw));
}

/* Drops the bytes before _off (frames already returned) and gives back an oversized buffer. */
static void rx_compact(struct mtp_rpc_codec *c) {
  if (c->_off > 0) {
    memmove(c->_buf, c->_buf + c->_off, c->_len - c->_off);
    c->_len -= c->_off;
    c->_off = 0;
  }
  if (c->_cap > RX_KEEP_CAP && c->_len <= RX_KEEP_CAP / 4) {
    uint8_t *nb = mtp_realloc(c->_buf, RX_KEEP_CAP);
    if (nb != NULL) { /* keeping the big one is harmless if shrinking fails */
      c->_buf = nb;
      c->_cap = RX_KEEP_CAP;
    }
  }
}

static int rx_reserve(struct mtp_rpc_codec *c, size_t extra) {
  size_t need = c->_len + extra;
  if (need <= c->_cap)
    return MTP_OK;
  size_t ncap = c->_cap ? c->_cap : 256;
  while (ncap < need)
    ncap *= 2;
  uint8_t *nb = mtp_realloc(c->_buf, ncap);
  if (nb == NULL)
    return MTP_ENOMEM;
  c->_buf = nb;
  c->_cap = ncap;
  return MTP_OK;
}

/*
 * Looks at the buffered plaintext from _off. Returns 1 with a frame (and _off moved past it),
 * 0 when more bytes are needed (*want = how many more plaintext bytes), or an error.
 */
static int rx_try_frame(struct mtp_rpc_codec *c, const uint8_t **body, size_t *body_len, size_t *want) {
  for (;;) {
    size_t avail = c->_len - c->_off;
    if (avail < 4) {
      *want = 4 - avail;
      return 0;
    }
    const uint8_t *p = c->_buf + c->_off;
    uint32_t flen = rd32(p);
    if (flen == 4) { /* filler word */
      c->_off += 4;
      continue;
    }
    if (flen == 0 || (flen & 3) != 0 || flen >= 0x80000000u)
      return MTP_EPROTO;
    if (flen > MTP_RPC_MAX_FRAME)
      return MTP_ETOOBIG;
    if (flen < 16)
      return MTP_EPROTO;
    if (avail < flen) {
      *want = flen - avail;
      return 0;
    }
    uint32_t crc = c->crc32c ? mtp_crc32c(0, p, flen - 4) : mtp_crc32(0, p, flen - 4);
    if (crc != rd32(p + flen - 4))
      return MTP_ECRC;
    if ((int32_t)rd32(p + 4) != c->_rx_seq)
      return MTP_ESEQ;
    c->_rx_seq++;
    *body = p + 8;
    *body_len = flen - 12;
    c->_off += flen;
    return 1;
  }
}

/* Moves up to n input bytes into the plaintext buffer, decrypting whole blocks. */
static int rx_feed(struct mtp_rpc_codec *c, const uint8_t *in, size_t n) {
  if (!c->_rx_enc) {
    int rc = rx_reserve(c, n);
    if (rc != MTP_OK)
      return rc;
    memcpy(c->_buf + c->_len, in, n);
    c->_len += n;
    return MTP_OK;
  }
  int rc = rx_reserve(c, c->_raw_len + n); /* upper bound of what can come out */
  if (rc != MTP_OK)
    return rc;
  if (c->_raw_len > 0) {
    size_t k = 16 - c->_raw_len;
    if (k > n)
      k = n;
    memcpy(c->_raw + c->_raw_len, in, k);
    c->_raw_len += k;
    in += k;
    n -= k;
    if (c->_raw_len < 16)
      return MTP_OK;
    mtp_aes_cbc_crypt(&c->_rx_cbc, c->_raw, c->_buf + c->_len, 16);
    c->_len += 16;
    c->_raw_len = 0;
  }
  size_t whole = n & ~(size_t)15;
  if (whole > 0) {
    mtp_aes_cbc_crypt(&c->_rx_cbc, in, c->_buf + c->_len, whole);
    c->_len += whole;
  }
  memcpy(c->_raw, in + whole, n - whole);
  c->_raw_len = n - whole;
  return MTP_OK;
}

/*
 * Input is taken only up to what the current frame needs (rounded up to the cipher block when
 * encrypted), so after a frame at most 15 decrypted bytes stay buffered: never a whole frame
 * the caller could miss by stopping when its input runs out.
 */
ssize_t mtp_rpc_recv(struct mtp_rpc_codec *c, const uint8_t *in, size_t len, const uint8_t **body,
                     size_t *body_len, bool *has_frame) {
  size_t used = 0;
  *has_frame = false;
  rx_compact(c);
  for (;;) {
    size_t want = 0;
    int r = rx_try_frame(c, body, body_len, &want);
    if (r < 0)
      return r;
    if (r == 1) {
      *has_frame = true;
      return (ssize_t)used;
    }
    if (used == len)
      return (ssize_t)used;
    size_t take;
    if (c->_rx_enc) {
      size_t blocks = (want + 15) / 16 * 16;
      take = blocks > c->_raw_len ? blocks - c->_raw_len : 1;
    } else {
      take = want;
    }
    if (take > len - used)
      take = len - used;
    int rc = rx_feed(c, in + used, take);
    if (rc != MTP_OK)
      return rc;
    used += take;
  }
}

size_t mtp_rpc_frame_size(const struct mtp_rpc_codec *c, size_t body_len) {
  size_t n = body_len + 12;
  if (c->_tx_enc)
    n = (n + 15) & ~(size_t)15;
  return n;
}

size_t mtp_rpc_sendv(struct mtp_rpc_codec *c, const struct iovec *iov, int iovcnt, uint8_t *out) {
  size_t body_len = 0;
  for (int i = 0; i < iovcnt; i++)
    body_len += iov[i].iov_len;
  if ((body_len & 3) != 0 || body_len + 12 > MTP_RPC_MAX_FRAME)
    return 0;
  size_t flen = body_len + 12;
  size_t total = mtp_rpc_frame_size(c, body_len);
  wr32(out, (uint32_t)flen);
  wr32(out + 4, (uint32_t)c->_tx_seq);
  size_t pos = 8;
  for (int i = 0; i < iovcnt; i++) {
    if (iov[i].iov_len > 0)
      memcpy(out + pos, iov[i].iov_base, iov[i].iov_len);
    pos += iov[i].iov_len;
  }
  uint32_t crc = c->crc32c ? mtp_crc32c(0, out, pos) : mtp_crc32(0, out, pos);
  wr32(out + pos, crc);
  pos += 4;
  while (pos < total) {
    wr32(out + pos, 4);
    pos += 4;
  }
  if (c->_tx_enc)
    mtp_aes_cbc_crypt(&c->_tx_cbc, out, out, total);
  c->_tx_seq++;
  return total;
}

/* ---- key derivation ---- */

#define KEY_SECRET_MAX 256u /* the official proxy refuses longer secrets */

void mtp_rpc_derive_keys(const struct mtp_rpc_key_params *p, bool for_client_to_server, uint8_t key[32],
                         uint8_t iv[16]) {
  uint8_t s[16 + 16 + 4 + 4 + 2 + 6 + 4 + 2 + KEY_SECRET_MAX + 16 + 32 + 16];
  size_t slen = p->secret_len > KEY_SECRET_MAX ? KEY_SECRET_MAX : p->secret_len;
  bool v6 = p->ipv6 || p->srv_ip == 0;
  size_t n = 0;
  memcpy(s + n, p->nonce_srv, 16);
  n += 16;
  memcpy(s + n, p->nonce_clt, 16);
  n += 16;
  wr32(s + n, p->clt_ts);
  n += 4;
  wr32(s + n, v6 ? 0 : p->srv_ip);
  n += 4;
  wr16(s + n, p->clt_port);
  n += 2;
  memcpy(s + n, for_client_to_server ? "CLIENT" : "SERVER", 6);
  n += 6;
  wr32(s + n, v6 ? 0 : p->clt_ip);
  n += 4;
  wr16(s + n, p->srv_port);
  n += 2;
  if (slen > 0)
    memcpy(s + n, p->secret, slen);
  n += slen;
  memcpy(s + n, p->nonce_srv, 16);
  n += 16;
  if (v6) {
    memcpy(s + n, p->clt_ipv6, 16);
    n += 16;
    memcpy(s + n, p->srv_ipv6, 16);
    n += 16;
  }
  memcpy(s + n, p->nonce_clt, 16);
  n += 16;

  uint8_t md[16], sha[20];
  mtp_md5(s + 1, n - 1, md);
  mtp_sha1(s, n, sha);
  memcpy(key, md, 12);
  memcpy(key + 12, sha, 20);
  mtp_md5(s + 2, n - 2, iv);
  mtp_wipe(s, sizeof(s));
  mtp_wipe(md, sizeof(md));
  mtp_wipe(sha, sizeof(sha));
}

/* ---- messages ---- */

size_t mtp_rpc_build_nonce(const struct mtp_rpc_nonce *n, uint8_t out[MTP_RPC_NONCE_LEN]) {
  wr32(out, MTP_RPC_NONCE);
  wr32(out + 4, n->key_selector);
  wr32(out + 8, n->crypto_schema);
  wr32(out + 12, n->crypto_ts);
  memcpy(out + 16, n->nonce, 16);
  return MTP_RPC_NONCE_LEN;
}

int mtp_rpc_parse_nonce(const uint8_t *body, size_t len, struct mtp_rpc_nonce *n) {
  if (len != MTP_RPC_NONCE_LEN || rd32(body) != MTP_RPC_NONCE)
    return MTP_EPROTO;
  n->key_selector = rd32(body + 4);
  n->crypto_schema = rd32(body + 8);
  n->crypto_ts = rd32(body + 12);
  memcpy(n->nonce, body + 16, 16);
  return MTP_OK;
}

static void put_pid(uint8_t *p, const struct mtp_rpc_pid *pid) {
  wr32(p, pid->ip);
  wr16(p + 4, pid->port);
  wr16(p + 6, pid->pid);
  wr32(p + 8, pid->utime);
}

static void get_pid(const uint8_t *p, struct mtp_rpc_pid *pid) {
  pid->ip = rd32(p);
  pid->port = rd16(p + 4);
  pid->pid = rd16(p + 6);
  pid->utime = rd32(p + 8);
}

size_t mtp_rpc_build_handshake(uint32_t flags, const struct mtp_rpc_pid *sender, const struct mtp_rpc_pid *peer,
                               uint8_t out[MTP_RPC_HANDSHAKE_LEN]) {
  wr32(out, MTP_RPC_HANDSHAKE);
  wr32(out + 4, flags);
  put_pid(out + 8, sender);
  put_pid(out + 20, peer);
  return MTP_RPC_HANDSHAKE_LEN;
}

/* The ad tag as a TL string: length byte, 16 bytes, zero padding to a multiple of 4. */
#define AD_TAG_TL_LEN 20u
#define PROXY_REQ_FIXED 56u

size_t mtp_rpc_build_proxy_req_hdr(uint32_t flags, uint64_t conn_id, const uint8_t client_ip[16],
                                   uint32_t client_port, const uint8_t proxy_ip[16], uint32_t proxy_port,
                                   const uint8_t *ad_tag, uint8_t out[MTP_RPC_PROXY_REQ_HDR_MAX]) {
  flags |= MTP_RPC_FLAG_MAGIC | MTP_RPC_FLAG_EXTMODE2;
  if (ad_tag != NULL)
    flags |= MTP_RPC_FLAG_HAS_AD_TAG;
  else
    flags &= ~MTP_RPC_FLAG_HAS_AD_TAG;
  flags &= ~4u; /* HTTP query info: never ours, and its extra block would be missing */
  wr32(out, MTP_RPC_PROXY_REQ);
  wr32(out + 4, flags);
  wr64(out + 8, conn_id);
  memcpy(out + 16, client_ip, 16);
  wr32(out + 32, client_port);
  memcpy(out + 36, proxy_ip, 16);
  wr32(out + 52, proxy_port);
  size_t n = PROXY_REQ_FIXED;
  if (ad_tag != NULL) {
    wr32(out + n, 4 + AD_TAG_TL_LEN);
    n += 4;
    wr32(out + n, MTP_TL_PROXY_TAG);
    n += 4;
    out[n] = 16;
    memcpy(out + n + 1, ad_tag, 16);
    memset(out + n + 17, 0, 3);
    n += AD_TAG_TL_LEN;
  }
  return n;
}

uint32_t mtp_rpc_proxy_req_flags(int proto, bool quickack) {
  uint32_t f = 0;
  switch (proto) {
  case MTP_PROTO_ABRIDGED:
    f = MTP_RPC_FLAG_ABRIDGED;
    break;
  case MTP_PROTO_INTERMEDIATE:
  case MTP_PROTO_PADDED:
    f = MTP_RPC_FLAG_INTERMEDIATE;
    break;
  default:
    break;
  }
  if (quickack)
    f |= MTP_RPC_FLAG_QUICKACK;
  return f;
}

uint32_t mtp_rpc_packet_flags(const uint8_t *pkt, size_t len) {
  if (len < 8)
    return 0;
  for (size_t i = 0; i < 8; i++)
    if (pkt[i] != 0)
      return 0;
  return MTP_RPC_FLAG_NOT_ENCRYPTED;
}

static size_t build_type_id(uint32_t type, uint64_t id, uint8_t out[12]) {
  wr32(out, type);
  wr64(out + 4, id);
  return 12;
}

size_t mtp_rpc_build_close_conn(uint64_t conn_id, uint8_t out[12]) {
  return build_type_id(MTP_RPC_CLOSE_CONN, conn_id, out);
}

size_t mtp_rpc_build_close_ext(uint64_t conn_id, uint8_t out[12]) {
  return build_type_id(MTP_RPC_CLOSE_EXT, conn_id, out);
}

size_t mtp_rpc_build_simple_ack(uint64_t conn_id, uint32_t token, uint8_t out[16]) {
  build_type_id(MTP_RPC_SIMPLE_ACK, conn_id, out);
  wr32(out + 12, token);
  return 16;
}

size_t mtp_rpc_build_ping(int64_t ping_id, uint8_t out[12]) {
  return build_type_id(MTP_RPC_PING, (uint64_t)ping_id, out);
}

size_t mtp_rpc_build_pong(int64_t ping_id, uint8_t out[12]) {
  return build_type_id(MTP_RPC_PONG, (uint64_t)ping_id, out);
}

size_t mtp_rpc_build_proxy_ans_hdr(uint32_t flags, uint64_t conn_id, uint8_t out[16]) {
  wr32(out, MTP_RPC_PROXY_ANS);
  wr32(out + 4, flags);
  wr64(out + 8, conn_id);
  return 16;
}

/* Walks the PROXY_REQ extra block (TL objects) looking for the proxy tag. */
static int parse_extra(const uint8_t *p, size_t n, struct mtp_rpc_msg *m) {
  if (n < 4 || rd32(p) != MTP_TL_PROXY_TAG)
    return MTP_OK; /* only HTTP query info or something newer: nothing for us */
  p += 4;
  n -= 4;
  if (n < 1)
    return MTP_EPROTO;
  size_t slen, hdr;
  if (p[0] < 254) {
    slen = p[0];
    hdr = 1;
  } else {
    if (n < 4)
      return MTP_EPROTO;
    slen = (size_t)p[1] | (size_t)p[2] << 8 | (size_t)p[3] << 16;
    hdr = 4;
  }
  if (hdr + slen > n || slen != 16)
    return MTP_EPROTO;
  memcpy(m->ad_tag, p + hdr, 16);
  m->has_ad_tag = true;
  return MTP_OK;
}

static int parse_proxy_req(const uint8_t *body, size_t len, struct mtp_rpc_msg *m) {
  if (len < PROXY_REQ_FIXED)
    return MTP_EPROTO;
  m->flags = rd32(body + 4);
  m->conn_id = rd64(body + 8);
  memcpy(m->client_ip, body + 16, 16);
  m->client_port = rd32(body + 32);
  memcpy(m->proxy_ip, body + 36, 16);
  m->proxy_port = rd32(body + 52);
  size_t pos = PROXY_REQ_FIXED;
  if (m->flags & (MTP_RPC_FLAG_HAS_AD_TAG | 4u)) {
    if (len - pos < 4)
      return MTP_EPROTO;
    uint32_t extra = rd32(body + pos);
    pos += 4;
    if ((extra & 3) != 0 || extra > len - pos)
      return MTP_EPROTO;
    if (m->flags & MTP_RPC_FLAG_HAS_AD_TAG) {
      int rc = parse_extra(body + pos, extra, m);
      if (rc != MTP_OK)
        return rc;
    }
    pos += extra;
  }
  m->data = body + pos;
  m->data_len = len - pos;
  return MTP_OK;
}

int mtp_rpc_parse(const uint8_t *body, size_t len, struct mtp_rpc_msg *m) {
  memset(m, 0, sizeof(*m));
  if (len < 4)
    return MTP_EPROTO;
  m->type = rd32(body);
  switch (m->type) {
  case MTP_RPC_NONCE:
    return mtp_rpc_parse_nonce(body, len, &m->nonce);
  case MTP_RPC_HANDSHAKE:
    if (len != MTP_RPC_HANDSHAKE_LEN)
      return MTP_EPROTO;
    m->flags = rd32(body + 4);
    get_pid(body + 8, &m->sender);
    get_pid(body + 20, &m->peer);
    return MTP_OK;
  case MTP_RPC_HANDSHAKE_ERROR:
    if (len != 20)
      return MTP_EPROTO;
    m->flags = rd32(body + 4);
    get_pid(body + 8, &m->sender);
    return MTP_OK;
  case MTP_RPC_PROXY_REQ:
    return parse_proxy_req(body, len, m);
  case MTP_RPC_PROXY_ANS:
    if (len < 16)
      return MTP_EPROTO;
    m->flags = rd32(body + 4);
    m->conn_id = rd64(body + 8);
    m->data = body + 16;
    m->data_len = len - 16;
    return MTP_OK;
  case MTP_RPC_SIMPLE_ACK:
    if (len != 16)
      return MTP_EPROTO;
    m->conn_id = rd64(body + 4);
    m->token = rd32(body + 12);
    return MTP_OK;
  case MTP_RPC_CLOSE_EXT:
  case MTP_RPC_CLOSE_CONN:
    if (len != 12)
      return MTP_EPROTO;
    m->conn_id = rd64(body + 4);
    return MTP_OK;
  case MTP_RPC_PING:
  case MTP_RPC_PONG:
    if (len != 12)
      return MTP_EPROTO;
    m->ping_id = (int64_t)rd64(body + 4);
    return MTP_OK;
  default:
    return MTP_EPROTO;
  }
}
