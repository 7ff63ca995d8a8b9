#!/usr/bin/env bash
# The installed wheel, used from a folder outside the repository: version, a tiny model, generation, and one step of
# AVG-LLaVA's stage-4 recipe found by name inside the package (packaged recipes and data files work).
# Usage: smoke_installed.sh VENV_BIN_DIR WORK_DIR
set -euo pipefail
bin=$1
work=$2
mkdir -p "$work" && cd "$work"
export PATH="$bin:$PATH"
test "$(command -v multigran)" = "$bin/multigran"

multigran --version
python -c "from importlib.resources import files; assert (files('multigran') / 'py.typed').is_file(), 'py.typed not shipped'"
python -c "from importlib.resources import files; assert (files('multigran') / 'recipes/avg/stage4_rglf.yaml').is_file()"
multigran init-tiny tiny-avg --method avg
python - <<'PY'
import json
from pathlib import Path

from PIL import Image

Path("images").mkdir(exist_ok=True)
records = []
for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
    Image.new("RGB", (40, 30), colour).save(f"images/{i}.png")
    records.append({"id": i, "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the picture?"},
        {"from": "gpt", "value": ["red", "blue"][i]}]})
Path("data.json").write_text(json.dumps(records))
PY
multigran generate --model tiny-avg --image images/0.png --prompt "What colour is the picture?" \
    --max-new-tokens 3 --granularity auto --device cpu --report
multigran train --recipe avg/stage4_rglf.yaml model=tiny-avg output_dir=stage4 data.path=data.json \
    data.image_folder=images training.max_steps=1 training.per_device_train_batch_size=2 \
    training.gradient_accumulation_steps=1 training.dataloader_num_workers=0 training.save_strategy=no \
    training.disable_tqdm=true
test -f stage4/config.json
echo "installed-wheel smoke test: ok"
