"""Base model for every message contract: unknown fields are ignored so publishers can upgrade first."""

from pydantic import BaseModel, ConfigDict


class Contract(BaseModel):
    """A message shape shared with publishers and consumers."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
