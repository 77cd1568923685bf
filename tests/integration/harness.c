/* harness.c - see harness.h. */
#include "harness.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "fake_middle.h"
#include "banned.h"

struct impl {
  pthread_t reader;
  int pipe_rd;
  int log_fd;
  pthread_mutex_t mu;
  pthread_cond_t cond;
  char *buf; /* owns: everything read, NUL-terminated */
  size_t len, cap;
  bool eof;
};

const char *h_mtproxy_bin(void) {
  const char *b = getenv("MTPROXY_BIN");
  return (b && *b) ? b : NULL;
}

int h_tmpdir(char *dir, size_t len) {
  const char *base = getenv("TMPDIR");
  if (!base || !*base)
    base = "/tmp";
  if ((size_t)snprintf(dir, len, "%s/mtp-it-XXXXXX", base) >= len)
    return -1;
  return mkdtemp(dir) ? 0 : -1;
}

int h_write_file(const char *path, const void *data, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f)
    return -1;
  size_t w = fwrite(data, 1, len, f);
  return (fclose(f) == 0 && w == len) ? 0 : -1;
}

void h_rmdir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d)
    return;
  struct dirent *e;
  char path[512];
  while ((e = readdir(d)) != NULL) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
      continue;
    snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
    unlink(path);
  }
  closedir(d);
  rmdir(dir);
}

int h_write_middle_files(const char *dir, const uint8_t *secret, size_t len, uint16_t port, char *secret_path,
                         char *config_path) {
  snprintf(secret_path, 256, "%s/proxy-secret", dir);
  snprintf(config_path, 256, "%s/proxy-config", dir);
  if (h_write_file(secret_path, secret, len) != 0)
    return -1;
  return fm_write_proxy_config(config_path, port) == 0 ? 0 : -1;
}

static void *reader_main(void *arg) {
  struct impl *im = arg;
  char chunk[4096];
  for (;;) {
    ssize_t n = read(im->pipe_rd, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR)
      continue;
    pthread_mutex_lock(&im->mu);
    if (n <= 0) {
      im->eof = true;
      pthread_cond_broadcast(&im->cond);
      pthread_mutex_unlock(&im->mu);
      return NULL;
    }
    if (im->len + (size_t)n + 1 > im->cap) {
      size_t cap = (im->cap ? im->cap : 65536);
      while (cap < im->len + (size_t)n + 1)
        cap *= 2;
      char *nb = mtp_realloc(im->buf, cap);
      if (nb) {
        im->buf = nb;
        im->cap = cap;
      }
    }
    if (im->len + (size_t)n + 1 <= im->cap) {
      memcpy(im->buf + im->len, chunk, (size_t)n);
      im->len += (size_t)n;
      im->buf[im->len] = '\0';
    }
    pthread_cond_broadcast(&im->cond);
    pthread_mutex_unlock(&im->mu);
    if (im->log_fd >= 0 && write(im->log_fd, chunk, (size_t)n) < 0) {
      /* the in-memory copy is what the waits use; a failed file write only loses the post-mortem */
    }
  }
}

int h_spawn(struct h_proc *p, char *const argv[]) {
  memset(p, 0, sizeof(*p));
  p->pid = -1;
  p->exit_status = -1;
  struct impl *im = mtp_calloc(1, sizeof(*im));
  if (!im)
    return -1;
  im->log_fd = -1;
  const char *base = getenv("TMPDIR");
  if (!base || !*base)
    base = "/tmp";
  snprintf(p->log_path, sizeof(p->log_path), "%s/mtp-it-log-XXXXXX", base);
  im->log_fd = mkstemp(p->log_path);
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    mtp_free(im);
    return -1;
  }
  pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    mtp_free(im);
    return -1;
  }
  if (pid == 0) {
    /* A test that dies (a failed CHECK exits at once) must not leave its proxy behind. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0)
      dup2(devnull, 0);
    execv(argv[0], argv);
    fprintf(stderr, "harness: exec %s failed: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  close(fds[1]);
  im->pipe_rd = fds[0];
  pthread_mutex_init(&im->mu, NULL);
  pthread_cond_init(&im->cond, NULL);
  p->pid = pid;
  p->_impl = im;
  if (pthread_create(&im->reader, NULL, reader_main, im) != 0) {
    p->_impl = NULL;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    p->pid = -1;
    close(fds[0]);
    mtp_free(im);
    return -1;
  }
  return 0;
}

static void deadline_in(struct timespec *dl, int timeout_ms) {
  clock_gettime(CLOCK_REALTIME, dl);
  dl->tv_sec += timeout_ms / 1000;
  dl->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
  if (dl->tv_nsec >= 1000000000L) {
    dl->tv_sec++;
    dl->tv_nsec -= 1000000000L;
  }
}

int h_wait_log(struct h_proc *p, const char *needle, char *rest, size_t restlen, int timeout_ms) {
  struct impl *im = p->_impl;
  if (!im)
    return -1;
  struct timespec dl;
  deadline_in(&dl, timeout_ms);
  int rc = -1;
  pthread_mutex_lock(&im->mu);
  for (;;) {
    const char *hit = im->buf ? strstr(im->buf, needle) : NULL;
    if (hit) {
      const char *s = hit + strlen(needle);
      const char *e = strchr(s, '\n');
      if (e || im->eof) {
        if (!e)
          e = s + strlen(s);
        if (rest && restlen) {
          size_t n = (size_t)(e - s) < restlen - 1 ? (size_t)(e - s) : restlen - 1;
          memcpy(rest, s, n);
          rest[n] = '\0';
        }
        rc = 0;
        break;
      }
    }
    if (im->eof)
      break;
    if (pthread_cond_timedwait(&im->cond, &im->mu, &dl) != 0)
      break;
  }
  pthread_mutex_unlock(&im->mu);
  return rc;
}

static int port_after(const char *rest, uint16_t *port) {
  /* rest is "127.0.0.1:PORT..." or "[::1]:PORT..." */
  const char *colon = NULL;
  for (const char *s = rest; *s && *s != ' '; s++)
    if (*s == ':')
      colon = s;
  if (!colon)
    return -1;
  long v = strtol(colon + 1, NULL, 10);
  if (v <= 0 || v > 65535)
    return -1;
  *port = (uint16_t)v;
  return 0;
}

int h_wait_listener(struct h_proc *p, const char *name, uint16_t *port, int timeout_ms) {
  char needle[128];
  snprintf(needle, sizeof(needle), "listener %s listening on ", name);
  return h_wait_port(p, needle, port, timeout_ms);
}

int h_wait_admin(struct h_proc *p, uint16_t *port, int timeout_ms) {
  return h_wait_port(p, "admin listening on ", port, timeout_ms);
}

int h_wait_port(struct h_proc *p, const char *needle, uint16_t *port, int timeout_ms) {
  char rest[128];
  if (h_wait_log(p, needle, rest, sizeof(rest), timeout_ms) != 0)
    return -1;
  return port_after(rest, port);
}

char *h_log_text(struct h_proc *p) {
  struct impl *im = p->_impl;
  char *out = NULL;
  if (im) {
    pthread_mutex_lock(&im->mu);
    out = mtp_malloc(im->len + 1);
    if (out) {
      if (im->len)
        memcpy(out, im->buf, im->len);
      out[im->len] = '\0';
    }
    pthread_mutex_unlock(&im->mu);
    return out;
  }
  /* After h_stop: read the file. */
  FILE *f = fopen(p->log_path, "rb");
  if (!f)
    return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  out = mtp_malloc(n > 0 ? (size_t)n + 1 : 1);
  if (out) {
    size_t got = n > 0 ? fread(out, 1, (size_t)n, f) : 0;
    out[got] = '\0';
  }
  fclose(f);
  return out;
}

void h_dump_log(struct h_proc *p) {
  char *t = h_log_text(p);
  fprintf(stderr, "----- process output (%s) -----\n%s\n----- end -----\n", p->log_path, t ? t : "(none)");
  mtp_free(t);
}

static int wait_exit(pid_t pid, int timeout_ms, int *status) {
  /* Bounded: waitpid WNOHANG in steps; a child exit also ends the reader, but the wait is on
   * the pid itself so a leaked pipe holder cannot hang us. */
  struct timespec step = {0, 10 * 1000000L};
  for (int waited = 0; waited <= timeout_ms; waited += 10) {
    pid_t r = waitpid(pid, status, WNOHANG);
    if (r == pid)
      return 0;
    if (r < 0 && errno != EINTR)
      return -1;
    nanosleep(&step, NULL);
  }
  return -1;
}

int h_stop(struct h_proc *p, int timeout_ms) {
  int result = p->exit_status;
  if (p->pid > 0) {
    int status = 0;
    kill(p->pid, SIGTERM);
    if (wait_exit(p->pid, timeout_ms, &status) == 0) {
      result = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    } else {
      kill(p->pid, SIGKILL);
      waitpid(p->pid, &status, 0);
      result = -1;
    }
    p->exit_status = result;
    p->pid = -1;
  }
  struct impl *im = p->_impl;
  if (im) {
    pthread_join(im->reader, NULL);
    close(im->pipe_rd);
    if (im->log_fd >= 0)
      close(im->log_fd);
    pthread_mutex_destroy(&im->mu);
    pthread_cond_destroy(&im->cond);
    mtp_free(im->buf);
    mtp_free(im);
    p->_impl = NULL;
  }
  return result;
}

void h_remove_log(struct h_proc *p) {
  if (p->log_path[0])
    unlink(p->log_path);
  p->log_path[0] = '\0';
}

int h_http_get(uint16_t port, const char *path, char **body, int timeout_ms) {
  *body = NULL;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  char req[512];
  int rl = snprintf(req, sizeof(req), "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", path);
  if (write(fd, req, (size_t)rl) != rl) {
    close(fd);
    return -1;
  }
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  size_t len = 0, cap = 65536;
  char *buf = mtp_malloc(cap);
  int rc = -1;
  while (buf) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long el = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    if (el >= timeout_ms)
      break;
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    if (poll(&pf, 1, (int)(timeout_ms - el)) <= 0)
      break;
    if (cap - len < 4096) {
      char *nb = mtp_realloc(buf, cap * 2);
      if (!nb)
        break;
      buf = nb;
      cap *= 2;
    }
    ssize_t n = read(fd, buf + len, cap - len - 1);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      rc = 0;
      break;
    }
    len += (size_t)n;
  }
  close(fd);
  if (rc != 0 || !buf) {
    mtp_free(buf);
    return -1;
  }
  buf[len] = '\0';
  int status = -1;
  if (sscanf(buf, "HTTP/%*d.%*d %d", &status) != 1) {
    mtp_free(buf);
    return -1;
  }
  char *b = strstr(buf, "\r\n\r\n");
  b = b ? b + 4 : buf + len;
  size_t bl = strlen(b);
  *body = mtp_malloc(bl + 1);
  if (*body)
    memcpy(*body, b, bl + 1);
  mtp_free(buf);
  return status;
}

int h_metric(const char *text, const char *series, double *value) {
  size_t sl = strlen(series);
  for (const char *line = text; line && *line;) {
    if (!strncmp(line, series, sl) && line[sl] == ' ') {
      *value = strtod(line + sl + 1, NULL);
      return 0;
    }
    line = strchr(line, '\n');
    if (line)
      line++;
  }
  return -1;
}
