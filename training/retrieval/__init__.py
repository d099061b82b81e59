"""Candidate retrieval: a two-tower model, its numpy export, a ScaNN index, a popularity
fallback, and their offline metrics.

Modules (the entry point is :func:`training.retrieval.train.train_retrieval`):

- ``numpy_tower``: the user tower's input encoding and forward pass in pure numpy; what
  serving loads. It imports neither torch nor pandas.
- ``features``: user features at request time (the training rows plus a point-in-time
  join of the category-affinity vector) and the item catalog.
- ``towers``: the PyTorch towers, their training loop, and the export to numpy.
- ``ann``: the ScaNN index (build, serialize, load), exact search, and the parameter sweep.
- ``popular``: the popularity fallback for users the tower cannot serve.
- ``evaluate``: Recall@K of test-period clicks and purchases.
- ``train``: ``train_retrieval``, which runs all of the above and writes the bundle files.

This package deliberately imports nothing at package level, so that serving can import
``training.retrieval.numpy_tower`` without pulling in torch.
"""
