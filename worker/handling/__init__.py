"""A request to an outcome: route it, call the tenant's provider, and decide what a failure means. Knows no AMQP."""
