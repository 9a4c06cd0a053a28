"""The engine's shared-backend port (:class:`~sse_blueprint.engine.SharedBackend`), implemented.

    memory  MemoryBackend on a MemoryHub: several workers in one process (tests; the reference)
    redis   RedisBackend: workers and instances joined by Redis (``SSE_REDIS_URL``)

Each imports the engine (and its driver); nothing here imports the web layer, and the engine
knows a backend only through its port.
"""
