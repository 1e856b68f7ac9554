"""Build the BCCD blood-smear test slide (pyramidal TIFF + WBC boxes CSV).

    python -m jobs.build_smear_slide --bccd ../shared/data/bccd --output bccd-smear.tif
"""

from __future__ import annotations

import argparse
import sys

from engine.slides.smear import build_bccd_smear
from jobs.common import count_arg, job_main, slide_mpp_arg


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.build_smear_slide", description=__doc__)
    p.add_argument("--bccd", default="../shared/data/bccd")
    p.add_argument("--output", default="bccd-smear.tif")
    p.add_argument("--fields", type=count_arg(), default=24)
    p.add_argument("--cols", type=count_arg(), default=6)
    p.add_argument("--mpp", type=slide_mpp_arg, default=0.25)
    args = p.parse_args(argv)
    boxes = build_bccd_smear(args.bccd, args.output, args.fields, args.cols, args.mpp)
    print(f"slide: {args.output}; WBC boxes: {boxes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
