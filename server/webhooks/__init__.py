"""Webhook delivery: the outbox (the durable queue of deliveries), the dispatcher (signed POSTs with retries)
and the relay (job ends become deliveries). app.py wires them; deps.py names the relay."""

from server.webhooks.dispatch import WebhookDispatcher, load_secret, sign_headers
from server.webhooks.outbox import Outbox, PendingDelivery, SqliteOutbox
from server.webhooks.relay import KEEP_AFTER_EXPIRY, Webhooks

__all__ = [
    "KEEP_AFTER_EXPIRY",
    "Outbox",
    "PendingDelivery",
    "SqliteOutbox",
    "WebhookDispatcher",
    "Webhooks",
    "load_secret",
    "sign_headers",
]
