/*
 * main_common.h - the start and the end that the executables' mains (cmd/mtproxy*.c) share:
 * the command line and the configuration, --help, the log settings, the app with its signal
 * handlers, and the teardown once the main loop has ended.
 *
 *   mtp_main_start ─► mtp_main_app_setup ─► the executable's services and workers ─►
 *   mtp_main_run (until stopped) ─► the executable frees its own ─► mtp_main_exit
 */
#ifndef MTP_CMD_MAIN_COMMON_H
#define MTP_CMD_MAIN_COMMON_H

#include <stdbool.h>
#include <stddef.h>

#include "app.h"
#include "config.h"

struct mtp_main_opts {
  const char *prog;      /* "mtproxy-front": the prefix of errors on stderr */
  unsigned config_flags; /* MTP_CONFIG_* for mtp_config_load_flags */
  bool takes_qr;         /* strip --qr from the command line (see mtp_main_start) */
  /* --help prints usage_head (NULL = nothing), mtp_config_usage, usage_tail (NULL = nothing). */
  const char *usage_head, *usage_tail;
  /* Optional: one line naming what cfg lacks for this executable, NULL when all is there; err
   * is room for the line. */
  const char *(*check)(const struct mtp_config *cfg, char *err, size_t errlen);
};

/*
 * Loads *cfg from argv (argv[0] is the program). With o->takes_qr, a "--qr" argument is taken
 * out first and sets *qr (print the links' QR codes even when stdout is not a terminal). Then
 * --help prints the usage, o->check runs, and the log level and debug modules are set. Returns
 * true with *cfg loaded (mtp_main_exit frees it), or false with the exit status in *status: 0
 * after --help, 2 after a bad command line or configuration (said on stderr).
 */
bool mtp_main_start(const struct mtp_main_opts *o, int argc, char **argv, struct mtp_config *cfg, bool *qr,
                    int *status);

/* mtp_app_setup, then the signal handlers at once: a SIGTERM that arrives while the executable
 * starts must stop it cleanly, not kill it. on_stop stops the app and the executable's
 * services; it must also work on the app this leaves in *out (NULL after a failure). */
int mtp_main_app_setup(struct mtp_app **out, const struct mtp_config *cfg, mtp_app_stop_cb on_stop);

/* After startup (rc: how it went; on failure it is logged and on_stop(app) stops what was
 * started): runs the main loop until everything has stopped. */
void mtp_main_run(struct mtp_app *app, int rc, mtp_app_stop_cb on_stop);

/* After the executable freed its own: closes the main loop, frees cfg, logs "stopped". Returns
 * the exit status: 0 if rc is MTP_OK, else 1. */
int mtp_main_exit(struct mtp_config *cfg, int rc);

/*
 * The split-mode files tunnel_cert, tunnel_key and tunnel_ca: NULL when all are set and
 * readable, else one line in err naming the flag (e.g. "--tunnel-key FILE is required (made by
 * <made_by>)") and err itself.
 */
const char *mtp_main_check_tunnel_files(const struct mtp_config *cfg, const char *made_by, char *err, size_t errlen);

#endif
