#!/usr/bin/env bash
# Create the MONAI Label 0.8.5 virtual environment used by tests/test_monailabel.py and by the
# retina_finetune bundle's "MONAI Label" instructions (bundles/retina_finetune/docs/README.md).
#
#   bash scripts/setup_monailabel_env.sh [PATH]     # default: $RETINA_MONAILABEL_VENV, else <repo>/.venv-monailabel
#
# Idempotent: does nothing when PATH/bin/python already imports monailabel. About 3 minutes and
# 8 GB. It is kept apart from the project's environment because the pins conflict:
#   - monailabel -> monai[torchvision] -> torchvision; the registry's torchvision 0.29.1 is a CUDA
#     build tied to torch 2.14.1 (next to the project's CPU torch 2.13.0 it fails on import:
#     "operator torchvision::nms does not exist"; unpinned, pip replaces torch with 2.14.1+cu130);
#   - monailabel -> numpymaxflow 0.0.7 (numpy<2.0.0,>=1.26.0) and pydicom-seg 0.4.1 (numpy<2.0.0),
#     while the project runs numpy 2.4.6 (the bundles' metadata.json numpy_version);
#   - pydicom-seg 0.4.1 needs pydicom<3 and dicomweb-client 0.61 needs pydicom>=3, so MONAI Label's
#     own minimums are pinned (pydicom 2.4.4, dicomweb-client 0.59.1, pynetdicom 2.0.2).
# The project itself is NOT installed here: the bundle finds `custom` at its own root.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${RETINA_MONAILABEL_VENV:-$REPO/.venv-monailabel}}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && PYTHONPATH= "$VENV/bin/python" -c "import monailabel" >/dev/null 2>&1; then
    echo "$VENV already imports monailabel $(PYTHONPATH= "$VENV/bin/python" -c 'import monailabel; print(monailabel.__version__)'); nothing to do"
    exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install torch==2.14.1 torchvision==0.29.1   # CUDA build, runs on CPU
"$VENV/bin/pip" install monai==1.6.1 monailabel==0.8.5 \
    pydicom==2.4.4 "dicomweb-client[gcp]==0.59.1" pynetdicom==2.0.2  # monailabel's own minimums
PYTHONPATH= "$VENV/bin/python" -c "import torch, torchvision, monai, monailabel; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'monai', monai.__version__, 'monailabel', monailabel.__version__)"
echo "MONAI Label environment ready: $VENV (put $VENV/bin first on PATH to run monailabel)"
