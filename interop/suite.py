"""kiwimq against the real kiwiPy (kiwipy[rmq]==0.9.0), on a real RabbitMQ, per codec.

Run by scripts/interop.sh, which makes the virtual environment and builds the Rust peer
(examples/interop_peer.rs). Every check runs on kiwiPy's default names (kiwipy.tasks,
kiwipy.messages), not in testing mode, inside a RabbitMQ virtual host of its own that is
deleted afterwards, so the shared broker keeps nothing.

Usage: suite.py PEER_BINARY [AMQP_HOST_PORT]
Prints one line per check and `N passed, M failed`; exits 1 on any failure.
"""

import json
import subprocess
import sys
import threading
import time
import uuid

import kiwipy
import msgpack
from kiwipy.rmq import RmqThreadCommunicator, defaults

PEER = sys.argv[1]
HOST = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:5672"
TIMEOUT = 20

CODECS = {
    # kiwiPy's default encoder and decoder (PyYAML).
    "yaml": (defaults.ENCODER, defaults.DECODER),
    # aio-pika wants bytes from the encoder.
    "json": (lambda o: json.dumps(o).encode(), json.loads),
    "msgpack": (msgpack.packb, msgpack.unpackb),
}

passed = 0
failed = 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def expect_raises(name, exception, call, contains=None):
    try:
        value = call()
    except exception as error:
        text = str(error)
        check(name, contains is None or contains in text, f"{type(error).__name__}: {text}")
    except Exception as error:  # noqa: BLE001 - a wrong error is a failed check
        check(name, False, f"raised {type(error).__name__}: {error}")
    else:
        check(name, False, f"returned {value!r}")


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, stdout=subprocess.DEVNULL)


class VirtualHost:
    """A RabbitMQ virtual host of its own, for kiwiPy's default (durable) names."""

    def __init__(self, label):
        self.name = f"kiwimq-interop-{label}-{uuid.uuid4().hex[:8]}"

    def __enter__(self):
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return f"amqp://guest:guest@{HOST}/{self.name}"

    def __exit__(self, *exc):
        rabbitmqctl("delete_vhost", self.name)


class Peer:
    """The Rust peer as a process, its `KEY json` lines collected."""

    def __init__(self, url, codec, role):
        self.process = subprocess.Popen(
            [PEER, "--uri", url, "--codec", codec, role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def values(self, key):
        with self.lock:
            lines = list(self.lines)
        return [json.loads(l[len(key) + 1 :]) for l in lines if l.startswith(key + " ")]

    def wait_for(self, key, count=1, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if sum(1 for l in self.lines if l == key or l.startswith(key + " ")) >= count:
                    return True
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.02)
        return False

    def finish(self):
        if self.process.poll() is None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=5)
        return self.process.returncode


def communicator(url, codec):
    encoder, decoder = CODECS[codec]
    return RmqThreadCommunicator.connect(
        connection_params={"url": url}, encoder=encoder, decoder=decoder, testing_mode=False
    )


def python_calls_rust(codec):
    """kiwiPy declares the default queue first; a Rust worker takes it over."""
    with VirtualHost(f"{codec}-a") as url:
        comm = communicator(url, codec)
        try:
            first = comm.task_send({"n": 0})
            peer = Peer(url, codec, "serve")
            ready = peer.wait_for("READY")
            check(f"{codec}: Rust serves on the queue kiwiPy declared", ready, peer.lines)
            if not ready:
                peer.finish()
                return
            result = first.result(timeout=TIMEOUT)
            check(f"{codec}: task Python -> Rust, result", result == {"done": {"n": 0}}, result)

            echo = comm.rpc_send("rust-echo", {"x": [1, 2], "s": "é"}).result(timeout=TIMEOUT)
            check(f"{codec}: RPC Python -> Rust", echo == {"echo": {"x": [1, 2], "s": "é"}}, echo)
            expect_raises(
                f"{codec}: RPC Python -> Rust, remote exception",
                kiwipy.RemoteException,
                lambda: comm.rpc_send("rust-fail", 1).result(timeout=TIMEOUT),
                contains="rust says no",
            )
            expect_raises(
                f"{codec}: RPC Python -> unknown identifier is unroutable",
                kiwipy.UnroutableError,
                lambda: comm.rpc_send("nobody-here", 1).result(timeout=TIMEOUT),
            )
            expect_raises(
                f"{codec}: task Python -> Rust, remote exception",
                kiwipy.RemoteException,
                lambda: comm.task_send({"fail": True}).result(timeout=TIMEOUT),
                contains="failed on purpose",
            )
            comm.task_send({"n": 5}, no_reply=True)
            got = peer.wait_for("TASK", count=3) and {"n": 5} in peer.values("TASK")
            check(f"{codec}: task Python -> Rust, no reply", got, peer.values("TASK"))

            comm.broadcast_send("ignored: subject", subject="other.job", sender="python")
            comm.broadcast_send("ignored: sender", subject="py.job.2", sender="someone")
            comm.broadcast_send("hello", subject="py.job.1", sender="python")
            heard = peer.wait_for("BROADCAST")
            check(
                f"{codec}: broadcast Python -> Rust, filtered by subject and sender",
                heard and peer.values("BROADCAST") == ["hello"],
                peer.values("BROADCAST"),
            )

            # AiiDA's state change: the sender is the process's pk, an integer.
            comm.broadcast_send(None, sender=48, subject="state_changed.running.waiting")
            comm.broadcast_send(None, sender=47, subject="state_changed.running.waiting")
            heard = peer.wait_for("PK-BROADCAST")
            check(
                f"{codec}: broadcast Python -> Rust with an integer sender (AiiDA's pk), filtered by '47'",
                heard
                and peer.values("PK-BROADCAST")
                == [{"body": None, "sender": 47, "subject": "state_changed.running.waiting", "correlation_id": None}],
                peer.values("PK-BROADCAST"),
            )
            comm.broadcast_send("f", sender=1.5, subject="plain.float", correlation_id=9)
            comm.broadcast_send("b", sender=True, subject="plain.bool", correlation_id=False)
            heard = peer.wait_for("PLAIN-BROADCAST", count=2)
            plain = sorted(peer.values("PLAIN-BROADCAST"), key=lambda b: b["body"])
            check(
                f"{codec}: broadcast Python -> Rust with float, bool and integer headers",
                heard
                and plain
                == [
                    {"body": "b", "sender": True, "subject": "plain.bool", "correlation_id": False},
                    {"body": "f", "sender": 1.5, "subject": "plain.float", "correlation_id": 9},
                ],
                plain,
            )
            code = peer.finish()
            check(f"{codec}: the Rust peer closed cleanly", code == 0, f"exit {code}: {peer.lines}")
        finally:
            comm.close()


def rust_calls_python(codec):
    """The Rust side declares the default queue first; a kiwiPy worker takes it over."""
    with VirtualHost(f"{codec}-b") as url:
        first = Peer(url, codec, "send-first")
        code = first.finish()
        check(f"{codec}: Rust declares the queue and sends", code == 0, first.lines)

        tasks = []
        broadcasts = []
        received = threading.Event()

        def echo(_comm, message):
            return {"echo": message}

        def fail(_comm, _message):
            raise ValueError("python says no")

        def worker(_comm, task):
            tasks.append(task)
            received.set()
            if isinstance(task, dict) and task.get("fail"):
                raise RuntimeError("python task failed")
            return {"done": task}

        def listener(_comm, body, sender, subject, correlation_id):
            broadcasts.append(body)

        pk_broadcasts = []

        def pk_listener(_comm, body, sender, subject, correlation_id):
            pk_broadcasts.append((body, sender, subject, correlation_id))

        comm = communicator(url, codec)
        try:
            comm.add_rpc_subscriber(echo, "py-echo")
            comm.add_rpc_subscriber(fail, "py-fail")
            comm.add_task_subscriber(worker)
            comm.add_broadcast_subscriber(
                kiwipy.BroadcastFilter(listener, subject="rust.*", sender="rust")
            )
            comm.add_broadcast_subscriber(kiwipy.BroadcastFilter(pk_listener, subject="pk.*", sender=47))
            check(
                f"{codec}: kiwiPy works the queue Rust declared",
                received.wait(TIMEOUT) and tasks[:1] == [{"n": 0}],
                tasks,
            )

            peer = Peer(url, codec, "drive")
            done = peer.wait_for("DONE", timeout=2 * TIMEOUT)
            code = peer.finish()
            check(f"{codec}: the Rust client ran", done and code == 0, peer.lines)
            values = {}
            for line in peer.lines:
                key, _, rest = line.partition(" ")
                if rest and key.isupper():
                    values[key] = json.loads(rest)
            check(f"{codec}: RPC Rust -> Python", values.get("RPC-ECHO") == {"echo": {"n": 1}}, values)
            fail_reply = values.get("RPC-FAIL") or {}
            check(
                f"{codec}: RPC Rust -> Python, remote exception",
                fail_reply.get("kind") == "remote" and "python says no" in fail_reply.get("text", ""),
                fail_reply,
            )
            check(
                f"{codec}: RPC Rust -> unknown identifier is unroutable",
                (values.get("RPC-NOBODY") or {}).get("kind") == "unroutable",
                values.get("RPC-NOBODY"),
            )
            check(
                f"{codec}: task Rust -> Python, result",
                values.get("TASK-RESULT") == {"done": {"n": 2}},
                values.get("TASK-RESULT"),
            )
            task_fail = values.get("TASK-FAIL") or {}
            check(
                f"{codec}: task Rust -> Python, remote exception",
                task_fail.get("kind") == "remote" and "python task failed" in task_fail.get("text", ""),
                task_fail,
            )
            deadline = time.monotonic() + TIMEOUT
            while {"n": 3} not in tasks and time.monotonic() < deadline:
                time.sleep(0.02)
            check(f"{codec}: task Rust -> Python, no reply", {"n": 3} in tasks, tasks)
            while not broadcasts and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # let any wrongly routed broadcast arrive, to be caught
            check(
                f"{codec}: broadcast Rust -> Python, filtered by subject and sender",
                broadcasts == ["hello"],
                broadcasts,
            )
            while not pk_broadcasts and time.monotonic() < deadline:
                time.sleep(0.02)
            check(
                f"{codec}: broadcast Rust -> Python with the integer sender 47 and correlation id 9",
                pk_broadcasts == [("pk", 47, "pk.state", 9)]
                and type(pk_broadcasts[0][1]) is int,
                pk_broadcasts,
            )
        finally:
            comm.close()


def presence_unseen_by_kiwipy():
    """A kiwimq peer announces its presence on an exchange of kiwimq's own: a watcher bound
    there hears it, while a kiwiPy peer (a catch-all broadcast subscriber and an RPC
    subscriber) hears nothing, and no queue of kiwiPy's is bound to that exchange."""
    import asyncio

    import aio_pika

    codec = "msgpack"
    with VirtualHost("presence") as url:
        heard = []

        def everything(_comm, body, sender, subject, correlation_id):
            heard.append((body, sender, subject))

        comm = communicator(url, codec)
        try:
            comm.add_broadcast_subscriber(everything)
            comm.add_rpc_subscriber(lambda _comm, msg: msg, "py-listener")

            async def watch(pid):
                connection = await aio_pika.connect(url)
                try:
                    channel = await connection.channel()
                    exchange = await channel.get_exchange("kiwipy.messages.kiwimq-presence")
                    queue = await channel.declare_queue(exclusive=True)
                    await queue.bind(exchange, routing_key="[kiwimq.presence]")
                    deadline = time.monotonic() + TIMEOUT
                    while time.monotonic() < deadline:
                        message = await queue.get(fail=False, no_ack=True)
                        if message is None:
                            await asyncio.sleep(0.1)
                            continue
                        presence = json.loads(message.body)
                        if presence.get("pid") == pid:
                            return presence
                    return None
                finally:
                    await connection.close()

            peer = Peer(url, codec, "serve")
            ready = peer.wait_for("READY")
            check("presence: the Rust peer serves", ready, peer.lines)
            presence = asyncio.run(watch(peer.process.pid)) if ready else None
            check(
                "presence: announced on kiwimq's own exchange (kiwipy.messages.kiwimq-presence)",
                presence is not None and presence.get("backend") == "amqp",
                presence,
            )
            bindings = subprocess.run(
                ["rabbitmqctl", "-q", "list_bindings", "-p", url.rsplit("/", 1)[1],
                 "source_name", "destination_name", "routing_key"],
                check=True, capture_output=True, text=True,
            ).stdout.splitlines()
            kiwipy_bound = [b for b in bindings if "kiwimq-presence" in b and "amq.gen" not in b]
            check("presence: no kiwiPy queue is bound to the presence exchange", not kiwipy_bound, kiwipy_bound)
            code = peer.finish()
            check("presence: the Rust peer closed cleanly", code == 0, f"exit {code}: {peer.lines}")
            time.sleep(0.3)  # let anything wrongly routed arrive, to be caught
            check("presence: a kiwiPy broadcast subscriber heard nothing of it", heard == [], heard)
        finally:
            comm.close()


def main():
    for codec in CODECS:
        for run in (python_calls_rust, rust_calls_python):
            try:
                run(codec)
            except Exception as error:  # noqa: BLE001 - report, go on with the next codec
                check(f"{codec}: {run.__name__}", False, f"{type(error).__name__}: {error}")
    try:
        presence_unseen_by_kiwipy()
    except Exception as error:  # noqa: BLE001 - report it as a failed check
        check("presence_unseen_by_kiwipy", False, f"{type(error).__name__}: {error}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
