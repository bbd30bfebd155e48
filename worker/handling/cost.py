"""Token usage of a reply, summed over its provider calls, priced by the tenant's optional `[pricing]` table."""

from decimal import Decimal

from contracts import Pricing, Usage

COST_DECIMALS = 8


def priced_usage(input_tokens: int, output_tokens: int, pricing: Pricing | None) -> Usage:
    if pricing is None:
        return Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    # Decimal from the printed price, so 0.0025 per 1k stays 0.0025 and sums do not pick up float noise.
    cost = (
        Decimal(input_tokens) * Decimal(str(pricing.input_per_1k_tokens))
        + Decimal(output_tokens) * Decimal(str(pricing.output_per_1k_tokens))
    ) / 1000
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        estimated_cost=float(round(cost, COST_DECIMALS)),
        currency=pricing.currency,
    )
