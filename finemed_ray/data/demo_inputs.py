"""Moved to :mod:`finemed_ray.toy.demo_inputs` (test and demo fixtures live in ``finemed_ray.toy``, which no product module imports).
This alias keeps old imports working; it is the same module object."""

import sys

from finemed_ray.toy import demo_inputs as _moved

sys.modules[__name__] = _moved
