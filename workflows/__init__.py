"""rtsmap workflows."""
