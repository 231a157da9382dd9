#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), not on the GPU machine: downloads into .whl/ (git-ignored) the wheels
# the lent GPU machine lacks, for its Python 3.12 on manylinux x86_64; benchmarks/gpu_run.sh installs them there
# (pip install --no-index --no-deps --target /tmp/site .whl/*.whl) when the call carries them: carry: [".whl"].
#
#     bash benchmarks/fetch_gpu_wheels.sh                    # liger-kernel, cut-cross-entropy (the image lacks them)
#     bash benchmarks/fetch_gpu_wheels.sh --image-packages   # also peft, pytest (+ iniconfig, pluggy, packaging,
#                                                            # pygments), for an image without them
#     bash benchmarks/fetch_gpu_wheels.sh --matplotlib       # also matplotlib (optional: without it no PNG)
#
# The GPU image ('cuda', as read in the device tool's KINDS.md) already has peft, pytest, iniconfig, pluggy,
# packaging, pygments and matplotlib with its dependencies: carrying them would only shadow the image's own
# versions, so they are fetched only when asked for. Every wheel's Requires-Dist (extras left out, markers
# evaluated for CPython 3.12 on Linux) is printed; where the image's package list is at hand ($IMAGE_PACKAGES,
# default the device tool's KINDS.md), the requirements it lacks are named. .whl/ is left holding exactly the
# wheels of this run (two versions of a project stop the whole install there). Last, the size of what a
# call would send (tree + .whl) against the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
IMAGE_PACKAGES=${IMAGE_PACKAGES:-/work/.library/device/KINDS.md}

specs=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
for arg in "$@"; do
    case $arg in
        --image-packages) specs+=(peft==0.21.2 pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 packaging==26.3 pygments==2.21.0) ;;
        --matplotlib) specs+=(matplotlib==3.11.2) ;;
        *) echo "unknown option $arg (--image-packages, --matplotlib)"; exit 2 ;;
    esac
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$tmp" "${specs[@]}"

mkdir -p .whl
shopt -s nullglob
for old in .whl/*.whl; do  # .whl/ holds exactly what was asked for now: one version of each, nothing stale
    [[ -e $tmp/$(basename "$old") ]] || echo "removed from .whl/: $(basename "$old")"
    rm -f "$old"
done
shopt -u nullglob
mv "$tmp"/*.whl .whl/

"$PYTHON" - "$IMAGE_PACKAGES" .whl/*.whl <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
listing = Path(sys.argv[1])
image = None
if listing.is_file():
    text = listing.read_text()
    found = re.search(r"Packages: (.*?)\.\n", text, re.S)  # the image's one-line package list
    image = {canonicalize_name(name.strip()) for name in found.group(1).split(",")} if found else None
carried = {canonicalize_name(Path(w).name.split("-")[0]) for w in sys.argv[2:]}
missing = set()
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    needs = []
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                needs.append(str(req))
                name = canonicalize_name(req.name)
                if image is not None and name not in image and name not in carried:
                    missing.add(name)
    print(f"{Path(wheel).name}: {Path(wheel).stat().st_size / 2**20:.2f} MiB; needs {', '.join(needs) or 'nothing'}")
if image is None:
    print(f"(no image package list at {listing}: check the needs above against the GPU image by hand)")
elif missing:
    print("needed but neither in the image nor carried: " + ", ".join(sorted(missing)) + " (fetch them too)")
else:
    print("every requirement is in the image or carried")
EOF

wheels=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
tree=$( { git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null || true; } | tail -n 1 | cut -f1)
total=$((wheels + tree))
awk -v w="$wheels" -v t="$tree" 'BEGIN { printf ".whl: %.2f MiB; the tree: %.2f MiB; a call carrying .whl sends %.2f MiB of the 64 MiB allowed\n", w / 2^20, t / 2^20, (w + t) / 2^20 }'
if ((total > 48 * 1024 * 1024)); then
    echo "warning: over 48 MiB: little room left under the 64 MiB a call may send"
fi
