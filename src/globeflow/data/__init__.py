"""Data in: image loading, frozen encoders, embedding stores and dataset readers."""
