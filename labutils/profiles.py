"""Run profiles: how much work a notebook does.

`smoke` runs every code path in seconds and makes no learning claims, `quick` keeps every claim true with
room to spare on a 2-core CPU, and `full` is the lesson as meant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROFILE_ENV_VAR = "LABUTILS_PROFILE"


@dataclass(frozen=True)
class Profile:
    """Sizes of the work a notebook does under one profile."""

    name: str
    epochs: int
    pairs_per_epoch: int
    eval_pairs: int
    num_seeds: int
    max_images_per_class: int | None
    claims: bool

    def seeds(self, first: int = 0) -> list[int]:
        """Return `num_seeds` consecutive seeds starting at `first`."""
        return list(range(first, first + self.num_seeds))


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", epochs=1, pairs_per_epoch=256, eval_pairs=256, num_seeds=1,
                     max_images_per_class=40, claims=False),
    "quick": Profile("quick", epochs=6, pairs_per_epoch=2048, eval_pairs=1000, num_seeds=2,
                     max_images_per_class=None, claims=True),
    "full": Profile("full", epochs=10, pairs_per_epoch=3072, eval_pairs=2000, num_seeds=3,
                    max_images_per_class=None, claims=True),
}


def get_profile(name: str) -> Profile:
    """Return the profile called `name`, or the one named in $LABUTILS_PROFILE when that is set.

    The environment variable wins so that tools which cannot inject parameters (nbval) can still pick a profile.
    """
    name = os.environ.get(PROFILE_ENV_VAR) or name
    try:
        return PROFILES[name]
    except KeyError:
        allowed = ", ".join(PROFILES)
        raise ValueError(f"Unknown profile {name!r}: use one of {allowed}.") from None
