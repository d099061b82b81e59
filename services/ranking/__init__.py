"""The ranking service: compiled GBDT scoring of candidate rows, isotonic calibration and
E[GMV] (``scorer.py``), served as ``homefeed.ranking.v1.RankingService``."""
