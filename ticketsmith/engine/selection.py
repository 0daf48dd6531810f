"""Which part of an experiment to train now, with no torch to import: the CLI checks
`--levels`/`--variants` before anything heavy starts (`ticketsmith.sidecar`)."""
from __future__ import annotations

from dataclasses import dataclass

VARIANT_NAMES = ("ticket", "random_reinit", "random_prune")  # lottery.VARIANTS builds each


@dataclass(frozen=True)
class Selection:
    """Which part of the experiment to train now (the rest must be finished or is left out).

    Selecting work never changes the experiment hash: a Job can train levels 3:4 or only the
    random control of an experiment that other Jobs train the rest of.
    """
    first_level: int = 0
    last_level: int | None = None      # inclusive; None = the config's last level
    variants: tuple[str, ...] | None = None  # None = every configured variant

    def allows(self, level: int, variant: str) -> bool:
        in_range = self.first_level <= level and (self.last_level is None or level <= self.last_level)
        return in_range and (self.variants is None or variant in self.variants or variant == "dense")
