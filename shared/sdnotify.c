#include "sdnotify.h"

#include <stdio.h>
#include <systemd/sd-daemon.h>
#include <time.h>

#include "log.h"
#include "banned.h"

static void notify(const char *state) {
  int rc = sd_notify(0, state);
  if (rc < 0)
    mtp_debug("sd_notify: %d", rc);
}

static void notify_with_status(const char *what, const char *status) {
  char msg[512];
  if (status != NULL)
    snprintf(msg, sizeof(msg), "%s%sSTATUS=%s", what, what[0] ? "\n" : "", status);
  else
    snprintf(msg, sizeof(msg), "%s", what);
  notify(msg);
}

void mtp_sd_ready(const char *status) { notify_with_status("READY=1", status); }

void mtp_sd_reloading(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  char msg[96];
  snprintf(msg, sizeof(msg), "RELOADING=1\nMONOTONIC_USEC=%llu",
           (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000ull);
  notify(msg);
}

void mtp_sd_stopping(const char *status) { notify_with_status("STOPPING=1", status); }

void mtp_sd_status(const char *status) { notify_with_status("", status); }
