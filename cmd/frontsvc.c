/*
 * frontsvc.c - the front half's process-wide services (see frontsvc.h).
 */
#include "frontsvc.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

#include "admin.h"
#include "alloc.h"
#include "err.h"
#include "log.h"
#include "lstats.h"
#include "policy.h"
#include "tlsprobe.h"

#include "banned.h"

/* ---- admin hooks ---- */

static int admin_tables_json(void *ctx, const char *table, char **out) {
  struct mtp_frontsvc *svc = ctx;
  return mtp_policy_tables_json(svc->policy, table, out);
}
static int admin_table_add(void *ctx, const char *table, const char *value) {
  struct mtp_frontsvc *svc = ctx;
  return mtp_policy_table_add(svc->policy, table, value);
}
static int admin_table_del(void *ctx, const char *table, const char *value) {
  struct mtp_frontsvc *svc = ctx;
  return mtp_policy_table_del(svc->policy, table, value);
}

/* A Prometheus label value: backslash, double quote and newline escaped. */
static void label_escape(const char *in, char *out, size_t outlen) {
  size_t o = 0;
  for (; *in != '\0' && o + 3 < outlen; in++) {
    char c = *in;
    if (c == '\\' || c == '"' || c == '\n') {
      out[o++] = '\\';
      c = c == '\n' ? 'n' : c;
    }
    out[o++] = c;
  }
  out[o] = '\0';
}

/* The per-listener series of /metrics: one line per listener with the value of stat first,
 * or (first < last) one per listener and outer protocol with the values first..last. */
static const struct {
  const char *name, *type, *help;
  int first, last; /* enum mtp_lstat */
} lstat_series[] = {
    {"mtproxy_listener_client_connections", "gauge", "client connections open now, by listener", MTP_LSTAT_ACTIVE,
     MTP_LSTAT_ACTIVE},
    {"mtproxy_listener_connections_total", "counter", "client TCP connections accepted, by listener",
     MTP_LSTAT_ACCEPTED, MTP_LSTAT_ACCEPTED},
    {"mtproxy_listener_handshakes_total", "counter",
     "successful client handshakes by listener and outer protocol (fake_tls: any framing inside)",
     MTP_LSTAT_HS_ABRIDGED, MTP_LSTAT_HS_FAKE_TLS},
};

/* mtproxy_policy_rejects_total{rule="N"}, the replay cache's figures and the client
 * connections by listener (see frontsvc.h). */
static char *admin_metrics(void *ctx) {
  struct mtp_frontsvc *svc = ctx;
  size_t n = mtp_policy_nrules(svc->policy);
  struct mtp_lstats_row *rows = NULL;
  size_t nrows = 0;
  if (mtp_lstats_sum(svc->lstats, mtp_app_config(svc->app), &rows, &nrows) != MTP_OK)
    nrows = 0; /* out of memory: no per-listener lines this time */
  size_t cap = 2048 + n * 64 + nrows * 6 * 200;
  char *out = mtp_malloc(cap);
  if (out == NULL) {
    mtp_lstats_rows_free(rows, nrows);
    return NULL;
  }
  size_t len = 0;
  int w;
#define EMIT(...)                                                       \
  do {                                                                  \
    w = snprintf(out + len, cap - len, __VA_ARGS__);                    \
    if (w > 0 && (size_t)w < cap - len)                                 \
      len += (size_t)w;                                                 \
  } while (0)
  if (n > 0) {
    EMIT("# HELP mtproxy_policy_rejects_total connections rejected by each policy rule (index in policy)\n"
         "# TYPE mtproxy_policy_rejects_total counter\n");
    for (size_t i = 0; i < n; i++)
      EMIT("mtproxy_policy_rejects_total{rule=\"%zu\"} %llu\n", i, (unsigned long long)mtp_policy_rejects(svc->policy, i));
  }
  struct mtp_replay_stats st;
  mtp_replay_get_stats(&svc->replay, &st);
  EMIT("# HELP mtproxy_replay_cache_entries handshakes remembered by the replay cache\n"
       "# TYPE mtproxy_replay_cache_entries gauge\nmtproxy_replay_cache_entries %llu\n"
       "# HELP mtproxy_replay_cache_capacity entries the replay cache can hold\n"
       "# TYPE mtproxy_replay_cache_capacity gauge\nmtproxy_replay_cache_capacity %llu\n"
       "# HELP mtproxy_replay_cache_hits_total replayed handshakes caught\n"
       "# TYPE mtproxy_replay_cache_hits_total counter\nmtproxy_replay_cache_hits_total %llu\n"
       "# HELP mtproxy_replay_cache_evictions_total live entries pushed out because the cache was full\n"
       "# TYPE mtproxy_replay_cache_evictions_total counter\nmtproxy_replay_cache_evictions_total %llu\n",
       (unsigned long long)st.entries, (unsigned long long)st.capacity, (unsigned long long)st.hits,
       (unsigned long long)st.evictions);
  char lbl[2 * 64 + 8];
  for (size_t m = 0; nrows > 0 && m < sizeof(lstat_series) / sizeof(lstat_series[0]); m++) {
    const char *name = lstat_series[m].name;
    EMIT("# HELP %s %s\n# TYPE %s %s\n", name, lstat_series[m].help, name, lstat_series[m].type);
    for (size_t i = 0; i < nrows; i++) {
      label_escape(rows[i].name, lbl, sizeof(lbl));
      for (int k = lstat_series[m].first; k <= lstat_series[m].last; k++) {
        if (lstat_series[m].first == lstat_series[m].last)
          EMIT("%s{listener=\"%s\"} %lld\n", name, lbl, (long long)rows[i].v[k]);
        else
          EMIT("%s{listener=\"%s\",protocol=\"%s\"} %lld\n", name, lbl, mtp_lstat_protocol((enum mtp_lstat)k),
               (long long)rows[i].v[k]);
      }
    }
  }
#undef EMIT
  mtp_lstats_rows_free(rows, nrows);
  return out;
}

/* /status: "clients" in each listener the app listed, and the removed listeners that still
 * have clients. */
static void status_listeners(struct mtp_frontsvc *svc, cJSON *status) {
  struct mtp_lstats_row *rows = NULL;
  size_t nrows = 0;
  if (mtp_lstats_sum(svc->lstats, mtp_app_config(svc->app), &rows, &nrows) != MTP_OK)
    return;
  cJSON *ls = cJSON_GetObjectItemCaseSensitive(status, "listeners");
  if (!cJSON_IsArray(ls))
    ls = NULL;
  cJSON *it;
  cJSON_ArrayForEach(it, ls) {
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(it, "name"));
    for (size_t i = 0; name != NULL && i < nrows; i++)
      if (!rows[i].removed && strcmp(rows[i].name, name) == 0)
        cJSON_AddNumberToObject(it, "clients", (double)rows[i].v[MTP_LSTAT_ACTIVE]);
  }
  cJSON *closed = NULL;
  for (size_t i = 0; i < nrows; i++) {
    if (!rows[i].removed)
      continue;
    if (closed == NULL && (closed = cJSON_AddArrayToObject(status, "closed_listeners")) == NULL)
      break;
    cJSON *o = cJSON_CreateObject();
    if (o == NULL || !cJSON_AddItemToArray(closed, o)) {
      cJSON_Delete(o);
      break;
    }
    cJSON_AddStringToObject(o, "name", rows[i].name);
    cJSON_AddNumberToObject(o, "clients", (double)rows[i].v[MTP_LSTAT_ACTIVE]);
  }
  mtp_lstats_rows_free(rows, nrows);
}

static void admin_status(void *ctx, cJSON *status) {
  struct mtp_frontsvc *svc = ctx;
  status_listeners(svc, status);
  struct mtp_replay_stats st;
  mtp_replay_get_stats(&svc->replay, &st);
  cJSON *r = cJSON_AddObjectToObject(status, "replay_cache");
  if (r == NULL)
    return;
  cJSON_AddNumberToObject(r, "entries", (double)st.entries);
  cJSON_AddNumberToObject(r, "capacity", (double)st.capacity);
  cJSON_AddNumberToObject(r, "hits", (double)st.hits);
  cJSON_AddNumberToObject(r, "evictions", (double)st.evictions);
  cJSON_AddNumberToObject(r, "max_age_s", (double)svc->replay._max_age);
}

/* ---- setup ---- */

/* The public addresses fronting must never dial: --nat-info's public IP and a literal
 * public_host. */
static void add_public_addrs(struct mtp_frontsvc *svc, const struct mtp_config *cfg) {
  struct mtp_front_shared *sh = &svc->shared;
  memset(sh->public_addrs, 0, sizeof(sh->public_addrs));
  sh->npublic = 0;
  if (cfg->has_nat) {
    struct sockaddr_in *a = (struct sockaddr_in *)&sh->public_addrs[sh->npublic++];
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(cfg->nat_public);
  }
  if (cfg->public_host != NULL && sh->npublic < 2) {
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, cfg->public_host, &a4->sin_addr) == 1)
      a4->sin_family = AF_INET;
    else if (inet_pton(AF_INET6, cfg->public_host, &a6->sin6_addr) == 1)
      a6->sin6_family = AF_INET6;
    else
      return;
    sh->public_addrs[sh->npublic++] = ss;
  }
}

static bool any_fake_tls(const struct mtp_config *cfg) {
  for (size_t i = 0; i < cfg->nlisteners; i++)
    if (mtp_config_serves_fake_tls(cfg, &cfg->listeners[i]))
      return true;
  return false;
}

int mtp_frontsvc_setup(struct mtp_frontsvc *svc, struct mtp_app *app, const struct mtp_config *cfg) {
  memset(svc, 0, sizeof(*svc));
  svc->app = app;
  mtp_replay_init(&svc->replay);
  int rc = mtp_replay_setup(&svc->replay, cfg->replay_cache_bytes, cfg->replay_max_age);
  if (rc != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "replay cache (%zu bytes, max age %u s): %s", cfg->replay_cache_bytes,
            (unsigned)cfg->replay_max_age, mtp_strerror(rc));
    return rc;
  }
  char perr[512];
  rc = mtp_policy_create(&svc->policy, cfg, perr, sizeof(perr));
  if (rc != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "policy: %s", perr);
    return rc;
  }
  if (any_fake_tls(cfg)) {
    rc = mtp_tlsprobe_setup(&svc->tlsprobe, cfg, mtp_app_loop(app));
    if (rc != MTP_OK) {
      mtp_log(MTP_LOG_ERROR, "tls probe: %s", mtp_strerror(rc));
      return rc;
    }
  }
  rc = mtp_lstats_create(&svc->lstats);
  if (rc != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "listener counters: %s", mtp_strerror(rc));
    return rc;
  }
  svc->shared.replay = &svc->replay;
  svc->shared.policy = svc->policy;
  svc->shared.tlsprobe = svc->tlsprobe;
  svc->shared.lstats = svc->lstats;
  svc->shared.bound_addrs = mtp_app_bound_addrs(app);
  svc->shared.nbound = cfg->nlisteners;
  add_public_addrs(svc, cfg);
  struct mtp_admin *admin = mtp_app_admin(app);
  if (admin != NULL) {
    struct mtp_admin_hooks hooks = {.ctx = svc,
                                    .status = admin_status,
                                    .metrics = admin_metrics,
                                    .tables_json = admin_tables_json,
                                    .table_add = admin_table_add,
                                    .table_del = admin_table_del};
    rc = mtp_admin_add_hooks(admin, &hooks);
  }
  return rc;
}

void mtp_frontsvc_reconfigure(struct mtp_frontsvc *svc, const struct mtp_config *cfg) {
  if (svc->tlsprobe != NULL) {
    int rc = mtp_tlsprobe_reconfigure(svc->tlsprobe, cfg);
    if (rc != MTP_OK)
      mtp_log(MTP_LOG_ERROR, "reload: the tls probe keeps its old domains and settings: %s", mtp_strerror(rc));
  } else if (any_fake_tls(cfg)) {
    /* The first configuration with fake-TLS: learn the flight sizes from now on. */
    int rc = mtp_tlsprobe_setup(&svc->tlsprobe, cfg, mtp_app_loop(svc->app));
    if (rc != MTP_OK)
      mtp_log(MTP_LOG_ERROR, "reload: no tls probe (flight sizes are drawn at random): %s", mtp_strerror(rc));
  }
  svc->shared.tlsprobe = svc->tlsprobe;
  svc->shared.bound_addrs = mtp_app_bound_addrs(svc->app);
  svc->shared.nbound = cfg->nlisteners;
  add_public_addrs(svc, cfg);
}

void mtp_frontsvc_reclaim(struct mtp_frontsvc *svc) { mtp_tlsprobe_reclaim(svc->tlsprobe); }

void mtp_frontsvc_stop(struct mtp_frontsvc *svc) {
  if (svc->tlsprobe != NULL)
    mtp_tlsprobe_stop(svc->tlsprobe);
}

void mtp_frontsvc_free(struct mtp_frontsvc *svc) {
  mtp_tlsprobe_free(svc->tlsprobe);
  svc->tlsprobe = NULL;
  mtp_lstats_free(svc->lstats);
  svc->lstats = NULL;
  mtp_policy_free(svc->policy);
  svc->policy = NULL;
  mtp_replay_free(&svc->replay);
}
