"""Nightly scoring entrypoint (cron / ``ray job submit``): one ``date=`` partition in, the same out.

Exit status: 0 when the partition is committed or was already scored; 2 with a message naming the
problem when the input partition is missing or empty, the config is wrong, the output holds a
different committed result (pass --overwrite), or too many rows were quarantined.

Example:
    RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/nightly_score.py --config configs/cpu.yaml --date 2024-05-01 \
        score.input=s3://bucket/events score.output=s3://bucket/predictions train.storage_path=s3://bucket/runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from mmray.config import ConfigError, load_config
from mmray.data.labels import LabelError
from mmray.data.pipeline import DataQualityError
from mmray.data.schema import SchemaError
from mmray.score.nightly import run_nightly


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nightly_score", description=__doc__.split("\n\n")[0])
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default: yesterday, UTC)")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--checkpoint", default=None,
                   help="default: score.checkpoint, else the one <train.storage_path>/latest.json names")  # fmt: skip
    p.add_argument("--input", default=None, help="input root with date=... partitions (default: score.input)")
    p.add_argument("--output", default=None, help="output root (default: score.output)")
    p.add_argument("--overwrite", action="store_true", help="replace a partition committed from other input/model")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or embedded local Ray)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_nightly(cfg, args.date, args.checkpoint, args.input, args.output, args.overwrite, args.address)
    except (ConfigError, SchemaError, LabelError, DataQualityError, FileNotFoundError, ValueError) as e:
        if os.environ.get("MMRAY_DEBUG"):
            traceback.print_exc()
        print(f"nightly_score: error: {e}", file=sys.stderr)
        return 2
    import ray

    if ray.is_initialized():
        ray.shutdown()  # so no Ray log line follows the result
    if result["status"] == "already scored":
        print(f"nightly_score: {result['date']} already scored ({result['output']}); nothing to do", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
