"""How many groups a GroupNorm gets when the channels do not divide evenly.

The rule, documented once here and reported for every norm it changes: among the divisors ``g`` of
``C`` that leave at least two channels per group (when ``C >= 2``), take the one closest to the
requested group count (``groups``, or ``C / group_size`` when a group size is asked for); on a tie the
smaller count, i.e. the larger groups. So 24 channels with ``groups=32`` get 12 groups of 2, never 24
groups of 1, which would silently be InstanceNorm.
"""

from __future__ import annotations


def choose_groups(channels: int, groups: int | None = 32, group_size: int | None = None) -> tuple[int, str | None]:
    """Return ``(num_groups, note)``; ``note`` says why the count differs from the request.

    Example:
        >>> choose_groups(64, 32)
        (32, None)
        >>> choose_groups(24, 32)[0]
        12
    """
    target = channels / group_size if group_size else float(groups or 32)
    if target == int(target) and channels % int(target) == 0 and (channels // int(target) >= 2 or channels == 1
                                                                   or int(target) == 1):
        return int(target), None
    divisors = [g for g in range(1, channels + 1) if channels % g == 0 and (channels // g >= 2 or channels == 1)]
    best = min(divisors, key=lambda g: (abs(g - target), g))
    asked = f"group_size={group_size}" if group_size else f"groups={groups}"
    return best, (f"{channels} channels with {asked}: using {best} groups of {channels // best} "
                  f"(closest divisor leaving >= 2 channels per group)")
