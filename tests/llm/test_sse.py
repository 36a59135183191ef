from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatbot_api.llm.sse import SSEComment, SSEError, SSEEvent, SSEItem, SSEParser


def feed_all(chunks: list[bytes], parser: SSEParser | None = None) -> list[SSEItem]:
    parser = parser or SSEParser()
    items: list[SSEItem] = []
    for chunk in chunks:
        items.extend(parser.feed(chunk))
    return items


def byte_by_byte(body: bytes) -> list[SSEItem]:
    return feed_all([body[i : i + 1] for i in range(len(body))])


# A stream that uses every feature: mixed line endings, comments, multi-line data, fields,
# an event with no data, non-ASCII text.
MIXED = (
    b": keep-alive\r\n"
    b"event: greeting\r\n"
    b"id: 7\r\n"
    b"data: hola, se\xc3\xb1or \xe2\x82\xac \xf0\x9f\x98\x80\r\n"
    b"data:second line\r\n"
    b"\r\n"
    b"retry: 1500\r"
    b"event: no-data\r"
    b"\r"
    b"data: third\n"
    b"\n"
)
MIXED_ITEMS: list[SSEItem] = [
    SSEComment("keep-alive"),
    SSEEvent("hola, señor € 😀\nsecond line", "greeting", "7"),
    SSEEvent("third", "message", "7"),
]


class TestSSEParser:
    def test_one_event_per_blank_line(self) -> None:
        items = feed_all([b'data: {"a": 1}\n\ndata: [DONE]\n\n'])
        assert items == [SSEEvent('{"a": 1}'), SSEEvent("[DONE]")]

    def test_multiline_data_is_joined_with_newlines(self) -> None:
        assert feed_all([b"data: one\ndata: two\ndata:\ndata: four\n\n"]) == [
            SSEEvent("one\ntwo\n\nfour")
        ]

    def test_crlf_line_endings(self) -> None:
        assert feed_all([b"data: a\r\ndata: b\r\n\r\n"]) == [SSEEvent("a\nb")]

    def test_cr_line_endings(self) -> None:
        assert feed_all([b"data: a\rdata: b\r\r"]) == [SSEEvent("a\nb")]

    def test_cr_at_chunk_end_and_lf_at_next_start_are_one_line_ending(self) -> None:
        # Were the LF read as a second line ending, "a" would be dispatched alone.
        assert feed_all([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [SSEEvent("a\nb")]

    def test_event_after_trailing_cr_dispatches_without_waiting_for_next_chunk(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"data: now\r\r") == [SSEEvent("now")]
        assert parser.feed(b"\ndata: later\n\n") == [SSEEvent("later")]

    def test_two_crs_across_chunks_are_two_line_endings(self) -> None:
        assert feed_all([b"data: a\r", b"\r"]) == [SSEEvent("a")]

    def test_comments_are_surfaced_but_are_not_events(self) -> None:
        items = feed_all([b": ping\n\n:\n\n:no space\ndata: x\n\n"])
        assert items == [SSEComment("ping"), SSEComment(""), SSEComment("no space"), SSEEvent("x")]

    def test_only_one_leading_space_is_stripped(self) -> None:
        assert feed_all([b"data:  two\n\ndata:none\n\n"]) == [SSEEvent(" two"), SSEEvent("none")]

    def test_field_without_colon_has_empty_value(self) -> None:
        assert feed_all([b"data\n\n"]) == [SSEEvent("")]

    def test_event_without_data_is_not_dispatched_and_resets_the_type(self) -> None:
        assert feed_all([b"event: ping\n\ndata: x\n\n"]) == [SSEEvent("x", "message")]

    def test_event_type_and_last_event_id(self) -> None:
        parser = SSEParser()
        items = feed_all([b"event: delta\nid: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"], parser)
        assert items == [SSEEvent("a", "delta", "1"), SSEEvent("b", "message", "1"), SSEEvent("c")]
        assert parser.last_event_id == ""

    def test_id_with_nul_is_ignored(self) -> None:
        assert feed_all([b"id: 1\n\nid: 2\x003\ndata: x\n\n"]) == [SSEEvent("x", "message", "1")]

    def test_retry_accepts_only_digits(self) -> None:
        parser = SSEParser()
        feed_all([b"retry: 2500\n\nretry: soon\n\nretry: 1.5\n\n"], parser)
        assert parser.retry == 2500

    def test_unknown_fields_are_ignored(self) -> None:
        assert feed_all([b"foo: bar\ndata: x\nbaz\n\n"]) == [SSEEvent("x")]

    def test_multibyte_character_split_across_chunks(self) -> None:
        body = "data: ñ€😀\n\n".encode()
        for cut in range(1, len(body)):
            assert feed_all([body[:cut], body[cut:]]) == [SSEEvent("ñ€😀")], cut

    def test_byte_by_byte_equals_one_chunk(self) -> None:
        assert feed_all([MIXED]) == MIXED_ITEMS
        assert byte_by_byte(MIXED) == MIXED_ITEMS

    def test_leading_byte_order_mark_is_skipped(self) -> None:
        body = b"\xef\xbb\xbfdata: x\n\n"
        assert feed_all([body]) == [SSEEvent("x")]
        assert byte_by_byte(body) == [SSEEvent("x")]

    def test_byte_order_mark_later_is_data(self) -> None:
        assert feed_all([b"data: x\n\n", b"data: \xef\xbb\xbfy\n\n"])[1] == SSEEvent("\ufeffy")

    def test_unterminated_event_at_end_is_not_dispatched(self) -> None:
        assert feed_all([b"data: complete\n\ndata: cut sho"]) == [SSEEvent("complete")]
        assert feed_all([b"data: no blank line\n"]) == []

    def test_invalid_utf8_becomes_replacement_character(self) -> None:
        assert feed_all([b"data: a\xffb\n\n"]) == [SSEEvent("a\ufffdb")]

    def test_empty_chunks_change_nothing(self) -> None:
        assert feed_all([b"", b"data: x\n", b"", b"\n"]) == [SSEEvent("x")]

    def test_overlong_line_raises(self) -> None:
        parser = SSEParser(max_event_size=100)
        with pytest.raises(SSEError):
            parser.feed(b"data: " + b"x" * 200)

    def test_oversized_event_raises(self) -> None:
        parser = SSEParser(max_event_size=100)
        with pytest.raises(SSEError):
            parser.feed(b"data: " + b"x" * 60 + b"\ndata: " + b"y" * 60 + b"\n")

    def test_sse_error_is_a_value_error(self) -> None:
        # So that `errors.map_exception` maps it to ProviderBadResponse.
        assert issubclass(SSEError, ValueError)

    @settings(database=None, max_examples=200, deadline=None)
    @given(cuts=st.lists(st.integers(min_value=0, max_value=len(MIXED)), max_size=12))
    def test_any_chunking_gives_the_same_items(self, cuts: list[int]) -> None:
        points = [0, *sorted(cuts), len(MIXED)]
        chunks = [MIXED[a:b] for a, b in pairwise(points)]
        assert feed_all(chunks) == MIXED_ITEMS
