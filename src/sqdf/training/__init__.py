"""The one Trainer loop shared by every method, how a run is assembled from names (``run_setup``), atomic
checkpoints, the reward guard, and loading and sampling a finished run folder (``saved_runs``)."""
