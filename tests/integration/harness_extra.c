/* harness_extra.c - see harness_extra.h. */
#include "harness_extra.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "err.h"
#include "rpc.h"
#include "banned.h"

int64_t hx_now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int hx_connect(uint16_t port, int timeout_ms) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0)
    return -1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
    if (errno != EINPROGRESS) {
      close(fd);
      return -1;
    }
    struct pollfd pf = {.fd = fd, .events = POLLOUT};
    int err = 0;
    socklen_t el = sizeof(err);
    if (poll(&pf, 1, timeout_ms) != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err != 0) {
      close(fd);
      return -1;
    }
  }
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  return fd;
}

int hx_write_all(int fd, const void *data, size_t len) {
  const uint8_t *p = data;
  while (len > 0) {
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return -1;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

uint16_t hx_local_port(int fd) {
  struct sockaddr_storage a;
  socklen_t l = sizeof(a);
  if (getsockname(fd, (struct sockaddr *)&a, &l) != 0)
    return 0;
  if (a.ss_family == AF_INET6)
    return ntohs(((struct sockaddr_in6 *)&a)->sin6_port);
  return ntohs(((struct sockaddr_in *)&a)->sin_port);
}

/* Reads until EOF/reset (0) or timeout (-1): *total counts every byte, the first cap go to buf. */
static int read_to_eof(int fd, int timeout_ms, uint8_t *buf, size_t cap, size_t *kept, size_t *total) {
  *kept = 0;
  *total = 0;
  int64_t deadline = hx_now_ms() + timeout_ms;
  uint8_t tmp[65536];
  for (;;) {
    int64_t left = deadline - hx_now_ms();
    if (left <= 0)
      return -1;
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    int r = poll(&pf, 1, (int)left);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return -1;
    ssize_t n = recv(fd, tmp, sizeof(tmp), MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
      continue;
    if (n <= 0)
      return 0; /* EOF or reset */
    size_t k = (size_t)n < cap - *kept ? (size_t)n : cap - *kept;
    if (k > 0)
      memcpy(buf + *kept, tmp, k);
    *kept += k;
    *total += (size_t)n;
  }
}

int hx_wait_eof(int fd, int timeout_ms, size_t *bytes) {
  size_t kept;
  return read_to_eof(fd, timeout_ms, NULL, 0, &kept, bytes);
}

int hx_read_until_eof(int fd, int timeout_ms, uint8_t *buf, size_t cap, size_t *len) {
  size_t total;
  return read_to_eof(fd, timeout_ms, buf, cap, len, &total);
}

int hx_http_raw(uint16_t port, const char *req, size_t len, size_t piece, int timeout_ms, char **resp) {
  *resp = NULL;
  int fd = hx_connect(port, timeout_ms);
  if (fd < 0)
    return -1;
  if (piece == 0)
    piece = len;
  for (size_t off = 0; off < len; off += piece) {
    size_t n = len - off < piece ? len - off : piece;
    if (hx_write_all(fd, req + off, n) != 0)
      break;
  }
  size_t cap = 1 << 16, got = 0;
  char *buf = mtp_malloc(cap);
  if (buf == NULL) {
    close(fd);
    return -1;
  }
  int64_t deadline = hx_now_ms() + timeout_ms;
  for (;;) {
    int64_t left = deadline - hx_now_ms();
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    if (left <= 0 || poll(&pf, 1, (int)left) <= 0)
      break;
    ssize_t r = read(fd, buf + got, cap - 1 - got);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0 || (got += (size_t)r) >= cap - 1)
      break;
  }
  close(fd);
  buf[got] = '\0';
  *resp = buf;
  if (got == 0)
    return -2;
  int st = -1;
  if (sscanf(buf, "HTTP/1.1 %d", &st) != 1)
    return -1;
  return st;
}

int hx_echo(struct tclient *c, size_t len, int timeout_ms, int64_t *elapsed_ms) {
  static uint8_t pkt[65536];
  if (len > sizeof(pkt))
    return MTP_EINVAL;
  tc_make_packet(pkt, len, true);
  int64_t t0 = hx_now_ms();
  *elapsed_ms = 0;
  int rc = tc_send(c, pkt, len, false);
  struct tc_msg m;
  if (rc == MTP_OK)
    rc = tc_recv(c, timeout_ms, &m);
  *elapsed_ms = hx_now_ms() - t0;
  if (rc == MTP_OK && !(m.kind == TC_PACKET && m.len == len && memcmp(m.data, pkt, len) == 0))
    rc = MTP_EPROTO;
  return rc;
}

int hx_first_echo(struct tclient *c, int timeout_ms, char *why, size_t whylen) {
  uint8_t pkt[72];
  tc_make_packet(pkt, sizeof(pkt), false);
  snprintf(why, whylen, "send");
  int rc = tc_send(c, pkt, sizeof(pkt), true);
  if (rc != MTP_OK)
    return rc;
  bool got_ack = false, got_echo = false;
  for (int i = 0; i < 3 && !got_echo; i++) {
    struct tc_msg m;
    rc = tc_recv(c, timeout_ms, &m);
    if (rc != MTP_OK) {
      snprintf(why, whylen, "recv: %s (ack %d, echo %d)", mtp_strerror(rc), got_ack, got_echo);
      return rc;
    }
    if (m.kind == TC_QUICKACK) {
      if (got_ack || (m.token | 0x80000000u) != fm_quickack_token(pkt, sizeof(pkt))) {
        snprintf(why, whylen, got_ack ? "a second quick ack" : "a quick ack with the wrong token");
        return MTP_EPROTO;
      }
      got_ack = true;
    } else {
      if (got_echo || m.len != sizeof(pkt) || memcmp(m.data, pkt, sizeof(pkt)) != 0) {
        snprintf(why, whylen, "a wrong echo (%zu bytes)", m.len);
        return MTP_EPROTO;
      }
      got_echo = true;
    }
  }
  if (!got_ack) {
    snprintf(why, whylen, "the echo came without a quick ack before it");
    return MTP_EPROTO;
  }
  snprintf(why, whylen, "ok");
  return MTP_OK;
}

const char *hx_check_first_rpc(const struct fm_conn_info *ci, enum mtp_proto proto, const uint8_t tag[16],
                               uint16_t proxy_port) {
  static const uint8_t v4mapped_lo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1};
  uint32_t framing = ci->flags & (MTP_RPC_FLAG_ABRIDGED | MTP_RPC_FLAG_INTERMEDIATE);
  if (!ci->has_ad_tag || memcmp(ci->ad_tag, tag, 16) != 0 || !(ci->flags & MTP_RPC_FLAG_HAS_AD_TAG))
    return "ad_tag";
  if (!(ci->flags & MTP_RPC_FLAG_QUICKACK))
    return "no QUICKACK flag";
  if (!(ci->flags & MTP_RPC_FLAG_NOT_ENCRYPTED))
    return "no NOT_ENCRYPTED flag";
  if (framing != (proto == MTP_PROTO_ABRIDGED ? MTP_RPC_FLAG_ABRIDGED : MTP_RPC_FLAG_INTERMEDIATE))
    return "framing flags";
  if (ci->proxy_port != proxy_port)
    return "proxy_port";
  if (memcmp(ci->client_ip, v4mapped_lo, 16) != 0)
    return "client_ip";
  if (memcmp(ci->proxy_ip, v4mapped_lo, 16) != 0)
    return "proxy_ip";
  if (ci->packets != 1)
    return "packets != 1";
  return NULL;
}

static int status_code(int st) { return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st); }

int hx_run(char *const argv[], int timeout_ms, char **out, int *exit_code) {
  *out = NULL;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0)
    return -1;
  pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return -1;
  }
  if (pid == 0) {
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0)
      dup2(devnull, 0);
    execv(argv[0], argv);
    _exit(127);
  }
  close(fds[1]);
  size_t len = 0, cap = 4096;
  char *buf = mtp_malloc(cap);
  int64_t deadline = hx_now_ms() + timeout_ms;
  bool timed_out = false;
  for (;;) {
    int64_t left = deadline - hx_now_ms();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    struct pollfd pf = {.fd = fds[0], .events = POLLIN};
    int r = poll(&pf, 1, (int)left);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      timed_out = true;
      break;
    }
    if (buf && cap - len < 1024) {
      char *nb = mtp_realloc(buf, cap * 2);
      if (nb) {
        buf = nb;
        cap *= 2;
      }
    }
    char tmp[1024];
    char *dst = (buf && cap - len > 1) ? buf + len : tmp;
    size_t room = (buf && cap - len > 1) ? cap - len - 1 : sizeof(tmp);
    ssize_t n = read(fds[0], dst, room);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    if (dst != tmp)
      len += (size_t)n;
  }
  close(fds[0]);
  int st = 0;
  int rc = 0;
  if (timed_out) {
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    rc = -1;
  } else {
    /* Output closed: the process is exiting; bound the wait anyway. */
    int64_t dl = hx_now_ms() + 5000;
    pid_t w;
    struct timespec step = {0, 5 * 1000000L};
    while ((w = waitpid(pid, &st, WNOHANG)) == 0 && hx_now_ms() < dl)
      nanosleep(&step, NULL);
    if (w != pid) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
      rc = -1;
    }
  }
  *exit_code = status_code(st);
  if (buf)
    buf[len] = '\0';
  *out = buf;
  return rc;
}

int hx_run_cmd(const char *bin, const char *sub, char *const args[], int timeout_ms, char **out, int *exit_code) {
  char *argv[64];
  size_t n = 0;
  argv[n++] = (char *)bin;
  if (sub != NULL)
    argv[n++] = (char *)sub;
  for (size_t i = 0; args[i] != NULL && n < 63; i++)
    argv[n++] = args[i];
  argv[n] = NULL;
  return hx_run(argv, timeout_ms, out, exit_code);
}

int hx_signal_wait(struct h_proc *p, int sig, int timeout_ms) {
  if (p->pid <= 0)
    return p->exit_status;
  if (kill(p->pid, sig) != 0)
    return -1;
  int64_t dl = hx_now_ms() + timeout_ms;
  struct timespec step = {0, 5 * 1000000L};
  for (;;) {
    int st = 0;
    pid_t w = waitpid(p->pid, &st, WNOHANG);
    if (w == p->pid) {
      p->exit_status = status_code(st);
      p->pid = -1;
      return p->exit_status;
    }
    if (w < 0 && errno != EINTR)
      return -1;
    if (hx_now_ms() >= dl)
      return -1;
    nanosleep(&step, NULL);
  }
}

long hx_vmrss_kb(pid_t pid) {
  char path[64], line[256];
  snprintf(path, sizeof(path), "/proc/%ld/status", (long)pid);
  FILE *f = fopen(path, "r");
  if (!f)
    return -1;
  long kb = -1;
  while (fgets(line, sizeof(line), f)) {
    if (!strncmp(line, "VmRSS:", 6)) {
      kb = strtol(line + 6, NULL, 10);
      break;
    }
  }
  fclose(f);
  return kb;
}

int hx_scrape(uint16_t admin, const char *series, double *value) {
  char *body = NULL;
  int st = h_http_get(admin, "/metrics", &body, 5000);
  int rc = -1;
  if (st == 200 && body)
    rc = h_metric(body, series, value);
  mtp_free(body);
  return rc;
}

/* ---- tiny HTTP server ---- */

struct hx_route {
  char path[128];
  uint8_t *body; /* owns */
  size_t len;
};

struct hx_http {
  int lfd;
  int stop_pipe[2];
  pthread_t thread;
  pthread_mutex_t mu;
  struct hx_route routes[8];
  size_t nroutes;
  bool fail_all;
  unsigned requests, ok;
};

static void http_answer(struct hx_http *h, int fd) {
  char req[4096];
  size_t len = 0;
  int64_t dl = hx_now_ms() + 3000;
  while (len < sizeof(req) - 1) {
    int64_t left = dl - hx_now_ms();
    if (left <= 0)
      return;
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    if (poll(&pf, 1, (int)left) <= 0)
      return;
    ssize_t n = recv(fd, req + len, sizeof(req) - 1 - len, 0);
    if (n <= 0)
      return;
    len += (size_t)n;
    req[len] = '\0';
    if (strstr(req, "\r\n\r\n"))
      break;
  }
  char path[128] = "";
  if (sscanf(req, "GET %127s ", path) != 1)
    path[0] = '\0';
  pthread_mutex_lock(&h->mu);
  h->requests++;
  int code = 404;
  uint8_t *body = NULL;
  size_t blen = 0;
  if (h->fail_all) {
    code = 500;
  } else {
    for (size_t i = 0; i < h->nroutes; i++) {
      if (!strcmp(h->routes[i].path, path)) {
        code = 200;
        body = mtp_malloc(h->routes[i].len ? h->routes[i].len : 1);
        if (body) {
          memcpy(body, h->routes[i].body, h->routes[i].len);
          blen = h->routes[i].len;
        }
        break;
      }
    }
  }
  if (code == 200)
    h->ok++;
  pthread_mutex_unlock(&h->mu);
  static const char err_body[] = "error\n";
  if (code != 200) {
    body = NULL;
    blen = sizeof(err_body) - 1;
  }
  char hdr[256];
  int hl = snprintf(hdr, sizeof(hdr),
                    "HTTP/1.0 %d %s\r\nContent-Type: application/octet-stream\r\nContent-Length: %zu\r\n"
                    "Connection: close\r\n\r\n",
                    code, code == 200 ? "OK" : code == 404 ? "Not Found" : "Internal Server Error", blen);
  if (hx_write_all(fd, hdr, (size_t)hl) == 0)
    (void)hx_write_all(fd, body ? (const void *)body : err_body, blen);
  mtp_free(body);
}

static void *http_main(void *arg) {
  struct hx_http *h = arg;
  for (;;) {
    struct pollfd pf[2] = {{.fd = h->lfd, .events = POLLIN}, {.fd = h->stop_pipe[0], .events = POLLIN}};
    int r = poll(pf, 2, -1);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0 || (pf[1].revents & (POLLIN | POLLHUP)))
      return NULL;
    if (pf[0].revents & POLLIN) {
      int fd = accept4(h->lfd, NULL, NULL, SOCK_CLOEXEC);
      if (fd < 0)
        continue;
      http_answer(h, fd);
      shutdown(fd, SHUT_WR);
      close(fd);
    }
  }
}

int hx_http_start(struct hx_http **out) {
  *out = NULL;
  struct hx_http *h = mtp_calloc(1, sizeof(*h));
  if (!h)
    return -1;
  h->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t al = sizeof(a);
  if (h->lfd < 0 || bind(h->lfd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(h->lfd, 16) != 0 ||
      getsockname(h->lfd, (struct sockaddr *)&a, &al) != 0 || pipe2(h->stop_pipe, O_CLOEXEC) != 0) {
    if (h->lfd >= 0)
      close(h->lfd);
    mtp_free(h);
    return -1;
  }
  pthread_mutex_init(&h->mu, NULL);
  if (pthread_create(&h->thread, NULL, http_main, h) != 0) {
    close(h->lfd);
    close(h->stop_pipe[0]);
    close(h->stop_pipe[1]);
    pthread_mutex_destroy(&h->mu);
    mtp_free(h);
    return -1;
  }
  *out = h;
  return ntohs(a.sin_port);
}

int hx_http_set(struct hx_http *h, const char *path, const void *body, size_t len) {
  pthread_mutex_lock(&h->mu);
  struct hx_route *r = NULL;
  for (size_t i = 0; i < h->nroutes; i++)
    if (!strcmp(h->routes[i].path, path))
      r = &h->routes[i];
  if (!r && h->nroutes < sizeof(h->routes) / sizeof(h->routes[0]))
    r = &h->routes[h->nroutes++];
  int rc = -1;
  uint8_t *copy = mtp_malloc(len ? len : 1);
  if (r && copy && strlen(path) < sizeof(r->path)) {
    memcpy(copy, body, len);
    mtp_free(r->body);
    snprintf(r->path, sizeof(r->path), "%s", path);
    r->body = copy;
    r->len = len;
    copy = NULL;
    rc = 0;
  }
  mtp_free(copy);
  pthread_mutex_unlock(&h->mu);
  return rc;
}

void hx_http_fail_all(struct hx_http *h, bool on) {
  pthread_mutex_lock(&h->mu);
  h->fail_all = on;
  pthread_mutex_unlock(&h->mu);
}

unsigned hx_http_requests(struct hx_http *h, unsigned *ok) {
  pthread_mutex_lock(&h->mu);
  unsigned n = h->requests;
  if (ok)
    *ok = h->ok;
  pthread_mutex_unlock(&h->mu);
  return n;
}

void hx_http_free(struct hx_http *h) {
  if (!h)
    return;
  if (write(h->stop_pipe[1], "x", 1) < 0) {
    /* closing the write end below also wakes the thread (POLLHUP) */
  }
  close(h->stop_pipe[1]);
  pthread_join(h->thread, NULL);
  close(h->stop_pipe[0]);
  close(h->lfd);
  for (size_t i = 0; i < h->nroutes; i++)
    mtp_free(h->routes[i].body);
  pthread_mutex_destroy(&h->mu);
  mtp_free(h);
}
