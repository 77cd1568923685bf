typedef int mtp_config_placeholder;
