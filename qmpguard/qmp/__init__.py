"""QMP transports and the read-only allow-list."""
