"""A conservative token estimate for remote models whose tokenizer is not available offline.

The estimate works like the first stage of a real BPE tokenizer. The text is cut into the
pieces a GPT-4 or Llama-3 pre-tokenizer makes: a letter run with its leading space, digit
groups of up to three, punctuation runs and whitespace runs. A piece of `b` UTF-8 bytes then
costs `ceil(b / 4)` tokens. Short common words cost one token and long words cost more.
Non-Latin text costs more per character because its characters take two to four bytes, and a
small surcharge on those extra bytes brings CJK close to one token per character.

The raw count is then multiplied by a calibration factor:

    factor = ewma(reported / raw) * SAFETY_MARGIN      (the EWMA is clamped to [0.5, 4.0])

`observe()` feeds it the prompt sizes that the provider reports. The margin keeps the estimate
on the high side, which is the safe side for fitting a context window. The starting EWMA of 1.0
already over-estimates Llama-3 on English (about 4 characters per token) and on Spanish: the
raw count runs at about 3 characters per token on both.

The scan runs in `re` on the encoded bytes and the sum runs in C (`map`): a 32,000-character
message costs about a millisecond. Nothing here awaits, so this is safe to call on the event loop.
"""

from __future__ import annotations

import math
import re
from itertools import repeat
from operator import add, floordiv

# Bytes per token for one piece. Bytes >= 0x80 (any non-ASCII character) count as letters.
BYTES_PER_TOKEN = 4
# One more token per this many bytes beyond the first of each non-ASCII character: about
# 1 token per CJK character, 1.5 Cyrillic/Greek characters per token.
NON_ASCII_SURCHARGE_BYTES = 6
SAFETY_MARGIN = 1.1
DEFAULT_RATIO = 1.0
MIN_RATIO = 0.5
MAX_RATIO = 4.0
DEFAULT_ALPHA = 0.2

_PIECES = re.compile(
    rb" ?[A-Za-z\x80-\xff]++"  # a word, with the space before it
    rb"|[0-9]{1,3}+"  # numbers in groups of three, as Llama 3 splits them
    rb"| ?[^\sA-Za-z0-9\x80-\xff]++"  # punctuation and symbols
    rb"|\s++"
)
_ROUND_UP = repeat(BYTES_PER_TOKEN - 1)
_PER_TOKEN = repeat(BYTES_PER_TOKEN)


def raw_token_count(text: str) -> int:
    """The uncalibrated estimate: the sum over pre-tokenizer pieces of ceil(bytes / 4), plus the
    surcharge for non-ASCII text."""
    if not text:
        return 0
    encoded = text.encode("utf-8", "surrogatepass")
    pieces = _PIECES.findall(encoded)
    # sum(ceil(len(p) / 4)) computed with C-level iterators, with no Python loop per piece.
    total: int = sum(map(floordiv, map(add, map(len, pieces), _ROUND_UP), _PER_TOKEN))
    return total + (len(encoded) - len(text)) // NON_ASCII_SURCHARGE_BYTES


class TokenEstimator:
    """Counts tokens conservatively and learns from what the provider reports."""

    __slots__ = ("_alpha", "_margin", "_ratio", "observations")

    def __init__(
        self,
        *,
        ratio: float = DEFAULT_RATIO,
        margin: float = SAFETY_MARGIN,
        alpha: float = DEFAULT_ALPHA,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if margin < 1:
            raise ValueError("margin must be >= 1: the estimate must err on the high side")
        self._ratio = _clamp(ratio)
        self._margin = margin
        self._alpha = alpha
        self.observations = 0

    @property
    def ratio(self) -> float:
        """The EWMA of reported / raw tokens, without the safety margin."""
        return self._ratio

    @property
    def factor(self) -> float:
        """What raw counts are multiplied by: the EWMA times the safety margin."""
        return self._ratio * self._margin

    def count(self, text: str) -> int:
        """Estimated tokens for `text`, rounded up. Zero for an empty string only."""
        raw = raw_token_count(text)
        return math.ceil(raw * self._ratio * self._margin) if raw else 0

    def max_tokens_per_byte(self) -> float:
        """The `Provider.max_tokens_per_byte` bound. A piece of `b` bytes costs at most `b`
        raw tokens and the non-ASCII surcharge at most `b / 6` more, so raw <= 7/6 of the
        bytes; the count multiplies that by a factor that calibration never takes past
        `MAX_RATIO * margin`, and rounds up (the `+ 1` of the bound)."""
        return (1 + 1 / NON_ASCII_SURCHARGE_BYTES) * MAX_RATIO * self._margin

    def observe(self, estimated: int, reported: int) -> None:
        """Calibrate from one call: `estimated` is what this estimator predicted for the prompt
        (its `count()`s plus any per-message overhead), `reported` the provider's prompt_tokens.

        `estimated` already includes the current factor, so it is divided back out. Otherwise
        the EWMA would chase its own tail and settle at sqrt(true ratio) instead.
        """
        if estimated <= 0 or reported <= 0:
            return
        sample = reported * self.factor / estimated
        self._ratio = _clamp((1 - self._alpha) * self._ratio + self._alpha * sample)
        self.observations += 1


def _clamp(ratio: float) -> float:
    return min(MAX_RATIO, max(MIN_RATIO, ratio))
