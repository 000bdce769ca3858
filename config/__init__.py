"""Wiring: settings and the Celery app."""
