"""The DPO stage: TRL's DPOTrainer from the previous stage's weights against a frozen copy of them.

Config: :class:`~finemed_ray.train.configs.DPOJobConfig` (``configs/dpo_*.yaml``; ``data.path`` holds preference
pairs prompt/chosen/rejected). Data: ``prepare_dpo`` (``finemed_ray/data/dpo_prepare.py``). Packing:
``finemed_ray/train/dpo_packing.py``. The worker loop, resume, LoRA and export are the generic ones
(``finemed_ray/train/loop.py``, ``finemed_ray/train/driver.py``).
"""

from __future__ import annotations

from typing import Any

from finemed_ray.train.configs import DPOJobConfig
from finemed_ray.train.driver import StageJob
from finemed_ray.train.loop import StageWorker, class_path
from finemed_ray.train.stages.sft import eval_arguments


class DPOWorker(StageWorker):
    config_class = DPOJobConfig
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def training_arguments(self, common: dict[str, Any]) -> Any:
        from trl import DPOConfig

        d = self.cfg.dpo
        return DPOConfig(
            **common,
            **eval_arguments(self.cfg, self.loop_cfg["has_eval"]),
            beta=d.beta,
            # RPO: DPO's loss plus a weighted NLL on the chosen answer (TRL sums the listed losses with these weights)
            loss_type=[d.loss_type] + (["sft"] if d.sft_weight > 0 else []),
            loss_weights=[1.0, d.sft_weight] if d.sft_weight > 0 else None,
            truncation_mode="keep_start",  # prepare already fitted every pair into max_length
        )

    def trainer_class(self) -> type:
        from trl import DPOTrainer

        from finemed_ray.train.dpo_packing import DPOPackingMixin
        from finemed_ray.train.ray_shard import RayShardDataLoaderMixin

        # No ref_model given -> TRL loads a frozen copy of the starting weights and, under DeepSpeed, wraps it in
        # its own ZeRO-3 inference engine (sharded like the policy); with LoRA the adapter is disabled instead.
        class RayDPOTrainer(RayShardDataLoaderMixin, DPOPackingMixin, DPOTrainer):  # packing: train/dpo_packing.py
            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset  # rows arrive tokenised by finemed_ray.data.dpo_prepare exactly as TRL would

        return RayDPOTrainer

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from finemed_ray.train.packing import resolve_pack_length

        t = self.cfg.train
        if not t.packing:
            return {}
        # chosen and rejected sequences flat, position ids restarting per sequence (finemed_ray/train/dpo_packing.py)
        return {"dpo_packing": True,
                "dpo_pack_length": resolve_pack_length(t.pack_length, self.cfg.data.max_length,
                                                       getattr(model.config, "_attn_implementation", None))}


class DPOJob(StageJob):
    """DPO from the previous stage's weights against a frozen copy of them (TRL DPOTrainer), same Ray Train,
    ZeRO-3, resume, LoRA and export machinery as SFT. ``data.path`` holds preference pairs (prompt/chosen/rejected)."""

    stage = "dpo"
    kind = "dpo"
    worker = class_path(DPOWorker)
    # train.packing is supported (finemed_ray/train/dpo_packing.py); the worker refuses an attention
    # implementation that would let packed sequences attend to each other (check_packing_attention).

    def prepare(self, selection):
        from finemed_ray.data.dpo_prepare import prepare_dpo

        cfg = self.cfg
        return prepare_dpo(cfg.data.path, cfg.model.path, self.run_uri, cfg.data.max_length,
                           max_prompt_length=cfg.dpo.max_prompt_length, overlong=cfg.data.overlong,
                           system_prompt=cfg.data.system_prompt, selection=selection)

    def read_prepared(self, uri: str, split: str):
        from finemed_ray.data.dpo_prepare import read_prepared_dpo

        return read_prepared_dpo(uri, split)

    def summary_class(self):
        from finemed_ray.data.dpo_prepare import DPOPrepareSummary

        return DPOPrepareSummary

    def fingerprint_extras(self) -> dict[str, Any]:
        return {"dpo_max_prompt_length": self.cfg.dpo.max_prompt_length}


__all__ = ["DPOJob", "DPOJobConfig", "DPOWorker"]
