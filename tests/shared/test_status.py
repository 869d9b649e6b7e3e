from shared.status import JobStatus


def test_only_final_states_are_terminal():
    assert {s for s in JobStatus if s.is_terminal()} == {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELED,
    }
    assert JobStatus("queued") is JobStatus.QUEUED
