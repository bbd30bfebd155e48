"""The one error taxonomy every provider maps its failures into.

    ProviderError                 raised by Provider.complete(); carries an ErrorClass
     ├─ transient                 timeouts, resets, 408/409/5xx, "overloaded", breaker open
     │   └─ CircuitOpen           the breaker refused the call: the provider was not called
     ├─ rate_limited              429 / throttling; `retry_after_s` when the provider says
     ├─ quota                     billing or quota exhausted: not worth a hot retry
     ├─ bad_request               400/422: the call is wrong, or asks what the model cannot do
     ├─ context_overflow          the prompt does not fit the model's context window
     ├─ content_filtered          the provider's safety system blocked the prompt or answer
     ├─ auth                      401/403: credentials, roles, network ACLs
     ├─ config                    the worker's own settings for the tenant are unusable (a secret that does not
     │                            resolve, a key file that is no key): the provider was not called
     └─ not_found                 404: model, deployment or endpoint does not exist

Messages are written for the tenant admin ("401 from Azure: check the API key") and never contain secrets:
a message is masked as it is made (`worker.redaction.redact_provider_text`), because most quote a provider's
own error text, and some servers quote the key they refused.
"""

from enum import StrEnum

from worker.redaction import redact_provider_text


class ErrorClass(StrEnum):
    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    QUOTA = "quota"
    BAD_REQUEST = "bad_request"
    CONTEXT_OVERFLOW = "context_overflow"
    CONTENT_FILTERED = "content_filtered"
    AUTH = "auth"
    CONFIG = "config"
    NOT_FOUND = "not_found"


class ProviderError(Exception):
    """A provider call failed; `error_class` decides what the tenant's policy does next."""

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        message = redact_provider_text(message)
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.code = code or error_class.value
        self.retry_after_s = retry_after_s
        self.status = status

    def __repr__(self) -> str:
        return f"ProviderError({self.error_class.value}, {self.code!r}, {self.message!r})"


class CircuitOpen(ProviderError):
    """The circuit breaker refused the call, so the provider was not called; `retry_after_s` is its next probe."""

    CODE = "circuit_open"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(ErrorClass.TRANSIENT, message, code=self.CODE, retry_after_s=retry_after_s)
