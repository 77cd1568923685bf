/*
 * link.h - the seam between front and back (see docs/architecture.md).
 *
 * The front terminates the client's transport and hands MTProto packets to the back through
 * a struct mtp_link. The back answers through the struct mtp_link_front_ops the front gave at
 * open. Two implementations: the local link (back/link_local.c; direct calls on the same loop,
 * no copies) and the remote link (mutual-TLS tunnel, split mode).
 *
 * Rules both sides keep:
 * - open() never calls the front's ops synchronously.
 * - The front may call close() from inside any of its ops; the stream is gone at once from the
 *   front's point of view (no more ops for it) and the back frees it when safe.
 * - After on_close() the back never touches that front stream again and the front must not
 *   call send()/close() on the stream handle.
 * - All calls happen on the loop thread that opened the stream.
 */
#ifndef MTP_LINK_H
#define MTP_LINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "obf2.h"

struct mtp_link_open {
  int dc;                               /* as the client asked: negative = media DC */
  enum mtp_proto proto;                 /* client's framing: RPC flags depend on it */
  struct sockaddr_storage client_addr;  /* the client's address and port */
  struct sockaddr_storage local_addr;   /* the proxy address the client connected to */
  const char *listener;                 /* borrows: listener name, for logs and metrics */
  bool has_ad_tag;
  uint8_t ad_tag[16];
};

/* Why a stream was closed by the back (for logs and metrics). */
enum mtp_link_close_reason {
  MTP_LINK_CLOSE_NORMAL = 0,     /* Telegram closed the client (RPC_CLOSE_EXT) */
  MTP_LINK_CLOSE_UPSTREAM = 1,   /* the DC connection failed with the client's packet in flight */
  MTP_LINK_CLOSE_NO_DC = 2,      /* no middle proxy could be reached for the DC */
  MTP_LINK_CLOSE_SHUTDOWN = 3,   /* the process is stopping */
  MTP_LINK_CLOSE_LINK_DOWN = 4,  /* the tunnel to the back dropped (split mode) */
  MTP_LINK_CLOSE_BACKPRESSURE = 5, /* split mode: the back buffered a whole window for a client
                                    * that was not reading (MTP_TUNNEL_CLOSE_BACKPRESSURE) */
};

/* What the back delivers to a front stream. `front` is the pointer given at open. */
struct mtp_link_front_ops {
  /* A packet from Telegram for the client. data is borrowed for the call only. */
  void (*on_packet)(void *front, const uint8_t *data, size_t len);
  /* Telegram acknowledged a packet sent with quickack: send the token to the client. */
  void (*on_quickack)(void *front, uint32_t token);
  /* The stream is gone (see the reason); the front closes its client. */
  void (*on_close)(void *front, int reason);
  /* The back can take data again after send() returned MTP_LINK_FULL. */
  void (*on_writable)(void *front);
};

/* send() result: taken, but the back's buffers for this stream are above the high-water mark;
 * the front should stop reading its client until on_writable. */
#define MTP_LINK_FULL 1

struct mtp_link {
  /* Opens a stream for a client whose handshake is done. Returns an opaque stream handle, or
   * NULL with *err set (e.g. MTP_ENOCONFIG, MTP_ENOMEM). */
  void *(*open)(struct mtp_link *link, const struct mtp_link_open *req, void *front,
                const struct mtp_link_front_ops *ops, int *err);
  /* Sends one client packet (copied or consumed before returning). Returns MTP_OK,
   * MTP_LINK_FULL (taken; pause the client), or a negative error (the stream is unusable;
   * the front closes it with close()). */
  int (*send)(struct mtp_link *link, void *stream, const uint8_t *data, size_t len, bool quickack);
  /* The client went away: releases the stream (the back tells Telegram). No ops after. */
  void (*close)(struct mtp_link *link, void *stream);
  void *impl; /* the implementation's context */
};

#endif
