typedef int mtp_back_placeholder;
