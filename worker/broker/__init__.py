"""The AMQP side: consume deliveries, settle outcomes into publishes and acks, declare the topology."""
