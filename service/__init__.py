"""Domain and orchestration: the job spec, settings, artifact store, job store and scheduler."""
