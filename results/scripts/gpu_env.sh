# Sourced by the GPU scripts (gpu_check.sh, gpu_s34.sh): Procgen, gym and their system libraries on the GPU machine's
# image, which lacks them. Carry them as wheels in .whl (gym, gym3, gym_notices, cffi, pycparser, procgen-mirror for
# Python 3.12) and the libraries Procgen loads (libGL.so.1, libgthread-2.0.so.0) as Debian packages in .gl (libgl1,
# libglvnd0, libglx0, libglx-mesa0, libglib2.0-0, libpcre2-8-0, libffi8); the device tool's README says how to fetch
# both. Writes the machine's facts to $OUT/env.txt.
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .gl ]; then for f in .gl/*.deb; do dpkg -x "$f" /tmp/glroot; done  # beside the system's, not over them
  export LD_LIBRARY_PATH=/tmp/glroot/usr/lib/x86_64-linux-gnu:/tmp/glroot/lib/x86_64-linux-gnu; fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; lscpu | grep "Model name"
  python3 -c "import torch, procgen, gym, numpy; print('torch', torch.__version__, torch.cuda.get_device_name(0),
'numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/env.txt"
