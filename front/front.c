/* placeholder until the front lands */ typedef int mtp_front_placeholder;
