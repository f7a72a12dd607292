"""gradtrace: capture gradient trajectories, measure cross-shift partial correlations, predict them."""
__version__ = "0.1.0"
