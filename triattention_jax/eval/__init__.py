"""The quality evaluation: tasks, metrics, resumable results, tables and plots (`runner.evaluate`)."""
