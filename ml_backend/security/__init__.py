"""The trust boundary: who may call the backend, where a URL may go, what a request may hold.

One module per rule (``auth``, ``urls``, ``limits``, ``webhooks``); views and loaders call them and
nothing else decides. SECURITY.md at the repository root states the threat model and the rules.
"""
