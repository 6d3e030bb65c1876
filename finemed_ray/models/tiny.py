"""Moved to :mod:`finemed_ray.toy.tiny_model` (test and demo fixtures live in ``finemed_ray.toy``, which no product module imports).
This alias keeps old imports working; it is the same module object."""

import sys

from finemed_ray.toy import tiny_model as _moved

sys.modules[__name__] = _moved
