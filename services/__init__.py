"""The gRPC services of the homefeed mesh; shared plumbing lives in ``services.common``."""
