"""The retrieval service: a user's candidate items from the two-tower model's ScaNN index,
with context popularity, cart-similar and exploration candidates beside them
(``index.py``), served as ``homefeed.retrieval.v1.RetrievalService``."""
