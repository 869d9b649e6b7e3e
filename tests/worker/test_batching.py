"""ContinuousBatches' dispatch policy, driven directly (the pool is a recording stand-in)."""

from types import SimpleNamespace

import pytest

from worker.batching import RETRY_BATCH, ContinuousBatches
from worker.loader import LoadCanceled


class RecordingPool:
    limit = 1

    def __init__(self) -> None:
        self.calls = []

    def apply_async(self, target, args, callback, error_callback):
        requests, loaded, *forward_done = args[1]  # forward_done: with a loader stage
        self.calls.append(
            SimpleNamespace(
                requests=requests,
                loaded=loaded,
                forward_done=forward_done[0] if forward_done else None,
                done=callback,
                lost=error_callback,
            )
        )


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
    task.slot_pool = RecordingPool()
    return task


def _buffer(task, *messages):
    for m in messages:
        task.receive(m)  # as the strategy does for each delivery: dispatches at once


def _ids(call):
    return [i for r in call.requests for i in r.args[0]]


def test_a_lone_job_is_dispatched_at_once(batcher):
    _buffer(batcher, Message("a"))
    batcher.dispatch()
    assert [_ids(c) for c in batcher.slot_pool.calls] == [["a"]]


def test_while_busy_jobs_accumulate_into_the_next_full_batch(batcher):
    first = Message("a")
    _buffer(batcher, first)
    batcher.dispatch()
    rest = [Message(x) for x in "bcdefg"]
    _buffer(batcher, *rest)
    batcher.dispatch()  # the timer fires while the model is busy: nothing is dispatched
    assert len(batcher.slot_pool.calls) == 1
    batcher.slot_pool.calls[0].done(None)
    assert [_ids(c) for c in batcher.slot_pool.calls] == [["a"], ["b", "c", "d", "e"]]
    assert first.events == ["ack"]
    batcher.slot_pool.calls[1].done(None)
    assert _ids(batcher.slot_pool.calls[2]) == ["f", "g"]


def test_batches_count_job_ids_not_messages(batcher):
    _buffer(batcher, Message("a", "b", "c"), Message("d", "e"), Message("f"))
    batcher.dispatch()
    assert _ids(batcher.slot_pool.calls[0]) == ["a", "b", "c"]


def test_unwritten_results_requeue_the_messages(batcher):
    msg = Message("a")
    _buffer(batcher, msg)
    batcher.dispatch()
    batcher.slot_pool.calls[0].done(RETRY_BATCH)
    assert msg.events == ["requeue"]


def test_a_lost_pool_process_requeues_and_frees_the_slot(batcher):
    lost, waiting = Message("a"), Message("b")
    _buffer(batcher, lost)
    batcher.dispatch()
    _buffer(batcher, waiting)
    batcher.slot_pool.calls[0].lost(RuntimeError("WorkerLostError"))
    assert lost.events == ["requeue"]
    assert _ids(batcher.slot_pool.calls[1]) == ["b"]


def test_two_slots_keep_two_batches_in_flight(batcher):
    # The threads pool (WORKER_CONCURRENCY=2): one batch loads while the other runs.
    batcher.slot_pool.limit = 2
    _buffer(batcher, Message("a"))
    batcher.dispatch()
    _buffer(batcher, Message("b"))
    batcher.dispatch()
    _buffer(batcher, *[Message(x) for x in "cdefg"])
    batcher.dispatch()  # both slots busy: c..g wait
    assert [_ids(c) for c in batcher.slot_pool.calls] == [["a"], ["b"]]
    batcher.slot_pool.calls[1].done(None)  # either slot returning takes the next full batch
    assert _ids(batcher.slot_pool.calls[2]) == ["c", "d", "e", "f"]
    batcher.slot_pool.calls[0].done(None)
    assert _ids(batcher.slot_pool.calls[3]) == ["g"]


def _from(queue: str, *ids: str) -> Message:
    message = Message(*ids)
    message.delivery_info = {"routing_key": queue}
    return message


def test_single_submissions_go_before_prefetched_bulk_chunks(batcher):
    batcher.first_queues = frozenset({"q.interactive"})
    batcher.slot_pool.limit = 1
    _buffer(batcher, _from("q.bulk", "x"))
    batcher.dispatch()  # the slot is busy with x
    chunks = [_from("q.bulk", f"b{i}", f"c{i}") for i in range(3)]
    single = _from("q.interactive", "s")
    _buffer(batcher, *chunks, single)
    batcher.slot_pool.calls[0].done(None)
    # The single job arrived last but rides in the next batch, with what still fits.
    assert _ids(batcher.slot_pool.calls[1]) == ["s", "b0", "c0"]
    batcher.slot_pool.calls[1].done(None)
    assert _ids(batcher.slot_pool.calls[2]) == ["b1", "c1", "b2", "c2"]


class Delivery(Message):
    """A message as the strategy gets it: kombu's delivery tag on ``.message``."""

    def __init__(self, tag: str, *ids: str) -> None:
        super().__init__(*ids)
        self.message = SimpleNamespace(delivery_tag=tag)


def test_held_deliveries_are_those_not_yet_acked_or_requeued(batcher):
    # The heartbeat renews these on a Redis broker (worker.liveness).
    done, lost, waiting = Delivery("t1", "a"), Delivery("t2", "b"), Delivery("t3", "c")
    batcher.slot_pool.limit = 2
    _buffer(batcher, done)
    batcher.dispatch()
    _buffer(batcher, lost)
    batcher.dispatch()
    _buffer(batcher, waiting)
    assert sorted(batcher.held_deliveries()) == ["t1", "t2", "t3"]
    batcher.slot_pool.calls[0].done(None)  # acked; c is dispatched in its place
    batcher.slot_pool.calls[1].lost(RuntimeError("WorkerLostError"))  # requeued
    assert batcher.held_deliveries() == ["t3"]
    batcher.slot_pool.calls[2].done(RETRY_BATCH)
    assert batcher.held_deliveries() == []


# --- with a loader stage (worker.loader): messages join batches once loaded ---------


class RecordingLoader:
    """Records the loads asked for; the test finishes them, as loader threads would."""

    def __init__(self) -> None:
        self.loads: dict[str, object] = {}
        self.closed = False
        self.first: dict[str, bool] = {}

    def submit(self, job_ids, done, first=False) -> None:
        self.loads[job_ids[0]] = done
        self.first[job_ids[0]] = first

    def finish(self, first_id: str, result: object = "arrays", error=None) -> None:
        self.loads.pop(first_id)(result, error)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def loading(batcher):
    batcher.loader = RecordingLoader()
    batcher.slot_pool.limit = 2
    return batcher


def test_a_message_still_loading_holds_no_slot(loading):
    slow, quick = Message("slow"), Message("quick")
    _buffer(loading, slow, quick)
    loading.dispatch()
    assert sorted(loading.loader.loads) == ["quick", "slow"]  # both load at once
    assert loading.slot_pool.calls == []  # neither is loaded: no batch
    loading.loader.finish("quick")
    assert [_ids(c) for c in loading.slot_pool.calls] == [["quick"]]
    assert loading.slot_pool.calls[0].loaded == ["arrays"]
    loading.loader.finish("slow", "slow arrays")
    loading.slot_pool.calls[0].forward_done()
    assert _ids(loading.slot_pool.calls[1]) == ["slow"]
    assert loading.slot_pool.calls[1].loaded == ["slow arrays"]


def test_loading_starts_while_every_slot_is_busy(loading):
    _buffer(loading, Message("a"), Message("b"))
    loading.dispatch()
    loading.loader.finish("a")
    loading.loader.finish("b")
    loading.slot_pool.calls[0].forward_done()
    assert len(loading.slot_pool.calls) == 2  # both slots busy
    _buffer(loading, *[Message(x) for x in "cde"])
    loading.dispatch()
    assert sorted(loading.loader.loads) == ["c", "d", "e"]
    for x in "cde":
        loading.loader.finish(x)
    loading.slot_pool.calls[0].done(None)
    loading.slot_pool.calls[1].forward_done()
    assert _ids(loading.slot_pool.calls[2]) == ["c", "d", "e"]


def test_the_next_batch_waits_for_the_forward_pass_and_takes_all_loaded_by_then(loading):
    # A batch formed while the model is taken would hold only what had loaded when the
    # previous one started, and wait for the model anyway.
    calls = loading.slot_pool.calls
    _buffer(loading, Message("a"))
    loading.loader.finish("a")
    _buffer(loading, Message("b"), Message("c"))
    loading.loader.finish("b")
    loading.loader.finish("c")
    assert [_ids(c) for c in calls] == [["a"]]  # a slot is free, the model is not
    calls[0].forward_done()
    assert [_ids(c) for c in calls] == [["a"], ["b", "c"]]
    calls[0].forward_done()  # said twice: counted once
    calls[0].done(None)
    _buffer(loading, Message("d"))
    loading.loader.finish("d")
    assert len(calls) == 2  # b, c have not passed their forward pass yet
    calls[1].done(None)  # returned without one (every image failed, say): the model is free
    assert _ids(calls[2]) == ["d"]


def test_a_load_that_could_not_claim_requeues_its_message(loading):
    unclaimed, broken = Delivery("t1", "a"), Delivery("t2", "b")
    _buffer(loading, unclaimed, broken)
    loading.dispatch()
    loading.loader.finish("a", SimpleNamespace(requeue=True))
    loading.loader.finish("b", None, RuntimeError("bug"))
    assert unclaimed.events == ["requeue"] and broken.events == ["requeue"]
    assert loading.held_deliveries() == [] and loading.slot_pool.calls == []
    assert loading._messages == []  # nothing left loading ahead


def test_bulk_loads_ahead_at_most_load_ahead_ids_and_singles_are_never_held_back(loading):
    loading.first_queues = frozenset({"q.interactive"})
    loading.load_ahead = 5
    chunks = [_from("q.bulk", f"b{i}", f"c{i}") for i in range(3)]
    single = _from("q.interactive", "s")
    _buffer(loading, *chunks, single)
    loading.dispatch()
    # The single job first, then 2 + 2 bulk ids fill the allowance; a third chunk waits.
    assert sorted(loading.loader.loads) == ["b0", "b1", "s"]
    loading.loader.finish("b0")  # dispatched: its ids no longer count
    assert sorted(loading.loader.loads) == ["b1", "b2", "s"]


def test_close_lets_running_loads_finish_and_starts_no_more(loading):
    running, canceled = Delivery("t1", "a"), Delivery("t2", "b")
    _buffer(loading, running, canceled)
    loading.dispatch()
    loading.close()
    assert loading.loader.closed
    _buffer(loading, Message("c"))
    loading.loader.finish("a")  # its jobs are claimed: it still runs while the pool drains
    loading.loader.finish("b", None, LoadCanceled())  # never started
    assert [_ids(c) for c in loading.slot_pool.calls] == [["a"]]
    assert "c" not in loading.loader.loads and not loading._claimed_not_running()
    loading.slot_pool.calls[0].done(None)
    assert running.events == ["ack"] and canceled.events == []
    assert loading.held_deliveries() == ["t2"]  # unacknowledged: the broker's again


def test_single_jobs_load_past_a_full_allowance_of_bulk(loading):
    loading.first_queues = frozenset({"q.interactive"})
    loading.load_ahead = 4
    _buffer(loading, _from("q.bulk", "b0", "c0"), _from("q.bulk", "b1", "c1"))
    loading.dispatch()
    _buffer(loading, _from("q.interactive", "s"))
    loading.dispatch()
    assert sorted(loading.loader.loads) == ["b0", "b1", "s"]


def test_close_waits_for_loaded_messages_to_reach_the_pool(loading):
    # Their jobs are claimed: if the pool stopped first, they would go back to the
    # broker with their jobs left processing (seen under load with a warm shutdown).
    loading.slot_pool.limit = 1
    first, second = Delivery("t1", "a"), Delivery("t2", "b")
    _buffer(loading, first, second)
    loading.loader.finish("a")  # runs in the only slot
    loading.loader.finish("b")  # loaded, waiting for the slot
    loading.close()
    assert loading._claimed_not_running()  # close(wait_s) keeps the pool from stopping
    loading.slot_pool.calls[0].done(None)  # a returns: b takes the slot
    assert [_ids(c) for c in loading.slot_pool.calls] == [["a"], ["b"]]
    assert not loading._claimed_not_running()


def test_singles_are_submitted_as_first(loading):
    loading.first_queues = frozenset({"q.interactive"})
    _buffer(loading, _from("q.interactive", "s"), _from("q.bulk", "b"))
    assert loading.loader.first == {"s": True, "b": False}


class StoppedLoader(RecordingLoader):
    def submit(self, job_ids, done, first=False) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")


def test_a_load_the_stopped_stage_refuses_leaves_its_message_arrived(loading):
    # Not LOADING for ever: close would wait its whole timeout for it.
    loading.loader = StoppedLoader()
    held = Delivery("t1", "a")
    _buffer(loading, held)
    assert not loading._claimed_not_running()
    assert loading.held_deliveries() == ["t1"] and held.events == []


class BrokenPool(RecordingPool):
    def apply_async(self, target, args, callback, error_callback):
        if self.calls:
            raise ValueError("a bug")
        super().apply_async(target, args, callback, error_callback)


def test_a_written_batch_is_acked_even_if_the_next_dispatch_fails(loading):
    loading.slot_pool = BrokenPool()
    written = Delivery("t1", "a")
    _buffer(loading, written, Message("b"))
    loading.loader.finish("a")  # runs in the only slot
    loading.loader.finish("b")  # loaded, waiting for the slot
    with pytest.raises(ValueError):
        loading.slot_pool.calls[0].done(None)  # its dispatch sends b: that fails
    assert written.events == ["ack"]


class Timer:
    def __init__(self) -> None:
        self.entries: list[SimpleNamespace] = []

    def call_repeatedly(self, seconds, fun):
        entry = SimpleNamespace(seconds=seconds, fun=fun, canceled=False)
        entry.cancel = lambda: setattr(entry, "canceled", True)
        self.entries.append(entry)
        return entry


def _connect(task) -> Timer:
    timer = Timer()
    consumer = SimpleNamespace(
        pool=task.slot_pool, hostname="h", event_dispatcher=None, timer=timer, connection_errors=()
    )
    task.Strategy(task, SimpleNamespace(use_fast_trace_task=False), consumer)  # on each connect
    return timer


def test_each_connection_registers_the_dispatch_timer_again(loading):
    # After a connection error celery clears the event loop's timer: the old entry is dead.
    first = _connect(loading)
    second = _connect(loading)
    assert first.entries[0].canceled and len(first.entries) == 1
    assert [e.fun for e in second.entries] == [loading.dispatch]
    assert not second.entries[0].canceled


def test_a_reconnect_leaves_unclaimed_messages_to_the_broker(loading):
    _connect(loading)
    loading.load_ahead = 1
    loading_one, waiting = Delivery("t1", "a"), Delivery("t2", "b")
    _buffer(loading, loading_one, waiting)  # b waits ARRIVED: a fills the allowance
    _connect(loading)  # the broker delivers b again: loading it too would claim it twice
    assert loading.held_deliveries() == ["t1"]
    loading.loader.finish("a")
    assert "b" not in loading.loader.loads
    assert [_ids(c) for c in loading.slot_pool.calls] == [["a"]]


def test_without_batch_wait_the_timer_is_a_slow_safety_net(loading):
    # Arrivals, ended loads and returned batches dispatch at once (the tests above); a
    # fast timer would only wake the consumer's loop for nothing (issue #22).
    assert loading.batch_wait == 0
    assert _connect(loading).entries[0].seconds >= 1
