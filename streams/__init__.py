"""Wiring: topics, settings, the render worker, the publication relay and the `zimage` CLI."""
