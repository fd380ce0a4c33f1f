"""The service around the pipeline: the daemon and its loops, systemd notification,
metrics (definitions, database gauges), health, the status document, the local listener
with its web view (web/), the one-daemon lock, logging."""
