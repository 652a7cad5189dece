"""The training loop's parts: typed config schemas, data streams, optimizer, parallelism, checkpoints, metrics.
The loop itself is train.train (train.py)."""
