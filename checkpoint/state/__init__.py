"""Live state dicts as plain data: flattening nested dicts into keyed leaves, putting values back, and
describing live (D)Tensors as layout descriptors for the planners.

May import: planners and torch; nothing else of checkpoint but its top-level records.
"""
