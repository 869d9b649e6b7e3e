"""api.bulk.chunk: how a batch's lines are numbered into messages."""

from __future__ import annotations

from api.bulk import chunk
from shared.dispatch import FIRST_CHUNK


def urls(*names: str) -> tuple[str, ...]:
    return tuple(f"http://x/{n}.jpg" for n in names)


def test_the_first_chunk_is_short_and_the_rest_full():
    ids = [str(i) for i in range(FIRST_CHUNK + 19)]
    chunks = chunk(ids, urls(*ids), size=8)
    assert [len(c) for c in chunks] == [FIRST_CHUNK, 8, 8, 3]
    assert [i for c in chunks for i in c] == ids


def test_a_urls_duplicates_stay_together_even_past_the_first_chunks_size():
    ids = [str(i) for i in range(9)]
    chunks = chunk(ids, urls("a", "b", "b", "b", "b", "b", "b", "c", "d"), size=8)
    assert chunks == [["0"], ["1", "2", "3", "4", "5", "6", "7", "8"]]


def test_batch_max_below_the_first_chunks_size_bounds_it():
    ids = [str(i) for i in range(5)]
    assert [len(c) for c in chunk(ids, urls(*ids), size=2)] == [2, 2, 1]


def test_a_batch_that_fits_one_message_stays_one():
    ids = [str(i) for i in range(8)]
    assert chunk(ids, urls(*ids), size=8) == [ids]
