"""Operating the worker: health and metrics server, dead-letter commands, topology export."""
