"""Make an int8 checkpoint of a cell classifier for CPU-only nodes (``engine.models.quantize``).

    python -m jobs.quantize_cell_classifier --checkpoint <float.safetensors> --data <dir with
        labels.csv> --output <int8.safetensors> [--source-mpp 0.1 | auto]
        [--calibration-images 512] [--seed 0] [--test-fraction 0.15] [--exclude-codes IG,NEU]
        [--ood-images 2000] [--no-eval]

Activation ranges are calibrated on images of the training split, rebuilt exactly as
``jobs.train_cell_classifier`` made it (same seed, test fraction and excluded codes), never on
the test rows. Those rows then score both models on this CPU (single view), and the card
records macro F1, accuracy and crops/s of each. Prints that JSON.

Where the float checkpoint carries a feature density (``jobs.fit_cell_ood``), the int8 model's
features sit a little off the float model's, so its distance threshold is carried over: the
float threshold times the median ratio of int8 to float distances among the farthest tenth of
``--ood-images`` training-split images (none of them used for calibration: on a small split, a
lab's first labels, half of it is kept for them). Use the output as
``pipeline.classifier.checkpoint`` on CPU nodes: its model actors then take no GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time

import numpy as np

from jobs.common import float_classifier_split, job_main, refit_parser, storage_from_args


def parse_args(argv=None) -> argparse.Namespace:
    p = refit_parser("jobs.quantize_cell_classifier", __doc__,
                     "the int8 checkpoint (.safetensors)")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--ood-images", type=int, default=2000,
                   help="training-split images that set the int8 distance threshold")
    p.add_argument("--no-eval", action="store_true", help="skip scoring on the test split")
    return p.parse_args(argv)


def score(model, crops: np.ndarray, y: np.ndarray, batch_size: int = 128
          ) -> tuple[dict, np.ndarray]:
    """Macro F1, accuracy and model crops/s of ``model`` on CPU (single view); with a feature
    density, the share of crops it flags, from the same forward pass. Returns those and the
    calls (class indices)."""
    from engine.models import Predictor
    from engine.train.metrics import classification_metrics

    pred = Predictor(model, "cpu")
    pred.predict_with_distance(crops[:batch_size])  # first-call set-up is not the model's rate
    t = time.perf_counter()
    probs, far = predict_batched(pred, crops, batch_size)
    seconds = time.perf_counter() - t
    report = classification_metrics(y, probs, list(model.class_codes))
    out = {"precision": "int8" if model.int8 is not None else "bf16" if pred.amp else "fp32",
           "macro_f1": round(report["macro_f1"], 4), "accuracy": round(report["accuracy"], 4),
           "classes_precision_recall_above_0_8": report["classes_precision_recall_above_0_8"],
           "crops_per_s": round(len(crops) / seconds, 1), "n": int(len(crops))}
    if far is not None:
        out["ood_flagged_fraction"] = round(float((far > model.ood.threshold).mean()), 4)
    return out, probs.argmax(1)


def predict_batched(pred, crops: np.ndarray, batch_size: int = 128
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """`Predictor.predict_with_distance` over ``crops`` in batches: probabilities and each
    crop's distance to the training data (None without a density)."""
    parts = [pred.predict_with_distance(crops[i:i + batch_size])
             for i in range(0, len(crops), batch_size)]
    far = [d for _, d in parts]
    return (np.concatenate([p for p, _ in parts]),
            None if any(d is None for d in far) else np.concatenate(far))


@job_main
def main(argv=None) -> int:
    args = parse_args(argv)
    storage = storage_from_args(args)
    import torch

    from engine.models import CheckpointError, Predictor, create_model, write_checkpoint
    from engine.models.quantize import SCHEME, calibrate, observer_state, prepare_int8
    from engine.train.data import load_cell_images
    from engine.train.metrics import paired_bootstrap

    try:
        state, card, model, trainable, dev_idx, test_rows = float_classifier_split(args)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"hemeflow: error: {err}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    # a density's threshold is carried over on images the calibration did not see: on a small
    # training split (a lab's first labels) half of it is kept for them
    kept = max(0, min(args.ood_images, len(dev_idx) // 2)) if model.ood is not None else 0
    picked = rng.choice(dev_idx, min(args.calibration_images, len(dev_idx) - kept),
                        replace=False)
    spec = model.spec
    images = load_cell_images([trainable.paths[i] for i in sorted(picked)], args.source_mpp,
                              spec.input_mpp, spec.input_px)
    float_cpu = Predictor(model, "cpu", amp=False)
    prepared = prepare_int8(model.module, spec.input_px)
    n = calibrate(prepared, (float_cpu.preprocess(images[i:i + 64])
                             for i in range(0, len(images), 64)))
    card = dict(card)
    card["quantization"] = {
        "scheme": SCHEME, "body": "int8 (stem, stages, global pool); final linear layer float32",
        "from_checkpoint": args.checkpoint, "torch": torch.__version__,
        "calibration": {"images": n, "data": args.data_source, "rows": "training split, never the "
                        "test split", "source_mpp": args.source_mpp,
                        "split": {"seed": args.seed, "test_fraction": args.test_fraction,
                                  "exclude_codes": args.exclude_codes}},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    tensors = {**state, **observer_state(prepared)}  # the histogram search, once
    write_checkpoint(tensors, card, args.output, storage)
    if kept:
        from engine.models.ood import PREFIX, match_threshold

        pool = np.setdiff1d(dev_idx, picked)
        chosen = np.sort(rng.choice(pool, min(args.ood_images, len(pool)), replace=False))
        crops = load_cell_images([trainable.paths[i] for i in chosen], args.source_mpp,
                                 spec.input_mpp, spec.input_px)
        float_far = predict_batched(Predictor(model), crops)[1]
        int8 = create_model(card["name"], args.output, storage=storage)
        int8_far = predict_batched(Predictor(int8), crops)[1]
        cut = match_threshold(float_far, model.ood.threshold, int8_far)
        tensors[PREFIX + "threshold"] = torch.tensor([cut], dtype=torch.float32)
        card["ood"] = {**card.get("ood", {}), "threshold": round(cut, 4)}
        card["quantization"]["ood_threshold"] = {
            "float": round(model.ood.threshold, 4), "int8": round(cut, 4),
            "images": int(len(chosen)), "flagged_fraction": round(
                float((float_far > model.ood.threshold).mean()), 4),
            "rule": "the float threshold times the median int8/float distance ratio among "
                    "the farthest tenth of these training-split images (none used for "
                    "calibration)"}
        write_checkpoint(tensors, card, args.output, storage)
    codes = list(model.class_codes)
    scored = [(p, c) for p, c in test_rows if c in codes]
    if not args.no_eval and scored:
        crops = load_cell_images([p for p, _ in scored], args.source_mpp, spec.input_mpp,
                                 spec.input_px)
        y = np.array([codes.index(c) for _, c in scored])
        as_float, float_calls = score(model, crops, y)
        as_int8, int8_calls = score(create_model(card["name"], args.output, storage=storage),
                                    crops, y)
        card["quantization"]["evaluation"] = {
            "rows": "the held-out test split, single view, on this CPU",
            "float": as_float, "int8": as_int8,
            # what int8 changes, paired on the same images: an interval that holds 0 is a
            # difference the test split cannot tell from chance
            "int8_minus_float": {k: v for k, v in paired_bootstrap(
                y, int8_calls, float_calls, codes).items() if k in ("accuracy", "macro_f1")}}
        write_checkpoint(tensors, card, args.output, storage)  # the same tensors, the card scored
    print(json.dumps({"output": args.output, **card["quantization"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
