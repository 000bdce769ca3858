"""Thin Celery tasks: hand-offs to the worker pipeline."""
