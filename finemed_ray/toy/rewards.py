"""A reward for testing the RL loop itself, not for training a medical model.

A random-initialised model never answers a question right, so every completion of a group gets the same
correctness reward, the group's advantage is 0 and GRPO changes nothing. ``even_first_token`` (1 when the first
generated token id is even) splits every group from the first step, so a short run on the tiny model moves its
greedy output: the tests use that to check that the weights reach the rollout engine.
"""

from __future__ import annotations

from typing import Any


def even_first_token(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    return [1.0 if ids and ids[0] % 2 == 0 else 0.0 for ids in completion_ids]
