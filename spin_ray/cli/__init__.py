"""The `spin-ray` command: parsing and dispatch (`main`), which cluster a command joins and its watch (`cluster`), where
progress and logs go (`output`), and the screens people read (`screens`)."""

from spin_ray.cli.main import main

__all__ = ["main"]
