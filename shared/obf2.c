typedef int mtp_obf2_placeholder;
