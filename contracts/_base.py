"""Base model for every message contract: unknown fields are ignored so publishers can upgrade first."""

from pydantic import BaseModel, ConfigDict

# Shared by messages and tenant configs; kept here so `messages` can refer to tenant types without a cycle.
TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class Contract(BaseModel):
    """A message shape shared with publishers and consumers."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
