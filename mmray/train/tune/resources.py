"""What one ``mmray tune`` trial holds, and so how many trials the cluster runs at once.

Trials never deadlock the cluster: at most as many run at once as the cluster holds of the largest
trial the space can draw (trainer workers x ``train.resources_per_worker``, plus the preprocessing pool
when trials read data, in which case one whole CPU stays free for Ray Data's file listing).
"""

from __future__ import annotations

import math

from mmray.config import Config

__all__ = ["DRIVER_CPU", "concurrency", "largest_trial", "trial_resources"]

DRIVER_CPU = 0.01  # the trial actor only drives Train (TorchTrainer's controller itself asks for 0 CPUs)


def trial_resources(cfg: Config, reads_data: bool) -> dict[str, float]:
    """What one trial holds while it trains: its driver, the trainer workers and, when the trial
    reads data (it preprocesses for itself, or the splits stream), the preprocessing pool."""
    from mmray.data.pipeline import preprocess_demand
    from mmray.runtime import total_demand
    from mmray.train.launcher import trainer_demand

    need = total_demand([trainer_demand(cfg), *([preprocess_demand(cfg.data.preprocess)] if reads_data else [])])
    need["CPU"] = need.get("CPU", 0.0) + DRIVER_CPU
    return need


def largest_trial(configs: list[Config], reads_data: bool) -> dict[str, float]:
    """Each resource's most over the configs the space can draw: concurrency is sized for the worst."""
    need: dict[str, float] = {}
    for c in configs:
        for k, v in trial_resources(c, reads_data).items():
            need[k] = max(need.get(k, 0.0), v)
    return need


def concurrency(cluster: dict[str, float], need: dict[str, float], reads_data: bool) -> int:
    """How many trials the cluster runs at once without any of them waiting forever.

    Raises:
        ValueError: when not even one trial fits, naming the resource.
    """
    fits = []
    for resource, amount in sorted(need.items()):
        have = cluster.get(resource, 0.0)
        spare = have - (1.0 if resource == "CPU" and reads_data else 0.0)
        n = math.floor(spare / amount + 1e-9)
        if n < 1:
            why = " with one whole CPU left for Ray Data's file listing" if resource == "CPU" and reads_data else ""
            raise ValueError(
                f"one trial needs {amount:g} {resource} (train.num_workers x train.resources_per_worker"
                f"{', + the data.preprocess pool' if reads_data else ''}) but the cluster has "
                f"{have:g}{why}"
            )
        fits.append(n)
    return min(fits)
