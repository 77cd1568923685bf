/*
 * fake_middle - run the test suite's fake Telegram middle proxy by hand.
 *
 *   fake_middle --secret-file F [--port P] [--config-out FILE]
 *
 * Listens on 127.0.0.1:P (0 = any), writes a proxy-config text pointing every DC at itself
 * to FILE if asked, logs what it receives on stderr and prints a summary on SIGINT/SIGTERM.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "err.h"
#include "fake_middle.h"
#include "banned.h"

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
  (void)sig;
  g_stop = 1;
}

static void log_line(void *arg, const char *line) {
  (void)arg;
  fprintf(stderr, "fake_middle: %s\n", line);
}

static void usage(void) {
  fprintf(stderr, "usage: fake_middle --secret-file F [--port P] [--config-out FILE]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *secret_file = NULL, *config_out = NULL;
  int port = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--secret-file") && i + 1 < argc)
      secret_file = argv[++i];
    else if (!strcmp(argv[i], "--port") && i + 1 < argc)
      port = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--config-out") && i + 1 < argc)
      config_out = argv[++i];
    else
      usage();
  }
  if (!secret_file || port < 0 || port > 65535)
    usage();
  uint8_t secret[1024];
  FILE *f = fopen(secret_file, "rb");
  if (!f) {
    perror(secret_file);
    return 1;
  }
  size_t slen = fread(secret, 1, sizeof(secret), f);
  fclose(f);
  if (slen < 32) {
    fprintf(stderr, "fake_middle: proxy secret too short (%zu bytes)\n", slen);
    return 1;
  }

  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  /* Block the signals before the fake's thread starts (it inherits the mask), so they are
   * only taken by sigsuspend below. */
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &block, &old);

  struct fm_options opt = {.port = (uint16_t)port, .log_cb = log_line};
  struct fake_middle *fm = NULL;
  int rc = fm_start_ex(secret, slen, &opt, &fm);
  if (rc < 0) {
    fprintf(stderr, "fake_middle: start failed: %s\n", mtp_strerror(rc));
    return 1;
  }
  fprintf(stderr, "fake_middle: listening on 127.0.0.1:%d\n", rc);
  if (config_out && fm_write_proxy_config(config_out, (uint16_t)rc) != MTP_OK) {
    fprintf(stderr, "fake_middle: cannot write %s\n", config_out);
    fm_free(fm);
    return 1;
  }
  while (!g_stop)
    sigsuspend(&old); /* no lost wakeup: the signals are blocked between the check and the wait */
  pthread_sigmask(SIG_SETMASK, &old, NULL);

  struct fm_stats st;
  fm_get_stats(fm, &st);
  fprintf(stderr,
          "fake_middle: accepted %u open %u nonces %u handshakes %u bad %u conn_ids %u proxy_reqs %llu "
          "proxy_ans %llu simple_acks %llu pings %llu close_conns %llu%s%s\n",
          st.accepted, st.open, st.nonces, st.handshakes, st.bad, st.conn_ids, (unsigned long long)st.proxy_reqs,
          (unsigned long long)st.proxy_ans, (unsigned long long)st.simple_acks, (unsigned long long)st.pings,
          (unsigned long long)st.close_conns, st.last_error[0] ? " last error: " : "", st.last_error);
  size_t n = fm_conn_count(fm);
  for (size_t i = 0; i < n; i++) {
    struct fm_conn_info ci;
    if (fm_conn_at(fm, i, &ci) != MTP_OK)
      break;
    char tag[33] = "-";
    if (ci.has_ad_tag)
      for (int k = 0; k < 16; k++)
        snprintf(tag + 2 * k, 3, "%02x", ci.ad_tag[k]);
    fprintf(stderr,
            "fake_middle: conn_id %016llx flags 0x%08x packets %llu bytes %llu ad_tag %s client %u.%u.%u.%u:%u "
            "proxy %u.%u.%u.%u:%u close_conn %s\n",
            (unsigned long long)ci.conn_id, ci.flags, (unsigned long long)ci.packets, (unsigned long long)ci.bytes,
            tag, ci.client_ip[12], ci.client_ip[13], ci.client_ip[14], ci.client_ip[15], ci.client_port,
            ci.proxy_ip[12], ci.proxy_ip[13], ci.proxy_ip[14], ci.proxy_ip[15], ci.proxy_port,
            ci.close_conn ? "yes" : "no");
  }
  fm_free(fm);
  return 0;
}
