"""The server side of beyond: the API, the job queue and the engine's supervisor, in rooms by purpose.

- http/: the HTTP layer: the app and its wiring, the middleware, the dependencies, the routes/, the request
  and response schemas, the error answers, result bodies and submission.
- guard/: what stands between a request and the work: API keys, rate limits, the Host allow-list, the
  URL guard (SSRF), fetching input images, and the limits and integrity checks of images.
- jobs/: the jobs: their contract, the stores (SQLite, Redis), the supervisor and the engine process, the
  workers' registry (its docstring has the words: worker, engine process, `beyond worker`).
- commands/: the `beyond` commands: cli (options and dispatch), serve, worker, outpaint, download, and the
  start-up both serve and worker need.
- webhooks/: signed, durable webhook delivery: the outbox (SQLite on one box, Redis on a fleet), the
  dispatcher that sends with retries, and the relay that turns job ends into deliveries.
- static/: the playground's script and style sheet (package data).
At the top, what every room uses: settings, logs, metrics, version.
"""
