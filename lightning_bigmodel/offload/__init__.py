"""Where offloaded weights live (pinned CPU memory, disk) and the hooks that bring them in just in time."""
