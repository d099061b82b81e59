"""Candidate retrieval: a two-tower model, its numpy export, a ScaNN index, a popularity
fallback, the history source, and their offline metrics. What serving loads of them is in
the model contract (``contract.tower``, ``contract.ann``, ``contract.popular``,
``contract.history``).

Modules (the entry point is :func:`training.retrieval.train.train_retrieval`):

- ``features``: user features at request time (the training rows plus a point-in-time
  join of the category-affinity vector) and the item catalog.
- ``towers``: the PyTorch towers, their training loop, and the export to numpy.
- ``ann``: the ScaNN index (build, serialize), exact search, and the parameter sweep.
- ``popular``: the popularity lists for users the tower cannot serve.
- ``history``: each user's engaged items, the history candidate source.
- ``evaluate``: Recall@K of test-period clicks and purchases.
- ``train``: ``train_retrieval``, which runs all of the above and writes the bundle files.
"""
