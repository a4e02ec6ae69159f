# The device machine's environment for the study scripts (sourced by results/study/device.sh and
# results/fit_form/device.sh): the rebuilt model parts and the gguf wheel on PYTHONPATH, the
# model store and compilation cache under $root.
root=/tmp/s
mkdir -p $root/chunks $root/bin $root/lib $root/site
# A wrapper, not a link: a link to a virtualenv's python3 starts it outside the virtualenv.
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > $root/bin/python && chmod +x $root/bin/python
export PATH=$root/bin:$PATH PYTHONPATH=$root/site:$root/lib TRIATTENTION_MODELS=$root/store \
    TRIATTENTION_COMPILATION_CACHE=$root/xla XLA_PYTHON_CLIENT_PREALLOCATE=false \
    JAX_DEFAULT_MATMUL_PRECISION=highest PYTHONUNBUFFERED=1
