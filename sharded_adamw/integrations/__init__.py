"""Integrations at the edge: DDP, torch's clipping functions, GradScaler, accelerate, Lightning."""
