"""Long jobs: embedding, training, evaluation and its metrics."""
