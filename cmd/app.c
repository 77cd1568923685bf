#include "app.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "log.h"
#include "metrics.h"
#include "obf2.h"
#include "banned.h"

/* One worker thread: its loop, the role's state, and the async that asks it to stop. */
struct worker {
  struct mtp_app *app;
  int index;
  pthread_t thread;
  bool started;
  uv_loop_t loop;
  uv_async_t stop_async;
  void *state; /* owns (through the role's hooks) */
  int setup_rc;
};

struct admin_conn {
  uv_tcp_t tcp;
  char req[8192];
  size_t len;
  char *resp; /* owns */
  uv_write_t wr;
};

struct mtp_app {
  const struct mtp_config *cfg; /* borrows */
  uv_loop_t *loop;              /* the default loop (main thread) */
  struct sockaddr_storage *bound; /* owns: concrete listener addresses */
  int *reserve_fds;               /* owns: sockets that hold the listener ports */
  struct worker *workers;         /* owns */
  int nworkers;
  const struct mtp_app_role *role; /* borrows */
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int nready;
  bool admin_on;
  uv_tcp_t admin;
  bool signals_on;
  uv_signal_t sigint, sigterm;
  mtp_app_stop_cb on_stop;
  bool stopping;
};

static int reserve_port(const struct sockaddr_storage *want, struct sockaddr_storage *got, int *fd_out) {
  int fd = socket(want->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return uv_translate_sys_error(errno);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
  if (want->ss_family == AF_INET6)
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
  socklen_t alen = want->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  if (bind(fd, (const struct sockaddr *)want, alen) != 0) {
    int err = uv_translate_sys_error(errno);
    close(fd);
    return err;
  }
  socklen_t glen = sizeof(*got);
  getsockname(fd, (struct sockaddr *)got, &glen);
  *fd_out = fd;
  return MTP_OK;
}

/* ---- admin endpoint: GET /metrics (Prometheus text); anything else 404 ---- */

static void on_admin_closed(uv_handle_t *h) {
  struct admin_conn *c = h->data;
  mtp_free(c->resp);
  mtp_free(c);
}

static void on_admin_written(uv_write_t *wr, int status) {
  struct admin_conn *c = wr->data;
  uv_close((uv_handle_t *)&c->tcp, on_admin_closed);
}

static void admin_respond(struct admin_conn *c, int code, const char *ctype, const char *body, size_t blen) {
  const char *reason = code == 200 ? "OK" : code == 404 ? "Not Found" : "Bad Request";
  size_t cap = blen + 256;
  c->resp = mtp_malloc(cap);
  if (c->resp == NULL) {
    uv_close((uv_handle_t *)&c->tcp, on_admin_closed);
    return;
  }
  int n = snprintf(c->resp, cap, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                   code, reason, ctype, blen);
  memcpy(c->resp + n, body, blen);
  uv_buf_t buf = uv_buf_init(c->resp, (unsigned)((size_t)n + blen));
  uv_read_stop((uv_stream_t *)&c->tcp);
  c->wr.data = c;
  if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &buf, 1, on_admin_written) != 0)
    uv_close((uv_handle_t *)&c->tcp, on_admin_closed);
}

static void admin_route(struct admin_conn *c) {
  if (strncmp(c->req, "GET /metrics ", 13) == 0 || strncmp(c->req, "GET /metrics?", 13) == 0) {
    char *text;
    size_t len;
    if (mtp_metrics_format(&text, &len) != MTP_OK) {
      uv_close((uv_handle_t *)&c->tcp, on_admin_closed);
      return;
    }
    admin_respond(c, 200, "text/plain; version=0.0.4", text, len);
    mtp_free(text);
    return;
  }
  static const char nf[] = "not found\n";
  admin_respond(c, 404, "text/plain", nf, sizeof(nf) - 1);
}

static void on_admin_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct admin_conn *c = h->data;
  buf->base = c->req + c->len;
  buf->len = sizeof(c->req) - 1 - c->len;
}

static void on_admin_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct admin_conn *c = s->data;
  if (nread < 0) {
    uv_close((uv_handle_t *)s, on_admin_closed);
    return;
  }
  c->len += (size_t)nread;
  c->req[c->len] = '\0';
  if (strstr(c->req, "\r\n\r\n") != NULL || strstr(c->req, "\n\n") != NULL) {
    admin_route(c);
    return;
  }
  if (c->len >= sizeof(c->req) - 1) {
    static const char bad[] = "request too large\n";
    admin_respond(c, 400, "text/plain", bad, sizeof(bad) - 1);
  }
}

static void on_admin_connection(uv_stream_t *server, int status) {
  if (status < 0)
    return;
  struct admin_conn *c = mtp_calloc(1, sizeof(*c));
  if (c == NULL)
    return;
  uv_tcp_init(server->loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_admin_alloc, on_admin_read) != 0)
    uv_close((uv_handle_t *)&c->tcp, on_admin_closed);
}

static int admin_start(struct mtp_app *app) {
  struct sockaddr_storage addr;
  if (mtp_parse_addr_port(app->cfg->admin, &addr) != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "admin: '%s' is not ADDR:PORT", app->cfg->admin);
    return MTP_EINVAL;
  }
  uv_tcp_init(app->loop, &app->admin);
  app->admin_on = true;
  int rc = uv_tcp_bind(&app->admin, (const struct sockaddr *)&addr, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&app->admin, 64, on_admin_connection);
  if (rc != 0) {
    mtp_log(MTP_LOG_ERROR, "admin: cannot listen on %s: %s", app->cfg->admin, uv_strerror(rc));
    return rc;
  }
  struct sockaddr_storage got;
  int glen = sizeof(got);
  uv_tcp_getsockname(&app->admin, (struct sockaddr *)&got, &glen);
  char s[80];
  mtp_format_addr(&got, s, sizeof(s));
  mtp_log(MTP_LOG_INFO, "admin listening on %s", s);
  return MTP_OK;
}

int mtp_app_setup(struct mtp_app **out, const struct mtp_config *cfg) {
  struct mtp_app *app = mtp_calloc(1, sizeof(*app));
  if (app == NULL)
    return MTP_ENOMEM;
  app->cfg = cfg;
  app->loop = uv_default_loop();
  pthread_mutex_init(&app->lock, NULL);
  pthread_cond_init(&app->cond, NULL);
  *out = app;
  mtp_metrics_thread_register();
  app->bound = mtp_calloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof(*app->bound));
  app->reserve_fds = mtp_calloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof(int));
  if (app->bound == NULL || app->reserve_fds == NULL)
    return MTP_ENOMEM;
  for (size_t i = 0; i < cfg->nlisteners; i++)
    app->reserve_fds[i] = -1;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    int rc = reserve_port(&cfg->listeners[i].addr, &app->bound[i], &app->reserve_fds[i]);
    if (rc != MTP_OK) {
      char s[80];
      mtp_format_addr(&cfg->listeners[i].addr, s, sizeof(s));
      mtp_log(MTP_LOG_ERROR, "listener %s: cannot bind %s: %s", cfg->listeners[i].name, s, mtp_strerror(rc));
      return rc;
    }
  }
  if (cfg->admin != NULL)
    return admin_start(app);
  return MTP_OK;
}

uv_loop_t *mtp_app_loop(struct mtp_app *app) { return app->loop; }
const struct mtp_config *mtp_app_config(struct mtp_app *app) { return app->cfg; }
const struct sockaddr_storage *mtp_app_bound_addrs(struct mtp_app *app) { return app->bound; }
void *mtp_app_role_ctx(struct mtp_app *app) { return app->role ? app->role->ctx : NULL; }

/* ---- workers ---- */

static void on_worker_stop(uv_async_t *a) {
  struct worker *w = a->data;
  w->app->role->worker_stop(w->state);
  uv_close((uv_handle_t *)a, NULL);
}

static void *worker_main(void *arg) {
  struct worker *w = arg;
  struct mtp_app *app = w->app;
  mtp_metrics_thread_register();
  int rc = uv_loop_init(&w->loop);
  if (rc == 0) {
    rc = uv_async_init(&w->loop, &w->stop_async, on_worker_stop);
    w->stop_async.data = w;
  }
  if (rc == 0)
    rc = app->role->worker_setup(app, &w->loop, w->index, &w->state);
  pthread_mutex_lock(&app->lock);
  w->setup_rc = rc;
  app->nready++;
  pthread_cond_broadcast(&app->cond);
  pthread_mutex_unlock(&app->lock);
  if (rc != 0 && w->state != NULL)
    app->role->worker_stop(w->state);
  if (rc != 0 && uv_is_active((uv_handle_t *)&w->stop_async))
    uv_close((uv_handle_t *)&w->stop_async, NULL);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  app->role->worker_free(w->state);
  w->state = NULL;
  if (uv_loop_close(&w->loop) != 0)
    mtp_log(MTP_LOG_WARN, "worker %d: loop closed with handles still open", w->index);
  return NULL;
}

int mtp_app_start_workers(struct mtp_app *app, const struct mtp_app_role *role) {
  const struct mtp_config *cfg = app->cfg;
  app->role = role;
  app->nworkers = cfg->workers > 0 ? cfg->workers : 1;
  app->workers = mtp_calloc((size_t)app->nworkers, sizeof(*app->workers));
  if (app->workers == NULL)
    return MTP_ENOMEM;
  int started = 0;
  for (int i = 0; i < app->nworkers; i++) {
    struct worker *w = &app->workers[i];
    w->app = app;
    w->index = i;
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
      mtp_log(MTP_LOG_ERROR, "cannot start worker thread %d", i);
      break;
    }
    w->started = true;
    started++;
  }
  pthread_mutex_lock(&app->lock);
  while (app->nready < started)
    pthread_cond_wait(&app->cond, &app->lock);
  pthread_mutex_unlock(&app->lock);
  if (started < app->nworkers)
    return MTP_ENOMEM;
  for (int i = 0; i < app->nworkers; i++)
    if (app->workers[i].setup_rc != 0)
      return app->workers[i].setup_rc;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    char s[80];
    mtp_format_addr(&app->bound[i], s, sizeof(s));
    mtp_log(MTP_LOG_INFO, "listener %s listening on %s", cfg->listeners[i].name, s);
  }
  mtp_log(MTP_LOG_INFO, "%d worker%s running", app->nworkers, app->nworkers == 1 ? "" : "s");
  return MTP_OK;
}

/* ---- links ---- */

static void guess_host(const struct mtp_app *app, const struct sockaddr_storage *bound, char *out, size_t outlen) {
  const struct mtp_config *cfg = app->cfg;
  if (cfg->public_host != NULL) {
    snprintf(out, outlen, "%s", cfg->public_host);
    return;
  }
  if (cfg->has_nat) {
    struct in_addr a = {htonl(cfg->nat_public)};
    inet_ntop(AF_INET, &a, out, (socklen_t)outlen);
    return;
  }
  /* A specific listen address is what clients dial; for a wildcard, the first global
   * address of this host (no network look-ups). */
  if (bound->ss_family == AF_INET) {
    const struct sockaddr_in *sin = (const struct sockaddr_in *)bound;
    if (sin->sin_addr.s_addr != htonl(INADDR_ANY)) {
      inet_ntop(AF_INET, &sin->sin_addr, out, (socklen_t)outlen);
      return;
    }
  } else {
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)bound;
    if (!IN6_IS_ADDR_UNSPECIFIED(&sin6->sin6_addr)) {
      inet_ntop(AF_INET6, &sin6->sin6_addr, out, (socklen_t)outlen);
      return;
    }
  }
  snprintf(out, outlen, "YOUR_SERVER_IP");
  struct ifaddrs *ifs;
  if (getifaddrs(&ifs) != 0)
    return;
  for (struct ifaddrs *i = ifs; i != NULL; i = i->ifa_next) {
    if (i->ifa_addr == NULL || i->ifa_addr->sa_family != AF_INET)
      continue;
    const struct sockaddr_in *sin = (const struct sockaddr_in *)i->ifa_addr;
    if ((ntohl(sin->sin_addr.s_addr) >> 24) == 127)
      continue;
    inet_ntop(AF_INET, &sin->sin_addr, out, (socklen_t)outlen);
    break;
  }
  freeifaddrs(ifs);
}

void mtp_app_print_links(struct mtp_app *app) {
  const struct mtp_config *cfg = app->cfg;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const struct mtp_listener_conf *l = &cfg->listeners[i];
    char host[INET6_ADDRSTRLEN + 2];
    guess_host(app, &app->bound[i], host, sizeof(host));
    int port = app->bound[i].ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&app->bound[i])->sin6_port)
                                                   : ntohs(((struct sockaddr_in *)&app->bound[i])->sin_port);
    bool v6host = strchr(host, ':') != NULL;
    for (size_t s = 0; s < l->nsecrets; s++) {
      char hex[33];
      mtp_hex_encode(l->secrets[s], 16, hex);
      if (l->allowed_protocols & (MTP_ALLOW_ABRIDGED | MTP_ALLOW_INTERMEDIATE))
        mtp_log(MTP_LOG_INFO, "link %s: tg://proxy?server=%s%s%s&port=%d&secret=%s", l->name, v6host ? "[" : "", host,
                v6host ? "]" : "", port, hex);
      if (l->allowed_protocols & MTP_ALLOW_SECURE) {
        mtp_log(MTP_LOG_INFO, "link %s: tg://proxy?server=%s%s%s&port=%d&secret=dd%s", l->name, v6host ? "[" : "",
                host, v6host ? "]" : "", port, hex);
        mtp_log(MTP_LOG_INFO, "link %s: https://t.me/proxy?server=%s%s%s&port=%d&secret=dd%s", l->name,
                v6host ? "[" : "", host, v6host ? "]" : "", port, hex);
      }
    }
  }
}

/* ---- signals and shutdown ---- */

static void on_signal(uv_signal_t *s, int signum) {
  struct mtp_app *app = s->data;
  if (app->stopping)
    return;
  app->stopping = true;
  mtp_log(MTP_LOG_INFO, "signal %d: stopping", signum);
  app->on_stop(app);
}

int mtp_app_handle_signals(struct mtp_app *app, mtp_app_stop_cb on_stop) {
  app->on_stop = on_stop;
  uv_signal_init(app->loop, &app->sigint);
  uv_signal_init(app->loop, &app->sigterm);
  app->sigint.data = app->sigterm.data = app;
  app->signals_on = true;
  int rc = uv_signal_start(&app->sigint, on_signal, SIGINT);
  if (rc == 0)
    rc = uv_signal_start(&app->sigterm, on_signal, SIGTERM);
  return rc;
}

bool mtp_app_is_stopping(const struct mtp_app *app) { return app->stopping; }

void mtp_app_stop(struct mtp_app *app) {
  for (int i = 0; i < app->nworkers; i++) {
    struct worker *w = &app->workers[i];
    if (w->started && w->setup_rc == 0)
      uv_async_send(&w->stop_async);
  }
  for (int i = 0; i < app->nworkers; i++) {
    struct worker *w = &app->workers[i];
    if (w->started)
      pthread_join(w->thread, NULL);
    w->started = false;
  }
  if (app->admin_on && !uv_is_closing((uv_handle_t *)&app->admin))
    uv_close((uv_handle_t *)&app->admin, NULL);
  if (app->signals_on) {
    if (!uv_is_closing((uv_handle_t *)&app->sigint))
      uv_close((uv_handle_t *)&app->sigint, NULL);
    if (!uv_is_closing((uv_handle_t *)&app->sigterm))
      uv_close((uv_handle_t *)&app->sigterm, NULL);
  }
  for (size_t i = 0; i < app->cfg->nlisteners; i++) {
    if (app->reserve_fds[i] >= 0)
      close(app->reserve_fds[i]);
    app->reserve_fds[i] = -1;
  }
}

void mtp_app_free(struct mtp_app *app) {
  if (app == NULL)
    return;
  mtp_free(app->workers);
  mtp_free(app->bound);
  mtp_free(app->reserve_fds);
  pthread_mutex_destroy(&app->lock);
  pthread_cond_destroy(&app->cond);
  mtp_free(app);
}
