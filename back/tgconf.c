/*
 * tgconf.c - see tgconf.h. Blocking helpers for the threadpool: libcurl downloads, file reads,
 * validation, snapshot building and the atomic cache writes.
 */
#include "tgconf.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"

#include "banned.h"

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

bool mtp_tgconf_is_url(const char *src) {
  return strncasecmp(src, "http://", 7) == 0 || strncasecmp(src, "https://", 8) == 0;
}

static const char *errno_str(int e, char *buf, size_t n) { return strerror_r(e, buf, n); }

/* ---- download ---- */

struct dl {
  uint8_t *buf;
  size_t len, cap;
  bool too_big, nomem;
  const atomic_bool *cancel;
};

static size_t on_curl_data(char *p, size_t size, size_t nmemb, void *ud) {
  struct dl *d = ud;
  size_t n = size * nmemb;
  if (n > MTP_TGCONF_MAX_SIZE || d->len + n > MTP_TGCONF_MAX_SIZE) {
    d->too_big = true;
    return 0;
  }
  if (d->len + n + 1 > d->cap) {
    size_t cap = d->cap ? d->cap : 4096;
    while (cap < d->len + n + 1)
      cap *= 2;
    uint8_t *nb = mtp_realloc(d->buf, cap);
    if (nb == NULL) {
      d->nomem = true;
      return 0;
    }
    d->buf = nb;
    d->cap = cap;
  }
  memcpy(d->buf + d->len, p, n);
  d->len += n;
  return n;
}

static int on_curl_progress(void *ud, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un) {
  const struct dl *d = ud;
  return d->cancel != NULL && atomic_load(d->cancel) ? 1 : 0;
}

static int read_url(const char *url, uint8_t **out, size_t *len, const atomic_bool *cancel, char *err,
                    size_t errlen) {
  pthread_once(&curl_once, curl_init_once);
  struct dl d = {.cancel = cancel};
  char ebuf[CURL_ERROR_SIZE] = "";
  CURL *c = curl_easy_init();
  if (c == NULL) {
    snprintf(err, errlen, "curl_easy_init failed");
    return MTP_ENOMEM;
  }
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, 5L);
#if LIBCURL_VERSION_NUM >= 0x075500
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#endif
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
  curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
  curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L);
  curl_easy_setopt(c, CURLOPT_USERAGENT, "mtproxy");
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, ebuf);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_curl_data);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &d);
  curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_curl_progress);
  curl_easy_setopt(c, CURLOPT_XFERINFODATA, &d);
  CURLcode cc = curl_easy_perform(c);
  long code = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
  curl_easy_cleanup(c);
  int rc = MTP_OK;
  if (d.too_big) {
    snprintf(err, errlen, "answer larger than %u bytes", MTP_TGCONF_MAX_SIZE);
    rc = MTP_ETOOBIG;
  } else if (d.nomem) {
    snprintf(err, errlen, "out of memory");
    rc = MTP_ENOMEM;
  } else if (cc == CURLE_HTTP_RETURNED_ERROR) {
    snprintf(err, errlen, "HTTP status %ld", code);
    rc = MTP_EIO;
  } else if (cc != CURLE_OK) {
    snprintf(err, errlen, "%s", ebuf[0] ? ebuf : curl_easy_strerror(cc));
    rc = MTP_EIO;
  } else if (d.len == 0) {
    snprintf(err, errlen, "empty answer (HTTP status %ld)", code);
    rc = MTP_EIO;
  }
  if (rc < 0) {
    mtp_free(d.buf);
    return rc;
  }
  d.buf[d.len] = 0;
  *out = d.buf;
  *len = d.len;
  return MTP_OK;
}

/* ---- files ---- */

static int read_file(const char *path, uint8_t **out, size_t *len, char *err, size_t errlen) {
  char eb[128];
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    snprintf(err, errlen, "cannot open: %s", errno_str(errno, eb, sizeof(eb)));
    return MTP_EIO;
  }
  struct stat st;
  if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
    snprintf(err, errlen, "not a regular file");
    close(fd);
    return MTP_EIO;
  }
  if (st.st_size > (off_t)MTP_TGCONF_MAX_SIZE) {
    snprintf(err, errlen, "file larger than %u bytes", MTP_TGCONF_MAX_SIZE);
    close(fd);
    return MTP_ETOOBIG;
  }
  size_t cap = (size_t)st.st_size + 1;
  uint8_t *buf = mtp_malloc(cap);
  if (buf == NULL) {
    close(fd);
    snprintf(err, errlen, "out of memory");
    return MTP_ENOMEM;
  }
  size_t n = 0;
  for (;;) {
    if (n + 1 >= cap) { /* the file grew since fstat: bounded by the size cap */
      if (cap > MTP_TGCONF_MAX_SIZE) {
        mtp_free(buf);
        close(fd);
        snprintf(err, errlen, "file larger than %u bytes", MTP_TGCONF_MAX_SIZE);
        return MTP_ETOOBIG;
      }
      uint8_t *nb = mtp_realloc(buf, cap * 2);
      if (nb == NULL) {
        mtp_free(buf);
        close(fd);
        snprintf(err, errlen, "out of memory");
        return MTP_ENOMEM;
      }
      buf = nb;
      cap *= 2;
    }
    ssize_t r = read(fd, buf + n, cap - 1 - n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      snprintf(err, errlen, "read failed: %s", errno_str(errno, eb, sizeof(eb)));
      mtp_free(buf);
      close(fd);
      return MTP_EIO;
    }
    if (r == 0)
      break;
    n += (size_t)r;
  }
  close(fd);
  if (n == 0) {
    snprintf(err, errlen, "file is empty");
    mtp_free(buf);
    return MTP_EIO;
  }
  if (n > MTP_TGCONF_MAX_SIZE) {
    snprintf(err, errlen, "file larger than %u bytes", MTP_TGCONF_MAX_SIZE);
    mtp_free(buf);
    return MTP_ETOOBIG;
  }
  buf[n] = 0;
  *out = buf;
  *len = n;
  return MTP_OK;
}

int mtp_tgconf_read_source(const char *src, uint8_t **out, size_t *len, const atomic_bool *cancel, char *err,
                           size_t errlen) {
  *out = NULL;
  *len = 0;
  if (src == NULL || src[0] == 0) {
    snprintf(err, errlen, "no source configured");
    return MTP_EINVAL;
  }
  if (mtp_tgconf_is_url(src))
    return read_url(src, out, len, cancel, err, errlen);
  return read_file(src, out, len, err, errlen);
}

/* ---- validation and snapshots ---- */

int mtp_tgconf_check_secret(size_t secret_len, char *err, size_t errlen) {
  if (secret_len < MTP_TGCONF_MIN_SECRET) {
    snprintf(err, errlen, "proxy secret is %zu bytes, expected at least %d", secret_len, MTP_TGCONF_MIN_SECRET);
    return MTP_EPROTO;
  }
  return MTP_OK;
}

int mtp_tgconf_build(const uint8_t *secret, size_t secret_len, const uint8_t *conf, size_t conf_len,
                     struct mtp_tg_snapshot **out, char *err, size_t errlen) {
  *out = NULL;
  int rc = mtp_tgconf_check_secret(secret_len, err, errlen);
  if (rc < 0)
    return rc;
  struct mtp_tg_snapshot *s = mtp_calloc(1, sizeof(*s));
  if (s == NULL) {
    snprintf(err, errlen, "out of memory");
    return MTP_ENOMEM;
  }
  s->secret = mtp_malloc(secret_len);
  if (s->secret == NULL) {
    mtp_free(s);
    snprintf(err, errlen, "out of memory");
    return MTP_ENOMEM;
  }
  memcpy(s->secret, secret, secret_len);
  s->secret_len = secret_len;
  char perr[200] = "";
  rc = mtp_tgconfig_parse((const char *)conf, conf_len, &s->cfg, perr, sizeof(perr));
  if (rc < 0) {
    snprintf(err, errlen, "bad proxy config: %s", perr[0] ? perr : mtp_strerror(rc));
    mtp_wipe(s->secret, s->secret_len);
    mtp_free(s->secret);
    mtp_free(s);
    return rc == MTP_ENOMEM ? rc : MTP_EPROTO;
  }
  atomic_init(&s->_refs, 1);
  *out = s;
  return MTP_OK;
}

void mtp_tg_snapshot_release(struct mtp_tg_snapshot *s) {
  if (s == NULL)
    return;
  if (atomic_fetch_sub(&s->_refs, 1) != 1)
    return;
  mtp_tgconfig_free(&s->cfg);
  mtp_wipe(s->secret, s->secret_len);
  mtp_free(s->secret);
  s->secret = NULL;
  mtp_free(s);
}

/* ---- cache ---- */

static int join_path(char *out, size_t n, const char *dir, const char *name, const char *suffix) {
  int w = snprintf(out, n, "%s/%s%s", dir, name, suffix);
  return (w < 0 || (size_t)w >= n) ? MTP_EINVAL : MTP_OK;
}

int mtp_tgconf_cache_write(const char *dir, const char *name, const uint8_t *data, size_t len, char *err,
                           size_t errlen) {
  char eb[128], path[4096], tmp[4096], suffix[32];
  snprintf(suffix, sizeof(suffix), ".tmp.%ld", (long)getpid());
  if (join_path(path, sizeof(path), dir, name, "") < 0 || join_path(tmp, sizeof(tmp), dir, name, suffix) < 0) {
    snprintf(err, errlen, "cache path too long");
    return MTP_EIO;
  }
  if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
    snprintf(err, errlen, "cannot create %s: %s", dir, errno_str(errno, eb, sizeof(eb)));
    return MTP_EIO;
  }
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    snprintf(err, errlen, "cannot create %s: %s", tmp, errno_str(errno, eb, sizeof(eb)));
    return MTP_EIO;
  }
  (void)fchmod(fd, 0644); /* whatever the umask */
  size_t off = 0;
  while (off < len) {
    ssize_t w = write(fd, data + off, len - off);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0) {
      snprintf(err, errlen, "cannot write %s: %s", tmp, errno_str(errno, eb, sizeof(eb)));
      close(fd);
      unlink(tmp);
      return MTP_EIO;
    }
    off += (size_t)w;
  }
  if (fsync(fd) < 0 || close(fd) < 0) {
    snprintf(err, errlen, "cannot write %s: %s", tmp, errno_str(errno, eb, sizeof(eb)));
    unlink(tmp);
    return MTP_EIO;
  }
  if (rename(tmp, path) < 0) {
    snprintf(err, errlen, "cannot rename to %s: %s", path, errno_str(errno, eb, sizeof(eb)));
    unlink(tmp);
    return MTP_EIO;
  }
  return MTP_OK;
}

int mtp_tgconf_cache_read(const char *dir, const char *name, uint8_t **out, size_t *len, char *err,
                          size_t errlen) {
  char path[4096];
  *out = NULL;
  *len = 0;
  if (join_path(path, sizeof(path), dir, name, "") < 0) {
    snprintf(err, errlen, "cache path too long");
    return MTP_EIO;
  }
  return read_file(path, out, len, err, errlen);
}

int mtp_tgconf_cache_mtime(const char *dir, const char *name, int64_t *mtime) {
  char path[4096];
  struct stat st;
  *mtime = 0;
  if (join_path(path, sizeof(path), dir, name, "") < 0 || stat(path, &st) < 0)
    return MTP_EIO;
  *mtime = (int64_t)st.st_mtime;
  return MTP_OK;
}

void mtp_tgconf_redact_source(const char *src, char *out, size_t outlen) {
  if (outlen == 0)
    return;
  out[0] = 0;
  if (src == NULL)
    return;
  if (!mtp_tgconf_is_url(src)) {
    snprintf(out, outlen, "%s", src);
    return;
  }
  const char *auth = strstr(src, "://") + 3;
  size_t auth_len = strcspn(auth, "/?#");
  /* userinfo ends at the last '@' of the authority */
  const char *host = auth;
  for (size_t i = 0; i < auth_len; i++)
    if (auth[i] == '@')
      host = auth + i + 1;
  size_t rest_len = strcspn(host, "?#");
  snprintf(out, outlen, "%.*s%.*s", (int)(auth - src), src, (int)rest_len, host);
}
