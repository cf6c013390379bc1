"""Placeholder: filled in by its owner (see docs/DEVELOPMENT.md)."""
