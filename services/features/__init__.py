"""The features service: the ranker's feature matrix for (user, candidate items, context)."""
