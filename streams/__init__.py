"""Wiring: topics, settings, the render worker, the faust apps and the `zimage` CLI."""
