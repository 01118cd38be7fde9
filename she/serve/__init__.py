"""Serving: the HTTP service and its worker processes, the HTTP client, and Ray scale-out (batch
scoring and Serve replicas)."""
