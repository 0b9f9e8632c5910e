"""Dynamo's own offline replay (its mocker engines and its KV router, in virtual time) on a
Mooncake trace: the reference our simulator (`dynamo-epp-sim`) is checked against.

Run with the Python of `.venv-dynamo` (scripts/setup-dynamo.sh installs ai-dynamo 1.6.1):

    .venv-dynamo/bin/python scripts/dynamo_replay.py TRACE WORKERS POLICY...

POLICY is `round_robin`, `kv_router`, or `kv_router:KEY=VALUE,...` with `KvRouterConfig`
keyword arguments (e.g. `kv_router:router_track_active_blocks=false`). Prints one JSON object
per policy. The mocker's engine defaults are the ones the simulator copies; each trace hash id
stands for 512 tokens.
"""

import json
import sys

from dynamo._core import KvRouterConfig
from dynamo.replay import run_trace_replay


def router_config(spec):
    if not spec:
        return None
    kwargs = {}
    for item in spec.split(","):
        key, value = item.split("=", 1)
        lowered = value.lower()
        if lowered in ("true", "false"):
            kwargs[key] = lowered == "true"
        else:
            kwargs[key] = float(value)
    return KvRouterConfig(**kwargs)


def main():
    trace, workers, policies = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    for policy in policies:
        mode, _, spec = policy.partition(":")
        summary = run_trace_replay(
            [trace],
            num_workers=workers,
            router_mode=mode,
            trace_block_size=512,
            router_config=router_config(spec),
        ).summary
        print(
            json.dumps(
                {
                    "policy": policy,
                    "completed": summary["completed_requests"],
                    "prefix_reuse": summary["prefix_cache_reused_ratio"],
                    "ttft_mean": summary["mean_ttft_ms"],
                    "ttft_p50": summary["median_ttft_ms"],
                    "ttft_p99": summary["p99_ttft_ms"],
                    "e2e_mean": summary["mean_e2e_latency_ms"],
                    "e2e_p99": summary["p99_e2e_latency_ms"],
                    "itl_mean": summary["mean_itl_ms"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
