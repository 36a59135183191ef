"""API key material: generation, hashing and a cheap shape check.

A key is `cbk_` followed by 43 base62 characters: 256 bits from `secrets`, so it cannot be
guessed, and a prefix that secret scanners can match. Only `hash_key()` of it is stored:
HMAC-SHA256 under the server secret, so a leaked database alone does not let anyone check
candidate keys. Lookups go through the hash (a unique index) and the stored hash is compared
again with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "cbk_"
RANDOM_BYTES = 32
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# ceil(256 / log2(62)) characters always hold 32 bytes.
BODY_LENGTH = 43
KEY_PATTERN = re.compile(rf"^{PREFIX}[0-9A-Za-z]{{{BODY_LENGTH}}}$")
# Anything that looks like one of our keys, wherever it appears (for redaction).
KEY_LIKE = re.compile(rf"{PREFIX}[0-9A-Za-z]{{8,}}")
HINT_CHARS = 6


def _base62(data: bytes, length: int) -> str:
    number = int.from_bytes(data, "big")
    chars: list[str] = []
    while number:
        number, digit = divmod(number, 62)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars)).rjust(length, "0")


def generate_key() -> str:
    return PREFIX + _base62(secrets.token_bytes(RANDOM_BYTES), BODY_LENGTH)


def looks_like_key(value: str) -> bool:
    return KEY_PATTERN.fullmatch(value) is not None


def hash_key(key: str, server_secret: str) -> str:
    return hmac.new(server_secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def hint(key: str) -> str:
    """What is stored to tell keys apart: a few characters after the prefix, far too few to
    use. Without the prefix, so nothing stored (or logged by a database driver) looks like
    a key."""
    return key[len(PREFIX) : len(PREFIX) + HINT_CHARS]


def display_hint(stored: str) -> str:
    return f"{PREFIX}{stored}…"
