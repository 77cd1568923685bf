/*
 * link_front.h - a fake front of a link (shared/link.h) for the unit tests of link
 * implementations (test_back_worker, test_tunnel_link): it counts what the link delivers and
 * keeps the head of the last packet and the last quick-ack token. A delivery after on_close
 * fails the test on the spot (CHECK).
 *
 * Header-only, like check.h, because it checks with the test's own CHECK: include it after
 * "check.h". A test that needs more embeds struct lf_front as the FIRST member of its own front
 * (the link hands the callbacks that pointer) and sets the hooks.
 *
 *   struct lf_front f = {.link = link};
 *   f.stream = link->open(link, &req, &f, &lf_ops, &err);
 */
#ifndef MTP_TESTS_LINK_FRONT_H
#define MTP_TESTS_LINK_FRONT_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#include "link.h"

struct lf_front {
  struct mtp_link *link; /* borrows: the link the stream is on */
  void *stream;          /* the link's stream; NULL once closed (by the link, or from on_packet) */
  int packets, quickacks, closes, writables;
  int close_reason;
  uint32_t last_token;
  size_t bytes;          /* packet bytes delivered */
  uint8_t last[64];      /* the head of the last packet */
  size_t last_len;
  bool close_in_packet;  /* closes the stream from inside on_packet (the link's re-entrancy) */
  /* Optional, called after the counting. */
  void (*packet_hook)(struct lf_front *f, const uint8_t *data, size_t len);
  void (*writable_hook)(struct lf_front *f);
};

static void lf_on_packet(void *front, const uint8_t *data, size_t len) {
  struct lf_front *f = front;
  CHECK(f->closes == 0);
  f->packets++;
  f->bytes += len;
  f->last_len = len < sizeof(f->last) ? len : sizeof(f->last);
  memcpy(f->last, data, f->last_len);
  if (f->close_in_packet && f->stream != NULL) {
    f->link->close(f->link, f->stream);
    f->stream = NULL;
  }
  if (f->packet_hook != NULL)
    f->packet_hook(f, data, len);
}

static void lf_on_quickack(void *front, uint32_t token) {
  struct lf_front *f = front;
  f->quickacks++;
  f->last_token = token;
}

static void lf_on_close(void *front, int reason) {
  struct lf_front *f = front;
  CHECK(f->closes == 0);
  f->closes++;
  f->close_reason = reason;
  f->stream = NULL;
}

static void lf_on_writable(void *front) {
  struct lf_front *f = front;
  f->writables++;
  if (f->writable_hook != NULL)
    f->writable_hook(f);
}

static const struct mtp_link_front_ops lf_ops = {lf_on_packet, lf_on_quickack, lf_on_close, lf_on_writable};

/* An open request as a front session makes it: intermediate framing, the client 10.1.2.3 at
 * client_port, listener "l0" on 192.0.2.7:443, ad_tag a0 a1 .. af. */
static inline void lf_make_open(struct mtp_link_open *o, int dc, uint16_t client_port) {
  memset(o, 0, sizeof(*o));
  o->dc = dc;
  o->proto = MTP_PROTO_INTERMEDIATE;
  struct sockaddr_in *c = (struct sockaddr_in *)&o->client_addr;
  c->sin_family = AF_INET;
  c->sin_port = htons(client_port);
  inet_pton(AF_INET, "10.1.2.3", &c->sin_addr);
  struct sockaddr_in *l = (struct sockaddr_in *)&o->local_addr;
  l->sin_family = AF_INET;
  l->sin_port = htons(443);
  inet_pton(AF_INET, "192.0.2.7", &l->sin_addr);
  o->listener = "l0";
  o->has_ad_tag = true;
  for (int i = 0; i < 16; i++)
    o->ad_tag[i] = (uint8_t)(0xa0 + i);
}

#endif
