from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdmaproxy.send_window import SendQueueFull, SendWindow


def test_signals_every_nth_and_retires_in_order() -> None:
    window: SendWindow[str] = SendWindow(depth=8, signal_every=3)
    posts = [window.post(f"chunk{i}") for i in range(6)]
    assert [signaled for _, signaled in posts] == [False, False, True, False, False, True]
    assert [wr_id for wr_id, _ in posts] == [1, 2, 3, 4, 5, 6]
    assert window.outstanding == 6 and window.room == 2
    assert window.complete(3) == ["chunk0", "chunk1", "chunk2"]
    assert window.complete(6) == ["chunk3", "chunk4", "chunk5"]
    assert window.outstanding == 0 and window.held() == []


def test_must_signal_resets_the_run_and_requests_without_buffers_hold_nothing() -> None:
    window: SendWindow[int] = SendWindow(depth=8, signal_every=4)
    assert window.post(None) == (1, False)
    assert window.post(7, must_signal=True) == (2, True)
    assert window.post(None) == (3, False)
    assert window.complete(2) == [7]


def test_the_request_that_fills_the_queue_is_signaled_and_a_full_queue_refuses() -> None:
    window: SendWindow[int] = SendWindow(depth=3, signal_every=3)
    assert [window.post(i)[1] for i in range(3)] == [False, False, True]
    with pytest.raises(SendQueueFull):
        window.post(99)
    assert window.posted == 3
    assert window.complete(3) == [0, 1, 2]
    assert window.room == 3


def test_completions_outside_the_window_are_refused() -> None:
    window: SendWindow[int] = SendWindow(depth=4, signal_every=1)
    window.post(1)
    with pytest.raises(ValueError, match="outside the outstanding"):
        window.complete(2)
    window.complete(1)
    with pytest.raises(ValueError, match="outside the outstanding"):
        window.complete(1)


@pytest.mark.parametrize(("depth", "every"), [(0, 1), (4, 0), (4, 5)])
def test_bad_parameters(depth: int, every: int) -> None:
    with pytest.raises(ValueError):
        SendWindow(depth=depth, signal_every=every)


@given(
    every=st.integers(1, 16),
    ops=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=300),
)
def test_every_buffer_comes_back_once_in_order(every: int, ops: list[tuple[bool, bool]]) -> None:
    """Post (maybe forced-signaled) or deliver the oldest pending signaled completion."""
    window: SendWindow[int] = SendWindow(depth=32, signal_every=every)
    signaled_pending: list[int] = []
    returned: list[int] = []
    for post, force in ops:
        if post and window.room:
            wr_id, signaled = window.post(wr_id_token := window.posted + 1, must_signal=force)
            assert wr_id == wr_id_token
            if signaled:
                signaled_pending.append(wr_id)
            assert window.unsignaled_run < every
        elif signaled_pending:
            returned += window.complete(signaled_pending.pop(0))
        # never stuck: a full queue always has a signaled request outstanding
        if window.room == 0:
            assert signaled_pending
    for wr_id in signaled_pending:
        returned += window.complete(wr_id)
    assert returned == list(range(1, len(returned) + 1))
    assert len(returned) + len(window.held()) == window.posted
    assert len(window.held()) == window.unsignaled_run  # only the unsignaled tail is left
