"""Model benchmark: forward + backward throughput and peak memory of Phi3VForCausalLM.

    python benchmarks/model.py                       # tiny config on the CPU (a smoke run, 2 threads)
    python benchmarks/model.py --config phi-3-vision-128k-instruct --device cuda --dtype bfloat16 --num-crops 16

Each step is one training step (forward, loss on the answer tokens, backward) on a batch of product-photo-shaped
inputs: one square image (4x4 crops at num_crops 16, 2x2 at 4) and a short prompt/answer, i.e. the real sequence
length of the catalog fine-tune. The baseline in the same run is eager attention, against SDPA; results are medians
over the timed steps after warm-up, with tokens/s and (on CUDA) peak allocated memory. Random weights: full-size
configs are built directly on the device in the requested dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from machine import describe  # benchmarks/machine.py (this script's folder is on sys.path)
from phi3v import Phi3VConfig, Phi3VForCausalLM
from phi3v.model.image_processing import num_image_tokens


def grid_for(num_crops: int) -> tuple[int, int]:
    side = int(num_crops**0.5)
    return side, side


def make_batch(config: Phi3VConfig, num_crops: int, batch: int, device: torch.device, dtype: torch.dtype):
    h, w = grid_for(num_crops)
    tokens = num_image_tokens(h, w, config.num_img_tokens)
    text = torch.randint(10, min(config.vocab_size, 30000), (batch, 40), device=device)
    image = torch.full((batch, tokens), config.image_token_id, device=device)
    ids = torch.cat([text[:, :20], image, text[:, 20:]], dim=1)  # [B, T]
    labels = ids.clone()
    labels[:, : 20 + tokens] = -100  # loss on the answer only
    pixel_values = torch.zeros(batch, num_crops + 1, 3, 336, 336, device=device, dtype=dtype)
    pixel_values[:, : 1 + h * w].normal_()
    image_sizes = torch.tensor([[h * 336, w * 336]] * batch, device=device)
    return dict(input_ids=ids, labels=labels, pixel_values=pixel_values, image_sizes=image_sizes)


def run(config: Phi3VConfig, attn: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3VForCausalLM(config).to(dtype).train()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    batch = make_batch(config, args.num_crops, args.batch_size, device, dtype)
    tokens = batch["input_ids"].numel()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model
    return {
        "attn": attn,
        "seq": batch["input_ids"].shape[1],
        "median_s": median,
        "tokens_s": tokens / median,
        "peak": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="tiny | phi-3-vision-128k-instruct | phi-3.5-vision-instruct")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--num-crops", type=int, default=None, help="default: 16 on CUDA, 4 on CPU")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    args.num_crops = args.num_crops or (16 if device.type == "cuda" else 4)
    torch.set_num_threads(args.threads)
    config = Phi3VConfig.from_name(args.config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else describe()
    print(f"# {args.config}, {dtype}, num_crops {args.num_crops}, batch {args.batch_size}, on {name}")
    print(f"torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up; medians")
    print("| attention | seq len | step (s) | tokens/s | peak GiB |")
    print("|---|---|---|---|---|")
    results = [run(config, attn, args, device, dtype) for attn in ("eager", "sdpa")]
    for r in results:
        print(f"| {r['attn']} | {r['seq']} | {r['median_s']:.3f} | {r['tokens_s']:.0f} | {r['peak']:.1f} |")
    print(f"sdpa / eager throughput: {results[1]['tokens_s'] / results[0]['tokens_s']:.2f}x")


if __name__ == "__main__":
    main()
