"""AiiDA's own ZeroMQ client (aiida-core 2.9.4 ``ZeromqCommunicator``) as a peer of kiwimq.

    python aiida_zmq_peer.py serve ENDPOINT      serves RPC 'py-rpc', takes tasks, hears broadcasts
    python aiida_zmq_peer.py send ENDPOINT N     sends N tasks as AiiDA's submit does, calls
                                                 RPC 'rust-rpc', broadcasts a state change

Prints one JSON array a line for the test to read; ``serve`` runs until stdin closes.
"""

import json
import sys

from aiida.brokers.zeromq.communicator import ZeromqCommunicator


def out(*fields):
    print(json.dumps(fields), flush=True)


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


def main():
    mode, endpoint = sys.argv[1], sys.argv[2]
    comm = ZeromqCommunicator(endpoint, task_timeout=10)
    comm.start()
    try:
        if mode == 'serve':
            serve(comm)
        else:
            send(comm, int(sys.argv[3]))
    finally:
        comm.close()


if __name__ == '__main__':
    main()
