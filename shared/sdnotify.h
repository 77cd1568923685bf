/*
 * sdnotify.h - tells systemd where the service is in its life (Type=notify units), through
 * libsystemd's sd_notify. Without $NOTIFY_SOCKET (not started by systemd) every call does
 * nothing. Failures are logged at debug and otherwise ignored: notification is advisory.
 *
 *   start ──workers up──► READY=1 ──SIGHUP / admin reload──► RELOADING=1 ──done──► READY=1
 *                            └──SIGTERM / SIGINT──► STOPPING=1 (then the drain, then exit)
 */
#ifndef MTP_SDNOTIFY_H
#define MTP_SDNOTIFY_H

/* READY=1 with a STATUS= line (status may be NULL). */
void mtp_sd_ready(const char *status);
/* RELOADING=1 with MONOTONIC_USEC= (what Type=notify-reload expects; plain notify ignores it). */
void mtp_sd_reloading(void);
/* STOPPING=1 with a STATUS= line (status may be NULL). */
void mtp_sd_stopping(const char *status);
/* STATUS=... only (e.g. "draining 12 clients"). */
void mtp_sd_status(const char *status);

#endif
