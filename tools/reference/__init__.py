"""The naive reference feed (one process: Feast online reads, LightGBM, brute-force
retrieval) that ``make bench`` compares the mesh against."""
