"""Async saves: staging a rank's chunks into shared buffers, and the persistent writer process that runs
the save protocol off the training thread (trainer side: client, supervisor; child side: child).

May import: checkpoint.save, checkpoint.state, planners, storage and the top-level records.
"""
