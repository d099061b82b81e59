"""The feed gateway: composes retrieval, features and ranking into a page (``pipeline.py``),
re-ranks it for diversity, new-seller exposure and exploration (``rerank.py``), and keeps
serving through downstream failures with deadlines, circuit breakers (``breaker.py``) and
fallbacks; served as ``homefeed.feed.v1.FeedService``."""
