"""rtsmap pipeline."""
