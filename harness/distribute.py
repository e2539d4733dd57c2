"""Choosing a `tf.distribute` strategy, and which process writes the results."""

from __future__ import annotations

import json
import os

import tensorflow as tf

__all__ = ["STRATEGIES", "is_chief", "make_strategy"]

STRATEGIES = ("auto", "mirrored", "multi_worker", "tpu", "one_device")

_TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The strategy called `name`.

    - `auto`: `MirroredStrategy` over the GPUs when there are any, else TensorFlow's
      default strategy (the CPU, no distribution overhead);
    - `mirrored`: `MirroredStrategy` over all local GPUs (or the CPU);
    - `multi_worker`: `MultiWorkerMirroredStrategy`, the cluster given by `TF_CONFIG`;
    - `tpu`: `TPUStrategy`, the TPU named by `TPU_NAME` (or the local one);
    - `one_device`: the first GPU, or the CPU, as a one-device `MirroredStrategy`
      (Keras' `BackupAndRestore`, which resuming relies on, refuses
      `OneDeviceStrategy`).

    Create it before any other TensorFlow work (multi-worker needs that).
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {list(STRATEGIES)}.")
    # Multi-worker and TPU first: they must come before anything that starts TensorFlow,
    # and listing devices does.
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy multi_worker needs the cluster in the TF_CONFIG environment "
                f"variable, e.g. {_TF_CONFIG_EXAMPLE} (same cluster on every worker, "
                "its own task index on each)."
            )
        mistake = _tf_config_mistake(os.environ["TF_CONFIG"])
        if mistake:
            raise ValueError(f"TF_CONFIG {mistake}: {os.environ['TF_CONFIG']!r}; give e.g. "
                             f"{_TF_CONFIG_EXAMPLE}.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=os.environ.get("TPU_NAME", "")
        )
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and gpus):
        return tf.distribute.MirroredStrategy()
    if name == "auto":
        return tf.distribute.get_strategy()
    first_device = gpus[0].name if gpus else "/cpu:0"
    return tf.distribute.MirroredStrategy([first_device])


def _tf_config_mistake(text: str) -> str | None:
    """What is wrong with `text` (TF_CONFIG), `None` if it is a JSON object whose "cluster"
    is an object of lists of "host:port" strings, and whose "task", if given, is an object
    (TensorFlow raises a `TypeError`, or ignores it, otherwise)."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        return f"is not valid JSON ({error})"
    if not isinstance(config, dict):
        return "is not a JSON object"
    cluster, task = config.get("cluster"), config.get("task")
    if cluster is None:
        return 'has no "cluster"'
    addresses = '"host:port" addresses'
    if not isinstance(cluster, dict) or not cluster:
        return f'has "cluster": {json.dumps(cluster)}, not an object of lists of {addresses}'
    for job, hosts in cluster.items():
        if not (isinstance(hosts, list) and hosts
                and all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in hosts)):
            return f'has "cluster": {{"{job}": {json.dumps(hosts)}}}, not a list of {addresses}'
    if task is not None and not isinstance(task, dict):
        example = '{"type": "worker", "index": 0}'
        return f'has "task": {json.dumps(task)}, not an object such as {example}'
    return None


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes results, plots and models (always, but in a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and resolver.task_id == 0 and not has_chief
