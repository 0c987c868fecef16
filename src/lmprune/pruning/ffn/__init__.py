"""IDEA Prune: training-time structured pruning of FFN neurons (pruner.py), their importance
(importance.py) and the slicing of weights and AdamW moments to the kept neurons (compaction.py)."""
