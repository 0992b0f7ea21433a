"""The load path: read and check the metadata, plan this rank's byte ranges, read them (straight into
the target where the storage allows), verify, and put values back into the target state dict.

May import: checkpoint.state, planners, storage and the top-level records; never the save side.
"""
