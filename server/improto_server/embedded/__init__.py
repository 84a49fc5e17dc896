"""Embedded mode: every storage port on one local SQLite database, no external services."""
