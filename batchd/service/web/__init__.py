"""The daemon's local HTTP listener: /metrics, /healthz, and the read-only web view at /."""
