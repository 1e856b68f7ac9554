"""Judge a frozen encoder by the DinoBloom protocol: linear probe, 1-NN and 20-NN on its
embeddings of labelled cell images (weighted F1, balanced accuracy), printed as JSON.

    python -m jobs.evaluate_embeddings --model dinov2-vits14 --checkpoint <…> --data <dir>
    python -m jobs.evaluate_embeddings --model deepheme-resnext50 --data ../shared/data/pbc

Classifiers are judged by their penultimate features. With --target-mpp the images are
resampled from their own µm/px to it (a pack's own, from its pack.json; else --source-mpp; else
0.1, PBC's) and centre-cropped to the model's input; without it they are resized whole to the
model's input size, as DinoBloom did. --data may be given more than once: the tables are read as
one, at one µm/px.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from engine.errors import CheckpointError, MissingWeights
from engine.models import list_models
from engine.train.data import load_cell_images
from jobs.common import (add_data_arg, add_storage_args, job_main, labelled_data, mpp_arg,
                         storage_from_args)


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate_embeddings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=list_models())
    p.add_argument("--checkpoint")
    add_data_arg(p, "folder or s3:// prefix with labels.csv (path,code)")
    p.add_argument("--source-mpp", type=mpp_arg,
                   help="µm/px of the images, or auto: measured on their red cells (default: "
                        "a pack's own, from its pack.json; else 0.1); only with --target-mpp")
    p.add_argument("--target-mpp", type=float,
                   help="resample to this µm/px before the model (default: resize whole)")
    p.add_argument("--limit-per-class", type=int)
    p.add_argument("--allow-untrained", action="store_true", help="random weights (tests only)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    add_storage_args(p)
    args = p.parse_args(argv)
    if args.source_mpp is not None and args.target_mpp is None:
        p.error("--source-mpp is used only with --target-mpp (the µm/px to resample to); "
                "without it each image is resized whole")
    from engine.models import Predictor, create_model  # torch: not for --help
    from engine.train.evaluation import probe_embeddings

    try:
        model = create_model(args.model, args.checkpoint, allow_untrained=args.allow_untrained,
                             storage=storage_from_args(args),
                             class_codes=("none",))
        data = labelled_data(args, resolve_mpp=bool(args.target_mpp))  # only to resample
    except (MissingWeights, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"hemeflow: error: {err}", file=sys.stderr)
        return 2
    if args.limit_per_class:
        rng = np.random.default_rng(args.seed)
        keep = [i for c in sorted(set(data.codes))
                for i in rng.permutation([j for j, k in enumerate(data.codes) if k == c])
                [: args.limit_per_class]]
        data = data.subset(sorted(keep))
    size = model.spec.input_px
    if args.target_mpp:
        images = load_cell_images(data.paths, args.source_mpp, args.target_mpp, size)
    else:
        from PIL import Image

        images = np.stack([np.asarray(Image.open(x).convert("RGB").resize((size, size)))
                           for x in data.paths])
    pred = Predictor(model)
    feats = np.concatenate([pred.embed(images[i : i + args.batch_size])
                            for i in range(0, len(images), args.batch_size)])
    report = {"model": args.model, "weights": model.weights, "data": args.data_source,
              "images": {"n": len(data), "source_mpp": args.source_mpp,
                         "target_mpp": args.target_mpp, "input_px": size,
                         "resized_whole": not args.target_mpp},
              **probe_embeddings(feats, data.codes, args.seed)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
