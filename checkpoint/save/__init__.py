"""The save protocol, written once for both modes: plan, exchange, write, commit, barrier.

An incremental save (`incremental`) leaves out of the write the chunks its base already holds.

Runs on trainer ranks (sync saves) and inside each rank's writer process (async saves).
May import: planners, storage, and checkpoint's top-level records (config, options, errors, types);
never the load path, the async writer, the manager or the tools.
"""
