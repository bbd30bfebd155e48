"""Pure functions from an incident to a model call and from a model's answer to a task's result."""
