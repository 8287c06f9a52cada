"""rtsmap models."""
