"""The host daemon: discovery, scheduled inspection, HTTP API and Prometheus metrics."""
