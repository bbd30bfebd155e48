"""The OpenTelemetry GenAI client metrics as Prometheus histograms, with the conventions' names and buckets."""

from typing import Final

from prometheus_client import CollectorRegistry, Histogram

from worker.ops.labelled import Labelled

# The bucket boundaries the GenAI semantic conventions advise for each instrument.
DURATION_BUCKETS: Final = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS: Final = tuple(float(4**n) for n in range(14))  # 1, 4, 16, … 67,108,864
# Label values come from closed sets only: provider names (a fixed mapping), `chat`, input/output, error classes.
LABELS: Final = ("gen_ai_operation_name", "gen_ai_provider_name", "error_type")


class GenAIMetrics:
    """`gen_ai.client.operation.duration` and `gen_ai.client.token.usage`, one observation per model call."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration (gen_ai.client.operation.duration): one model call, as the worker saw it.",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per model call (gen_ai.client.token.usage), by gen_ai_token_type input or output.",
            ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_token_type"),
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self._duration = Labelled(self.duration)
        self._token_usage = Labelled(self.token_usage)

    def observe(
        self, operation: str, provider: str, seconds: float, *, input_tokens: int, output_tokens: int, error_type: str
    ) -> None:
        """Record one call; `error_type` is empty for a call that answered. Token counts of 0 mean unknown."""
        self._duration(operation, provider, error_type).observe(seconds)
        if input_tokens > 0:
            self._token_usage(operation, provider, "input").observe(input_tokens)
        if output_tokens > 0:
            self._token_usage(operation, provider, "output").observe(output_tokens)
