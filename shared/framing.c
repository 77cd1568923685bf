typedef int mtp_framing_placeholder;
