typedef int mtp_tgconfig_placeholder;
