"""Entrypoint for `ray job submit`: the same as `spin-ray run`, on the cluster the job runs in.

    ray job submit --address http://<head>:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".git", ".venv", "runs"]}' \
        -- python jobs/spin.py --config jobs/configs/paper_zephyr7b.yaml --set storage=s3://<bucket>/spin
"""

import sys
from pathlib import Path

# The submitted working dir's spin_ray wins over an installed one (Ray puts the working dir on workers' path too).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spin_ray.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
