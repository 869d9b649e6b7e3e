"""Uploaded images travel to the worker through Redis with a TTL, never inside a Celery message."""

from __future__ import annotations

from typing import cast

import redis

from shared.config import Config


class UploadStore:
    def __init__(self, client: redis.Redis, config: Config) -> None:
        self._redis = client
        self._ttl = config.upload_ttl_s
        self._prefix = f"{config.queue_prefix}:upload:"

    def put(self, job_id: str, data: bytes) -> None:
        self._redis.set(self._prefix + job_id, data, ex=self._ttl)

    def get(self, job_id: str) -> bytes | None:
        # The client is built without decode_responses, so values come back as bytes.
        return cast(bytes | None, self._redis.get(self._prefix + job_id))

    def delete(self, *job_ids: str) -> None:
        if job_ids:
            self._redis.delete(*(self._prefix + j for j in job_ids))
