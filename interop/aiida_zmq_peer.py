"""AiiDA's own ZeroMQ client (aiida-core 2.9.4 ``ZeromqCommunicator``) as a peer of kiwimq.

    python aiida_zmq_peer.py serve ENDPOINT      serves RPC 'py-rpc', takes tasks, hears broadcasts
    python aiida_zmq_peer.py send ENDPOINT N     sends N tasks as AiiDA's submit does, calls
                                                 RPC 'rust-rpc', broadcasts a state change
    python aiida_zmq_peer.py work ENDPOINT S P   a worker as AiiDA's daemon runs one: takes at
                                                 most P tasks at a time and acks each S seconds
                                                 after it arrived (a process running)

Prints one JSON array a line for the test to read; ``serve`` runs until stdin closes.
"""

import json
import sys
import threading
from concurrent.futures import Future

from aiida.brokers.zeromq.communicator import ZeromqCommunicator


_printing = threading.Lock()


def out(*fields):
    # One write a line, under a lock: the worker's timers print from threads of their own.
    with _printing:
        sys.stdout.write(json.dumps(fields) + '\n')
        sys.stdout.flush()


def serve(comm):
    comm.add_rpc_subscriber(lambda _comm, msg: {'python_echo': msg}, 'py-rpc')

    def task(_comm, body):
        out('task', body)
        return True

    comm.add_task_subscriber(task, 'py-tasks')
    comm.add_broadcast_subscriber(
        lambda _comm, body, sender, subject, correlation_id: out('broadcast', body, sender, subject, correlation_id)
    )
    out('ready')
    sys.stdin.read()


def send(comm, count):
    for pid in range(count):
        comm.task_send({'task': 'continue', 'args': {'pid': pid, 'nowait': False, 'tag': None}}, no_reply=True)
    out('tasks sent', count)
    out('rpc', comm.rpc_send('rust-rpc', {'intent': 'status', 'message': None}).result(timeout=10))
    try:
        comm.rpc_send('nobody', 1).result(timeout=10)
        out('rpc error', None)
    except Exception as error:
        out('rpc error', str(error))
    comm.broadcast_send({'state': 'running'}, sender=7, subject='state_changed.created.running')
    out('broadcast sent')
    confirm = comm.task_send({'task': 'continue', 'args': {'pid': -1}})
    out('task confirmed', confirm.result(timeout=10).result())


def work(comm, hold):
    def task(_comm, body):
        out('task', body)
        done = Future()

        def finish():
            out('done', body)
            done.set_result(True)

        threading.Timer(hold, finish).start()
        return done

    comm.add_task_subscriber(task, 'py-worker')
    out('ready')
    sys.stdin.read()


def main():
    mode, endpoint = sys.argv[1], sys.argv[2]
    prefetch = int(sys.argv[4]) if mode == 'work' else None
    comm = ZeromqCommunicator(endpoint, task_timeout=10, task_prefetch_count=prefetch)
    comm.start()
    try:
        if mode == 'serve':
            serve(comm)
        elif mode == 'work':
            work(comm, float(sys.argv[3]))
        else:
            send(comm, int(sys.argv[3]))
    finally:
        comm.close()


if __name__ == '__main__':
    main()
