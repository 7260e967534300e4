"""A workflow for kiwimq's live AiiDA tests: ``SleepyAdd`` runs an ``ArithmeticAddCalculation``
whose job sleeps, and waits for it — a workflow that stays alive long enough to be paused,
played and killed over RPC while its calculation runs.

The daemon imports it from ``PYTHONPATH`` (the test puts this directory there).
"""

from aiida import orm
from aiida.engine import ToContext, WorkChain
from aiida.plugins import CalculationFactory


class SleepyAdd(WorkChain):
    """x + y, computed by a calculation whose job sleeps ``sleep`` seconds first."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('x', valid_type=orm.Int)
        spec.input('y', valid_type=orm.Int)
        spec.input('sleep', valid_type=orm.Int)
        spec.input('code', valid_type=orm.AbstractCode)
        spec.outline(cls.add, cls.result)
        spec.output('sum', valid_type=orm.Int)

    def add(self):
        calculation = self.submit(
            CalculationFactory('core.arithmetic.add'),
            x=self.inputs.x,
            y=self.inputs.y,
            code=self.inputs.code,
            metadata={'options': {'sleep': self.inputs.sleep.value, 'resources': {'num_machines': 1}}},
        )
        return ToContext(addition=calculation)

    def result(self):
        self.out('sum', self.ctx.addition.outputs.sum)
