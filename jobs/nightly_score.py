"""Nightly scoring entrypoint (cron / ``ray job submit`` / KubeRay): ``mmray nightly`` as a job.

Scores ``<input>/date=D`` into ``<output>/date=D`` with ``score.checkpoint`` or the checkpoint that
``<train.storage_path>/latest.json`` names. ``--date yesterday`` (the default) is resolved in ``--tz``
(default UTC): pass the scheduler's time zone. ``--from D1 --to D2`` backfills every date of the range
that is not committed yet and skips the committed ones.

Exit status: 0 when the partition is committed or was already scored; 2 with a message naming the
problem when the input partition is missing or empty, the config is wrong, the output holds a
different committed result (pass --overwrite), too many rows were quarantined, or a backfill date failed.

Example:
    RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env cluster/runtime_env.yaml -- \
        python jobs/nightly_score.py --config configs/cpu.yaml --date yesterday --tz Europe/Berlin \
        score.input=s3://bucket/events score.output=s3://bucket/predictions train.storage_path=s3://bucket/runs
"""

from __future__ import annotations

import sys

from mmray.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
