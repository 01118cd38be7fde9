"""Bytes and files: the wire format, SEAL's ciphertext format, TenSEAL contexts and upload checks,
compact uploads, data sets, shipped assets, owner-only files."""
