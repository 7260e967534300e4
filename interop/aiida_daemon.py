"""A live AiiDA profile for kiwimq's tests: AiiDA's side of running its daemon on a broker.

    python aiida_daemon.py service-dir PROFILE            the broker service directory
    python aiida_daemon.py submit PROFILE N SLEEP         submits N workflows of AiiDA's own
                                                          (MultiplyAddWorkChain) and N whose
                                                          calculation sleeps SLEEP s (SleepyAdd,
                                                          aiida_workflows.py); prints the pks
    python aiida_daemon.py wait PROFILE SECONDS PK...     waits until each process is terminated;
                                                          prints [pk, state, exit status] of each

Prints one JSON value on stdout. The profile is one ``verdi presto --use-zeromq`` made, with a
``bash`` code on ``localhost``.
"""

import json
import sys
import time

from aiida import load_profile, orm


def service_dir(profile):
    from aiida.manage.configuration import get_config

    return get_config().filepaths(profile)['broker_service']['dir']


def submit(count, sleep):
    from aiida.engine import submit as submit_process
    from aiida.plugins import WorkflowFactory
    from aiida_workflows import SleepyAdd

    code = orm.load_code('bash@localhost')
    workflows = [
        submit_process(
            WorkflowFactory('core.arithmetic.multiply_add'),
            x=orm.Int(n),
            y=orm.Int(2),
            z=orm.Int(1),
            code=code,
        ).pk
        for n in range(count)
    ]
    sleepy = [
        submit_process(SleepyAdd, x=orm.Int(n), y=orm.Int(1), sleep=orm.Int(sleep), code=code).pk
        for n in range(count)
    ]
    return {'workflows': workflows, 'sleepy': sleepy}


def wait(seconds, pks):
    deadline = time.monotonic() + seconds
    nodes = [orm.load_node(pk) for pk in pks]
    while time.monotonic() < deadline and not all(node.is_terminated for node in nodes):
        time.sleep(0.5)
    return [[node.pk, node.process_state.value if node.process_state else None, node.exit_status] for node in nodes]


def main():
    command, profile = sys.argv[1], load_profile(sys.argv[2])
    if command == 'service-dir':
        result = service_dir(profile)
    elif command == 'submit':
        result = submit(int(sys.argv[3]), int(sys.argv[4]))
    elif command == 'wait':
        result = wait(float(sys.argv[3]), [int(pk) for pk in sys.argv[4:]])
    else:
        raise SystemExit(f'unknown command {command}')
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
    main()
