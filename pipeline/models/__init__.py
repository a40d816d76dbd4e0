"""Model loading, precision and parameter selection."""
