"""Training entrypoint for ``ray job submit``: parse, build config, train, exit code.

Example:
    RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py --config configs/cpu.yaml data.train=s3://bucket/train data.val=s3://bucket/val
"""

from __future__ import annotations

import sys

from mmray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
