typedef int mtp_crypto_placeholder;
