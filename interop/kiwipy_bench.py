"""The same round trips and publishes through Python kiwiPy (kiwipy[rmq]==0.9.0), on the same
broker, for docs/performance.md: RPC and task round trips one at a time (p50, p99) and
no-reply task publishes one after another, 1 KiB bodies, MessagePack, prefetch 100; then
MANY RPC subscribers on one communicator (argument, default 3000: kiwiPy adds them one at a
time): the seconds to add them, the RSS each costs, and the RPC p50 with all of them present.

Usage (after scripts/interop.sh made the environment):
    target/interop-venv/bin/python interop/kiwipy_bench.py
It works in a RabbitMQ virtual host of its own, deleted afterwards.
"""

import resource
import subprocess
import sys
import time
import uuid

import msgpack
from kiwipy.rmq import RmqThreadCommunicator

VHOST = "kiwimq-kiwipy-bench-" + uuid.uuid4().hex[:8]
BODY = bytes(i % 251 for i in range(1024))


def communicator(url):
    return RmqThreadCommunicator.connect(
        connection_params={"url": url},
        encoder=msgpack.packb,
        decoder=msgpack.unpackb,
        task_prefetch_count=100,
    )


def rss_kib():
    """This process's resident memory now, in KiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 1024


def percentiles(call, n):
    call()  # warm up
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return samples[n // 2] * 1e6, samples[n * 99 // 100] * 1e6


def main():
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", VHOST], check=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"],
        check=True,
    )
    url = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
    server, client = communicator(url), communicator(url)
    try:
        server.add_rpc_subscriber(lambda _comm, message: message, "echo")
        server.add_task_subscriber(lambda _comm, task: task)
        p50, p99 = percentiles(lambda: client.rpc_send("echo", BODY).result(), 1000)
        print(f"kiwipy rpc_p50_us {p50:.0f} rpc_p99_us {p99:.0f}")
        p50, p99 = percentiles(lambda: client.task_send(BODY).result(), 1000)
        print(f"kiwipy task_roundtrip_p50_us {p50:.0f} task_roundtrip_p99_us {p99:.0f}")
        n = 5000
        started = time.perf_counter()
        for _ in range(n):
            client.task_send(BODY, no_reply=True)
        print(f"kiwipy publish_msgs_per_s {n / (time.perf_counter() - started):.0f}")
        many = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
        before = rss_kib()
        started = time.perf_counter()
        for i in range(many):
            server.add_rpc_subscriber(lambda _comm, message: message, f"many-{i}")
        adding = time.perf_counter() - started
        per_subscriber = (rss_kib() - before) / many
        p50, _ = percentiles(lambda: client.rpc_send(f"many-{many // 2}", BODY).result(), 1000)
        print(
            f"kiwipy rpc_subscribers_{many}_add_s {adding:.1f} "
            f"rss_kib_per_rpc_subscriber {per_subscriber:.1f} "
            f"rpc_p50_us_with_{many}_subscribers {p50:.0f}"
        )
    finally:
        server.close()
        client.close()
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", VHOST], check=True)


if __name__ == "__main__":
    main()
