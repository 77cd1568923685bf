/*
 * mtp_bench - load and memory benchmark for the mtproxy binary.
 *
 *   mtp_bench [--mtproxy PATH] [--front PATH --back PATH] [--workers W] [--clients N]
 *             [--size BYTES] [--seconds S] [--proto abridged|intermediate|secure]
 *             [--inflight K] [--idle N] [--dc DC]
 *
 * With --mtproxy the bench measures the single-process proxy; with --front and --back
 * (mtproxy-front, mtproxy-back) it measures split mode: certificates from `mtproxy-back certs`,
 * the back on 127.0.0.1 in front of the fake, the front dialing it with the same --workers,
 * clients through the front once every front worker's tunnel is up (the front's
 * mtproxy_tunnel_connections). With all three, the same run is made against both setups in one
 * invocation (a fresh fake middle proxy each) and a "split vs single" summary follows.
 *
 * The bench runs the test suite's fake Telegram middle proxy in-process (fake_middle.h),
 * spawns the real mtproxy pointed at it (random client secret, random proxy secret), waits
 * for its "listener l0 listening on 127.0.0.1:PORT" log line, and then drives it from one
 * epoll loop in this process:
 *
 *   load mode (default): N clients each complete the obfuscated2 handshake and one warm-up
 *     echo, then keep K packets of BYTES in flight for S seconds (client -> mtproxy -> fake
 *     middle -> mtproxy -> client). Answers come back in order per client, so each answer
 *     is matched with the oldest send timestamp of its client. Reports payload MB/s (one
 *     direction, 1 MB = 10^6 bytes), packets/s, p50/p99/max round trip, errors, and the
 *     proxy's CPU use during the window (utime+stime from /proc/PID/stat).
 *
 *   idle mode (--idle N): one warm-up client, then VmRSS of mtproxy (/proc/PID/status);
 *     then N more clients that each complete the handshake and one echo (so each has its
 *     back stream), VmRSS again; bytes per idle connection = delta / N. Then all clients
 *     close and, once the fake has seen their RPC_CLOSE_CONN, VmRSS a third time.
 *
 * Client sockets are non-blocking; at most OPEN_BATCH clients are between connect() and
 * their first echo at a time, so the proxy's accept queue never overflows (dropped SYNs
 * would add 1 s retransmits to the numbers). The soft RLIMIT_NOFILE is raised to the hard
 * limit before mtproxy is spawned, so the proxy inherits it.
 *
 * Synchronisation is by events only: the proxy's stderr goes to a file watched with inotify
 * (poll() with short timeouts, re-reading the file), its exit is awaited through a pidfd,
 * and every wait has a deadline. The one poll: in split mode, the front's tunnel gauge is
 * scraped every 20 ms until every worker's tunnel is up (bounded by PROXY_START_MS).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "fake_middle.h"
#include "framing.h"
#include "obf2.h"
#include "tclient.h"
#include "banned.h"

extern char **environ;

#define OPEN_BATCH 256          /* clients between connect() and first echo at a time */
#define READ_CHUNK (256 * 1024) /* one read() */
#define READS_PER_EVENT 16      /* bound the work per wakeup */
#define PROXY_START_MS 30000    /* mtproxy waits for its Telegram config before listening */
#define PROXY_STOP_MS 10000
#define MAX_SAMPLES (64u * 1024 * 1024)

/* ---- options ---- */

struct opts {
  const char *mtproxy;
  const char *front; /* split mode: mtproxy-front and mtproxy-back, both or neither */
  const char *back;
  int workers;
  int clients;
  size_t size;
  double seconds;
  enum mtp_proto proto;
  int inflight;
  int idle; /* 0 = load mode */
  int dc;
};

static void usage(FILE *f) {
  fputs("usage: mtp_bench [--mtproxy PATH] [--front PATH --back PATH] [--workers W] [--clients N]\n"
        "                 [--size BYTES] [--seconds S] [--proto abridged|intermediate|secure]\n"
        "                 [--inflight K] [--idle N] [--dc DC]\n"
        "defaults: --workers 1 --clients 100 --size 1024 --seconds 10 --proto intermediate\n"
        "          --inflight 1 --dc 2; --idle N measures the proxy's RSS per idle client instead.\n"
        "--mtproxy runs the single-process proxy; --front/--back (mtproxy-front, mtproxy-back) run\n"
        "split mode over the TLS tunnel; with all three, the same run is made against both.\n",
        f);
}

static bool parse_long(const char *s, long lo, long hi, long *out) {
  char *end = NULL;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
    return false;
  *out = v;
  return true;
}

static int parse_opts(int argc, char **argv, struct opts *o) {
  memset(o, 0, sizeof(*o));
  o->workers = 1;
  o->clients = 100;
  o->size = 1024;
  o->seconds = 10;
  o->proto = MTP_PROTO_INTERMEDIATE;
  o->inflight = 1;
  o->dc = 2;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      exit(0);
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "mtp_bench: %s needs a value\n", a);
      return -1;
    }
    const char *v = argv[++i];
    long n;
    if (!strcmp(a, "--mtproxy")) {
      o->mtproxy = v;
    } else if (!strcmp(a, "--front")) {
      o->front = v;
    } else if (!strcmp(a, "--back")) {
      o->back = v;
    } else if (!strcmp(a, "--workers") && parse_long(v, 1, 64, &n)) {
      o->workers = (int)n;
    } else if (!strcmp(a, "--clients") && parse_long(v, 1, 1000000, &n)) {
      o->clients = (int)n;
    } else if (!strcmp(a, "--size") && parse_long(v, 56, (long)MTP_MAX_PACKET, &n) && n % 4 == 0) {
      o->size = (size_t)n;
    } else if (!strcmp(a, "--seconds")) {
      char *end = NULL;
      o->seconds = strtod(v, &end);
      if (end == v || *end != '\0' || !(o->seconds > 0 && o->seconds <= 3600)) {
        fprintf(stderr, "mtp_bench: bad --seconds '%s'\n", v);
        return -1;
      }
    } else if (!strcmp(a, "--proto")) {
      o->proto = tc_proto_parse(v);
      if (o->proto == MTP_PROTO_NONE) {
        fprintf(stderr, "mtp_bench: bad --proto '%s'\n", v);
        return -1;
      }
    } else if (!strcmp(a, "--inflight") && parse_long(v, 1, 1024, &n)) {
      o->inflight = (int)n;
    } else if (!strcmp(a, "--idle") && parse_long(v, 1, 1000000, &n)) {
      o->idle = (int)n;
    } else if (!strcmp(a, "--dc") && parse_long(v, -5, 5, &n) && n != 0) {
      o->dc = (int)n;
    } else {
      fprintf(stderr, "mtp_bench: bad option or value: %s %s (sizes: multiple of 4, 56..%u)\n", a, v,
              MTP_MAX_PACKET);
      return -1;
    }
  }
  if ((o->front == NULL) != (o->back == NULL)) {
    fprintf(stderr, "mtp_bench: --front and --back go together\n");
    return -1;
  }
  if (o->mtproxy == NULL && o->front == NULL) {
    usage(stderr);
    return -1;
  }
  return 0;
}

/* ---- time ---- */

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int ms_until(int64_t deadline_ns) {
  int64_t d = deadline_ns - now_ns();
  if (d <= 0)
    return 0;
  return (int)((d + 999999) / 1000000);
}

/* ---- the proxy processes ---- */

/* One spawned binary and its log (stdout + stderr). */
struct child {
  pid_t pid;
  const char *name; /* "mtproxy", "mtproxy-front", "mtproxy-back" */
  char log_path[160];
};

/* What one run measures: mtproxy alone, or mtproxy-front + mtproxy-back (split). */
struct proxy {
  bool split;
  struct child main; /* mtproxy, or mtproxy-front in split mode: clients connect to it */
  struct child back; /* split mode: mtproxy-back */
  uint16_t port;     /* listener l0 of main */
  uint16_t admin;    /* admin endpoint of main */
  char dir[64];
  char secret_path[128];
  char config_path[128];
  char certs[128];
  char cert_log[160]; /* output of `mtproxy-back certs` */
};

/* Reads the whole file into a NUL-terminated heap string (owned by the caller), or NULL. */
static char *read_text(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  size_t cap = 4096, len = 0;
  char *s = mtp_malloc(cap);
  while (s != NULL) {
    size_t n = fread(s + len, 1, cap - len - 1, f);
    len += n;
    if (n == 0)
      break;
    if (cap - len - 1 == 0) {
      char *t = mtp_realloc(s, cap * 2);
      if (t == NULL) {
        mtp_free(s);
        s = NULL;
        break;
      }
      s = t;
      cap *= 2;
    }
  }
  fclose(f);
  if (s != NULL)
    s[len] = '\0';
  return s;
}

static void print_log_tail(const char *path, const char *name) {
  char *s = read_text(path);
  if (s == NULL)
    return;
  size_t len = strlen(s);
  const char *from = len > 3000 ? s + len - 3000 : s;
  fprintf(stderr, "---- %s log (%s, tail) ----\n%s---- end of log ----\n", name, path, from);
  mtp_free(s);
}

static int write_file(const char *path, const void *data, size_t len) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    return MTP_EIO;
  ssize_t n = write(fd, data, len);
  int rc = close(fd);
  return n == (ssize_t)len && rc == 0 ? MTP_OK : MTP_EIO;
}

/* Looks for needle followed by a port number ("...127.0.0.1:PORT") in the log. */
static bool find_port(const char *log, const char *needle, uint16_t *port) {
  const char *p = strstr(log, needle);
  if (p == NULL)
    return false;
  long n;
  char digits[8];
  size_t i = 0;
  p += strlen(needle);
  while (i < sizeof(digits) - 1 && p[i] >= '0' && p[i] <= '9') {
    digits[i] = p[i];
    i++;
  }
  digits[i] = '\0';
  if (i == 0 || (p[i] != '\n' && p[i] != ' ' && p[i] != '\0') || !parse_long(digits, 1, 65535, &n))
    return false;
  *port = (uint16_t)n;
  return true;
}

/* Starts argv[0] with its output appended to c->log_path (created empty first). */
static int child_spawn(struct child *c, const char *name, char *const argv[]) {
  c->name = name;
  if (write_file(c->log_path, "", 0) != MTP_OK) {
    fprintf(stderr, "mtp_bench: cannot write %s\n", c->log_path);
    return MTP_EIO;
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 2, c->log_path, O_WRONLY | O_APPEND, 0);
  posix_spawn_file_actions_adddup2(&fa, 2, 1);
  int rc = posix_spawn(&c->pid, argv[0], &fa, NULL, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    fprintf(stderr, "mtp_bench: cannot start %s: %s\n", argv[0], strerror(rc));
    c->pid = 0;
    return MTP_EIO;
  }
  return MTP_OK;
}

/*
 * Waits until the child's log contains needle followed by a port (inotify on the log, poll()
 * with short timeouts so an exit that writes nothing is noticed too). The watch is added before
 * the first read, so no write is missed.
 */
static int child_wait_port(struct child *c, const char *needle, uint16_t *port, int timeout_ms) {
  int ino = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (ino < 0 || inotify_add_watch(ino, c->log_path, IN_MODIFY | IN_CLOSE_WRITE) < 0) {
    perror("mtp_bench: inotify");
    if (ino >= 0)
      close(ino);
    return MTP_EIO;
  }
  int64_t deadline = now_ns() + (int64_t)timeout_ms * 1000000;
  int result = MTP_ETIMEDOUT;
  for (;;) {
    char *log = read_text(c->log_path);
    bool found = log != NULL && find_port(log, needle, port);
    mtp_free(log);
    if (found) {
      result = MTP_OK;
      break;
    }
    int status;
    if (waitpid(c->pid, &status, WNOHANG) == c->pid) {
      fprintf(stderr, "mtp_bench: %s exited during startup (status %d)\n", c->name, status);
      c->pid = 0;
      result = MTP_EIO;
      break;
    }
    int left = ms_until(deadline);
    if (left == 0)
      break;
    struct pollfd pfd = {ino, POLLIN, 0};
    if (poll(&pfd, 1, left < 100 ? left : 100) > 0) {
      char evbuf[4096];
      while (read(ino, evbuf, sizeof(evbuf)) > 0) {
      }
    }
  }
  close(ino);
  if (result != MTP_OK) {
    if (result == MTP_ETIMEDOUT)
      fprintf(stderr, "mtp_bench: no '%s' line from %s within %d ms\n", needle, c->name, timeout_ms);
    print_log_tail(c->log_path, c->name);
  }
  return result;
}

/* Waits (pidfd + poll, bounded) for the child to exit; with sig, sends it first; SIGKILL on
 * timeout. Returns the wait status or -1. */
static int child_stop(struct child *c, int sig, int timeout_ms) {
  if (c->pid <= 0)
    return -1;
  int pidfd = (int)syscall(SYS_pidfd_open, c->pid, 0);
  if (sig != 0)
    kill(c->pid, sig);
  int status = -1;
  bool done = false;
  if (pidfd >= 0) {
    struct pollfd pfd = {pidfd, POLLIN, 0};
    if (poll(&pfd, 1, timeout_ms) > 0)
      done = waitpid(c->pid, &status, 0) == c->pid;
    close(pidfd);
  } else {
    int64_t deadline = now_ns() + (int64_t)timeout_ms * 1000000;
    while (!done && ms_until(deadline) > 0) {
      done = waitpid(c->pid, &status, WNOHANG) == c->pid;
      if (!done) {
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL); /* fallback only when pidfd_open is missing */
      }
    }
  }
  if (!done) {
    fprintf(stderr, "mtp_bench: %s did not exit within %d ms%s; SIGKILL\n", c->name, timeout_ms,
            sig == SIGTERM ? " of SIGTERM" : "");
    kill(c->pid, SIGKILL);
    waitpid(c->pid, &status, 0);
  }
  c->pid = 0;
  return status;
}

/* GET http://127.0.0.1:port/metrics and the value of one series, or -1. Bounded. */
static double scrape(uint16_t port, const char *series) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  struct timeval tv = {2, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  static const char req[] = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  static char buf[1 << 18];
  size_t len = 0;
  if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 || write(fd, req, sizeof(req) - 1) != sizeof(req) - 1) {
    close(fd);
    return -1;
  }
  for (;;) {
    ssize_t n = read(fd, buf + len, sizeof(buf) - 1 - len);
    if (n <= 0 || (len += (size_t)n) == sizeof(buf) - 1)
      break;
  }
  close(fd);
  buf[len] = '\0';
  size_t sl = strlen(series);
  for (const char *line = buf; line != NULL && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
    if (strncmp(line, series, sl) == 0 && line[sl] == ' ')
      return strtod(line + sl + 1, NULL);
  return -1;
}

static int make_dir_and_files(struct proxy *p, const uint8_t *proxy_secret, size_t proxy_secret_len,
                              uint16_t fake_port) {
  snprintf(p->dir, sizeof(p->dir), "/tmp/mtp_bench.XXXXXX");
  if (mkdtemp(p->dir) == NULL) {
    perror("mtp_bench: mkdtemp");
    p->dir[0] = '\0';
    return MTP_EIO;
  }
  snprintf(p->secret_path, sizeof(p->secret_path), "%s/proxy-secret", p->dir);
  snprintf(p->config_path, sizeof(p->config_path), "%s/proxy-multi.conf", p->dir);
  if (write_file(p->secret_path, proxy_secret, proxy_secret_len) != MTP_OK ||
      fm_write_proxy_config(p->config_path, fake_port) != MTP_OK) {
    fprintf(stderr, "mtp_bench: cannot write files in %s\n", p->dir);
    return MTP_EIO;
  }
  return MTP_OK;
}

/* Runs `mtproxy-back certs ARGS` to completion (bounded). */
static int run_certs(struct proxy *p, const char *back_bin, char *const args[]) {
  char *argv[8];
  size_t n = 0;
  argv[n++] = (char *)back_bin;
  argv[n++] = "certs";
  for (size_t i = 0; args[i] != NULL && n < 7; i++)
    argv[n++] = args[i];
  argv[n] = NULL;
  struct child c = {0};
  snprintf(c.log_path, sizeof(c.log_path), "%s", p->cert_log);
  if (child_spawn(&c, "mtproxy-back certs", argv) != MTP_OK)
    return MTP_EIO;
  int status = child_stop(&c, 0, 60000);
  if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    print_log_tail(c.log_path, c.name);
    return MTP_EIO;
  }
  return MTP_OK;
}

/* mtproxy alone. */
static int proxy_start(struct proxy *p, const struct opts *o, const uint8_t client_secret[16],
                       const uint8_t *proxy_secret, size_t proxy_secret_len, uint16_t fake_port) {
  memset(p, 0, sizeof(*p));
  int rc = make_dir_and_files(p, proxy_secret, proxy_secret_len, fake_port);
  if (rc != MTP_OK)
    return rc;
  snprintf(p->main.log_path, sizeof(p->main.log_path), "%s/mtproxy.log", p->dir);
  char hex[33], workers[16];
  mtp_hex_encode(client_secret, 16, hex);
  snprintf(workers, sizeof(workers), "%d", o->workers);
  char *argv[] = {(char *)o->mtproxy, "--listen", "127.0.0.1:0", "--secret", hex, "--proxy-secret",
                  p->secret_path, "--proxy-config", p->config_path, "--workers", workers, "--admin",
                  "127.0.0.1:0", "--log-level", "info", NULL};
  rc = child_spawn(&p->main, "mtproxy", argv);
  if (rc == MTP_OK)
    rc = child_wait_port(&p->main, "listener l0 listening on 127.0.0.1:", &p->port, PROXY_START_MS);
  if (rc == MTP_OK)
    rc = child_wait_port(&p->main, "admin listening on 127.0.0.1:", &p->admin, PROXY_START_MS);
  return rc;
}

/* mtproxy-back + mtproxy-front on loopback, certificates made by `mtproxy-back certs`; returns
 * once every front worker's tunnel is up (the front's mtproxy_tunnel_connections). */
static int split_start(struct proxy *p, const struct opts *o, const uint8_t client_secret[16],
                       const uint8_t *proxy_secret, size_t proxy_secret_len, uint16_t fake_port) {
  memset(p, 0, sizeof(*p));
  p->split = true;
  int rc = make_dir_and_files(p, proxy_secret, proxy_secret_len, fake_port);
  if (rc != MTP_OK)
    return rc;
  snprintf(p->certs, sizeof(p->certs), "%s/certs", p->dir);
  snprintf(p->cert_log, sizeof(p->cert_log), "%s/certs.log", p->dir);
  snprintf(p->main.log_path, sizeof(p->main.log_path), "%s/mtproxy-front.log", p->dir);
  snprintf(p->back.log_path, sizeof(p->back.log_path), "%s/mtproxy-back.log", p->dir);
  if (run_certs(p, o->back, (char *[]){"init", p->certs, NULL}) != MTP_OK ||
      run_certs(p, o->back, (char *[]){"issue", p->certs, "bench", NULL}) != MTP_OK) {
    fprintf(stderr, "mtp_bench: mtproxy-back certs failed\n");
    return MTP_EIO;
  }
  char bcrt[160], bkey[160], ca[160], fcrt[160], fkey[160];
  snprintf(bcrt, sizeof(bcrt), "%s/back.crt", p->certs);
  snprintf(bkey, sizeof(bkey), "%s/back.key", p->certs);
  snprintf(ca, sizeof(ca), "%s/ca.crt", p->certs);
  snprintf(fcrt, sizeof(fcrt), "%s/bench.crt", p->certs);
  snprintf(fkey, sizeof(fkey), "%s/bench.key", p->certs);
  char hex[33], workers[16];
  mtp_hex_encode(client_secret, 16, hex);
  snprintf(workers, sizeof(workers), "%d", o->workers);
  char *bargv[] = {(char *)o->back, "--tunnel-listen", "127.0.0.1:0", "--tunnel-cert", bcrt, "--tunnel-key", bkey,
                   "--tunnel-ca", ca, "--proxy-secret", p->secret_path, "--proxy-config", p->config_path,
                   "--workers", workers, "--log-level", "info", NULL};
  uint16_t tport = 0;
  rc = child_spawn(&p->back, "mtproxy-back", bargv);
  if (rc == MTP_OK)
    rc = child_wait_port(&p->back, "tunnel listening on 127.0.0.1:", &tport, PROXY_START_MS);
  if (rc != MTP_OK)
    return rc;
  char back_addr[32];
  snprintf(back_addr, sizeof(back_addr), "127.0.0.1:%u", tport);
  char *fargv[] = {(char *)o->front, "--back", back_addr, "--tunnel-cert", fcrt, "--tunnel-key", fkey, "--tunnel-ca",
                   ca, "--listen", "127.0.0.1:0", "--secret", hex, "--workers", workers, "--admin", "127.0.0.1:0",
                   "--node-name", "bench", "--log-level", "info", NULL};
  rc = child_spawn(&p->main, "mtproxy-front", fargv);
  if (rc == MTP_OK)
    rc = child_wait_port(&p->main, "listener l0 listening on 127.0.0.1:", &p->port, PROXY_START_MS);
  if (rc == MTP_OK)
    rc = child_wait_port(&p->main, "admin listening on 127.0.0.1:", &p->admin, PROXY_START_MS);
  if (rc != MTP_OK)
    return rc;
  /* Every front worker has its own tunnel; clients may land on any worker. */
  int64_t deadline = now_ns() + (int64_t)PROXY_START_MS * 1000000;
  double up = -1;
  while ((up = scrape(p->admin, "mtproxy_tunnel_connections")) < o->workers && ms_until(deadline) > 0) {
    struct timespec ts = {0, 20 * 1000000};
    nanosleep(&ts, NULL); /* polling the gauge, bounded by the deadline */
  }
  if (up < o->workers) {
    fprintf(stderr, "mtp_bench: the front has %g of %d tunnel connections up after %d ms\n", up, o->workers,
            PROXY_START_MS);
    print_log_tail(p->main.log_path, p->main.name);
    print_log_tail(p->back.log_path, p->back.name);
    return MTP_ETIMEDOUT;
  }
  return MTP_OK;
}

/* Stops the front (or mtproxy) first, then the back. *main_status / *back_status get the wait
 * statuses (-1 when not running). */
static void proxy_stop(struct proxy *p, int *main_status, int *back_status) {
  int ms = child_stop(&p->main, SIGTERM, PROXY_STOP_MS);
  int bs = child_stop(&p->back, SIGTERM, PROXY_STOP_MS);
  if (main_status != NULL)
    *main_status = ms;
  if (back_status != NULL)
    *back_status = bs;
}

static void proxy_cleanup_files(const struct proxy *p, bool keep_log) {
  if (p->dir[0] == '\0')
    return;
  unlink(p->secret_path);
  unlink(p->config_path);
  if (keep_log) {
    fprintf(stderr, "mtp_bench: logs kept in %s\n", p->dir);
    return;
  }
  if (p->split) {
    static const char *const files[] = {"ca.crt", "ca.key", "back.crt", "back.key", "bench.crt", "bench.key"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
      char path[200];
      snprintf(path, sizeof(path), "%s/%s", p->certs, files[i]);
      unlink(path);
    }
    rmdir(p->certs);
    unlink(p->cert_log);
    unlink(p->back.log_path);
  }
  unlink(p->main.log_path);
  rmdir(p->dir);
}

/* VmRSS of pid in bytes, or -1. */
static long long proc_rss(pid_t pid) {
  char path[64];
  snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
  char *s = read_text(path);
  if (s == NULL)
    return -1;
  long long kb = -1;
  const char *p = strstr(s, "\nVmRSS:");
  if (p != NULL)
    kb = strtoll(p + 7, NULL, 10);
  mtp_free(s);
  return kb < 0 ? -1 : kb * 1024;
}

/* utime + stime of pid in seconds, or -1. */
static double proc_cpu(pid_t pid) {
  char path[64];
  snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
  char *s = read_text(path);
  if (s == NULL)
    return -1;
  double r = -1;
  const char *p = strrchr(s, ')'); /* the command name may contain spaces */
  if (p != NULL) {
    /* After ") ": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
     * utime(14) stime(15). */
    unsigned long long ut = 0, st = 0;
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) == 2)
      r = (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
  }
  mtp_free(s);
  return r;
}

/* CPU seconds of the proxy's processes (mtproxy, or front + back); each part in *main_s and
 * *back_s (0 when there is no back). -1 when one cannot be read. */
static double proxy_cpu(const struct proxy *p, double *main_s, double *back_s) {
  *main_s = proc_cpu(p->main.pid);
  *back_s = p->split ? proc_cpu(p->back.pid) : 0;
  return *main_s < 0 || *back_s < 0 ? -1 : *main_s + *back_s;
}

/* VmRSS in bytes of the proxy's processes, like proxy_cpu. */
static long long proxy_rss(const struct proxy *p, long long *main_b, long long *back_b) {
  *main_b = proc_rss(p->main.pid);
  *back_b = p->split ? proc_rss(p->back.pid) : 0;
  return *main_b < 0 || *back_b < 0 ? -1 : *main_b + *back_b;
}

/* CPU seconds used by this process (the bench loop and the fake middle's thread). */
static double self_cpu(void) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0)
    return 0;
  return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* ---- clients ---- */

enum cstate {
  C_UNUSED,     /* not opened yet */
  C_CONNECTING, /* connect() in progress, waiting for writability */
  C_OPEN,       /* header sent (or queued); packets flow */
  C_DEAD,       /* failed or closed by the peer; fd closed */
  C_CLOSED,     /* closed by us at the end */
};

struct client {
  int fd;
  enum cstate state;
  bool warm;    /* got its first echo */
  bool pollout; /* EPOLLOUT is in the registered mask */
  struct mtp_obf2 obf;
  struct mtp_frame_dec dec;
  uint8_t *out; /* owns: encrypted bytes not yet written, [out_off, out_len) */
  size_t out_off, out_len, out_cap;
  int64_t *ts; /* owns: ring of send timestamps, one per packet in flight */
  unsigned ts_head, inflight;
};

/* The figures of one run, for the split-vs-single summary. */
struct result {
  double mbps, pps, p50_us, p99_us;
  uint64_t packets;
  double cpu_s;      /* the proxy's processes' CPU in the window */
  double idle_bytes; /* idle mode: VmRSS delta per idle connection (all processes) */
};

struct bench {
  struct opts o;
  int epfd;
  struct sockaddr_in addr;
  uint8_t secret[16];
  uint8_t *payload; /* owns: the packet every client sends */
  uint8_t *rbuf;    /* owns: READ_CHUNK */
  struct client *clients; /* owns: cap_clients entries */
  int cap_clients;
  int target;  /* clients to open */
  int opened;  /* clients opened so far */
  int pending; /* opened, not yet warm and not dead */
  int warm;
  bool sending;   /* top clients up to K in flight */
  bool measuring; /* count answers into the stats */
  int64_t deadline;
  /* stats */
  uint64_t packets;
  int64_t *lat; /* owns: round trips (ns) of counted packets */
  size_t nlat, cap_lat;
  uint64_t err_connect, err_closed, err_bad;
  struct result last; /* the current run's figures */
};

static struct bench B;

static void set_pollout(struct client *c, bool on) {
  if (c->pollout == on)
    return;
  struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0), .data.ptr = c};
  epoll_ctl(B.epfd, EPOLL_CTL_MOD, c->fd, &ev);
  c->pollout = on;
}

static void client_release(struct client *c) {
  if (c->fd >= 0)
    close(c->fd);
  c->fd = -1;
  mtp_obf2_free(&c->obf);
  mtp_frame_dec_free(&c->dec);
  mtp_free(c->out);
  c->out = NULL;
  c->out_off = c->out_len = c->out_cap = 0;
  mtp_free(c->ts);
  c->ts = NULL;
  c->inflight = 0;
}

static void client_fail(struct client *c, uint64_t *counter) {
  if (c->state != C_OPEN && c->state != C_CONNECTING)
    return;
  (*counter)++;
  if (!c->warm)
    B.pending--;
  c->state = C_DEAD;
  client_release(c);
}

/* Writes as much of the queue as the socket takes; asks for EPOLLOUT when some is left. */
static void client_flush(struct client *c) {
  while (c->out_off < c->out_len) {
    ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
    if (n > 0) {
      c->out_off += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      set_pollout(c, true);
      return;
    }
    client_fail(c, &B.err_closed);
    return;
  }
  c->out_off = c->out_len = 0;
  set_pollout(c, false);
}

/* Makes room for n more queued bytes. */
static bool client_reserve(struct client *c, size_t n) {
  if (c->out_off > 0 && c->out_len + n > c->out_cap) {
    memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
    c->out_len -= c->out_off;
    c->out_off = 0;
  }
  if (c->out_len + n <= c->out_cap)
    return true;
  size_t cap = c->out_cap ? c->out_cap : 4096;
  while (cap < c->out_len + n)
    cap *= 2;
  uint8_t *p = mtp_realloc(c->out, cap);
  if (p == NULL)
    return false;
  c->out = p;
  c->out_cap = cap;
  return true;
}

/* Frames, obfuscates and queues one payload packet, stamping its send time. */
static bool client_queue_packet(struct client *c) {
  size_t size = B.o.size, pad = 0;
  uint8_t hdr[4], padding[4];
  size_t hlen = mtp_frame_header(B.o.proto, size, false, hdr, &pad);
  if (!client_reserve(c, hlen + size + pad)) {
    client_fail(c, &B.err_bad);
    return false;
  }
  uint8_t *start = c->out + c->out_len;
  memcpy(start, hdr, hlen);
  memcpy(start + hlen, B.payload, size);
  for (size_t i = 0; i < pad; i++)
    padding[i] = (uint8_t)mtp_random_below(256);
  memcpy(start + hlen + size, padding, pad);
  mtp_aes_ctr_crypt(&c->obf.tx, start, start, hlen + size + pad);
  c->out_len += hlen + size + pad;
  c->ts[(c->ts_head + c->inflight) % (unsigned)B.o.inflight] = now_ns();
  c->inflight++;
  return true;
}

/* Sends until K packets are in flight (only while the window is open). */
static void client_top_up(struct client *c) {
  while (c->state == C_OPEN && c->inflight < (unsigned)B.o.inflight && now_ns() < B.deadline)
    if (!client_queue_packet(c))
      return;
  if (c->state == C_OPEN)
    client_flush(c);
}

static void record_latency(int64_t ns) {
  if (B.nlat == B.cap_lat) {
    if (B.cap_lat >= MAX_SAMPLES)
      return;
    size_t cap = B.cap_lat ? B.cap_lat * 2 : 65536;
    int64_t *p = mtp_realloc(B.lat, cap * sizeof(*p));
    if (p == NULL)
      return;
    B.lat = p;
    B.cap_lat = cap;
  }
  B.lat[B.nlat++] = ns;
}

static void on_packet(struct client *c, const struct mtp_packet *pkt) {
  int64_t t = now_ns();
  if (c->inflight == 0) {
    client_fail(c, &B.err_bad); /* an answer nobody asked for */
    return;
  }
  int64_t sent = c->ts[c->ts_head];
  c->ts_head = (c->ts_head + 1) % (unsigned)B.o.inflight;
  c->inflight--;
  if (pkt->len != B.o.size || memcmp(pkt->data, B.payload, B.o.size) != 0) {
    client_fail(c, &B.err_bad);
    return;
  }
  if (!c->warm) {
    c->warm = true;
    B.warm++;
    B.pending--;
  }
  if (B.measuring && t < B.deadline) {
    B.packets++;
    record_latency(t - sent);
  }
  if (B.sending)
    client_top_up(c);
}

static void client_read(struct client *c) {
  for (int r = 0; r < READS_PER_EVENT && c->state == C_OPEN; r++) {
    ssize_t n = recv(c->fd, B.rbuf, READ_CHUNK, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      client_fail(c, &B.err_closed);
      return;
    }
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return;
    }
    mtp_aes_ctr_crypt(&c->obf.rx, B.rbuf, B.rbuf, (size_t)n);
    size_t off = 0;
    while (off < (size_t)n && c->state == C_OPEN) {
      struct mtp_packet pkt;
      bool has = false;
      ssize_t used = mtp_frame_decode(&c->dec, B.rbuf + off, (size_t)n - off, &pkt, &has);
      if (used < 0 || (used == 0 && !has)) {
        client_fail(c, &B.err_bad);
        return;
      }
      off += (size_t)used;
      if (has)
        on_packet(c, &pkt);
    }
    if (n < READ_CHUNK)
      return;
  }
}

static void client_connected(struct client *c) {
  int err = 0;
  socklen_t len = sizeof(err);
  if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
    client_fail(c, &B.err_connect);
    return;
  }
  c->state = C_OPEN;
  uint8_t hdr[MTP_OBF2_HEADER_LEN];
  if (mtp_obf2_connect(&c->obf, B.secret, B.o.proto, (int16_t)B.o.dc, hdr) != MTP_OK ||
      !client_reserve(c, sizeof(hdr))) {
    client_fail(c, &B.err_connect);
    return;
  }
  memcpy(c->out + c->out_len, hdr, sizeof(hdr));
  c->out_len += sizeof(hdr);
  /* The warm-up echo: proves the whole path and gives the client its back stream. */
  if (client_queue_packet(c))
    client_flush(c);
}

static void client_open(struct client *c) {
  memset(c, 0, sizeof(*c));
  c->fd = -1;
  B.opened++;
  B.pending++;
  c->state = C_CONNECTING;
  mtp_frame_dec_init(&c->dec, B.o.proto);
  c->ts = mtp_calloc((size_t)B.o.inflight, sizeof(*c->ts));
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->ts == NULL || c->fd < 0) {
    if (c->fd < 0 && B.err_connect == 0)
      perror("mtp_bench: socket");
    client_fail(c, &B.err_connect);
    return;
  }
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (connect(c->fd, (const struct sockaddr *)&B.addr, sizeof(B.addr)) != 0 && errno != EINPROGRESS) {
    client_fail(c, &B.err_connect);
    return;
  }
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = c};
  c->pollout = true;
  if (epoll_ctl(B.epfd, EPOLL_CTL_ADD, c->fd, &ev) != 0)
    client_fail(c, &B.err_connect);
}

static void on_event(struct client *c, uint32_t events) {
  if (c->state == C_CONNECTING) {
    if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
      client_connected(c);
    return;
  }
  if (c->state != C_OPEN)
    return;
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP))
    client_read(c);
  if (c->state == C_OPEN && (events & EPOLLOUT))
    client_flush(c);
}

/* Opens clients up to the target, at most OPEN_BATCH still warming up at once. */
static void open_more(void) {
  while (B.opened < B.target && B.pending < OPEN_BATCH)
    client_open(&B.clients[B.opened]);
}

static bool all_warm(void) {
  return B.opened == B.target && B.pending == 0;
}

static bool never(void) {
  return false;
}

/* Runs the loop until done() or the deadline. Returns done(). */
static bool run_until(bool (*done)(void), int64_t deadline) {
  struct epoll_event ev[256];
  for (;;) {
    open_more();
    if (done())
      return true;
    int left = ms_until(deadline);
    if (left == 0)
      return done();
    int n = epoll_wait(B.epfd, ev, 256, left < 100 ? left : 100);
    if (n < 0 && errno != EINTR) {
      perror("mtp_bench: epoll_wait");
      return done();
    }
    for (int i = 0; i < n; i++)
      on_event(ev[i].data.ptr, ev[i].events);
  }
}

static void close_clients(int from, int to) {
  for (int i = from; i < to; i++) {
    struct client *c = &B.clients[i];
    if (c->state == C_OPEN || c->state == C_CONNECTING) {
      if (!c->warm)
        B.pending--;
      c->state = C_CLOSED;
    }
    client_release(c);
  }
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static double pct_us(double p) {
  if (B.nlat == 0)
    return 0;
  size_t i = (size_t)(p * (double)(B.nlat - 1) + 0.5);
  return (double)B.lat[i] / 1000.0;
}

/* ---- the two modes ---- */

static int run_load(const struct proxy *p, struct fake_middle *fm, FILE *out) {
  int64_t t_warm = now_ns();
  B.target = B.o.clients;
  if (!run_until(all_warm, now_ns() + 60 * (int64_t)1000000000)) {
    fprintf(stderr, "mtp_bench: only %d of %d clients warmed up within 60 s (pending %d)\n", B.warm,
            B.target, B.pending);
  }
  double warm_s = (double)(now_ns() - t_warm) / 1e9;
  if (B.warm == 0) {
    fprintf(stderr, "mtp_bench: no client got an echo; giving up\n");
    return 1;
  }

  double m0, k0, m1, k1;
  double cpu0 = proxy_cpu(p, &m0, &k0), self0 = self_cpu();
  int64_t t0 = now_ns();
  B.deadline = t0 + (int64_t)(B.o.seconds * 1e9);
  B.sending = true;
  B.measuring = true;
  for (int i = 0; i < B.opened; i++)
    if (B.clients[i].state == C_OPEN && B.clients[i].warm)
      client_top_up(&B.clients[i]);
  run_until(never, B.deadline);
  B.measuring = false;
  B.sending = false;
  double elapsed = (double)(now_ns() - t0) / 1e9;
  double cpu1 = proxy_cpu(p, &m1, &k1), self1 = self_cpu();
  long long rss_main, rss_back;
  long long rss = proxy_rss(p, &rss_main, &rss_back);

  qsort(B.lat, B.nlat, sizeof(*B.lat), cmp_i64);
  int open_now = 0;
  for (int i = 0; i < B.opened; i++)
    open_now += B.clients[i].state == C_OPEN;
  struct fm_stats fs;
  fm_get_stats(fm, &fs);

  double bytes = (double)B.packets * (double)B.o.size;
  fprintf(out, "clients: %d opened, %d warmed up in %.3f s, %d still open at the end\n", B.opened, B.warm,
              warm_s, open_now);
  fprintf(out, "window: %.3f s, %" PRIu64 " packets echoed\n", elapsed, B.packets);
  fprintf(out, "throughput: %.2f MB/s payload (one direction, 1 MB = 10^6 B), %.0f packets/s\n",
          bytes / elapsed / 1e6, (double)B.packets / elapsed);
  fprintf(out, "latency: p50 %.1f us, p99 %.1f us, max %.1f us (%zu samples)\n", pct_us(0.50), pct_us(0.99),
          B.nlat ? (double)B.lat[B.nlat - 1] / 1000.0 : 0.0, B.nlat);
  fprintf(out, "errors: connect %" PRIu64 ", closed %" PRIu64 ", bad answers %" PRIu64 "\n", B.err_connect,
          B.err_closed, B.err_bad);
  if (cpu0 >= 0 && cpu1 >= 0 && !p->split)
    fprintf(out, "mtproxy cpu: %.2f s in the window (%.0f%% of one core), VmRSS at end %.1f MiB\n",
            cpu1 - cpu0, 100.0 * (cpu1 - cpu0) / elapsed, (double)rss / 1048576.0);
  if (cpu0 >= 0 && cpu1 >= 0 && p->split)
    fprintf(out,
            "front + back cpu: %.2f s in the window (%.0f%% of one core): front %.2f s, back %.2f s; "
            "VmRSS at end: front %.1f MiB, back %.1f MiB\n",
            cpu1 - cpu0, 100.0 * (cpu1 - cpu0) / elapsed, m1 - m0, k1 - k0, (double)rss_main / 1048576.0,
            (double)rss_back / 1048576.0);
  if (cpu0 >= 0 && cpu1 > cpu0)
    fprintf(out, "per proxy cpu-second: %.0f packets, %.1f MB\n", (double)B.packets / (cpu1 - cpu0),
            bytes / (cpu1 - cpu0) / 1e6);
  B.last.mbps = bytes / elapsed / 1e6;
  B.last.pps = (double)B.packets / elapsed;
  B.last.p50_us = pct_us(0.50);
  B.last.p99_us = pct_us(0.99);
  B.last.packets = B.packets;
  B.last.cpu_s = cpu0 >= 0 && cpu1 >= 0 ? cpu1 - cpu0 : 0;
  fprintf(out, "bench + fake middle cpu: %.2f s in the window (%.0f%% of one core)\n", self1 - self0,
          100.0 * (self1 - self0) / elapsed);
  fprintf(out, "fake middle: %u rpc conns (%u open), %" PRIu64 " proxy_req, %" PRIu64 " proxy_ans, %u bad%s%s\n",
          fs.accepted, fs.open, fs.proxy_reqs, fs.proxy_ans, fs.bad, fs.last_error[0] ? ": " : "",
          fs.last_error);
  bool ok = B.packets > 0 && B.err_connect + B.err_closed + B.err_bad == 0;
  return ok ? 0 : 1;
}

static bool close_conns_reached(const struct fm_stats *s, void *arg) {
  return s->close_conns >= *(const uint64_t *)arg;
}

static int run_idle(const struct proxy *p, struct fake_middle *fm, FILE *out) {
  /* One client first, so the RPC connections and per-worker pools exist before the baseline. */
  B.target = 1;
  if (!run_until(all_warm, now_ns() + 30 * (int64_t)1000000000) || B.warm != 1) {
    fprintf(stderr, "mtp_bench: the warm-up client got no echo\n");
    return 1;
  }
  long long m0, k0, m1, k1, m2, k2;
  long long rss0 = proxy_rss(p, &m0, &k0);
  int64_t t = now_ns();
  B.target = 1 + B.o.idle;
  if (!run_until(all_warm, now_ns() + 300 * (int64_t)1000000000))
    fprintf(stderr, "mtp_bench: only %d of %d idle clients warmed up within 300 s\n", B.warm - 1, B.o.idle);
  double open_s = (double)(now_ns() - t) / 1e9;
  long long rss1 = proxy_rss(p, &m1, &k1);
  int n = B.warm - 1;

  struct fm_stats fs;
  fm_get_stats(fm, &fs);
  uint64_t want = fs.close_conns + (uint64_t)n + 1;
  close_clients(0, B.opened);
  bool closed = fm_wait(fm, close_conns_reached, &want, 30000);
  long long rss2 = proxy_rss(p, &m2, &k2);

  fprintf(out, "idle clients: %d of %d completed handshake + one echo of %zu B in %.3f s\n", n, B.o.idle,
          B.o.size, open_s);
  fprintf(out, "%s VmRSS: %.1f MiB with 1 client, %.1f MiB with %d more\n", p->split ? "front + back" : "mtproxy",
          (double)rss0 / 1048576.0, (double)rss1 / 1048576.0, n);
  if (p->split)
    fprintf(out, "  front %.1f -> %.1f MiB, back %.1f -> %.1f MiB\n", (double)m0 / 1048576.0,
            (double)m1 / 1048576.0, (double)k0 / 1048576.0, (double)k1 / 1048576.0);
  if (n > 0 && !p->split)
    fprintf(out, "per idle connection: %.0f bytes (VmRSS delta / %d)\n", (double)(rss1 - rss0) / n, n);
  if (n > 0 && p->split)
    fprintf(out, "per idle connection: %.0f bytes (VmRSS delta / %d): front %.0f, back %.0f\n",
            (double)(rss1 - rss0) / n, n, (double)(m1 - m0) / n, (double)(k1 - k0) / n);
  B.last.idle_bytes = n > 0 ? (double)(rss1 - rss0) / n : 0;
  if (closed)
    fprintf(out, "after all closed (RPC_CLOSE_CONN seen for each): VmRSS %.1f MiB\n", (double)rss2 / 1048576.0);
  else
    fprintf(out, "after close: the fake did not see every RPC_CLOSE_CONN within 30 s; VmRSS %.1f MiB\n",
            (double)rss2 / 1048576.0);
  fprintf(out, "errors: connect %" PRIu64 ", closed %" PRIu64 ", bad answers %" PRIu64 "\n", B.err_connect,
          B.err_closed, B.err_bad);
  return n == B.o.idle && B.err_connect + B.err_closed + B.err_bad == 0 ? 0 : 1;
}

/* ---- main ---- */

static void raise_nofile(int need) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)need + 64 > rl.rlim_cur)
    fprintf(stderr, "mtp_bench: warning: RLIMIT_NOFILE is %llu, %d clients need more\n",
            (unsigned long long)rl.rlim_cur, need);
}

/* Forgets the previous run's clients and figures (the buffers are kept). */
static void bench_reset(void) {
  close_clients(0, B.opened);
  for (int i = 0; i < B.cap_clients; i++) {
    memset(&B.clients[i], 0, sizeof(B.clients[i]));
    B.clients[i].fd = -1;
  }
  B.target = B.opened = B.pending = B.warm = 0;
  B.sending = B.measuring = false;
  B.deadline = 0;
  B.packets = 0;
  B.nlat = 0;
  B.err_connect = B.err_closed = B.err_bad = 0;
  memset(&B.last, 0, sizeof(B.last));
}

static void print_exit(const char *name, int status) {
  if (status == -1)
    printf("%s exit: not running\n", name);
  else if (WIFEXITED(status))
    printf("%s exit: status %d after SIGTERM\n", name, WEXITSTATUS(status));
  else if (WIFSIGNALED(status))
    printf("%s exit: killed by signal %d\n", name, WTERMSIG(status));
}

static bool exit_ok(int status) { return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0; }

/* One run against one setup (mtproxy alone, or split). Prints its result block. Returns 0 when
 * the run was clean; *res gets its figures. */
static int bench_one(bool split, int argc, char **argv, const char *cpu, struct result *res) {
  int rc = 1;
  struct fake_middle *fm = NULL;
  struct proxy p;
  memset(&p, 0, sizeof(p));
  bool keep_log = false;
  uint8_t proxy_secret[128];
  bench_reset();
  if (mtp_random(proxy_secret, sizeof(proxy_secret)) != MTP_OK || mtp_random(B.secret, sizeof(B.secret)) != MTP_OK)
    goto out;
  int port = fm_start(proxy_secret, sizeof(proxy_secret), &fm);
  if (port < 0) {
    fprintf(stderr, "mtp_bench: fake middle: %s\n", mtp_strerror(port));
    goto out;
  }
  int src = split ? split_start(&p, &B.o, B.secret, proxy_secret, sizeof(proxy_secret), (uint16_t)port)
                  : proxy_start(&p, &B.o, B.secret, proxy_secret, sizeof(proxy_secret), (uint16_t)port);
  if (src != MTP_OK) {
    keep_log = true;
    goto out;
  }
  B.addr.sin_family = AF_INET;
  B.addr.sin_port = htons(p.port);
  B.addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

  /* Buffer the report so it prints as one block after the run. */
  char *report = NULL;
  size_t report_len = 0;
  FILE *out = open_memstream(&report, &report_len);
  if (out == NULL)
    goto out;
  rc = B.o.idle > 0 ? run_idle(&p, fm, out) : run_load(&p, fm, out);
  fclose(out);
  *res = B.last;

  close_clients(0, B.opened);
  int main_status = -1, back_status = -1;
  proxy_stop(&p, &main_status, &back_status);

  printf("==== mtp_bench result ====\ncommand:");
  for (int i = 0; i < argc; i++)
    printf(" %s", argv[i]);
  printf("\nmachine: %ld cpus, %s\n", sysconf(_SC_NPROCESSORS_ONLN), cpu);
  printf("setup: %s\n", split ? "split: mtproxy-front + mtproxy-back over the TLS tunnel on loopback"
                              : "single: mtproxy (front and back in one process)");
  printf("mode: %s, proto %s, dc %d, workers %d, size %zu B", B.o.idle ? "idle" : "load",
         mtp_proto_name(B.o.proto), B.o.dc, B.o.workers, B.o.size);
  if (!B.o.idle)
    printf(", clients %d, inflight %d, seconds %g", B.o.clients, B.o.inflight, B.o.seconds);
  else
    printf(", idle clients %d", B.o.idle);
  printf("\n%s", report ? report : "");
  print_exit(split ? "mtproxy-front" : "mtproxy", main_status);
  if (split)
    print_exit("mtproxy-back", back_status);
  printf("==== end ====\n");
  fflush(stdout);
  free(report); /* open_memstream's buffer comes from libc malloc */
  if (rc != 0 || !exit_ok(main_status) || (split && !exit_ok(back_status))) {
    keep_log = true;
    rc = 1;
  }

out:
  close_clients(0, B.opened);
  proxy_stop(&p, NULL, NULL);
  proxy_cleanup_files(&p, keep_log);
  fm_free(fm);
  mtp_wipe(proxy_secret, sizeof(proxy_secret));
  return rc;
}

int main(int argc, char **argv) {
  if (parse_opts(argc, argv, &B.o) != 0)
    return 2;
  signal(SIGPIPE, SIG_IGN);
  int nclients = B.o.idle > 0 ? B.o.idle + 1 : B.o.clients;
  raise_nofile(nclients * (B.o.front != NULL ? 2 : 1));

  int rc = 1;
  B.epfd = -1;
  B.payload = mtp_malloc(B.o.size);
  B.rbuf = mtp_malloc(READ_CHUNK);
  B.clients = mtp_calloc((size_t)nclients, sizeof(*B.clients));
  B.cap_clients = nclients;
  B.epfd = epoll_create1(EPOLL_CLOEXEC);
  if (B.payload == NULL || B.rbuf == NULL || B.clients == NULL || B.epfd < 0) {
    fprintf(stderr, "mtp_bench: out of memory\n");
    goto out;
  }
  for (int i = 0; i < nclients; i++)
    B.clients[i].fd = -1;
  tc_make_packet(B.payload, B.o.size, true); /* encrypted-looking: forwarded as is */

  char cpu[128] = "unknown";
  char *info = read_text("/proc/cpuinfo");
  if (info != NULL) {
    const char *m = strstr(info, "model name");
    if (m != NULL && (m = strchr(m, ':')) != NULL) {
      m += 2;
      size_t l = strcspn(m, "\n");
      snprintf(cpu, sizeof(cpu), "%.*s", (int)l, m);
    }
    mtp_free(info);
  }

  /* The same run against each setup given: mtproxy first, then front + back. */
  struct result single = {0}, split = {0};
  int rc_single = 0, rc_split = 0;
  if (B.o.mtproxy != NULL)
    rc_single = bench_one(false, argc, argv, cpu, &single);
  if (B.o.front != NULL)
    rc_split = bench_one(true, argc, argv, cpu, &split);
  rc = rc_single || rc_split ? 1 : 0;
  if (B.o.mtproxy != NULL && B.o.front != NULL && rc_single == 0 && rc_split == 0) {
    printf("==== split vs single ====\n");
    if (B.o.idle == 0) {
      printf("throughput: split %.2f MB/s, single %.2f MB/s (split/single %.2f)\n", split.mbps, single.mbps,
             single.mbps > 0 ? split.mbps / single.mbps : 0.0);
      printf("packets/s: split %.0f, single %.0f; p50 RTT split %.1f us, single %.1f us; p99 split %.1f us, "
             "single %.1f us\n",
             split.pps, single.pps, split.p50_us, single.p50_us, split.p99_us, single.p99_us);
      printf("proxy cpu per echoed packet: split %.1f us (front + back), single %.1f us\n",
             split.packets > 0 ? split.cpu_s * 1e6 / (double)split.packets : 0.0,
             single.packets > 0 ? single.cpu_s * 1e6 / (double)single.packets : 0.0);
    } else {
      printf("bytes per idle connection: split %.0f (front + back), single %.0f\n", split.idle_bytes,
             single.idle_bytes);
    }
    printf("==== end ====\n");
    fflush(stdout);
  }

out:
  close_clients(0, B.opened);
  if (B.epfd >= 0)
    close(B.epfd);
  mtp_free(B.clients);
  mtp_free(B.payload);
  mtp_free(B.rbuf);
  mtp_free(B.lat);
  return rc;
}
