"""Lightning modules, the orchestration of a run (policy phase, DDP, loggers, summary) and callbacks."""
