"""Training-time unstructured pruning: per-weight masks (masks.py), MGPP, GMP, iterative magnitude
pruning, a random baseline (one file each: config, schedule, pruner) and the sparse export format."""
