"""Persistent state: keys, usage (SQLite)."""
