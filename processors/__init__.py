"""Decisions and computation, no sockets: validation, scheduling, batching, rendering, event shapes."""
