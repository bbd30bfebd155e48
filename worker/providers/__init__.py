"""The tenants' model providers behind one protocol, each bounded by its timeout and circuit breaker."""
