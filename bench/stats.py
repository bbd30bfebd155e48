"""Medians with min–max, percentiles, ratios and plain-text tables: the arithmetic every benchmark shares."""

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """A set of repeated measurements, summarised by its median and range."""

    median: float
    low: float
    high: float
    n: int

    def show(self, fmt: str = "{:.0f}") -> str:
        if self.n == 1:
            return fmt.format(self.median)
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}–{fmt.format(self.high)})"


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no measurements")
    return Spread(median(values), min(values), max(values), len(values))


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile, `p` in 0..100 (the same definition as numpy's default)."""
    if not values:
        raise ValueError("no measurements")
    if not 0 <= p <= 100:
        raise ValueError("p must be within 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


def pairwise_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Ratio of each run to the baseline run next to it (alternating runs share the machine's mood)."""
    if len(numerators) != len(denominators):
        raise ValueError("need one baseline run per measured run")
    return [n / d for n, d in zip(numerators, denominators, strict=True) if d > 0]


def alternate(names: Sequence[str], rounds: int) -> list[str]:
    """Run order A B B A A B …: each round swaps which goes first, so neither always runs warm."""
    order: list[str] = []
    for r in range(rounds):
        order.extend(names if r % 2 == 0 else list(reversed(names)))
    return order


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (reads well in a terminal and pastes into the docs unchanged)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"
