"""The search service: an HTTP API (``cardigan serve``) and a page over the same index.

``service`` holds the domain (one encoder, batched embeds and searches, near-duplicates),
``filters`` the checks that keep request values out of Milvus expressions, ``app`` the HTTP
layer (routes, auth, limits, metrics), ``cli`` the commands and ``bench`` the load test.
"""
