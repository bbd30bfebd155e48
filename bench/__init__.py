"""Benchmarks of the worker against a plain aio-pika baseline measured in the same run (`make bench`)."""
