# What gpu_run.sh and train_run.sh share (sourced, from the repository root).

# use_site ARCHIVE SITE HINT: unpack a bundle.py archive once into SITE and put it on PYTHONPATH;
# exit 2 with HINT (how to make it) when the archive was not carried.
use_site() {
  local archive=$1 site=$2 hint=$3
  if [ ! -f "$archive" ]; then
    echo "no $archive: $hint" >&2
    exit 2
  fi
  if [ ! -f "$site/.unpacked" ]; then
    mkdir -p "$site" && tar -xJf "$archive" -C "$site" && touch "$site/.unpacked" || exit 3
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

# machine_header: when, which GPU, how many CPUs
machine_header() {
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  nproc
}
