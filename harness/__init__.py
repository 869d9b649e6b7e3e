"""Real-service helpers shared by the tests and the benchmarks, one module per concept.

- ``services``: where the local PostgreSQL, Redis and RabbitMQ are, the repository root,
  the output folder (``TEST_*`` environment variables);
- ``waiting``: ``wait_for``, polling until a condition holds;
- ``databases``: scratch PostgreSQL databases, Redis key prefixes, RabbitMQ queues, and
  the clean-up of all of them at the end of a session;
- ``stack_config``: a ``Config`` for a scratch stack, and the environment reproducing it;
- ``processes``: the classification and webhook Celery workers as real processes;
- ``photos``: a local HTTP server for photos (slow, gated and failing paths);
- ``images``: hostile image files built in memory (decompression bombs, floods);
- ``accounts``: users and administrators made through the API, auth headers;
- ``serving``: the API app behind a real HTTP server on loopback;
- ``webhook_receiver``: a scripted webhook receiver.

Nothing here imports pytest: ``bench/`` runs without the test suite. The service code
(``api``, ``worker``, ``shared``) never imports this package.
"""
