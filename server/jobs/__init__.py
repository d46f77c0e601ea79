"""Jobs: their store, the worker process that runs the engine, and the supervisor between them."""
