"""imgclf command-line client: submit images and batches over the public HTTP API only.

It deliberately imports nothing from the service packages (``api``, ``shared``,
``worker``) so it can be copied to a machine that has only ``requests`` and ``rich``.
"""
