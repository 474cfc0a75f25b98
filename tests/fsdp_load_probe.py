"""Run under `accelerate launch` (2 processes): phi3v's model loading and the engine's wrapping of `phi3v train`, then
print each rank's peak RSS as one JSON line. No training step: the probe measures what loading costs.

    accelerate launch --config_file configs/launch/fsdp2.yaml --num_processes 2 tests/fsdp_load_probe.py \
        --model M --data D --output_dir O --mode full
"""

from __future__ import annotations

import json
import logging
import sys

from phi3v.train import Phi3VTrainer, load_model_and_processor, load_train_config, peak_rss_mib


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = load_train_config(None, sys.argv[1:])
    args = config.training_arguments()
    model, processor = load_model_and_processor(config, args)
    trainer = Phi3VTrainer(model=model, args=args, processing_class=processor, phi3v_config=config)
    optimizer = trainer.create_optimizer()  # as in train(): FSDP2 re-points it at the shards
    # FSDP2: shard; with cpu_ram_efficient_loading, rank 0 broadcasts its tensors into the other ranks' shards
    wrapped, optimizer = trainer.accelerator.prepare(model, optimizer)
    switched = {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in wrapped.parameters() if p.requires_grad
    }
    local = sum(getattr(p, "_local_tensor", p).numel() for p in wrapped.parameters())
    report = {
        "rank": args.process_index,
        "peak_rss_mib": peak_rss_mib(),
        "engine": str(trainer.accelerator.distributed_type),
        "local_parameters": local,
        "optimizer_on_shards": switched,
    }
    print("PROBE " + json.dumps(report), flush=True)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
