"""Trust boundaries: each module here holds one kind of security rule, and nothing else decides it.

* :mod:`ml_backend.security.urls`: where a URL goes, and whether it may carry Label Studio's token.
"""
