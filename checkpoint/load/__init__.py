"""The load path: read and check the metadata, plan this rank's byte ranges, read them (straight into
the target where the storage allows), verify, and put values back into the target state dict.
Files an incremental checkpoint references are opened in the checkpoint that holds them (`references`).

May import: checkpoint.state, planners, storage and the top-level records; never the save side.
"""
