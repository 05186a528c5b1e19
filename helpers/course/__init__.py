"""Given course code, by chapter."""
