"""Batch jobs: OpenAI's batch file format, the output file as the checkpoint, and an async executor.

``format`` is shared with the gateway's ``/v1/batches``; ``checkpoint`` and ``execute`` are the CLI's
``memserve batch run``. Nothing here imports torch, the gateway or the pool.
"""
