"""Jobs: their contract, their store, the engine process that runs them, and the supervisor between them.

The words, as this package uses them:
- engine process: the child process that holds the model and runs the jobs (engine_process.py), started
  and restarted by its supervisor (supervisor.py), which it talks to through messages.py.
- worker: a supervisor and its engine process, the unit that takes jobs from the store; the workers'
  registry (registry.py) lists them, and /health shows them. `beyond serve` runs one (its local worker)
  unless --no-worker.
- `beyond worker`: a worker with no HTTP of its own, fed from the shared (Redis) store
  (server/commands/worker.py).
The engine process's own class and entry point keep their older names (Worker, worker_main, and the
WorkerConfig message): they are what the supervisor starts.
"""
