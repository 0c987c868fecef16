"""One-shot structured pruning of pretrained models: calibration statistics and criteria
(calibration.py), planning and applying the pruning (oneshot.py). The `lmprune prune` verb is
lmprune.prune_app."""
