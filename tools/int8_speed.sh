#!/usr/bin/env bash
# Reproduce the INT8 figures of docs/engines.md ("INT8 on a CPU"): quantize the demo bundle and a bundle
# wrapping the Ultralytics YOLOv8n fixture, time FP32 and INT8 back to back (twice, load average beside each
# figure), run `bench analyze` on the demo bundle in both precisions and `engines verify` on 3 unseen slides.
#
#   tools/int8_speed.sh [WORKDIR]          (default /tmp/mitosis-edge-int8; about 5 minutes on 2 cores)
#
# Everything it writes goes to WORKDIR: slides, the two INT8 bundles, and results.txt (the raw JSON).
set -euo pipefail

work=${1:-/tmp/mitosis-edge-int8}
root=$(cd "$(dirname "$0")/.." && pwd)
fixture=${ULTRALYTICS_ONNX:-$root/../shared/data/models/ultralytics-yolov8n-nc2-random.onnx}
mkdir -p "$work"
results=$work/results.txt
: >"$results"
log() { echo "$*" | tee -a "$results"; }

# 1. slides: one to calibrate on, three unseen ones to verify on
for seed in 9001 9101 9102 9103; do
    [ -f "$work/s$seed.tiff" ] || mitosis-edge synth "$work/s$seed.tiff" --width 6000 --height 6000 --seed "$seed"
done

# 2. a bundle whose detector is the Ultralytics YOLOv8n export (docs/engines.md, "Ultralytics YOLO"), wrapped
if [ ! -f "$work/yolov8n/manifest.toml" ]; then
    rm -rf "$work/yolov8n"
    cp -r "$root/engines/demo" "$work/yolov8n"
    rm "$work/yolov8n/detector.onnx"
    python - "$work/yolov8n/manifest.toml" <<'EOF'
import sys
from pathlib import Path
manifest = Path(sys.argv[1])
text = manifest.read_text()
start, end = text.index("[detector]"), text.index("[[classifier]]")
table = """[detector]
file = "detector.onnx"
sha256 = ""
input = "tiles"
size = 1024
mpp = 0.25
layout = "NCHW"
channel_order = "RGB"
normalisation = { scale = 0.00392156862745098, mean = [0.0, 0.0, 0.0], std = [1.0, 1.0, 1.0] }
output = "output0"
output_format = "yolov8"
classes = ["mitotic_figure", "imposter"]
candidate_classes = ["mitotic_figure"]
scores = "probabilities"
score_threshold = 0.25

"""
text = text[:start] + table + text[end:]
text = text.replace('name = "demo"', 'name = "yolov8n-random"', 1)
manifest.write_text(text)
EOF
    mitosis-edge engines wrap "$fixture" --bundle "$work/yolov8n" --model detector
fi

# 3. the INT8 versions (onnxruntime target, the default)
for b in demo yolov8n; do
    src=$b
    [ "$b" = yolov8n ] && src=$work/yolov8n
    [ -f "$work/$b-int8/manifest.toml" ] ||
        mitosis-edge engines quantize --bundle "$src" --calibration-slide "$work/s9001.tiff" --out "$work/$b-int8"
done
log "== quantization reports"
python -c "
import json, sys
for b in sys.argv[1:]:
    r = json.load(open(b + '/quantization.json'))
    print(b, json.dumps({k: {f: v[f] for f in ('file', 'space_to_depth_convs', 'fp32_items_per_s', 'without_space_to_depth_items_per_s',
                                        'space_to_depth_items_per_s', 'int8_items_per_s')
                              if f in v} for k, v in r['models'].items()}))
" "$work/demo-int8" "$work/yolov8n-int8" | tee -a "$results"

# 4. bench engine: FP32 then INT8 back to back, two rounds
detector_rate() {
    mitosis-edge bench engine --bundle "$1" --repeats 3 --batches 4 --json | tee -a "$results" |
        python -c "import json, sys; print(round(json.load(sys.stdin)['detector_tiles_per_s'], 1))"
}
for round in 1 2; do
    for b in demo yolov8n; do
        src=$b
        [ "$b" = yolov8n ] && src=$work/yolov8n
        load=$(uptime | sed 's/.*load average: //')
        fp32=$(detector_rate "$src")
        int8=$(detector_rate "$work/$b-int8")
        log "bench engine round $round $b: FP32 $fp32 INT8 $int8 tiles/s = $(python -c "print(round($int8 / $fp32, 2))")x (load $load)"
    done
done

# 4b. the two detector sessions interleaved in one process (both see the same load)
for b in demo yolov8n; do
    src=$root/engines/demo
    [ "$b" = yolov8n ] && src=$work/yolov8n
    load=$(uptime | sed 's/.*load average: //')
    log "interleaved $b: $(python "$root/tools/int8_interleaved.py" "$src" "$work/$b-int8") (load $load)"
done

# 5. bench analyze on the demo bundle, FP32 then INT8
for b in demo "$work/demo-int8"; do
    log "== bench analyze $b (load $(uptime | sed 's/.*load average: //'))"
    mitosis-edge bench analyze "$work/s9101.tiff" --bundle "$b" --json | tee -a "$results"
done

# 6. F1 change on the three unseen slides
log "== engines verify (load $(uptime | sed 's/.*load average: //'))"
mitosis-edge engines verify --bundle "$work/demo-int8" --reference demo --json \
    --slide "$work/s9101.tiff" --slide "$work/s9102.tiff" --slide "$work/s9103.tiff" | tee -a "$results"
log "raw figures in $results"
