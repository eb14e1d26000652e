"""Tools: the command line, the memory estimator, the peak-memory instrument."""
