"""Placeholder replaced by the full comparison demo."""
