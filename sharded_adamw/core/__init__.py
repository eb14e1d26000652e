"""The core: buckets and layout, the collectives, the reducer, the update, the optimizer."""
