"""The model contract: what training produces and serving consumes, in one small package
that both import and that imports neither.

- ``columns``: the event tables' names, columns and types;
- ``features``: the ranker's feature schema and ``build_matrix``, with the definitions the
  feature jobs and serving share;
- ``bundle``: the bundle's layout and its verification; ``registry``: versions and aliases;
- ``catalog``, ``heuristic``, ``popular``, ``history``: the serving files a bundle carries;
- ``tower``, ``calibration``, ``scorer``, ``ann``: the user tower in numpy, the calibrator,
  the compiled-scorer and ScaNN loaders;
- ``feature_store``, ``paths``, ``timeutil``: opening a dataset's Feast store, where files
  live, timestamps.

It depends on numpy, pandas and the loaders' own runtimes (TL2cgen, ScaNN, Feast, MLflow's
client, all imported where they are used), never on the training stack.
"""
