"""Executing a plan on ciphertexts (server side): the batch and single-packing engines, the integer
kernels of the hot loop, re-randomisation of results."""
