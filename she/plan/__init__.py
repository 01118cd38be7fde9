"""Compiling a lowered model into an encrypted execution plan: encryption parameters and their
security, the error and cost model, single packing's slot layouts, BFV quantisation."""
