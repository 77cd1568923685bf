typedef int mtp_rpc_placeholder;
