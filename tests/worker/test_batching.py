"""ContinuousBatches' dispatch policy, driven directly (the pool is a recording stand-in)."""

from types import SimpleNamespace

import pytest

from worker.batching import RETRY_BATCH, ContinuousBatches


class RecordingPool:
    limit = 1

    def __init__(self) -> None:
        self.calls = []

    def apply_async(self, target, args, callback, error_callback):
        self.calls.append(SimpleNamespace(requests=args[1][0], done=callback, lost=error_callback))


class Message:
    def __init__(self, *ids: str) -> None:
        self.args = (list(ids),)
        self.id, self.name, self.kwargs = ids[0], "t", {}
        self.delivery_info, self.hostname, self.ignore_result = {}, "h", True
        self.reply_to = self.correlation_id = None
        self.request_dict = {}
        self._payload = (self.args, {}, {})
        self.events: list[str] = []

    def acknowledge(self) -> None:
        self.events.append("ack")

    def reject(self, requeue: bool = False) -> None:
        self.events.append("requeue" if requeue else "reject")


@pytest.fixture
def batcher():
    task = ContinuousBatches()
    task.batch_max = 4
    task._pool = RecordingPool()
    return task


def _buffer(task, *messages):
    for m in messages:
        task._buffer.put(m)


def _ids(call):
    return [i for r in call.requests for i in r.args[0]]


def test_a_lone_job_is_dispatched_at_once(batcher):
    _buffer(batcher, Message("a"))
    batcher._do_flush()
    assert [_ids(c) for c in batcher._pool.calls] == [["a"]]


def test_while_busy_jobs_accumulate_into_the_next_full_batch(batcher):
    first = Message("a")
    _buffer(batcher, first)
    batcher._do_flush()
    rest = [Message(x) for x in "bcdefg"]
    _buffer(batcher, *rest)
    batcher._do_flush()  # the timer fires while the model is busy: nothing is dispatched
    assert len(batcher._pool.calls) == 1
    batcher._pool.calls[0].done(None)
    assert [_ids(c) for c in batcher._pool.calls] == [["a"], ["b", "c", "d", "e"]]
    assert first.events == ["ack"]
    batcher._pool.calls[1].done(None)
    assert _ids(batcher._pool.calls[2]) == ["f", "g"]


def test_batches_count_job_ids_not_messages(batcher):
    _buffer(batcher, Message("a", "b", "c"), Message("d", "e"), Message("f"))
    batcher._do_flush()
    assert _ids(batcher._pool.calls[0]) == ["a", "b", "c"]


def test_unwritten_results_requeue_the_messages(batcher):
    msg = Message("a")
    _buffer(batcher, msg)
    batcher._do_flush()
    batcher._pool.calls[0].done(RETRY_BATCH)
    assert msg.events == ["requeue"]


def test_a_lost_pool_process_requeues_and_frees_the_slot(batcher):
    lost, waiting = Message("a"), Message("b")
    _buffer(batcher, lost)
    batcher._do_flush()
    _buffer(batcher, waiting)
    batcher._pool.calls[0].lost(RuntimeError("WorkerLostError"))
    assert lost.events == ["requeue"]
    assert _ids(batcher._pool.calls[1]) == ["b"]


def test_two_slots_keep_two_batches_in_flight(batcher):
    # The threads pool (WORKER_CONCURRENCY=2): one batch loads while the other runs.
    batcher._pool.limit = 2
    _buffer(batcher, Message("a"))
    batcher._do_flush()
    _buffer(batcher, Message("b"))
    batcher._do_flush()
    _buffer(batcher, *[Message(x) for x in "cdefg"])
    batcher._do_flush()  # both slots busy: c..g wait
    assert [_ids(c) for c in batcher._pool.calls] == [["a"], ["b"]]
    batcher._pool.calls[1].done(None)  # either slot returning takes the next full batch
    assert _ids(batcher._pool.calls[2]) == ["c", "d", "e", "f"]
    batcher._pool.calls[0].done(None)
    assert _ids(batcher._pool.calls[3]) == ["g"]


def _from(queue: str, *ids: str) -> Message:
    message = Message(*ids)
    message.delivery_info = {"routing_key": queue}
    return message


def test_single_submissions_go_before_prefetched_bulk_chunks(batcher):
    batcher.first_queues = frozenset({"q.interactive"})
    batcher._pool.limit = 1
    _buffer(batcher, _from("q.bulk", "x"))
    batcher._do_flush()  # the slot is busy with x
    chunks = [_from("q.bulk", f"b{i}", f"c{i}") for i in range(3)]
    single = _from("q.interactive", "s")
    _buffer(batcher, *chunks, single)
    batcher._pool.calls[0].done(None)
    # The single job arrived last but rides in the next batch, with what still fits.
    assert _ids(batcher._pool.calls[1]) == ["s", "b0", "c0"]
    batcher._pool.calls[1].done(None)
    assert _ids(batcher._pool.calls[2]) == ["b1", "c1", "b2", "c2"]


class Delivery(Message):
    """A message as the strategy gets it: kombu's delivery tag on ``.message``."""

    def __init__(self, tag: str, *ids: str) -> None:
        super().__init__(*ids)
        self.message = SimpleNamespace(delivery_tag=tag)


def test_held_deliveries_are_those_not_yet_acked_or_requeued(batcher):
    # The heartbeat renews these on a Redis broker (worker.liveness).
    done, lost, waiting = Delivery("t1", "a"), Delivery("t2", "b"), Delivery("t3", "c")
    for d in (done, lost, waiting):
        batcher._hold(d.message.delivery_tag)
    batcher._pool.limit = 2
    _buffer(batcher, done)
    batcher._do_flush()
    _buffer(batcher, lost)
    batcher._do_flush()
    _buffer(batcher, waiting)
    assert sorted(batcher.held_deliveries()) == ["t1", "t2", "t3"]
    batcher._pool.calls[0].done(None)  # acked; c is dispatched in its place
    batcher._pool.calls[1].lost(RuntimeError("WorkerLostError"))  # requeued
    assert batcher.held_deliveries() == ["t3"]
    batcher._pool.calls[2].done(RETRY_BATCH)
    assert batcher.held_deliveries() == []
