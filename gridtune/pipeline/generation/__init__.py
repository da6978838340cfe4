"""The teacher writes the completions: the runner, detached runs, batches, progress, estimates."""
