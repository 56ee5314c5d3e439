"""Files shipped with the package: the bundled tasks, the embedded default config, architecture facts, measured steps."""

from pathlib import Path

ASSETS = Path(__file__).parent
