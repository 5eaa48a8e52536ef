"""CoQuant (seed 002): one network trained jointly over a bit-width set B that runs at every b in B and, after BN
calibration, at bit-widths it never trained at."""
