from __future__ import annotations

import math
import random

import pytest

from chatbot_api.llm.tokens import (
    MAX_RATIO,
    MIN_RATIO,
    SAFETY_MARGIN,
    TokenEstimator,
    raw_token_count,
)

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. In 2024, researchers at the university "
    "published a comprehensive study on tokenization, showing that large language models "
    "process text in subword units. Isn't it interesting? Performance matters: the "
    "implementation handles 32,000 characters in well under a few milliseconds."
)
SPANISH = (
    "El rápido zorro marrón salta sobre el perro perezoso. En 2024, los investigadores de la "
    "universidad publicaron un estudio exhaustivo sobre la tokenización, demostrando que los "
    "modelos de lenguaje procesan el texto en unidades más pequeñas. ¿No es interesante? El "
    "rendimiento importa: la implementación maneja información compleja rápidamente."
)
RUSSIAN = "Быстрая коричневая лиса прыгает через ленивую собаку."
CHINESE = "敏捷的棕色狐狸跳过了懒狗。研究人员发表了一项关于分词的全面研究。"


class TestRawTokenCount:
    def test_empty_text_costs_nothing(self) -> None:
        assert raw_token_count("") == 0

    def test_short_word_with_its_space_is_one_token(self) -> None:
        assert raw_token_count("hi") == 1
        assert raw_token_count(" the") == 1

    def test_long_words_cost_more_than_short_ones(self) -> None:
        assert raw_token_count("internationalization") == 5  # 20 bytes / 4
        assert raw_token_count("cat dog") == 2

    def test_digits_are_grouped_by_three(self) -> None:
        assert raw_token_count("1234567") == 3

    def test_punctuation_and_whitespace_are_pieces(self) -> None:
        assert raw_token_count("a, b") == 3  # "a" "," " b"
        assert raw_token_count("a\n\n\nb") == 3

    def test_not_a_character_count(self) -> None:
        # Same length, very different cost: a long run is cut in 4-byte pieces, separate
        # letters each cost a token.
        assert raw_token_count("a" * 40) == 10
        assert raw_token_count("a." * 20) == 40

    def test_non_latin_text_costs_more_per_character(self) -> None:
        english_rate = raw_token_count(ENGLISH) / len(ENGLISH)
        assert raw_token_count(RUSSIAN) / len(RUSSIAN) > english_rate
        # Llama 3 spends roughly a token per CJK character: do not undercut that.
        assert raw_token_count(CHINESE) >= len(CHINESE)

    def test_lone_surrogates_do_not_raise(self) -> None:
        assert raw_token_count("bad \ud800 text") >= 3


class TestTokenEstimator:
    def test_count_is_the_raw_count_times_the_factor_rounded_up(self) -> None:
        estimator = TokenEstimator()
        assert estimator.factor == pytest.approx(SAFETY_MARGIN)
        assert estimator.count(ENGLISH) == math.ceil(raw_token_count(ENGLISH) * SAFETY_MARGIN)
        assert estimator.count("") == 0

    @pytest.mark.parametrize(
        ("text", "chars_per_token"),
        [
            # Llama 3 spends about 4 characters per English token and well over 3 per Spanish
            # one; a fresh estimator must claim fewer characters per token (more tokens).
            (ENGLISH, 3.5),
            (SPANISH, 3.0),
        ],
    )
    def test_default_over_estimates_llama3(self, text: str, chars_per_token: float) -> None:
        assert TokenEstimator().count(text) > len(text) / chars_per_token

    def test_observe_converges_to_reported_counts_plus_margin(self) -> None:
        estimator = TokenEstimator()
        raw = raw_token_count(SPANISH)
        reported = 2 * raw
        for _ in range(60):
            estimator.observe(estimator.count(SPANISH), reported)
        assert estimator.ratio == pytest.approx(2.0, rel=0.02)
        assert estimator.count(SPANISH) >= reported
        assert estimator.count(SPANISH) == pytest.approx(reported * SAFETY_MARGIN, rel=0.03)
        assert estimator.observations == 60

    def test_observe_learns_a_lower_ratio_but_stays_above_the_truth(self) -> None:
        estimator = TokenEstimator()
        reported = math.ceil(raw_token_count(ENGLISH) * 0.7)
        for _ in range(60):
            estimator.observe(estimator.count(ENGLISH), reported)
        assert estimator.count(ENGLISH) < TokenEstimator().count(ENGLISH)
        assert estimator.count(ENGLISH) >= reported

    def test_one_observation_moves_the_ratio_only_partly(self) -> None:
        estimator = TokenEstimator(alpha=0.2)
        estimator.observe(estimator.count(ENGLISH), 3 * raw_token_count(ENGLISH))
        assert 1.0 < estimator.ratio < 2.0

    def test_ratio_is_clamped(self) -> None:
        high, low = TokenEstimator(), TokenEstimator()
        for _ in range(100):
            high.observe(10, 10_000)
            low.observe(10_000, 1)
        assert high.ratio == MAX_RATIO
        assert low.ratio == MIN_RATIO
        assert TokenEstimator(ratio=50).ratio == MAX_RATIO

    @pytest.mark.parametrize(("estimated", "reported"), [(0, 10), (10, 0), (-1, 5)])
    def test_meaningless_observations_are_ignored(self, estimated: int, reported: int) -> None:
        estimator = TokenEstimator()
        estimator.observe(estimated, reported)
        assert estimator.ratio == 1.0
        assert estimator.observations == 0

    @pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.5}, {"margin": 0.9}])
    def test_invalid_settings_are_refused(self, kwargs: dict[str, float]) -> None:
        with pytest.raises(ValueError):  # noqa: PT011 - the message is not the contract
            TokenEstimator(**kwargs)


# Texts that cost the most tokens per byte: one-byte pieces (a letter, then punctuation),
# digits cut in threes, lone non-ASCII characters, whitespace runs, and random mixtures.
_ALPHABET = "a.1 \n!é日🙂Я-_,"


def _adversarial() -> list[str]:
    rng = random.Random(20261201)
    fixed = ["a.", "a", ".", "a." * 500, "1a" * 300, "é." * 200, "日." * 200, "🙂a" * 100]
    fixed += [" \n" * 50, "!" * 999, RUSSIAN, CHINESE, ENGLISH]
    mixed = ["".join(rng.choices(_ALPHABET, k=rng.randint(1, 400))) for _ in range(300)]
    return fixed + mixed


class TestBytesBound:
    @pytest.mark.parametrize("ratio", [MIN_RATIO, 1.0, MAX_RATIO, 50.0])
    def test_no_text_costs_more_than_the_bound_whatever_the_calibration(self, ratio: float) -> None:
        estimator = TokenEstimator(ratio=ratio)
        bound = estimator.max_tokens_per_byte()
        worst = 0.0
        for text in _adversarial():
            size = len(text.encode())
            assert estimator.count(text) <= bound * size + 1, text
            worst = max(worst, (estimator.count(text) - 1) / size)
        if estimator.ratio == MAX_RATIO:
            # The bound is not loose for nothing: a letter-and-dot text comes close to it.
            assert worst > 0.8 * bound
