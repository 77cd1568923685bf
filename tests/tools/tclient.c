/* tclient.c - see tclient.h. */
#include "tclient.h"

#include <arpa/inet.h>

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "banned.h"

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int remaining(int64_t deadline) {
  int64_t r = deadline - now_ms();
  return r < 0 ? 0 : (int)r;
}

void tc_init(struct tclient *c) {
  memset(c, 0, sizeof(*c));
  c->fd = -1;
}

void tc_close(struct tclient *c) {
  if (c->fd >= 0)
    close(c->fd);
  c->fd = -1;
  mtp_obf2_free(&c->_obf);
  mtp_frame_dec_free(&c->_dec);
  mtp_free(c->_in);
  c->_in = NULL;
  mtp_free(c->_pkt);
  c->_pkt = NULL;
  c->_in_len = c->_in_off = c->_in_cap = c->_pkt_cap = 0;
}

/* Binds fd to the numeric address src (port 0) of family fam. */
static int bind_source(int fd, int fam, const char *src) {
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof(ss));
  socklen_t len;
  if (fam == AF_INET6) {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
    a->sin6_family = AF_INET6;
    if (inet_pton(AF_INET6, src, &a->sin6_addr) != 1)
      return -1;
    len = sizeof(*a);
  } else {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    a->sin_family = AF_INET;
    if (inet_pton(AF_INET, src, &a->sin_addr) != 1)
      return -1;
    len = sizeof(*a);
  }
  return bind(fd, (struct sockaddr *)&ss, len);
}

static int connect_bounded(const char *host, uint16_t port, const char *src, int timeout_ms) {
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  char portstr[8];
  snprintf(portstr, sizeof(portstr), "%u", (unsigned)port);
  if (getaddrinfo(host, portstr, &hints, &res) != 0 || !res)
    return MTP_EIO;
  int64_t deadline = now_ms() + timeout_ms;
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(res);
    return MTP_EIO;
  }
  if (src != NULL && bind_source(fd, res->ai_family, src) != 0) {
    freeaddrinfo(res);
    close(fd);
    return MTP_EIO;
  }
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  int rc = connect(fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  if (rc < 0 && errno != EINPROGRESS) {
    close(fd);
    return MTP_EIO;
  }
  if (rc < 0) {
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int n;
    do {
      n = poll(&p, 1, remaining(deadline));
    } while (n < 0 && errno == EINTR);
    if (n == 0) {
      close(fd);
      return MTP_ETIMEDOUT;
    }
    int err = 0;
    socklen_t el = sizeof(err);
    if (n < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err != 0) {
      close(fd);
      if (err)
        errno = err;
      return MTP_EIO;
    }
  }
  fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

static int send_all(int fd, const uint8_t *p, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return (errno == EPIPE || errno == ECONNRESET) ? MTP_ECLOSED : MTP_EIO;
    }
    p += w;
    n -= (size_t)w;
  }
  return MTP_OK;
}

/* Builds the client's obfuscated2 header into hdr and readies the framing decoder; closes c on
 * an error. */
static int start_obf2(struct tclient *c, const uint8_t *secret, enum mtp_proto proto, int16_t dc,
                      uint8_t hdr[MTP_OBF2_HEADER_LEN]) {
  int rc = mtp_obf2_connect(&c->_obf, secret, proto, dc, hdr);
  if (rc != MTP_OK) {
    tc_close(c);
    return rc;
  }
  mtp_frame_dec_init(&c->_dec, proto);
  return MTP_OK;
}

int tc_connect(struct tclient *c, const char *host, uint16_t port, const uint8_t *secret, enum mtp_proto proto,
               int16_t dc, int timeout_ms) {
  if (proto != MTP_PROTO_ABRIDGED && proto != MTP_PROTO_INTERMEDIATE && proto != MTP_PROTO_PADDED)
    return MTP_EINVAL;
  const char *src = c->bind_addr;
  tc_close(c);
  tc_init(c);
  c->bind_addr = src;
  int fd = connect_bounded(host, port, c->bind_addr, timeout_ms);
  if (fd < 0)
    return fd;
  c->fd = fd;
  c->proto = proto;
  uint8_t hdr[MTP_OBF2_HEADER_LEN];
  int rc = start_obf2(c, secret, proto, dc, hdr);
  if (rc != MTP_OK)
    return rc;
  rc = send_all(fd, hdr, sizeof(hdr));
  if (rc != MTP_OK)
    tc_close(c);
  return rc;
}

/* Obfuscates data and sends it in records (fake-TLS), after a CCS if ccs. */
static int send_records(struct tclient *c, const uint8_t *data, size_t len, bool ccs) {
  static const uint8_t ccs_rec[6] = {0x14, 0x03, 0x03, 0x00, 0x01, 0x01};
  size_t max = c->_rec_max ? c->_rec_max : MTP_FAKETLS_MAX_PAYLOAD;
  uint8_t *plain = mtp_malloc(len + 1);
  size_t wl = (ccs ? sizeof(ccs_rec) : 0) + mtp_faketls_wrap_len(len, max);
  uint8_t *wire = mtp_malloc(wl + 1);
  if (plain == NULL || wire == NULL) {
    mtp_free(plain);
    mtp_free(wire);
    return MTP_ENOMEM;
  }
  mtp_aes_ctr_crypt(&c->_obf.tx, data, plain, len);
  size_t w = 0;
  if (ccs) {
    memcpy(wire, ccs_rec, sizeof(ccs_rec));
    w = sizeof(ccs_rec);
  }
  mtp_faketls_wrap(plain, len, max, wire + w);
  int rc = send_all(c->fd, wire, wl);
  mtp_free(plain);
  mtp_free(wire);
  return rc;
}

/* Reads the server's answer to the hello (within deadline) and checks it; bytes after it are
 * the server's first records and are kept. */
static int read_answer(struct tclient *c, const uint8_t secret[16], int64_t deadline) {
  size_t cap = 2 * (MTP_FAKETLS_MAX_RECORD_PAYLOAD + 64), len = 0;
  uint8_t *buf = mtp_malloc(cap);
  if (buf == NULL)
    return MTP_ENOMEM;
  int rc;
  for (;;) {
    rc = mtp_faketls_answer_check(secret, c->hello + MTP_FAKETLS_RANDOM_OFFSET, buf, len);
    if (rc != MTP_AGAIN)
      break;
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    int n = poll(&p, 1, remaining(deadline));
    if (n < 0 && errno == EINTR)
      continue;
    if (n == 0) {
      rc = MTP_ETIMEDOUT;
      break;
    }
    ssize_t r = n < 0 ? -1 : recv(c->fd, buf + len, cap - len, 0);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      rc = MTP_ECLOSED;
      break;
    }
    len += (size_t)r;
    if (len == cap) {
      rc = MTP_EPROTO;
      break;
    }
  }
  if (rc > 0) {
    size_t off = 5 + (((size_t)buf[3] << 8) | buf[4]) + 6;
    c->flight_len = ((size_t)buf[off + 3] << 8) | buf[off + 4];
    size_t rest = len - (size_t)rc;
    if (rest > 0) {
      /* The server spoke first after its answer (it never does today); keep its bytes. */
      c->_in = mtp_malloc(131072 > rest ? 131072 : rest);
      if (c->_in == NULL) {
        mtp_free(buf);
        return MTP_ENOMEM;
      }
      c->_in_cap = 131072 > rest ? 131072 : rest;
      size_t plain = 0;
      if (mtp_faketls_rx_feed(&c->_rx, buf + rc, rest, c->_in, &plain) < 0) {
        mtp_free(buf);
        return MTP_EPROTO;
      }
      mtp_aes_ctr_crypt(&c->_obf.rx, c->_in, c->_in, plain);
      c->_in_len = plain;
    }
    rc = MTP_OK;
  }
  mtp_free(buf);
  return rc;
}

int tc_connect_tls(struct tclient *c, const char *host, uint16_t port, const uint8_t *secret, const struct tc_tls *tls,
                   enum mtp_proto proto, int16_t dc, int timeout_ms) {
  if ((proto != MTP_PROTO_ABRIDGED && proto != MTP_PROTO_INTERMEDIATE && proto != MTP_PROTO_PADDED) ||
      secret == NULL || tls == NULL || tls->sni == NULL)
    return MTP_EINVAL;
  const char *src = c->bind_addr;
  tc_close(c);
  tc_init(c);
  c->bind_addr = src;
  int64_t deadline = now_ms() + timeout_ms;
  uint32_t ts = tls->timestamp ? tls->timestamp : (uint32_t)time(NULL);
  int n = mtp_faketls_client_hello(secret, tls->sni, ts, tls->kind, c->hello, sizeof(c->hello));
  if (n < 0)
    return n;
  c->hello_len = (size_t)n;
  int fd = connect_bounded(host, port, c->bind_addr, timeout_ms);
  if (fd < 0)
    return fd;
  c->fd = fd;
  c->proto = proto;
  c->tls = true;
  c->_rec_max = tls->record_max;
  mtp_faketls_rx_init(&c->_rx);
  uint8_t hdr[MTP_OBF2_HEADER_LEN];
  int rc = start_obf2(c, secret, proto, dc, hdr);
  if (rc != MTP_OK)
    return rc;
  size_t cut = tls->split_hello ? 77 : c->hello_len;
  rc = send_all(fd, c->hello, cut);
  if (rc == MTP_OK && cut < c->hello_len) /* TCP_NODELAY: two segments */
    rc = send_all(fd, c->hello + cut, c->hello_len - cut);
  if (rc == MTP_OK)
    rc = read_answer(c, secret, deadline);
  if (rc == MTP_OK) {
    /* The header is ready to send as it is (bytes 56..63 already encrypted): it goes in
     * records of its own, not through send_records, which would encrypt it again. */
    size_t max = c->_rec_max ? c->_rec_max : MTP_FAKETLS_MAX_PAYLOAD;
    static const uint8_t ccs_rec[6] = {0x14, 0x03, 0x03, 0x00, 0x01, 0x01};
    uint8_t wire[6 + MTP_OBF2_HEADER_LEN + MTP_OBF2_HEADER_LEN * MTP_FAKETLS_RECORD_HEADER];
    size_t w = 0;
    if (!tls->no_ccs) {
      memcpy(wire, ccs_rec, sizeof(ccs_rec));
      w = sizeof(ccs_rec);
    }
    w += mtp_faketls_wrap(hdr, sizeof(hdr), max, wire + w);
    rc = send_all(fd, wire, w);
  }
  if (rc != MTP_OK)
    tc_close(c);
  return rc;
}

int tc_send_raw(struct tclient *c, const uint8_t *data, size_t len) {
  if (c->fd < 0)
    return MTP_ECLOSED;
  if (c->tls)
    return len > 0 ? send_records(c, data, len, false) : MTP_OK;
  uint8_t chunk[4096];
  while (len > 0) {
    size_t n = len < sizeof(chunk) ? len : sizeof(chunk);
    mtp_aes_ctr_crypt(&c->_obf.tx, data, chunk, n);
    int rc = send_all(c->fd, chunk, n);
    if (rc != MTP_OK)
      return rc;
    data += n;
    len -= n;
  }
  return MTP_OK;
}

int tc_send(struct tclient *c, const uint8_t *pkt, size_t len, bool quickack) {
  uint8_t hdr[4], pad[4];
  size_t pad_len = 0;
  size_t hl = mtp_frame_header(c->proto, len, quickack, hdr, &pad_len);
  if (c->tls) {
    /* One write, so the records carry header, packet and padding together. */
    uint8_t *buf = mtp_malloc(hl + len + pad_len + 1);
    if (buf == NULL)
      return MTP_ENOMEM;
    memcpy(buf, hdr, hl);
    memcpy(buf + hl, pkt, len);
    mtp_random(buf + hl + len, pad_len);
    int rc = tc_send_raw(c, buf, hl + len + pad_len);
    mtp_free(buf);
    return rc;
  }
  int rc = tc_send_raw(c, hdr, hl);
  if (rc == MTP_OK)
    rc = tc_send_raw(c, pkt, len);
  if (rc == MTP_OK && pad_len > 0) {
    mtp_random(pad, pad_len);
    rc = tc_send_raw(c, pad, pad_len);
  }
  return rc;
}

/* Reads what is available (waiting at most timeout_ms) into the input buffer, de-obfuscated.
 * Returns bytes read (> 0), MTP_ETIMEDOUT, MTP_ECLOSED or MTP_ENOMEM. */
static int fill(struct tclient *c, int timeout_ms) {
  if (c->fd < 0)
    return MTP_ECLOSED;
  struct pollfd p = {.fd = c->fd, .events = POLLIN};
  int n;
  do {
    n = poll(&p, 1, timeout_ms);
  } while (n < 0 && errno == EINTR);
  if (n == 0)
    return MTP_ETIMEDOUT;
  if (n < 0)
    return MTP_ECLOSED;
  if (c->_in_off > 0 && c->_in_off == c->_in_len)
    c->_in_off = c->_in_len = 0;
  if (c->_in_cap - c->_in_len < 65536) {
    if (c->_in_off > 0) {
      memmove(c->_in, c->_in + c->_in_off, c->_in_len - c->_in_off);
      c->_in_len -= c->_in_off;
      c->_in_off = 0;
    }
    if (c->_in_cap - c->_in_len < 65536) {
      size_t cap = c->_in_cap ? c->_in_cap * 2 : 131072;
      uint8_t *nb = mtp_realloc(c->_in, cap);
      if (!nb)
        return MTP_ENOMEM;
      c->_in = nb;
      c->_in_cap = cap;
    }
  }
  ssize_t r;
  do {
    r = recv(c->fd, c->_in + c->_in_len, c->_in_cap - c->_in_len, 0);
  } while (r < 0 && errno == EINTR);
  if (r <= 0)
    return MTP_ECLOSED;
  size_t got = (size_t)r;
  if (c->tls) {
    size_t plain = 0;
    if (mtp_faketls_rx_feed(&c->_rx, c->_in + c->_in_len, got, c->_in + c->_in_len, &plain) < 0)
      return MTP_EPROTO;
    got = plain;
  }
  mtp_aes_ctr_crypt(&c->_obf.rx, c->_in + c->_in_len, c->_in + c->_in_len, got);
  c->_in_len += got;
  return (int)r;
}

static uint32_t rd_le32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Tries to take one message from the buffered input. Returns 1 with *m filled, 0 when more
 * input is needed, or a negative error. */
static int take(struct tclient *c, struct tc_msg *m) {
  for (;;) {
    const uint8_t *in = c->_in + c->_in_off;
    size_t avail = c->_in_len - c->_in_off;
    if (avail == 0)
      return 0;
    if (!c->_mid_packet) {
      bool ack;
      if (c->proto == MTP_PROTO_ABRIDGED) {
        ack = (in[0] & 0x80) != 0;
      } else {
        if (avail < 4)
          return 0;
        ack = (rd_le32(in) & 0x80000000u) != 0;
      }
      if (ack) {
        if (avail < 4)
          return 0;
        m->kind = TC_QUICKACK;
        m->token = c->proto == MTP_PROTO_ABRIDGED
                       ? ((uint32_t)in[0] << 24 | (uint32_t)in[1] << 16 | (uint32_t)in[2] << 8 | in[3])
                       : rd_le32(in);
        m->data = NULL;
        m->len = 0;
        c->_in_off += 4;
        return 1;
      }
    }
    struct mtp_packet pkt;
    bool has = false;
    ssize_t used = mtp_frame_decode(&c->_dec, in, avail, &pkt, &has);
    if (used < 0)
      return (int)used;
    c->_in_off += (size_t)used;
    if (!has) {
      c->_mid_packet = true;
      return 0;
    }
    c->_mid_packet = false;
    /* Copy: pkt.data may borrow the input buffer, which the next fill() moves. */
    if (pkt.len > c->_pkt_cap) {
      uint8_t *nb = mtp_realloc(c->_pkt, pkt.len);
      if (!nb)
        return MTP_ENOMEM;
      c->_pkt = nb;
      c->_pkt_cap = pkt.len;
    }
    memcpy(c->_pkt, pkt.data, pkt.len);
    if (c->proto == MTP_PROTO_PADDED) {
      if (pkt.len >= 8 && rd_le32(c->_pkt) == 0xffffffffu) {
        m->kind = TC_QUICKACK;
        m->token = rd_le32(c->_pkt + 4);
        m->data = NULL;
        m->len = 0;
        c->_skip_filler = true;
        return 1;
      }
      if (c->_skip_filler && pkt.len >= 4 && pkt.len <= 8 && rd_le32(c->_pkt) == 0) {
        c->_skip_filler = false;
        continue;
      }
    }
    c->_skip_filler = false;
    m->kind = TC_PACKET;
    m->data = c->_pkt;
    m->len = pkt.len;
    m->token = 0;
    return 1;
  }
}

int tc_recv(struct tclient *c, int timeout_ms, struct tc_msg *m) {
  int64_t deadline = now_ms() + timeout_ms;
  for (;;) {
    int rc = take(c, m);
    if (rc != 0)
      return rc > 0 ? MTP_OK : rc;
    rc = fill(c, remaining(deadline));
    if (rc < 0)
      return rc;
  }
}

int tc_wait_closed(struct tclient *c, int timeout_ms) {
  int64_t deadline = now_ms() + timeout_ms;
  bool got = false;
  for (;;) {
    int rc = fill(c, remaining(deadline));
    if (rc == MTP_ECLOSED)
      return MTP_ECLOSED;
    if (rc == MTP_ETIMEDOUT)
      return got ? MTP_OK : MTP_ETIMEDOUT;
    if (rc < 0)
      return rc;
    got = true;
    c->_in_off = c->_in_len; /* discard */
    if (remaining(deadline) == 0)
      return MTP_OK;
  }
}

void tc_make_packet(uint8_t *buf, size_t len, bool encrypted) {
  mtp_random(buf, len);
  if (encrypted) {
    if (len >= 8 && buf[0] == 0)
      buf[0] = 1; /* any non-zero auth_key_id */
    return;
  }
  uint8_t h[24];
  memset(h, 0, sizeof(h));
  uint64_t msg_id = ((uint64_t)time(NULL) << 32) | ((uint64_t)mtp_random_below(0x40000000u) << 2);
  for (int i = 0; i < 8; i++)
    h[8 + i] = (uint8_t)(msg_id >> (8 * i));
  uint32_t ml = len >= 20 ? (uint32_t)(len - 20) : 0;
  uint32_t ctor = 0xbe7e8ef1u; /* req_pq_multi */
  for (int i = 0; i < 4; i++) {
    h[16 + i] = (uint8_t)(ml >> (8 * i));
    h[20 + i] = (uint8_t)(ctor >> (8 * i));
  }
  memcpy(buf, h, len < sizeof(h) ? len : sizeof(h));
}

enum mtp_proto tc_proto_parse(const char *s) {
  if (!strcmp(s, "abridged"))
    return MTP_PROTO_ABRIDGED;
  if (!strcmp(s, "intermediate"))
    return MTP_PROTO_INTERMEDIATE;
  if (!strcmp(s, "secure") || !strcmp(s, "padded"))
    return MTP_PROTO_PADDED;
  return MTP_PROTO_NONE;
}
