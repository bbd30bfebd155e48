"""atlas-inference-worker: answers incident inference requests with each tenant's own LLM."""

__version__ = "0.1.0"
