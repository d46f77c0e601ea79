"""The HTTP side of beyond: the API, the job queue and the worker supervisor."""
