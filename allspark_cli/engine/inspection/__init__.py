"""Inspection: `inspect-memory`, pictures of what the Semantic Memory holds."""
