"""The sans-I/O core: frames, CBOR, encoders, addresses, the byte budget, the method table.

Bytes in, items and frames out; no sockets, no event loop. It imports nothing
of the package but the base modules (errors, models, ...).
"""
