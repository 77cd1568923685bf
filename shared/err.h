/*
 * err.h - the one error vocabulary of mtproxy.
 *
 * Every function that can fail returns an int status: MTP_OK (0) or a negative code.
 * libuv's codes (negative errno values) pass through unchanged; our own codes live far
 * below them (-10000 and lower) so the two never collide. mtp_strerror() names both.
 * Codecs return bytes consumed (>= 0) or one of these negatives.
 */
#ifndef MTP_ERR_H
#define MTP_ERR_H

#define MTP_ERRNO_MAP(XX)                                                   \
  XX(AGAIN, -10001, "need more input")                                      \
  XX(EPROTO, -10002, "malformed input")                                     \
  XX(ETOOBIG, -10003, "packet too large")                                   \
  XX(ENOMEM, -10004, "out of memory")                                       \
  XX(EBADSECRET, -10005, "no secret matches")                               \
  XX(EDISABLED, -10006, "protocol not allowed on this listener")            \
  XX(ECRC, -10007, "checksum mismatch")                                     \
  XX(ESEQ, -10008, "sequence number mismatch")                              \
  XX(EINVAL, -10009, "invalid argument")                                    \
  XX(EIO, -10010, "input/output error")                                     \
  XX(ECLOSED, -10011, "connection closed")                                  \
  XX(ETIMEDOUT, -10012, "timed out")                                        \
  XX(ENODC, -10013, "no middle proxy for this DC")                          \
  XX(EBACKPRESSURE, -10014, "send budget exceeded")                         \
  XX(EHANDSHAKE, -10015, "handshake rejected by peer")                      \
  XX(ENOCONFIG, -10016, "no Telegram config loaded yet")                    \
  XX(EPOLICY, -10017, "rejected by policy")                                 \
  XX(ELOOP, -10018, "target is the proxy itself")                           \
  XX(ELINKDOWN, -10019, "tunnel to the back is down")                       \
  XX(EEXIST, -10020, "already exists")                                      \
  XX(ENOTFOUND, -10021, "not found")

enum mtp_err {
  MTP_OK = 0,
#define XX(name, val, str) MTP_##name = (val),
  MTP_ERRNO_MAP(XX)
#undef XX
};

/* Returns a static string describing err (ours or libuv's). Never NULL. */
const char *mtp_strerror(int err);


#endif
