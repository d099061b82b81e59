"""Serving plumbing shared by every homefeed service: errors and input checks, JSON logs,
settings from the environment, the server bootstrap with health, reflection and graceful
drain, the error/latency interceptor, deadline helpers and FloatMatrix conversion."""
