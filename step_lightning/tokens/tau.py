"""Parse dCTS merging thresholds written as four digits in tenths (paper §4.2, Table 1).

``tau=6899`` means tau(2x2)=0.6, tau(4x4)=0.8, tau(8x8)=0.9, tau(16x16)=0.9. The returned tuple is
ordered like :data:`WINDOW_SIZES`, which is the order :func:`step_lightning.tokens.layout.dcts_layout`
expects.
"""

from __future__ import annotations

import re

from step_lightning.core import ConfigError

WINDOW_SIZES = (2, 4, 8, 16)

_EXPECTED = "tau=6899 means 0.6/0.8/0.9/0.9 for 2x2/4x4/8x8/16x16"


def parse_tau(value: int | str) -> tuple[float, float, float, float]:
    """``6899`` or ``"6899"`` -> ``(0.6, 0.8, 0.9, 0.9)`` for window sizes 2, 4, 8, 16.

    Anything that is not exactly four decimal digits raises :class:`ConfigError`. Floats are refused
    even when integral: ``6.8`` and ``6899.0`` are both more likely typos than intent. An int whose
    first digit is 0 (e.g. 999 for "0999") is refused too, because it has three digits; pass the
    string ``"0999"`` instead.
    """
    # bool is an int subclass; True would otherwise read as "1".
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"tau={value!r} must be four digits 0-9 ({_EXPECTED}).")
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]{4}", text):
        raise ConfigError(f"tau={value!r} is not exactly four digits 0-9 ({_EXPECTED}).")
    t2, t4, t8, t16 = (int(ch) / 10 for ch in text)
    return t2, t4, t8, t16
