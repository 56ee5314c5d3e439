"""Bundled data: toy SFT tasks with exactly checkable answers (see make_tasks)."""
