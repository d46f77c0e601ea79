"""The guard: API keys and credits (auth.py), rate limits, the Host allow-list (hosts.py), the URL guard
against server-side request forgery (urlguard.py), fetching input images (fetch.py), and what an input
image may be (images.py, input_limits.py, image_integrity.py)."""
