"""Job status: the one state machine the API and the worker share."""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in TERMINAL


class WebhookEventStatus(enum.StrEnum):
    """A webhook event's delivery state (the webhook worker's state machine)."""

    PENDING = "pending"
    DELIVERING = "delivering"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    def is_waiting(self) -> bool:
        """Not delivered yet, and not being delivered right now."""
        return self in (WebhookEventStatus.PENDING, WebhookEventStatus.RETRYING)


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.PROCESSING})
