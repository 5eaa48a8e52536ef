"""Learned post-training mixed precision under average and maximum constraints (seed 004 App. A/B, Obs. 4-7)."""
