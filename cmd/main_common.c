/*
 * main_common.c - what the executables' mains share (see main_common.h).
 */
#include "main_common.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "err.h"
#include "log.h"
#include "banned.h"

bool mtp_main_start(const struct mtp_main_opts *o, int argc, char **argv, struct mtp_config *cfg, bool *qr,
                    int *status) {
  char err[512];
  bool help = false;
  if (o->takes_qr) {
    /* --qr is the executable's, not a setting. */
    *qr = false;
    int nargs = 0;
    for (int i = 1; i < argc; i++) {
      if (strcmp(argv[i], "--qr") == 0)
        *qr = true;
      else
        argv[1 + nargs++] = argv[i];
    }
    argc = 1 + nargs;
  }
  if (mtp_config_load_flags(argc - 1, argv + 1, o->config_flags, cfg, &help, err, sizeof(err)) != MTP_OK) {
    fprintf(stderr, "%s: %s\n", o->prog, err);
    *status = 2;
    return false;
  }
  if (help) {
    if (o->usage_head != NULL)
      fputs(o->usage_head, stdout);
    fputs(mtp_config_usage, stdout);
    if (o->usage_tail != NULL)
      fputs(o->usage_tail, stdout);
    *status = 0;
    return false;
  }
  const char *bad = o->check != NULL ? o->check(cfg, err, sizeof(err)) : NULL;
  if (bad != NULL) {
    fprintf(stderr, "%s: %s\n", o->prog, bad);
    mtp_config_free(cfg);
    *status = 2;
    return false;
  }
  mtp_log_level = cfg->log_level;
  if (cfg->log_debug != NULL && mtp_log_set_debug_modules(cfg->log_debug) != MTP_OK)
    mtp_log(MTP_LOG_WARN, "log_debug '%s': bad module list; ignored", cfg->log_debug);
  return true;
}

int mtp_main_app_setup(struct mtp_app **out, const struct mtp_config *cfg, mtp_app_stop_cb on_stop) {
  int rc = mtp_app_setup(out, cfg);
  if (rc == MTP_OK)
    rc = mtp_app_handle_signals(*out, on_stop);
  return rc;
}

void mtp_main_run(struct mtp_app *app, int rc, mtp_app_stop_cb on_stop) {
  if (rc != MTP_OK) {
    mtp_log(MTP_LOG_ERROR, "startup failed: %s", mtp_strerror(rc));
    on_stop(app);
  }
  uv_run(uv_default_loop(), UV_RUN_DEFAULT);
}

int mtp_main_exit(struct mtp_config *cfg, int rc) {
  uv_loop_close(uv_default_loop());
  mtp_config_free(cfg);
  mtp_log(MTP_LOG_INFO, "stopped");
  return rc == MTP_OK ? 0 : 1;
}

const char *mtp_main_check_tunnel_files(const struct mtp_config *cfg, const char *made_by, char *err, size_t errlen) {
  const struct {
    const char *flag;
    const char *path;
  } files[] = {{"--tunnel-cert", cfg->tunnel_cert}, {"--tunnel-key", cfg->tunnel_key}, {"--tunnel-ca", cfg->tunnel_ca}};
  for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
    if (files[i].path == NULL) {
      snprintf(err, errlen, "%s FILE is required (made by %s)", files[i].flag, made_by);
      return err;
    }
    if (access(files[i].path, R_OK) != 0) {
      snprintf(err, errlen, "%s: cannot read '%.200s': %s", files[i].flag, files[i].path, strerror(errno));
      return err;
    }
  }
  return NULL;
}
