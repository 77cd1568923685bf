/*
 * replay_main.c - a plain main() for the libFuzzer targets in tests/fuzz, so every build (any
 * compiler, no -fsanitize=fuzzer) can run a target as a unit test:
 *
 *   fuzz_X_replay [-m MUTATIONS] PATH...
 *
 * Each PATH is a file or a directory of files (read in name order). Every file is run through
 * LLVMFuzzerTestOneInput as it is, then MUTATIONS (default 300) deterministic variants of it
 * (bit flips, byte changes, cuts, insertions, duplicated or swapped chunks; a fixed xorshift
 * seed per file), then as many inputs made of random bytes. A target reports a bug by
 * crashing (abort, a sanitizer); this driver exits 0 after printing how many inputs ran, or 1
 * when no input file was found (a missing corpus must not pass silently).
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REPLAY_MAX_INPUT (1u << 20)

static uint64_t rng;

static uint64_t next(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

static size_t below(size_t n) { return n == 0 ? 0 : (size_t)(next() % n); }

static unsigned long runs;

/* Runs the target on an exactly-sized heap copy, so a sanitizer sees any overread. */
static void run(const uint8_t *data, size_t len) {
  uint8_t *copy = malloc(len ? len : 1);
  if (copy == NULL)
    abort();
  if (len)
    memcpy(copy, data, len);
  LLVMFuzzerTestOneInput(copy, len);
  free(copy);
  runs++;
}

/* One random edit of buf (len bytes, room for cap) in place; returns the new length. */
static size_t mutate(uint8_t *buf, size_t len, size_t cap) {
  switch (below(8)) {
  case 0: /* flip a bit */
    if (len)
      buf[below(len)] ^= (uint8_t)(1u << below(8));
    break;
  case 1: /* set a byte to an interesting value */
    if (len) {
      static const uint8_t v[] = {0x00, 0x01, 0x7f, 0x80, 0xff, 0x16, 0x03, 0x17};
      buf[below(len)] = v[below(sizeof(v))];
    }
    break;
  case 2: /* cut the tail */
    len = below(len + 1);
    break;
  case 3: /* cut a piece out */
    if (len > 1) {
      size_t a = below(len), n = 1 + below(len - a);
      memmove(buf + a, buf + a + n, len - a - n);
      len -= n;
    }
    break;
  case 4: /* insert random bytes */
    if (len < cap) {
      size_t at = below(len + 1), n = 1 + below(cap - len < 16 ? cap - len : 16);
      memmove(buf + at + n, buf + at, len - at);
      for (size_t i = 0; i < n; i++)
        buf[at + i] = (uint8_t)next();
      len += n;
    }
    break;
  case 5: /* duplicate a chunk at the end */
    if (len > 0 && len < cap) {
      size_t a = below(len), n = 1 + below(len - a);
      if (n > cap - len)
        n = cap - len;
      memmove(buf + len, buf + a, n);
      len += n;
    }
    break;
  case 6: /* swap two bytes */
    if (len > 1) {
      size_t a = below(len), b = below(len);
      uint8_t t = buf[a];
      buf[a] = buf[b];
      buf[b] = t;
    }
    break;
  default: /* a new first byte (most targets read their chunk size there) */
    if (len)
      buf[0] = (uint8_t)next();
    break;
  }
  return len;
}

static int cmp_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static unsigned long files;

static void run_file(const char *path, unsigned mutations) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) {
    fprintf(stderr, "%s: cannot open\n", path);
    exit(1);
  }
  static uint8_t seed[REPLAY_MAX_INPUT], buf[REPLAY_MAX_INPUT];
  size_t len = fread(seed, 1, sizeof(seed), f);
  fclose(f);
  files++;
  run(seed, len);
  rng = 0x9e3779b97f4a7c15ull ^ (files * 0x100000001b3ull);
  for (unsigned i = 0; i < mutations; i++) {
    size_t n = len;
    memcpy(buf, seed, len);
    unsigned edits = 1 + (unsigned)below(4);
    for (unsigned e = 0; e < edits; e++)
      n = mutate(buf, n, sizeof(buf) < len + 4096 ? sizeof(buf) : len + 4096);
    run(buf, n);
  }
}

static void run_path(const char *path, unsigned mutations) {
  struct stat st;
  if (stat(path, &st) != 0) {
    fprintf(stderr, "%s: not found\n", path);
    exit(1);
  }
  if (!S_ISDIR(st.st_mode)) {
    run_file(path, mutations);
    return;
  }
  DIR *d = opendir(path);
  if (d == NULL) {
    fprintf(stderr, "%s: cannot open\n", path);
    exit(1);
  }
  char **names = NULL;
  size_t n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.')
      continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 16;
      names = realloc(names, cap * sizeof(*names));
      if (names == NULL)
        abort();
    }
    size_t l = strlen(path) + strlen(e->d_name) + 2;
    names[n] = malloc(l);
    if (names[n] == NULL)
      abort();
    snprintf(names[n], l, "%s/%s", path, e->d_name);
    n++;
  }
  closedir(d);
  qsort(names, n, sizeof(*names), cmp_names);
  for (size_t i = 0; i < n; i++) {
    run_file(names[i], mutations);
    free(names[i]);
  }
  free(names);
}

int main(int argc, char **argv) {
  unsigned mutations = 300;
  int i = 1;
  if (i + 1 < argc && strcmp(argv[i], "-m") == 0) {
    mutations = (unsigned)strtoul(argv[i + 1], NULL, 10);
    i += 2;
  }
  if (i >= argc) {
    fprintf(stderr, "usage: %s [-m MUTATIONS] FILE_OR_DIR...\n", argv[0]);
    return 2;
  }
  for (; i < argc; i++)
    run_path(argv[i], mutations);
  if (files == 0) {
    fprintf(stderr, "no input files\n");
    return 1;
  }
  rng = 0x2545f4914f6cdd1dull;
  static uint8_t buf[4096];
  for (unsigned k = 0; k < mutations; k++) {
    size_t n = below(sizeof(buf));
    for (size_t j = 0; j < n; j++)
      buf[j] = (uint8_t)next();
    run(buf, n);
  }
  printf("%lu inputs from %lu files\n", runs, files);
  return 0;
}
