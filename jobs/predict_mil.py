"""Predict with a trained ABMIL checkpoint: K resampled bags per slide, mean and sd.

    python -m jobs.predict_mil --checkpoint <abmil.safetensors> --embeddings <…> --output <dir>

Writes ``<output>/mil_predictions/predictions.parquet`` and prints one JSON line per slide.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from engine.models.mil import load_mil, predict_bags
from jobs.train_mil import load_bags


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.predict_mil", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--embeddings", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--n-bags", type=int)
    p.add_argument("--bag-size", type=int)
    args = p.parse_args(argv)
    model, card = load_mil(args.checkpoint)
    n_bags, bag_size = args.n_bags or card.get("n_bags", 10), args.bag_size or card.get(
        "bag_size", 256)
    rows = []
    for sid, bag in sorted(load_bags(args.embeddings).items()):
        pred = predict_bags(model, bag, n_bags, bag_size)
        row = {"slide_id": sid, "task": card["task"], "n_bags": pred.n_bags,
               "bag_size": pred.bag_size, "n_instances": len(bag),
               "mean": pred.mean.tolist(), "sd": pred.sd.tolist(),
               "classes": card.get("classes") or None}
        rows.append(row)
        print(json.dumps(row))
    os.makedirs(os.path.join(args.output, "mil_predictions"), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows),
                   os.path.join(args.output, "mil_predictions", "predictions.parquet"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
