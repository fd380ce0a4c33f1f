"""The service around the pipeline: the daemon and its loops, systemd notification,
metrics and health, the one-daemon lock, logging."""
