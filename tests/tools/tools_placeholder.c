typedef int mtp_tools_placeholder;
