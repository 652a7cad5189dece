"""models/streaming.py: the one chunked-streaming loop."""

from __future__ import annotations

import pytest

from models.streaming import stream


def test_stream_covers_every_position_once_and_threads_the_state():
    def step(span: slice, state: list[slice]):
        return (span.start, span.stop), state + [span]

    outputs, state = stream(step, 10, 4, [])
    assert outputs == [(0, 4), (4, 8), (8, 10)]
    assert state == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert stream(step, 0, 4, []) == ([], [])
    assert stream(step, 3, 8, [])[0] == [(0, 3)]
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        stream(step, 10, 0, [])
