"""A chaos soak: faults, kills and connection cuts under load, then an accounting of every request."""
