"""``analyze stages`` over a cache vs the bare forward of the same inverse modules on tensors in memory (target ≥ 0.8).

The analysis side runs ``invcache.analysis.stages.run`` end to end: whole-shard reads of
every needed tap, the four chains, per-image errors, confidence intervals, figures and the
results files. The bare side holds the same taps in memory already and only runs the four
chains on the same batches. Modules are trained for one epoch (their weights do not change
the cost). Also reported: the CKA pass of ``analyze inter-layer`` alone (whole-shard reads of
every compared layer and the HSIC sums of every layer pair) in images/s and image·pairs/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report, setup  # noqa: E402

import invcache  # noqa: E402
from invcache.analysis import inter_layer, stages  # noqa: E402
from invcache.analysis.cka import MinibatchCKA  # noqa: E402
from invcache.analysis.common import batches, evaluation_rows  # noqa: E402
from invcache.chain import STAGE_CHAINS, STAGES, invert, load_modules  # noqa: E402
from invcache.data import parse_size  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-tiny")
    parser.add_argument("--size", default="128x160")
    parser.add_argument("--images", type=int, default=256, help="Evaluation images.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", default="small", help="B⁻¹ width: small for CPUs, full on a GPU.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = dict(source="synthetic", workspace=root, model=args.model, weights="random:0",
                      size=parse_size(args.size), shard_size=64, num_workers=0, device=args.device)
        invcache.extract(invcache.ExtractSettings(split="train2017", synthetic_images=args.batch_size * 2, **common))
        invcache.extract(invcache.ExtractSettings(split="val2017", synthetic_images=args.images, **common))
        for name in ("backbone-inv", "encoder-inv", "decoder-inv", "head-inv"):
            invcache.train(invcache.TrainSettings(name, workspace=root, epochs=1, batch_size=args.batch_size,
                                                  width=args.width, num_workers=0, device=args.device))
        settings = invcache.AnalyzeSettings(workspace=root, batch_size=args.batch_size, device=args.device, n=4)

        stages.run(settings)  # warm-up: first-touch costs of both sides land here
        started = time.perf_counter()
        stages.run(settings)
        analysis_s = time.perf_counter() - started

        cache = invcache.open_cache(root / "cache" / "val2017")
        modules = load_modules(root / "modules", device=device)
        inputs = {stage: modules[STAGE_CHAINS[stage][0]].spec.inputs for stage in STAGES}
        taps = sorted({t for names in inputs.values() for t in names})
        in_memory = {t: cache[t].torch[:].to(device) for t in taps}

        def bare() -> float:
            started = time.perf_counter()
            with torch.no_grad():
                for start in range(0, args.images, args.batch_size):
                    for stage in STAGES:
                        batch = {t: in_memory[t][start:start + args.batch_size] for t in inputs[stage]}
                        invert(modules, batch, via=STAGE_CHAINS[stage])
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

        bare()
        bare_s = bare()

        # the CKA pass of inter-layer alone: the same whole-shard batches, every layer pair's HSIC sums
        layers = inter_layer.run(invcache.AnalyzeSettings(workspace=root, batch_size=args.batch_size, n=2,
                                                          device=args.device, out=root / "inter"))["cka"]["layers"]
        rows = evaluation_rows(cache)
        started = time.perf_counter()
        accumulator = MinibatchCKA(layers)
        for _, batch in batches(cache, layers, rows, args.batch_size, device):
            accumulator.update(batch)
        accumulator.matrix()
        cka_s = time.perf_counter() - started
        layers = len(layers)
    pairs = layers * (layers + 1) // 2
    report("analysis", model=args.model, size=args.size, images=args.images, batch_size=args.batch_size,
           device=str(device), analysis_img_s=round(args.images / analysis_s, 1),
           bare_chains_img_s=round(args.images / bare_s, 1), ratio=round(bare_s / analysis_s, 3), target=0.8,
           cka_layers=layers, cka_img_s=round(args.images / cka_s, 1),
           cka_img_pairs_s=round(args.images * pairs / cka_s, 1))


if __name__ == "__main__":
    main()
