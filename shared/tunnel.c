/*
 * tunnel.c - length-prefixed protobuf-c frames for the split-mode tunnel (see tunnel.h).
 */
#include "tunnel.h"

#include <string.h>

#include "alloc.h"
#include "err.h"

#include "banned.h"

enum dec_state {
  DEC_WAIT_HEADER = 0, /* collecting the 4-byte length prefix */
  DEC_WAIT_BODY = 1,   /* collecting _need body bytes */
  DEC_FAILED = 2,      /* a malformed frame was seen; _err says which */
};

/* protobuf-c allocator that goes through mtp_malloc and remembers whether an allocation
 * failed, so a NULL from unpack can be told apart as MTP_ENOMEM or MTP_EPROTO. */
struct pb_alloc_state {
  bool failed;
};

static void *pb_alloc(void *data, size_t size) {
  void *p = mtp_malloc(size == 0 ? 1 : size);
  if (p == NULL && data != NULL)
    ((struct pb_alloc_state *)data)->failed = true;
  return p;
}

static void pb_free(void *data, void *p) {
  (void)data;
  mtp_free(p);
}

void mtp_tunnel_dec_init(struct mtp_tunnel_dec *d) {
  memset(d, 0, sizeof(*d));
  d->max_frame = MTP_TUNNEL_MAX_FRAME;
  d->_state = DEC_WAIT_HEADER;
}

void mtp_tunnel_dec_free(struct mtp_tunnel_dec *d) {
  mtp_free(d->_buf);
  d->_buf = NULL;
  d->_have = 0;
}

void mtp_tunnel_frame_free(Mtp__Frame *f) {
  if (f == NULL)
    return;
  ProtobufCAllocator a = {.alloc = pb_alloc, .free = pb_free, .allocator_data = NULL};
  mtp__frame__free_unpacked(f, &a);
}

static bool ip_len_ok(const ProtobufCBinaryData *b) { return b->len == 0 || b->len == 4 || b->len == 16; }

int mtp_tunnel_frame_check(const Mtp__Frame *f) {
  if (f == NULL)
    return MTP_EPROTO;
  switch (f->msg_case) {
  case MTP__FRAME__MSG__NOT_SET:
    return MTP_OK; /* a frame type from a newer peer: the receiver ignores it */
  case MTP__FRAME__MSG_HELLO:
    return f->hello != NULL ? MTP_OK : MTP_EPROTO;
  case MTP__FRAME__MSG_OPEN: {
    const Mtp__Open *o = f->open;
    if (o == NULL || o->stream == 0 || !ip_len_ok(&o->client_ip) || !ip_len_ok(&o->local_ip) ||
        o->client_port > 65535 || o->local_port > 65535 || (o->ad_tag.len != 0 && o->ad_tag.len != 16))
      return MTP_EPROTO;
    return MTP_OK;
  }
  case MTP__FRAME__MSG_DATA:
    return f->data != NULL && f->data->stream != 0 ? MTP_OK : MTP_EPROTO;
  case MTP__FRAME__MSG_QUICKACK:
    return f->quickack != NULL && f->quickack->stream != 0 ? MTP_OK : MTP_EPROTO;
  case MTP__FRAME__MSG_CLOSE:
    return f->close != NULL ? MTP_OK : MTP_EPROTO;
  case MTP__FRAME__MSG_CREDIT:
    return f->credit != NULL && f->credit->stream != 0 ? MTP_OK : MTP_EPROTO;
  case MTP__FRAME__MSG_PING:
    return f->ping != NULL ? MTP_OK : MTP_EPROTO;
  case MTP__FRAME__MSG_PONG:
    return f->pong != NULL ? MTP_OK : MTP_EPROTO;
  default:
    /* protobuf-c never produces another value; a caller-built frame might. */
    return MTP_EPROTO;
  }
}

int mtp_tunnel_unpack(const uint8_t *body, size_t len, Mtp__Frame **out) {
  *out = NULL;
  struct pb_alloc_state st = {.failed = false};
  ProtobufCAllocator a = {.alloc = pb_alloc, .free = pb_free, .allocator_data = &st};
  Mtp__Frame *f = mtp__frame__unpack(&a, len, body);
  if (f == NULL)
    return st.failed ? MTP_ENOMEM : MTP_EPROTO;
  if (mtp_tunnel_frame_check(f) != MTP_OK) {
    mtp__frame__free_unpacked(f, &a);
    return MTP_EPROTO;
  }
  *out = f;
  return MTP_OK;
}

static ssize_t fail(struct mtp_tunnel_dec *d, int err) {
  mtp_free(d->_buf);
  d->_buf = NULL;
  d->_state = DEC_FAILED;
  d->_err = err;
  return err;
}

ssize_t mtp_tunnel_decode(struct mtp_tunnel_dec *d, const uint8_t *in, size_t len, Mtp__Frame **out) {
  *out = NULL;
  size_t used = 0;
  while (used < len) {
    switch (d->_state) {
    case DEC_WAIT_HEADER: {
      size_t take = MTP_TUNNEL_HDR_LEN - d->_hdr_have;
      if (take > len - used)
        take = len - used;
      memcpy(d->_hdr + d->_hdr_have, in + used, take);
      d->_hdr_have += take;
      used += take;
      if (d->_hdr_have < MTP_TUNNEL_HDR_LEN)
        break;
      uint32_t n = ((uint32_t)d->_hdr[0] << 24) | ((uint32_t)d->_hdr[1] << 16) | ((uint32_t)d->_hdr[2] << 8) |
                   (uint32_t)d->_hdr[3];
      if (n == 0)
        return fail(d, MTP_EPROTO);
      if (n > d->max_frame)
        return fail(d, MTP_ETOOBIG);
      d->_need = n;
      d->_have = 0;
      d->_hdr_have = 0;
      d->_state = DEC_WAIT_BODY;
      break;
    }
    case DEC_WAIT_BODY: {
      const uint8_t *body;
      if (d->_have == 0 && len - used >= d->_need) {
        /* The whole body is in the caller's input: unpack it in place, no copy. */
        body = in + used;
        used += d->_need;
      } else {
        if (d->_buf == NULL) {
          d->_buf = mtp_malloc(d->_need);
          if (d->_buf == NULL)
            return fail(d, MTP_ENOMEM);
        }
        size_t take = d->_need - d->_have;
        if (take > len - used)
          take = len - used;
        memcpy(d->_buf + d->_have, in + used, take);
        d->_have += take;
        used += take;
        if (d->_have < d->_need)
          break;
        body = d->_buf;
      }
      int rc = mtp_tunnel_unpack(body, d->_need, out);
      mtp_free(d->_buf);
      d->_buf = NULL;
      d->_have = 0;
      d->_need = 0;
      if (rc != MTP_OK)
        return fail(d, rc);
      d->_state = DEC_WAIT_HEADER;
      return (ssize_t)used;
    }
    default:
      return d->_err;
    }
  }
  if (d->_state == DEC_FAILED)
    return d->_err;
  return (ssize_t)used;
}

size_t mtp_tunnel_frame_size(const Mtp__Frame *f) {
  if (f == NULL || f->msg_case == MTP__FRAME__MSG__NOT_SET || mtp_tunnel_frame_check(f) != MTP_OK)
    return 0;
  size_t n = mtp__frame__get_packed_size(f);
  if (n == 0 || n > MTP_TUNNEL_MAX_FRAME)
    return 0;
  return MTP_TUNNEL_HDR_LEN + n;
}

ssize_t mtp_tunnel_encode(const Mtp__Frame *f, uint8_t *out, size_t cap) {
  if (f == NULL || f->msg_case == MTP__FRAME__MSG__NOT_SET || mtp_tunnel_frame_check(f) != MTP_OK)
    return MTP_EINVAL;
  size_t n = mtp__frame__get_packed_size(f);
  if (n > MTP_TUNNEL_MAX_FRAME)
    return MTP_ETOOBIG;
  if (cap < MTP_TUNNEL_HDR_LEN + n)
    return MTP_AGAIN;
  out[0] = (uint8_t)(n >> 24);
  out[1] = (uint8_t)(n >> 16);
  out[2] = (uint8_t)(n >> 8);
  out[3] = (uint8_t)n;
  size_t w = mtp__frame__pack(f, out + MTP_TUNNEL_HDR_LEN);
  return (ssize_t)(MTP_TUNNEL_HDR_LEN + w);
}

const char *mtp_tunnel_frame_name(const Mtp__Frame *f) {
  if (f == NULL)
    return "none";
  switch (f->msg_case) {
  case MTP__FRAME__MSG_HELLO: return "hello";
  case MTP__FRAME__MSG_OPEN: return "open";
  case MTP__FRAME__MSG_DATA: return "data";
  case MTP__FRAME__MSG_QUICKACK: return "quickack";
  case MTP__FRAME__MSG_CLOSE: return "close";
  case MTP__FRAME__MSG_CREDIT: return "credit";
  case MTP__FRAME__MSG_PING: return "ping";
  case MTP__FRAME__MSG_PONG: return "pong";
  default: return "unknown";
  }
}
