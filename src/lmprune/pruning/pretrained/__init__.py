"""One-shot structured pruning of pretrained models: calibration statistics and criteria
(calibration.py), planning and the prune flow (oneshot.py), per-layer rank / refit / slice (layerwise.py),
the least-squares refit (reconstruct.py), layer-sequential calibration (sequential.py) and layers loaded
one at a time from safetensors (offload.py). The `lmprune prune` verb is lmprune.prune_app."""
