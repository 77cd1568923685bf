typedef int mtp_app_placeholder;
