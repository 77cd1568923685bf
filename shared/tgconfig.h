/*
 * tgconfig.h - Telegram's middle-proxy list (getProxyConfig):
 *   # comment
 *   proxy_for DC IP:PORT;        (DC may be negative; several lines per DC; IPv6 as [addr]:port)
 *   default DC;
 * Parsed strictly: anything else, an empty list, or a bad address is an error that names the
 * line. Pure: no I/O.
 */
#ifndef MTP_TGCONFIG_H
#define MTP_TGCONFIG_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct mtp_tg_addr {
  int dc;
  struct sockaddr_storage addr; /* AF_INET or AF_INET6 with the port set */
};

struct mtp_tgconfig {
  struct mtp_tg_addr *addrs; /* owns */
  size_t naddrs;
  int default_dc;
  bool has_default;
};

/* Parses text into cfg (which it initialises). Returns MTP_OK, or MTP_EPROTO with a message
 * naming the line in err. cfg needs mtp_tgconfig_free only on success. */
int mtp_tgconfig_parse(const char *text, size_t len, struct mtp_tgconfig *cfg, char *err, size_t errlen);
void mtp_tgconfig_free(struct mtp_tgconfig *cfg);

/* Addresses for dc: fills out with up to max pointers into cfg, returns how many. When dc has
 * none, uses the default DC (and then *used_default is set), else returns 0. */
size_t mtp_tgconfig_lookup(const struct mtp_tgconfig *cfg, int dc, const struct mtp_tg_addr **out, size_t max,
                           bool *used_default);

#endif
