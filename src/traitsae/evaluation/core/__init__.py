"""Services every evaluation shares; nothing here imports a task."""
