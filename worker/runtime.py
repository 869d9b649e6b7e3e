"""Everything a worker process holds for its lifetime, built once after fork."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Config
from shared.db import make_engine, make_session_factory
from shared.queue import make_celery
from shared.redis_client import make_redis
from shared.uploads import UploadStore
from worker.fetch import Fetcher
from worker.models import ModelRegistry, top_k


@dataclass
class Runtime:
    config: Config
    sessions: sessionmaker[Session]
    redis: redis.Redis
    uploads: UploadStore
    fetcher: Fetcher
    models: ModelRegistry
    io_pool: ThreadPoolExecutor
    celery: Celery  # sends webhook deliveries
    top_k: Callable = top_k

    @classmethod
    def build(cls, config: Config) -> Runtime:
        models = ModelRegistry(config)
        models.setup_all()  # loads Keras and the weights: seconds, so once per process
        client = make_redis(config)
        return cls(
            config=config,
            sessions=make_session_factory(make_engine(config)),
            redis=client,
            uploads=UploadStore(client, config),
            fetcher=Fetcher(config),
            models=models,
            io_pool=ThreadPoolExecutor(config.fetch_threads, thread_name_prefix="fetch"),
            celery=make_celery(config, main="imgclf-worker-sender"),
        )
