"""The operator's side: aggregation, checkpoints, evaluation and the Flower ServerApp."""
