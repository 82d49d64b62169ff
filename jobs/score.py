"""Batch-scoring entrypoint for ``ray job submit``.

Example:
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/score.py --checkpoint s3://bucket/runs/r1/checkpoint_x --input s3://bucket/new \
        --output s3://bucket/preds storage.s3_region=eu-west-1
"""

from __future__ import annotations

import sys

from mmray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
