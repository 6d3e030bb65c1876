"""The SFT stage: TRL's SFTTrainer on tokenised, labelled conversations (curriculum and reasoning SFT).

Config: :class:`~finemed_ray.train.configs.SFTJobConfig` (``configs/sft_*.yaml``). Data: ``prepare_sft``
(``finemed_ray/data/sft_prepare.py``). The Ray Train worker loop, resume and export are the generic ones
(``finemed_ray/train/loop.py``, ``finemed_ray/train/driver.py``); this file is what SFT adds to them.
"""

from __future__ import annotations

from typing import Any

from finemed_ray.train.configs import SFTJobConfig
from finemed_ray.train.driver import StageJob
from finemed_ray.train.loop import StageWorker, class_path


def eval_arguments(cfg: Any, has_eval: bool) -> dict[str, Any]:
    """The eval-loss arguments of the stages that hold out rows (SFT, DPO)."""
    t = cfg.train
    return dict(max_length=cfg.data.max_length, eval_strategy="steps" if has_eval and t.eval_steps else "no",
                eval_steps=t.eval_steps, per_device_eval_batch_size=t.per_device_batch_size)


class SFTWorker(StageWorker):
    config_class = SFTJobConfig
    columns = ("input_ids", "labels")

    def training_arguments(self, common: dict[str, Any]) -> Any:
        from trl import SFTConfig

        from finemed_ray.train.packing import packing_sft_config_kwargs

        return SFTConfig(
            **common,
            **eval_arguments(self.cfg, self.loop_cfg["has_eval"]),
            dataset_kwargs={"skip_prepare_dataset": True},  # rows arrive tokenised, labelled and truncated
            **(packing_sft_config_kwargs() if self.cfg.train.packing else {}),
        )

    def trainer_class(self) -> type:
        from trl import SFTTrainer

        from finemed_ray.train.ray_shard import RayShardDataLoaderMixin

        class RaySFTTrainer(RayShardDataLoaderMixin, SFTTrainer):
            pass

        return RaySFTTrainer

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from finemed_ray.train.packing import packing_collator, resolve_pack_length

        t = self.cfg.train
        if not t.packing:
            return {}
        pack_length = resolve_pack_length(t.pack_length, self.cfg.data.max_length,
                                          getattr(model.config, "_attn_implementation", None))
        return {"data_collator": packing_collator(tokenizer, pack_length=pack_length)}


class SFTJob(StageJob):
    """Supervised fine-tuning from ``model.path`` on the conversations under ``data.path``."""

    stage = "sft"
    kind = "sft"
    worker = class_path(SFTWorker)

    def prepare(self, selection):
        from finemed_ray.data.sft_prepare import prepare_sft

        cfg = self.cfg
        return prepare_sft(cfg.data.path, cfg.model.path, self.run_uri, cfg.data.max_length, cfg.data.system_prompt,
                           selection, overlong=cfg.data.overlong)

    def read_prepared(self, uri: str, split: str):
        from finemed_ray.data.sft_prepare import read_prepared

        return read_prepared(uri, split)

    def summary_class(self):
        from finemed_ray.data.sft_prepare import PrepareSummary

        return PrepareSummary


__all__ = ["SFTJob", "SFTJobConfig", "SFTWorker", "eval_arguments"]
