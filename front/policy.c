/*
 * policy.c - connection policy: rules, tables, max_connections counters, the tables file.
 * See policy.h for the contract and docs/policy.md for the operator's view.
 *
 * Locks (always taken in this order, never held when a public function returns):
 *   edit_lock      mutex; serialises table edits, tables-file writes and reconfigure; guards
 *                  the list of tables and the file path. Admin thread only in practice.
 *   rules_lock     rwlock (writer-preferring); admit holds it for reading while it walks the
 *                  rules; reconfigure holds it for writing to swap the rule set.
 *   table->lock    rwlock (writer-preferring) per table; admit reads, edits write.
 *   cmap->lock     mutex per max_connections rule; guards that rule's counter map.
 *
 * Lifetimes: tables are never freed before mtp_policy_free (rules point at them). A counter
 * map (cmap) is reference-counted: one reference from the rule that owns it plus one per
 * counter a hold has taken in it, so a hold can be released after its rule (or the whole
 * policy) is gone.
 */
#include "policy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "alloc.h"
#include "crypto.h"
#include "err.h"
#include "log.h"

#include "banned.h"

#define TEXT_MAX 255       /* longest listener-name / untyped table entry */
#define DOMAIN_MAX 253     /* longest domain table entry (and SNI value used as such) */
#define NORM_MAX 256       /* buffer for one normalised value, NUL included */
#define TUPLE_SEP '\x1f'   /* between key values in a counter's key (never in a value) */
#define TUPLE_MAX (MTP_POLICY_MAX_KEYS * (TEXT_MAX + 1) + 1)
#define FILE_MAX (64u << 20) /* a bigger tables file is refused as corrupt */

/* ------------------------------------------------------------------------------------------ */
/* Hashing: SipHash-1-3 with a per-process random key, so clients cannot aim for collisions. */

static uint64_t hash_key[2];
static pthread_once_t hash_once = PTHREAD_ONCE_INIT;

static void hash_init(void) {
  if (mtp_random(hash_key, sizeof(hash_key)) != MTP_OK) {
    hash_key[0] = (uint64_t)getpid() * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)&hash_key;
    hash_key[1] = (uint64_t)time(NULL) * 0xc2b2ae3d27d4eb4full;
  }
}

static inline uint64_t rotl64(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

#define SIPROUND                  \
  do {                            \
    v0 += v1;                     \
    v1 = rotl64(v1, 13);          \
    v1 ^= v0;                     \
    v0 = rotl64(v0, 32);          \
    v2 += v3;                     \
    v3 = rotl64(v3, 16);          \
    v3 ^= v2;                     \
    v0 += v3;                     \
    v3 = rotl64(v3, 21);          \
    v3 ^= v0;                     \
    v2 += v1;                     \
    v1 = rotl64(v1, 17);          \
    v1 ^= v2;                     \
    v2 = rotl64(v2, 32);          \
  } while (0)

static uint32_t strhash(const char *s, size_t len) {
  const uint8_t *p = (const uint8_t *)s;
  uint64_t v0 = 0x736f6d6570736575ull ^ hash_key[0], v1 = 0x646f72616e646f6dull ^ hash_key[1];
  uint64_t v2 = 0x6c7967656e657261ull ^ hash_key[0], v3 = 0x7465646279746573ull ^ hash_key[1];
  size_t nblk = len / 8;
  for (size_t i = 0; i < nblk; i++, p += 8) {
    uint64_t m = 0;
    for (int j = 0; j < 8; j++)
      m |= (uint64_t)p[j] << (8 * j);
    v3 ^= m;
    SIPROUND;
    v0 ^= m;
  }
  uint64_t b = (uint64_t)len << 56;
  for (size_t j = 0; j < (len & 7); j++)
    b |= (uint64_t)p[j] << (8 * j);
  v3 ^= b;
  SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  uint64_t h = v0 ^ v1 ^ v2 ^ v3;
  return (uint32_t)(h ^ (h >> 32));
}

/* ------------------------------------------------------------------------------------------ */
/* strmap: an open-addressing (linear probing) map from a string to a uint64_t. The slot array
 * holds pointers to separately allocated entries, so an entry's address is stable while it is
 * in the map (holds point at their counters). Deletion shifts the following run back instead
 * of leaving tombstones, and the array shrinks when it becomes sparse, so memory follows the
 * current number of entries. Not thread-safe: callers lock. */

struct sm_entry {
  uint64_t val;  /* counters: open connections; tables: META_* of the entry */
  uint32_t hash;
  uint32_t len;  /* strlen(key) */
  char key[];    /* NUL-terminated */
};

struct strmap {
  struct sm_entry **slots; /* owns: cap slots (and the entries); NULL when empty */
  size_t cap;              /* 0 or a power of two >= 16 */
  size_t n;
};

#define SM_MIN_CAP 16

static struct sm_entry *sm_find(const struct strmap *m, const char *key, size_t len) {
  if (m->n == 0)
    return NULL;
  uint32_t h = strhash(key, len);
  size_t mask = m->cap - 1;
  for (size_t i = h & mask;; i = (i + 1) & mask) {
    struct sm_entry *e = m->slots[i];
    if (e == NULL)
      return NULL;
    if (e->hash == h && e->len == len && memcmp(e->key, key, len) == 0)
      return e;
  }
}

static void sm_place(struct sm_entry **slots, size_t cap, struct sm_entry *e) {
  size_t i = e->hash & (cap - 1);
  while (slots[i] != NULL)
    i = (i + 1) & (cap - 1);
  slots[i] = e;
}

static int sm_resize(struct strmap *m, size_t cap) {
  struct sm_entry **s = mtp_calloc(cap, sizeof(*s));
  if (s == NULL)
    return MTP_ENOMEM;
  for (size_t i = 0; i < m->cap; i++)
    if (m->slots[i] != NULL)
      sm_place(s, cap, m->slots[i]);
  mtp_free(m->slots);
  m->slots = s;
  m->cap = cap;
  return MTP_OK;
}

/* Adds key with val (the key must not be present). Returns MTP_OK or MTP_ENOMEM. */
static int sm_add(struct strmap *m, const char *key, size_t len, uint64_t val, struct sm_entry **out) {
  if ((m->n + 1) * 4 > m->cap * 3) {
    int rc = sm_resize(m, m->cap ? m->cap * 2 : SM_MIN_CAP);
    if (rc != MTP_OK)
      return rc;
  }
  struct sm_entry *e = mtp_malloc(offsetof(struct sm_entry, key) + len + 1);
  if (e == NULL)
    return MTP_ENOMEM;
  e->val = val;
  e->hash = strhash(key, len);
  e->len = (uint32_t)len;
  memcpy(e->key, key, len);
  e->key[len] = '\0';
  sm_place(m->slots, m->cap, e);
  m->n++;
  if (out != NULL)
    *out = e;
  return MTP_OK;
}

/* Removes and frees e, which must be in m. */
static void sm_remove(struct strmap *m, struct sm_entry *e) {
  size_t mask = m->cap - 1;
  size_t i = e->hash & mask;
  while (m->slots[i] != e)
    i = (i + 1) & mask;
  /* Backward shift: move later members of the probe run into the hole unless their home slot
   * lies cyclically in (hole, j], where they must stay to remain reachable. */
  size_t j = i;
  for (;;) {
    j = (j + 1) & mask;
    struct sm_entry *x = m->slots[j];
    if (x == NULL)
      break;
    size_t k = x->hash & mask;
    bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
    if (stays)
      continue;
    m->slots[i] = x;
    i = j;
  }
  m->slots[i] = NULL;
  m->n--;
  mtp_free(e);
  if (m->n == 0) {
    mtp_free(m->slots);
    m->slots = NULL;
    m->cap = 0;
  } else if (m->cap > SM_MIN_CAP && m->n * 8 < m->cap) {
    (void)sm_resize(m, m->cap / 2); /* on failure the larger array simply stays */
  }
}

static void sm_clear(struct strmap *m) {
  for (size_t i = 0; i < m->cap; i++)
    mtp_free(m->slots[i]);
  mtp_free(m->slots);
  m->slots = NULL;
  m->cap = 0;
  m->n = 0;
}

/* The entries' keys sorted (for stable JSON); borrowed pointers, caller frees the array. */
static int cmp_strp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int sm_sorted_keys(const struct strmap *m, const char ***out) {
  *out = NULL;
  if (m->n == 0)
    return MTP_OK;
  const char **v = mtp_malloc(m->n * sizeof(*v));
  if (v == NULL)
    return MTP_ENOMEM;
  size_t k = 0;
  for (size_t i = 0; i < m->cap; i++)
    if (m->slots[i] != NULL)
      v[k++] = m->slots[i]->key;
  qsort(v, k, sizeof(*v), cmp_strp);
  *out = v;
  return MTP_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Values: table entries and key values share one normal form. */

/* How a table's entries are normalised: by the kinds of key the rules use it with (a set of
 * these bits, config.h's MTP_PENTRY_*: the same kinds as config.c checks the config's entries
 * for). */
enum {
  TK_ANY = 0,                        /* no rule uses the table: IPs canonicalised, other text kept as is */
  TK_LISTENER = MTP_PENTRY_NAME,     /* listener names, as is */
  TK_DOMAIN = MTP_PENTRY_DOMAIN,     /* host names; lower-cased when no listener key uses the table too */
  TK_V4 = MTP_PENTRY_V4,             /* IPv4 addresses and subnets, canonical */
  TK_V6 = MTP_PENTRY_V6,             /* IPv6 addresses and subnets, canonical (IPv4-mapped ones become IPv4) */
};

/* "an IPv4 address or subnet or a host name" etc. for errors. */
static const char *tkind_what(unsigned k, char *buf, size_t len) {
  static const char *const what[] = {"a listener name", "a host name", "an IPv4 address or subnet",
                                     "an IPv6 address or subnet"};
  size_t used = 0;
  buf[0] = '\0';
  for (int b = 0; b < 4; b++)
    if ((k & (1u << b)) && used < len) {
      int w = snprintf(buf + used, len - used, "%s%s", used > 0 ? " or " : "", what[b]);
      used += w > 0 ? (size_t)w : 0;
    }
  if (k == TK_ANY)
    snprintf(buf, len, "1..255 printable characters without spaces");
  return buf;
}

/* An IP entry's META: family (4 or 6) << 8 | prefix length; 0 for other entries. */
#define META(fam, pfx) ((uint64_t)(fam) << 8 | (uint64_t)(pfx))
#define META_FAM(m) ((int)((m) >> 8))
#define META_PFX(m) ((int)((m)&0xff))

static void mask_bytes(uint8_t *a, int nbytes, int pfx) {
  for (int i = 0; i < nbytes; i++) {
    int bits = pfx - 8 * i;
    if (bits >= 8)
      continue;
    a[i] &= bits <= 0 ? 0 : (uint8_t)(0xff << (8 - bits));
  }
}

/* Canonical text of an address (fam 4: 4 bytes, 6: 16 bytes) masked to pfx: the plain address
 * when pfx is the full length, else "net/pfx". Returns the length. */
static size_t format_ip(int fam, const uint8_t *addr, int pfx, char *out, size_t outlen) {
  uint8_t a[16];
  int nbytes = fam == 4 ? 4 : 16;
  memcpy(a, addr, (size_t)nbytes);
  mask_bytes(a, nbytes, pfx);
  char txt[INET6_ADDRSTRLEN];
  if (inet_ntop(fam == 4 ? AF_INET : AF_INET6, a, txt, sizeof(txt)) == NULL)
    txt[0] = '\0';
  int n = pfx == 8 * nbytes ? snprintf(out, outlen, "%s", txt) : snprintf(out, outlen, "%s/%d", txt, pfx);
  return n < 0 ? 0 : (size_t)n < outlen ? (size_t)n : outlen - 1;
}

/* "a.b.c.d", "a.b.c.d/M", IPv6 likewise; an IPv4-mapped IPv6 address (or a /96+ subnet of
 * them) becomes IPv4. Writes the canonical text; *written_fam is the family as written (4 or
 * 6, before the mapped-address rewrite). Returns MTP_OK or MTP_EINVAL. */
static int norm_ip(const char *in, char *out, size_t outlen, uint64_t *meta, int *written_fam) {
  uint8_t a[16];
  int af, pfx;
  if (mtp_parse_ip_prefix(in, &af, a, &pfx) != MTP_OK)
    return MTP_EINVAL;
  int fam = af == AF_INET ? 4 : 6;
  *written_fam = fam;
  if (fam == 6 && IN6_IS_ADDR_V4MAPPED((struct in6_addr *)a) && pfx >= 96) {
    fam = 4;
    memmove(a, a + 12, 4);
    pfx -= 96;
  }
  format_ip(fam, a, pfx, out, outlen);
  *meta = META(fam, pfx);
  return MTP_OK;
}

/* 1..max bytes, none of them a space or a control character (as config.c checks entries). */
static bool text_ok(const char *s, size_t len, size_t max) {
  if (len == 0 || len > max)
    return false;
  for (size_t i = 0; i < len; i++)
    if ((unsigned char)s[i] <= ' ' || s[i] == 0x7f)
      return false;
  return true;
}

/* Dot-separated labels of 1..63 letters, digits, '-' or '_'; 1..253 bytes in all. */
static bool hostname_ok(const char *s, size_t len) {
  if (len == 0 || len > DOMAIN_MAX)
    return false;
  size_t label = 0;
  for (size_t i = 0; i < len; i++) {
    char c = s[i];
    if (c == '.') {
      if (label == 0)
        return false;
      label = 0;
    } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_') {
      if (++label > 63)
        return false;
    } else {
      return false;
    }
  }
  return label > 0;
}

/* Normalises a table value for the kinds in `kind` into out[NORM_MAX]: an IP (of an allowed
 * family, as written) is made canonical; else a host name is lower-cased when the table is
 * not also matched against listener names; else text is kept as is if a listener key (or no
 * rule) uses the table. Returns MTP_OK or MTP_EINVAL. */
static int norm_value(unsigned kind, const char *in, char *out, uint64_t *meta) {
  size_t len = strlen(in);
  int fam = 0;
  *meta = 0;
  if ((kind == TK_ANY || (kind & (TK_V4 | TK_V6))) && norm_ip(in, out, NORM_MAX, meta, &fam) == MTP_OK &&
      (kind == TK_ANY || (kind & (fam == 4 ? TK_V4 : TK_V6))))
    return MTP_OK;
  *meta = 0;
  if ((kind & TK_DOMAIN) && !(kind & TK_LISTENER) && hostname_ok(in, len)) {
    for (size_t i = 0; i <= len; i++)
      out[i] = (in[i] >= 'A' && in[i] <= 'Z') ? (char)(in[i] - 'A' + 'a') : in[i];
    return MTP_OK;
  }
  if ((kind == TK_ANY || (kind & TK_LISTENER) || ((kind & TK_DOMAIN) && hostname_ok(in, len))) &&
      text_ok(in, len, TEXT_MAX)) {
    memcpy(out, in, len + 1);
    return MTP_OK;
  }
  return MTP_EINVAL;
}

/* ------------------------------------------------------------------------------------------ */
/* Tables. */

struct tset {
  struct strmap set;     /* entry -> META */
  uint32_t npfx4[33];    /* IPv4 entries per prefix length (32: single addresses) */
  uint32_t npfx6[129];
};

struct ptable {
  char *name;            /* owns */
  unsigned kind;       /* changed only under edit_lock and lock (write) */
  bool in_config;        /* named by the current config (else kept from the file or an old config) */
  pthread_rwlock_t lock; /* guards s */
  struct tset s;
};

static void tset_count(struct tset *s, uint64_t meta, int d) {
  if (META_FAM(meta) == 4)
    s->npfx4[META_PFX(meta)] += (uint32_t)d;
  else if (META_FAM(meta) == 6)
    s->npfx6[META_PFX(meta)] += (uint32_t)d;
}

/* Adds a normalised value. Returns MTP_OK, MTP_EEXIST or MTP_ENOMEM. */
static int tset_add(struct tset *s, const char *v, uint64_t meta) {
  size_t len = strlen(v);
  if (sm_find(&s->set, v, len) != NULL)
    return MTP_EEXIST;
  int rc = sm_add(&s->set, v, len, meta, NULL);
  if (rc == MTP_OK)
    tset_count(s, meta, +1);
  return rc;
}

static int tset_del(struct tset *s, const char *v) {
  struct sm_entry *e = sm_find(&s->set, v, strlen(v));
  if (e == NULL)
    return MTP_ENOTFOUND;
  tset_count(s, e->val, -1);
  sm_remove(&s->set, e);
  return MTP_OK;
}

static void tset_clear(struct tset *s) {
  sm_clear(&s->set);
  memset(s->npfx4, 0, sizeof(s->npfx4));
  memset(s->npfx6, 0, sizeof(s->npfx6));
}

/* Normalises and adds value; duplicates (after normalisation) are fine. On MTP_EINVAL err
 * says what was wrong, prefixed by `where`. */
static int tset_load_value(struct tset *s, unsigned kind, const char *value, const char *where, char *err,
                           size_t errlen) {
  char norm[NORM_MAX], what[160];
  uint64_t meta;
  if (norm_value(kind, value, norm, &meta) != MTP_OK) {
    snprintf(err, errlen, "%s: '%.80s' is not %s", where, value, tkind_what(kind, what, sizeof(what)));
    return MTP_EINVAL;
  }
  int rc = tset_add(s, norm, meta);
  if (rc == MTP_ENOMEM) {
    snprintf(err, errlen, "%s: out of memory", where);
    return rc;
  }
  return MTP_OK;
}

/* Builds into dst the entries of src normalised for kind (dst starts empty). */
static int tset_renormalise(struct tset *dst, const struct tset *src, unsigned kind, const char *where, char *err,
                            size_t errlen) {
  for (size_t i = 0; i < src->set.cap; i++) {
    const struct sm_entry *e = src->set.slots[i];
    if (e == NULL)
      continue;
    int rc = tset_load_value(dst, kind, e->key, where, err, errlen);
    if (rc != MTP_OK)
      return rc;
  }
  return MTP_OK;
}

static struct ptable *ptable_new(const char *name, unsigned kind) {
  struct ptable *t = mtp_calloc(1, sizeof(*t));
  if (t == NULL)
    return NULL;
  t->name = mtp_strdup(name);
  pthread_rwlockattr_t a;
  pthread_rwlockattr_init(&a);
  pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  int lrc = pthread_rwlock_init(&t->lock, &a);
  pthread_rwlockattr_destroy(&a);
  if (t->name == NULL || lrc != 0) {
    mtp_free(t->name);
    mtp_free(t);
    return NULL;
  }
  t->kind = kind;
  return t;
}

static void ptable_free(struct ptable *t) {
  if (t == NULL)
    return;
  tset_clear(&t->s);
  pthread_rwlock_destroy(&t->lock);
  mtp_free(t->name);
  mtp_free(t);
}

/* ------------------------------------------------------------------------------------------ */
/* Counter maps and rules. */

struct cmap {
  atomic_long refs;      /* the owning rule + one per counter held in it */
  pthread_mutex_t lock;  /* guards map */
  struct strmap map;     /* key tuple -> open connections (> 0) */
};

static struct cmap *cmap_new(void) {
  struct cmap *m = mtp_calloc(1, sizeof(*m));
  if (m == NULL)
    return NULL;
  if (pthread_mutex_init(&m->lock, NULL) != 0) {
    mtp_free(m);
    return NULL;
  }
  atomic_init(&m->refs, 1);
  return m;
}

static void cmap_unref(struct cmap *m) {
  if (m == NULL || atomic_fetch_sub_explicit(&m->refs, 1, memory_order_acq_rel) != 1)
    return;
  sm_clear(&m->map); /* empty by now: every entry has a hold, and every hold a reference */
  pthread_mutex_destroy(&m->lock);
  mtp_free(m);
}

struct prule {
  enum mtp_policy_rule_kind kind;
  struct mtp_policy_keyspec keys[MTP_POLICY_MAX_KEYS];
  size_t nkeys;
  struct ptable *table;  /* borrows (tables live until mtp_policy_free): in/not_in_table */
  uint64_t max;          /* max_connections */
  struct cmap *counters; /* owns one reference: max_connections */
  atomic_uint_fast64_t rejects;
};

struct ruleset {
  struct prule *rules; /* owns */
  size_t n;
  size_t nmax;         /* how many are max_connections (the size of a hold) */
};

static void ruleset_free(struct ruleset *rs) {
  if (rs == NULL)
    return;
  for (size_t i = 0; i < rs->n; i++)
    cmap_unref(rs->rules[i].counters);
  mtp_free(rs->rules);
  mtp_free(rs);
}

struct hold_item {
  struct cmap *m;     /* owns one reference */
  struct sm_entry *e; /* the counter incremented; stays in m->map while its count is > 0 */
};

struct mtp_policy_hold {
  size_t n;
  struct hold_item items[];
};

static void hold_release(struct mtp_policy_hold *h) {
  if (h == NULL)
    return;
  for (size_t i = h->n; i-- > 0;) {
    struct cmap *m = h->items[i].m;
    pthread_mutex_lock(&m->lock);
    if (--h->items[i].e->val == 0)
      sm_remove(&m->map, h->items[i].e);
    pthread_mutex_unlock(&m->lock);
    cmap_unref(m);
  }
  mtp_free(h);
}

/* ------------------------------------------------------------------------------------------ */

struct mtp_policy {
  pthread_rwlock_t rules_lock; /* guards rs */
  struct ruleset *rs;          /* owns */

  pthread_mutex_t edit_lock;   /* guards everything below, serialises edits and file writes */
  struct ptable **tables;      /* owns: never shrinks before mtp_policy_free */
  size_t ntables;
  char *path;                  /* owns: the tables file; NULL = not persisted */
  char *mkdir_dir;             /* owns: cache_dir to create before writing; NULL = none */
};

static struct ptable *find_table(struct ptable *const *v, size_t n, const char *name) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(v[i]->name, name) == 0)
      return v[i];
  return NULL;
}

/* ---- what a connection looks like to the rules ---- */

struct conninfo {
  int fam;               /* 0: no usable address; 4 (IPv4-mapped IPv6 included) or 6 */
  uint8_t addr[16];
  const char *listener;  /* borrows; NULL: the listener key does not apply */
  bool has_domain;
  char domain[DOMAIN_MAX + 1]; /* lower-cased SNI; "\x01" for an over-long one (matches no entry) */
};

static void conninfo_init(struct conninfo *ci, const struct mtp_policy_conn *c) {
  memset(ci, 0, sizeof(*ci));
  ci->listener = c->listener;
  const struct sockaddr_storage *ss = c->client;
  if (ss != NULL && ss->ss_family == AF_INET) {
    ci->fam = 4;
    memcpy(ci->addr, &((const struct sockaddr_in *)ss)->sin_addr, 4);
  } else if (ss != NULL && ss->ss_family == AF_INET6) {
    const struct in6_addr *a6 = &((const struct sockaddr_in6 *)ss)->sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(a6)) {
      ci->fam = 4;
      memcpy(ci->addr, a6->s6_addr + 12, 4);
    } else {
      ci->fam = 6;
      memcpy(ci->addr, a6->s6_addr, 16);
    }
  }
  if (c->tls_domain != NULL && c->tls_domain[0] != '\0') {
    ci->has_domain = true;
    size_t len = strlen(c->tls_domain);
    if (len > DOMAIN_MAX) {
      ci->domain[0] = '\x01';
    } else {
      for (size_t i = 0; i <= len; i++) {
        char ch = c->tls_domain[i];
        ci->domain[i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch - 'A' + 'a') : ch;
      }
    }
  }
}

/* The prefix length a key looks at (client_ipv4: 32, ipv4/M: M, ...). */
static int key_prefix(const struct mtp_policy_keyspec *k) {
  switch (k->key) {
  case MTP_PKEY_CLIENT_IPV4:
    return 32;
  case MTP_PKEY_CLIENT_IPV6:
    return 128;
  default:
    return k->prefix;
  }
}

static bool key_is_v4(enum mtp_policy_key k) { return k == MTP_PKEY_CLIENT_IPV4 || k == MTP_PKEY_IPV4_SUBNET; }
static bool key_is_v6(enum mtp_policy_key k) { return k == MTP_PKEY_CLIENT_IPV6 || k == MTP_PKEY_IPV6_SUBNET; }

static bool key_applies(const struct mtp_policy_keyspec *k, const struct conninfo *ci) {
  if (key_is_v4(k->key))
    return ci->fam == 4;
  if (key_is_v6(k->key))
    return ci->fam == 6;
  if (k->key == MTP_PKEY_TLS_DOMAIN)
    return ci->has_domain;
  return ci->listener != NULL;
}

/* Appends the key's value to buf (TUPLE_MAX bytes; *len in/out). The key must apply. */
static void key_append(const struct mtp_policy_keyspec *k, const struct conninfo *ci, char *buf, size_t *len) {
  size_t room = TUPLE_MAX - *len;
  if (key_is_v4(k->key) || key_is_v6(k->key)) {
    *len += format_ip(ci->fam, ci->addr, key_prefix(k), buf + *len, room);
    return;
  }
  const char *v = k->key == MTP_PKEY_TLS_DOMAIN ? ci->domain : ci->listener;
  size_t n = strnlen(v, TEXT_MAX); /* longer listener names share their first 255 bytes */
  if (n >= room)
    n = room - 1;
  memcpy(buf + *len, v, n);
  *len += n;
  buf[*len] = '\0';
}

/* 1: the key's value is in the table, 0: no, -1: the key does not apply. For every IP key
 * (client_ipv4, ipv4/M, ...) that means: the client's address is an address entry or lies
 * inside a subnet entry; the key's /M plays no part here (it does for max_connections). */
static int table_match(struct ptable *t, const struct mtp_policy_keyspec *k, const struct conninfo *ci) {
  if (!key_applies(k, ci))
    return -1;
  int found = 0;
  pthread_rwlock_rdlock(&t->lock);
  if (k->key == MTP_PKEY_LISTENER) {
    found = sm_find(&t->s.set, ci->listener, strlen(ci->listener)) != NULL;
  } else if (k->key == MTP_PKEY_TLS_DOMAIN) {
    found = sm_find(&t->s.set, ci->domain, strlen(ci->domain)) != NULL;
  } else {
    /* Only the prefix lengths the table holds are probed: at most 33 (IPv4) or 129 (IPv6)
     * lookups, in practice one per distinct length. */
    const uint32_t *npfx = ci->fam == 4 ? t->s.npfx4 : t->s.npfx6;
    int full = ci->fam == 4 ? 32 : 128;
    char v[NORM_MAX];
    for (int p = 0; p <= full && !found; p++) {
      if (npfx[p] == 0)
        continue;
      size_t n = format_ip(ci->fam, ci->addr, p, v, sizeof(v));
      found = sm_find(&t->s.set, v, n) != NULL;
    }
  }
  pthread_rwlock_unlock(&t->lock);
  return found;
}

/* max_connections: 1 admitted (counter taken into h, or the rule did not apply), 0 rejected,
 * MTP_ENOMEM. */
static int counter_take(struct prule *r, const struct conninfo *ci, struct mtp_policy_hold *h) {
  char tuple[TUPLE_MAX];
  size_t len = 0;
  tuple[0] = '\0';
  for (size_t i = 0; i < r->nkeys; i++) {
    if (!key_applies(&r->keys[i], ci))
      return 1;
    if (i > 0 && len + 1 < TUPLE_MAX) {
      tuple[len++] = TUPLE_SEP;
      tuple[len] = '\0';
    }
    key_append(&r->keys[i], ci, tuple, &len);
  }
  struct cmap *m = r->counters;
  pthread_mutex_lock(&m->lock);
  struct sm_entry *e = sm_find(&m->map, tuple, len);
  if (e == NULL ? r->max == 0 : e->val >= r->max) {
    pthread_mutex_unlock(&m->lock);
    return 0;
  }
  if (e == NULL && sm_add(&m->map, tuple, len, 0, &e) != MTP_OK) {
    pthread_mutex_unlock(&m->lock);
    return MTP_ENOMEM;
  }
  e->val++;
  pthread_mutex_unlock(&m->lock);
  atomic_fetch_add_explicit(&m->refs, 1, memory_order_relaxed);
  h->items[h->n++] = (struct hold_item){.m = m, .e = e};
  return 1;
}

int mtp_policy_admit(struct mtp_policy *p, const struct mtp_policy_conn *c, struct mtp_policy_hold **hold,
                     int *rule) {
  *hold = NULL;
  if (rule != NULL)
    *rule = -1;
  struct conninfo ci;
  conninfo_init(&ci, c);
  int rc = MTP_OK;
  struct mtp_policy_hold *h = NULL;
  pthread_rwlock_rdlock(&p->rules_lock);
  struct ruleset *rs = p->rs;
  if (rs->nmax > 0) {
    h = mtp_malloc(sizeof(*h) + rs->nmax * sizeof(h->items[0]));
    if (h == NULL) {
      pthread_rwlock_unlock(&p->rules_lock);
      return MTP_ENOMEM;
    }
    h->n = 0;
  }
  for (size_t i = 0; i < rs->n; i++) {
    struct prule *r = &rs->rules[i];
    int pass;
    if (r->kind == MTP_PRULE_MAX_CONNECTIONS) {
      pass = counter_take(r, &ci, h);
    } else {
      int m = table_match(r->table, &r->keys[0], &ci);
      pass = m < 0 || (r->kind == MTP_PRULE_IN_TABLE ? m == 1 : m == 0);
    }
    if (pass < 0) {
      rc = pass;
      break;
    }
    if (pass == 0) {
      atomic_fetch_add_explicit(&r->rejects, 1, memory_order_relaxed);
      if (rule != NULL)
        *rule = (int)i;
      rc = MTP_EPOLICY;
      break;
    }
  }
  pthread_rwlock_unlock(&p->rules_lock);
  if (rc != MTP_OK) {
    hold_release(h); /* counters of earlier max_connections rules */
    return rc;
  }
  if (h != NULL && h->n == 0) {
    mtp_free(h);
    h = NULL;
  }
  *hold = h;
  return MTP_OK;
}

void mtp_policy_release(struct mtp_policy *p, struct mtp_policy_hold *hold) {
  (void)p; /* the hold carries its own references: it may outlive p's rules, or p */
  hold_release(hold);
}

uint64_t mtp_policy_rejects(const struct mtp_policy *p, size_t rule) {
  struct mtp_policy *mp = (struct mtp_policy *)p; /* the lock is not part of the value */
  uint64_t v = 0;
  pthread_rwlock_rdlock(&mp->rules_lock);
  if (rule < mp->rs->n)
    v = atomic_load_explicit(&mp->rs->rules[rule].rejects, memory_order_relaxed);
  pthread_rwlock_unlock(&mp->rules_lock);
  return v;
}

size_t mtp_policy_nrules(const struct mtp_policy *p) {
  struct mtp_policy *mp = (struct mtp_policy *)p;
  pthread_rwlock_rdlock(&mp->rules_lock);
  size_t n = mp->rs->n;
  pthread_rwlock_unlock(&mp->rules_lock);
  return n;
}

size_t mtp_policy_counter_entries(const struct mtp_policy *p, size_t rule) {
  struct mtp_policy *mp = (struct mtp_policy *)p;
  size_t n = 0;
  pthread_rwlock_rdlock(&mp->rules_lock);
  if (rule < mp->rs->n && mp->rs->rules[rule].counters != NULL) {
    struct cmap *m = mp->rs->rules[rule].counters;
    pthread_mutex_lock(&m->lock);
    n = m->map.n;
    pthread_mutex_unlock(&m->lock);
  }
  pthread_rwlock_unlock(&mp->rules_lock);
  return n;
}

/* ------------------------------------------------------------------------------------------ */
/* Config validation and building. */

static const char *rule_kind_name(enum mtp_policy_rule_kind k) {
  return k == MTP_PRULE_IN_TABLE ? "in_table" : k == MTP_PRULE_NOT_IN_TABLE ? "not_in_table" : "max_connections";
}

/* Checks cfg's rules and tables, and works out each config table's kind (kinds[i] for
 * cfg->tables[i]). */
static int check_config(const struct mtp_config *cfg, unsigned *kinds, char *err, size_t errlen) {
  for (size_t i = 0; i < cfg->ntables; i++) {
    const char *name = cfg->tables[i].name;
    if (name == NULL || name[0] == '\0') {
      snprintf(err, errlen, "tables[%zu]: no name", i);
      return MTP_EINVAL;
    }
    for (size_t j = 0; j < i; j++)
      if (strcmp(cfg->tables[j].name, name) == 0) {
        snprintf(err, errlen, "tables: '%.80s' is defined twice", name);
        return MTP_EINVAL;
      }
    kinds[i] = TK_ANY;
  }
  for (size_t i = 0; i < cfg->npolicy; i++) {
    const struct mtp_policy_rule_conf *r = &cfg->policy[i];
    if (r->kind != MTP_PRULE_IN_TABLE && r->kind != MTP_PRULE_NOT_IN_TABLE && r->kind != MTP_PRULE_MAX_CONNECTIONS) {
      snprintf(err, errlen, "policy[%zu]: unknown rule", i);
      return MTP_EINVAL;
    }
    if (r->nkeys > MTP_POLICY_MAX_KEYS) {
      snprintf(err, errlen, "policy[%zu]: at most %d keys", i, MTP_POLICY_MAX_KEYS);
      return MTP_EINVAL;
    }
    for (size_t k = 0; k < r->nkeys; k++) {
      const struct mtp_policy_keyspec *ks = &r->keys[k];
      if ((int)ks->key < MTP_PKEY_LISTENER || ks->key > MTP_PKEY_TLS_DOMAIN) {
        snprintf(err, errlen, "policy[%zu]: unknown key", i);
        return MTP_EINVAL;
      }
      if ((ks->key == MTP_PKEY_IPV4_SUBNET && (ks->prefix < 0 || ks->prefix > 32)) ||
          (ks->key == MTP_PKEY_IPV6_SUBNET && (ks->prefix < 0 || ks->prefix > 128))) {
        snprintf(err, errlen, "policy[%zu]: subnet prefix %d out of range", i, ks->prefix);
        return MTP_EINVAL;
      }
    }
    if (r->kind == MTP_PRULE_MAX_CONNECTIONS)
      continue;
    if (r->nkeys != 1) {
      snprintf(err, errlen, "policy[%zu]: %s takes exactly one key", i, rule_kind_name(r->kind));
      return MTP_EINVAL;
    }
    size_t t = cfg->ntables;
    for (size_t j = 0; r->table != NULL && j < cfg->ntables; j++)
      if (strcmp(cfg->tables[j].name, r->table) == 0)
        t = j;
    if (t == cfg->ntables) {
      snprintf(err, errlen, "policy[%zu]: table '%.80s' is not defined in tables", i, r->table ? r->table : "");
      return MTP_EINVAL;
    }
    kinds[t] |= mtp_policy_key_entry(r->keys[0].key);
  }
  return MTP_OK;
}

static bool same_keys(const struct prule *a, const struct mtp_policy_rule_conf *b) {
  if (a->nkeys != b->nkeys)
    return false;
  for (size_t k = 0; k < a->nkeys; k++) {
    if (a->keys[k].key != b->keys[k].key)
      return false;
    bool subnet = a->keys[k].key == MTP_PKEY_IPV4_SUBNET || a->keys[k].key == MTP_PKEY_IPV6_SUBNET;
    if (subnet && a->keys[k].prefix != b->keys[k].prefix)
      return false;
  }
  return true;
}

/* Builds the rule set of cfg. Tables are looked up in v[0..n) and extra[0..nextra). Counter
 * maps of old max_connections rules with the same keys are shared (each at most once), and
 * an old rule identical to the new one at the same index passes its reject count on. */
static int build_rules(const struct mtp_config *cfg, struct ptable *const *v, size_t n, struct ptable *const *extra,
                       size_t nextra, const struct ruleset *old, struct ruleset **out, char *err, size_t errlen) {
  *out = NULL;
  struct ruleset *rs = mtp_calloc(1, sizeof(*rs));
  bool *reused = old != NULL && old->n > 0 ? mtp_calloc(old->n, sizeof(bool)) : NULL;
  if (rs == NULL || (old != NULL && old->n > 0 && reused == NULL))
    goto nomem;
  if (cfg->npolicy > 0 && (rs->rules = mtp_calloc(cfg->npolicy, sizeof(*rs->rules))) == NULL)
    goto nomem;
  for (size_t i = 0; i < cfg->npolicy; i++) {
    const struct mtp_policy_rule_conf *c = &cfg->policy[i];
    struct prule *r = &rs->rules[i];
    r->kind = c->kind;
    r->nkeys = c->nkeys;
    memcpy(r->keys, c->keys, sizeof(r->keys));
    r->max = c->max;
    atomic_init(&r->rejects, 0);
    rs->n = i + 1;
    if (c->kind != MTP_PRULE_MAX_CONNECTIONS) {
      r->table = find_table(v, n, c->table);
      if (r->table == NULL)
        r->table = find_table(extra, nextra, c->table);
      if (r->table == NULL) { /* check_config ran first: cannot happen */
        snprintf(err, errlen, "policy[%zu]: table '%.80s' is not defined", i, c->table);
        ruleset_free(rs);
        mtp_free(reused);
        return MTP_EINVAL;
      }
    } else {
      rs->nmax++;
      for (size_t j = 0; old != NULL && j < old->n && r->counters == NULL; j++) {
        struct prule *o = &old->rules[j];
        if (o->kind == MTP_PRULE_MAX_CONNECTIONS && !reused[j] && same_keys(o, c)) {
          reused[j] = true;
          atomic_fetch_add(&o->counters->refs, 1);
          r->counters = o->counters;
        }
      }
      if (r->counters == NULL && (r->counters = cmap_new()) == NULL)
        goto nomem;
    }
  }
  mtp_free(reused);
  *out = rs;
  return MTP_OK;
nomem:
  ruleset_free(rs);
  mtp_free(reused);
  snprintf(err, errlen, "policy: out of memory");
  return MTP_ENOMEM;
}

/* Same definition (the rejects counter of the old rule carries on). */
static bool same_rule(const struct prule *a, const struct prule *b) {
  if (a->kind != b->kind || a->nkeys != b->nkeys || a->max != b->max || a->table != b->table)
    return false;
  for (size_t k = 0; k < a->nkeys; k++)
    if (a->keys[k].key != b->keys[k].key || key_prefix(&a->keys[k]) != key_prefix(&b->keys[k]))
      return false;
  return true;
}

/* ------------------------------------------------------------------------------------------ */
/* The tables file: {"version":1,"tables":{"name":["value",...],...}}. */

static char *tables_path(const struct mtp_config *cfg, char **mkdir_dir) {
  *mkdir_dir = NULL;
  if (cfg->tables_file != NULL && cfg->tables_file[0] != '\0')
    return mtp_strdup(cfg->tables_file);
  if (cfg->cache_dir == NULL || cfg->cache_dir[0] == '\0')
    return NULL;
  size_t n = strlen(cfg->cache_dir) + sizeof("/tables.json");
  char *s = mtp_malloc(n);
  if (s == NULL)
    return NULL;
  snprintf(s, n, "%s/tables.json", cfg->cache_dir);
  *mkdir_dir = mtp_strdup(cfg->cache_dir);
  return s;
}

static bool same_str(const char *a, const char *b) {
  return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* Reads the whole file. MTP_ENOTFOUND when it does not exist. */
static int read_whole(const char *path, char **out, size_t *len, char *err, size_t errlen) {
  *out = NULL;
  *len = 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT)
      return MTP_ENOTFOUND;
    snprintf(err, errlen, "tables file %s: cannot open: %s", path, strerror(errno));
    return MTP_EIO;
  }
  size_t cap = 4096, n = 0;
  char *buf = mtp_malloc(cap);
  int rc = MTP_OK;
  while (buf != NULL) {
    if (n + 1 >= cap) {
      if (cap >= FILE_MAX) {
        snprintf(err, errlen, "tables file %s: larger than %u bytes", path, FILE_MAX);
        rc = MTP_EINVAL;
        break;
      }
      char *nb = mtp_realloc(buf, cap * 2);
      if (nb == NULL)
        break;
      buf = nb;
      cap *= 2;
    }
    ssize_t r = read(fd, buf + n, cap - n - 1);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      snprintf(err, errlen, "tables file %s: cannot read: %s", path, strerror(errno));
      rc = MTP_EIO;
      break;
    }
    if (r == 0) {
      buf[n] = '\0';
      close(fd);
      *out = buf;
      *len = n;
      return MTP_OK;
    }
    n += (size_t)r;
  }
  close(fd);
  mtp_free(buf);
  if (rc == MTP_OK) {
    snprintf(err, errlen, "tables file %s: out of memory", path);
    rc = MTP_ENOMEM;
  }
  return rc;
}

/* Parses the file text and checks its shape; *tables is the "tables" object inside *root. */
static int parse_file(const char *path, const char *text, size_t len, cJSON **root, const cJSON **tables, char *err,
                      size_t errlen) {
  cJSON *j = cJSON_ParseWithLength(text, len);
  *root = j;
  if (j == NULL) {
    const char *at = cJSON_GetErrorPtr(); /* cJSON keeps it globally: only a hint, range-checked */
    if (at != NULL && at >= text && at <= text + len)
      snprintf(err, errlen, "tables file %s: not valid JSON (near byte %ld)", path, (long)(at - text));
    else
      snprintf(err, errlen, "tables file %s: not valid JSON", path);
    return MTP_EINVAL;
  }
  if (!cJSON_IsObject(j)) {
    snprintf(err, errlen, "tables file %s: not a JSON object", path);
    return MTP_EINVAL;
  }
  const cJSON *ver = cJSON_GetObjectItemCaseSensitive(j, "version");
  if (!cJSON_IsNumber(ver) || ver->valuedouble != 1) {
    snprintf(err, errlen, "tables file %s: \"version\" must be 1", path);
    return MTP_EINVAL;
  }
  const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "tables");
  if (!cJSON_IsObject(t)) {
    snprintf(err, errlen, "tables file %s: \"tables\" must be an object", path);
    return MTP_EINVAL;
  }
  const cJSON *tab;
  cJSON_ArrayForEach(tab, t) {
    if (tab->string == NULL || tab->string[0] == '\0' || !cJSON_IsArray(tab)) {
      snprintf(err, errlen, "tables file %s: tables.%.80s must be an array of strings", path,
               tab->string ? tab->string : "");
      return MTP_EINVAL;
    }
    const cJSON *e;
    size_t k = 0;
    cJSON_ArrayForEach(e, tab) {
      if (!cJSON_IsString(e)) {
        snprintf(err, errlen, "tables file %s: tables.%.80s[%zu] is not a string", path, tab->string, k);
        return MTP_EINVAL;
      }
      k++;
    }
    for (const cJSON *o = t->child; o != tab; o = o->next)
      if (strcmp(o->string, tab->string) == 0) {
        snprintf(err, errlen, "tables file %s: table '%.80s' appears twice", path, tab->string);
        return MTP_EINVAL;
      }
  }
  *tables = t;
  return MTP_OK;
}

/* Serialises all tables (entries sorted). Caller holds edit_lock. Returns cJSON_Print text
 * (free with cJSON_free) or NULL. `only` limits it to one table; `wrap` gives the file form. */
static char *tables_text(struct mtp_policy *p, const struct ptable *only, bool wrap) {
  cJSON *root = cJSON_CreateObject(), *obj = root;
  if (root == NULL)
    return NULL;
  if (wrap && (cJSON_AddNumberToObject(root, "version", 1) == NULL ||
               (obj = cJSON_AddObjectToObject(root, "tables")) == NULL)) {
    cJSON_Delete(root);
    return NULL;
  }
  bool ok = true;
  for (size_t i = 0; ok && i < p->ntables; i++) {
    struct ptable *t = p->tables[i];
    if (only != NULL && t != only)
      continue;
    cJSON *arr = cJSON_AddArrayToObject(obj, t->name);
    ok = arr != NULL;
    pthread_rwlock_rdlock(&t->lock);
    const char **keys = NULL;
    if (ok && sm_sorted_keys(&t->s.set, &keys) != MTP_OK)
      ok = false;
    for (size_t k = 0; ok && k < t->s.set.n; k++) {
      cJSON *s = cJSON_CreateString(keys[k]);
      ok = s != NULL && cJSON_AddItemToArray(arr, s);
    }
    pthread_rwlock_unlock(&t->lock);
    mtp_free(keys);
  }
  char *text = ok ? (wrap ? cJSON_Print(root) : cJSON_PrintUnformatted(root)) : NULL;
  cJSON_Delete(root);
  return text;
}

static int fsync_dir_of(const char *path) {
  char dir[4096];
  const char *slash = strrchr(path, '/');
  if (slash == NULL) {
    dir[0] = '.';
    dir[1] = '\0';
  } else {
    size_t n = (size_t)(slash - path);
    if (n == 0)
      n = 1; /* "/file" */
    if (n >= sizeof(dir))
      return -1;
    memcpy(dir, path, n);
    dir[n] = '\0';
  }
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return -1;
  int rc = fsync(fd);
  close(fd);
  return rc;
}

/* Writes the tables file atomically: PATH.tmp.PID in the same directory, fsync, rename over
 * PATH, fsync the directory. Caller holds edit_lock. */
static int write_file(struct mtp_policy *p, char *err, size_t errlen) {
  if (p->path == NULL)
    return MTP_OK;
  char *text = tables_text(p, NULL, true);
  if (text == NULL) {
    snprintf(err, errlen, "tables file %s: out of memory", p->path);
    return MTP_ENOMEM;
  }
  if (p->mkdir_dir != NULL && mkdir(p->mkdir_dir, 0755) < 0 && errno != EEXIST) {
    snprintf(err, errlen, "cannot create %s: %s", p->mkdir_dir, strerror(errno));
    cJSON_free(text);
    return MTP_EIO;
  }
  char tmp[4096];
  if (snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", p->path, (long)getpid()) >= (int)sizeof(tmp)) {
    snprintf(err, errlen, "tables file path too long");
    cJSON_free(text);
    return MTP_EIO;
  }
  int rc = MTP_OK, e = 0;
  const char *what = "create";
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    e = errno;
    rc = MTP_EIO;
  } else {
    (void)fchmod(fd, 0644); /* whatever the umask */
    size_t len = strlen(text), off = 0;
    what = "write";
    while (off < len) {
      ssize_t w = write(fd, text + off, len - off);
      if (w < 0 && errno == EINTR)
        continue;
      if (w <= 0) {
        e = w < 0 ? errno : EIO;
        rc = MTP_EIO;
        break;
      }
      off += (size_t)w;
    }
    if (rc == MTP_OK && (write(fd, "\n", 1) != 1 || fsync(fd) < 0)) {
      e = errno;
      rc = MTP_EIO;
    }
    if (close(fd) < 0 && rc == MTP_OK) {
      e = errno;
      rc = MTP_EIO;
    }
    if (rc == MTP_OK && rename(tmp, p->path) < 0) {
      e = errno;
      what = "rename";
      rc = MTP_EIO;
    }
    if (rc != MTP_OK)
      unlink(tmp);
  }
  if (rc != MTP_OK)
    snprintf(err, errlen, "tables file %s: cannot %s its temporary copy: %s", p->path, what, strerror(e));
  else
    (void)fsync_dir_of(p->path); /* the rename is durable; a failure here changes nothing we can fix */
  cJSON_free(text);
  return rc;
}

/* ------------------------------------------------------------------------------------------ */

static int policy_alloc(struct mtp_policy **out) {
  struct mtp_policy *p = mtp_calloc(1, sizeof(*p));
  if (p == NULL)
    return MTP_ENOMEM;
  pthread_rwlockattr_t a;
  pthread_rwlockattr_init(&a);
  pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  int r1 = pthread_rwlock_init(&p->rules_lock, &a);
  pthread_rwlockattr_destroy(&a);
  int r2 = pthread_mutex_init(&p->edit_lock, NULL);
  if (r1 != 0 || r2 != 0) {
    if (r1 == 0)
      pthread_rwlock_destroy(&p->rules_lock);
    if (r2 == 0)
      pthread_mutex_destroy(&p->edit_lock);
    mtp_free(p);
    return MTP_ENOMEM;
  }
  *out = p;
  return MTP_OK;
}

static int add_table(struct mtp_policy *p, struct ptable *t) {
  struct ptable **v = mtp_realloc(p->tables, (p->ntables + 1) * sizeof(*v));
  if (v == NULL)
    return MTP_ENOMEM;
  p->tables = v;
  p->tables[p->ntables++] = t;
  return MTP_OK;
}

/* Loads the tables file into p (at create). */
static int load_file(struct mtp_policy *p, char *err, size_t errlen) {
  char *text;
  size_t len;
  int rc = read_whole(p->path, &text, &len, err, errlen);
  if (rc == MTP_ENOTFOUND) {
    mtp_debug("policy: tables file %s does not exist yet", p->path);
    return MTP_OK;
  }
  if (rc != MTP_OK)
    return rc;
  cJSON *root = NULL;
  const cJSON *tables = NULL;
  rc = parse_file(p->path, text, len, &root, &tables, err, errlen);
  const cJSON *tab;
  if (rc == MTP_OK) {
    cJSON_ArrayForEach(tab, tables) {
      struct ptable *t = find_table(p->tables, p->ntables, tab->string);
      if (t == NULL) {
        mtp_log(MTP_LOG_INFO, "tables file %s: table '%.80s' is not in the config; kept", p->path, tab->string);
        if ((t = ptable_new(tab->string, TK_ANY)) == NULL || add_table(p, t) != MTP_OK) {
          ptable_free(t);
          snprintf(err, errlen, "tables file %s: out of memory", p->path);
          rc = MTP_ENOMEM;
          break;
        }
      }
      tset_clear(&t->s); /* the file's contents replace the config's initial entries */
      char where[512];
      snprintf(where, sizeof(where), "tables file %s: table '%.80s'", p->path, tab->string);
      const cJSON *e;
      cJSON_ArrayForEach(e, tab) {
        if ((rc = tset_load_value(&t->s, t->kind, e->valuestring, where, err, errlen)) != MTP_OK)
          break;
      }
      if (rc != MTP_OK)
        break;
    }
  }
  cJSON_Delete(root);
  mtp_free(text);
  return rc;
}

int mtp_policy_create(struct mtp_policy **out, const struct mtp_config *cfg, char *err, size_t errlen) {
  *out = NULL;
  pthread_once(&hash_once, hash_init);
  unsigned *kinds = mtp_calloc(cfg->ntables + 1, sizeof(*kinds));
  struct mtp_policy *p = NULL;
  if (kinds == NULL || policy_alloc(&p) != MTP_OK) {
    mtp_free(kinds);
    snprintf(err, errlen, "policy: out of memory");
    return MTP_ENOMEM;
  }
  int rc = check_config(cfg, kinds, err, errlen);
  for (size_t i = 0; rc == MTP_OK && i < cfg->ntables; i++) {
    const struct mtp_table_conf *tc = &cfg->tables[i];
    struct ptable *t = ptable_new(tc->name, kinds[i]);
    if (t == NULL || add_table(p, t) != MTP_OK) {
      ptable_free(t);
      snprintf(err, errlen, "policy: out of memory");
      rc = MTP_ENOMEM;
      break;
    }
    t->in_config = true;
    char where[128];
    snprintf(where, sizeof(where), "tables.%.80s", tc->name);
    for (size_t k = 0; rc == MTP_OK && k < tc->nentries; k++)
      rc = tset_load_value(&t->s, t->kind, tc->entries[k], where, err, errlen);
  }
  if (rc == MTP_OK) {
    p->path = tables_path(cfg, &p->mkdir_dir);
    if ((cfg->tables_file != NULL || cfg->cache_dir != NULL) && p->path == NULL) {
      snprintf(err, errlen, "policy: out of memory");
      rc = MTP_ENOMEM;
    }
  }
  if (rc == MTP_OK && p->path != NULL)
    rc = load_file(p, err, errlen);
  if (rc == MTP_OK)
    rc = build_rules(cfg, p->tables, p->ntables, NULL, 0, NULL, &p->rs, err, errlen);
  mtp_free(kinds);
  if (rc != MTP_OK) {
    mtp_policy_free(p);
    return rc;
  }
  *out = p;
  return MTP_OK;
}

/* What reconfigure will do to one existing table whose kind changes. */
struct retype {
  struct ptable *t;
  unsigned kind;
  struct tset s; /* the entries normalised for kind */
};

int mtp_policy_reconfigure(struct mtp_policy *p, const struct mtp_config *cfg, char *err, size_t errlen) {
  unsigned *kinds = mtp_calloc(cfg->ntables + 1, sizeof(*kinds));
  struct ptable **fresh = mtp_calloc(cfg->ntables + 1, sizeof(*fresh));
  size_t nfresh = 0, nretypes = 0;
  struct ruleset *rs = NULL;
  char *path = NULL, *mkdir_dir = NULL;
  pthread_mutex_lock(&p->edit_lock);
  /* At most one retype per existing table. */
  struct retype *retypes = mtp_calloc(p->ntables + 1, sizeof(*retypes));
  int rc = MTP_OK;
  if (kinds == NULL || fresh == NULL || retypes == NULL) {
    snprintf(err, errlen, "policy: out of memory");
    rc = MTP_ENOMEM;
  }
  if (rc == MTP_OK)
    rc = check_config(cfg, kinds, err, errlen);

  /* Everything that can fail is prepared off to the side first: tables new in the config
   * (with their config entries), existing tables re-normalised for a new kind, the rules. */
  for (size_t i = 0; rc == MTP_OK && i < cfg->ntables; i++) {
    const struct mtp_table_conf *tc = &cfg->tables[i];
    struct ptable *t = find_table(p->tables, p->ntables, tc->name);
    char where[128];
    snprintf(where, sizeof(where), "tables.%.80s", tc->name);
    if (t == NULL) {
      if ((t = ptable_new(tc->name, kinds[i])) == NULL) {
        snprintf(err, errlen, "policy: out of memory");
        rc = MTP_ENOMEM;
        break;
      }
      fresh[nfresh++] = t;
      t->in_config = true;
      for (size_t k = 0; rc == MTP_OK && k < tc->nentries; k++)
        rc = tset_load_value(&t->s, t->kind, tc->entries[k], where, err, errlen);
    } else if (t->kind != kinds[i]) {
      struct retype *rt = &retypes[nretypes++];
      rt->t = t;
      rt->kind = kinds[i];
      rc = tset_renormalise(&rt->s, &t->s, kinds[i], where, err, errlen);
    }
  }
  /* Tables the config no longer names become untyped; their entries stay as they are. */
  for (size_t i = 0; rc == MTP_OK && i < p->ntables; i++) {
    struct ptable *t = p->tables[i];
    bool named = false;
    for (size_t j = 0; j < cfg->ntables && !named; j++)
      named = strcmp(cfg->tables[j].name, t->name) == 0;
    if (!named && t->kind != TK_ANY) {
      struct retype *rt = &retypes[nretypes++];
      rt->t = t;
      rt->kind = TK_ANY;
      rc = tset_renormalise(&rt->s, &t->s, TK_ANY, t->name, err, errlen);
    }
  }
  struct ptable **grown = NULL;
  if (rc == MTP_OK && nfresh > 0) {
    if ((grown = mtp_realloc(p->tables, (p->ntables + nfresh) * sizeof(*grown))) == NULL) {
      snprintf(err, errlen, "policy: out of memory");
      rc = MTP_ENOMEM;
    } else {
      p->tables = grown;
    }
  }
  if (rc == MTP_OK) {
    pthread_rwlock_rdlock(&p->rules_lock); /* only reconfigure (under edit_lock) replaces rs */
    rc = build_rules(cfg, p->tables, p->ntables, fresh, nfresh, p->rs, &rs, err, errlen);
    pthread_rwlock_unlock(&p->rules_lock);
  }
  if (rc == MTP_OK) {
    path = tables_path(cfg, &mkdir_dir);
    if ((cfg->tables_file != NULL || cfg->cache_dir != NULL) && path == NULL) {
      snprintf(err, errlen, "policy: out of memory");
      rc = MTP_ENOMEM;
    }
  }
  if (rc != MTP_OK) {
    for (size_t i = 0; i < nfresh; i++)
      ptable_free(fresh[i]);
    for (size_t i = 0; i < nretypes; i++)
      tset_clear(&retypes[i].s);
    ruleset_free(rs);
    pthread_mutex_unlock(&p->edit_lock);
    mtp_free(kinds);
    mtp_free(fresh);
    mtp_free(retypes);
    mtp_free(path);
    mtp_free(mkdir_dir);
    return rc;
  }

  /* Commit. Admits see either the old rules with the old tables or the new with the new. */
  pthread_rwlock_wrlock(&p->rules_lock);
  for (size_t i = 0; i < nfresh; i++)
    p->tables[p->ntables++] = fresh[i];
  for (size_t i = 0; i < nretypes; i++) {
    struct ptable *t = retypes[i].t;
    pthread_rwlock_wrlock(&t->lock);
    tset_clear(&t->s);
    t->s = retypes[i].s;
    t->kind = retypes[i].kind;
    pthread_rwlock_unlock(&t->lock);
  }
  for (size_t i = 0; i < p->ntables; i++) {
    struct ptable *t = p->tables[i];
    t->in_config = false;
    for (size_t j = 0; j < cfg->ntables && !t->in_config; j++)
      t->in_config = strcmp(cfg->tables[j].name, t->name) == 0;
  }
  struct ruleset *old = p->rs;
  for (size_t i = 0; i < rs->n && i < old->n; i++)
    if (same_rule(&rs->rules[i], &old->rules[i]))
      atomic_store(&rs->rules[i].rejects, atomic_load(&old->rules[i].rejects));
  p->rs = rs;
  pthread_rwlock_unlock(&p->rules_lock);
  /* Old counter maps no longer used by a rule live on while holds reference them. */
  ruleset_free(old);

  bool moved = !same_str(path, p->path);
  mtp_free(p->path);
  mtp_free(p->mkdir_dir);
  p->path = path;
  p->mkdir_dir = mkdir_dir;
  if (moved && p->path != NULL) {
    char werr[512];
    if (write_file(p, werr, sizeof(werr)) != MTP_OK)
      mtp_log(MTP_LOG_ERROR, "policy: %s", werr);
    else
      mtp_log(MTP_LOG_INFO, "policy: tables now persisted in %s", p->path);
  }
  pthread_mutex_unlock(&p->edit_lock);
  mtp_free(kinds);
  mtp_free(fresh);
  mtp_free(retypes);
  return MTP_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Table edits. */

static int table_edit(struct mtp_policy *p, const char *table, const char *value, bool add) {
  if (table == NULL || value == NULL)
    return MTP_EINVAL;
  pthread_mutex_lock(&p->edit_lock);
  struct ptable *t = find_table(p->tables, p->ntables, table);
  int rc = t == NULL ? MTP_ENOTFOUND : MTP_OK;
  char norm[NORM_MAX];
  uint64_t meta = 0;
  if (rc == MTP_OK && norm_value(t->kind, value, norm, &meta) != MTP_OK)
    rc = MTP_EINVAL;
  if (rc == MTP_OK) {
    pthread_rwlock_wrlock(&t->lock);
    rc = add ? tset_add(&t->s, norm, meta) : tset_del(&t->s, norm);
    pthread_rwlock_unlock(&t->lock);
  }
  if (rc == MTP_OK) {
    char err[512];
    int wrc = write_file(p, err, sizeof(err));
    if (wrc != MTP_OK) {
      /* Memory and file must agree: undo the edit. */
      mtp_log(MTP_LOG_ERROR, "policy: %s; table '%s' left unchanged", err, t->name);
      pthread_rwlock_wrlock(&t->lock);
      if (add)
        (void)tset_del(&t->s, norm);
      else
        (void)tset_add(&t->s, norm, meta);
      pthread_rwlock_unlock(&t->lock);
      rc = wrc == MTP_ENOMEM ? MTP_ENOMEM : MTP_EIO;
    } else {
      mtp_debug("policy: table '%s': %s '%s'", t->name, add ? "added" : "removed", norm);
    }
  }
  pthread_mutex_unlock(&p->edit_lock);
  return rc;
}

int mtp_policy_table_add(struct mtp_policy *p, const char *table, const char *value) {
  return table_edit(p, table, value, true);
}

int mtp_policy_table_del(struct mtp_policy *p, const char *table, const char *value) {
  return table_edit(p, table, value, false);
}

int mtp_policy_tables_json(struct mtp_policy *p, const char *table, char **out) {
  *out = NULL;
  pthread_mutex_lock(&p->edit_lock);
  const struct ptable *only = NULL;
  int rc = MTP_OK;
  if (table != NULL && (only = find_table(p->tables, p->ntables, table)) == NULL)
    rc = MTP_ENOTFOUND;
  char *text = rc == MTP_OK ? tables_text(p, only, false) : NULL;
  pthread_mutex_unlock(&p->edit_lock);
  if (rc != MTP_OK)
    return rc;
  if (text == NULL)
    return MTP_ENOMEM;
  *out = mtp_strdup(text); /* the caller frees with mtp_free, not cJSON's allocator */
  cJSON_free(text);
  return *out != NULL ? MTP_OK : MTP_ENOMEM;
}

void mtp_policy_free(struct mtp_policy *p) {
  if (p == NULL)
    return;
  ruleset_free(p->rs);
  for (size_t i = 0; i < p->ntables; i++)
    ptable_free(p->tables[i]);
  mtp_free(p->tables);
  mtp_free(p->path);
  mtp_free(p->mkdir_dir);
  pthread_rwlock_destroy(&p->rules_lock);
  pthread_mutex_destroy(&p->edit_lock);
  mtp_free(p);
}
