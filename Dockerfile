# The mmray cluster image: every `image:` in cluster/ is built from this file.
#
#   docker build -t my-registry/mmray:0.1.0-ray2.60.0-py311 . && docker push my-registry/mmray:0.1.0-ray2.60.0-py311
#
# The tag is <mmray version>-ray<Ray version>-py<Python>; tests/cluster/test_manifests.py checks that
# these ARGs, pyproject.toml, the Makefile's torch pins and every manifest agree. The CUDA base runs on
# CPU nodes too, so one image serves the head, CPU and GPU workers.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu
ARG RAY_VERSION

# Pinned exactly as the Makefile pins them (pyproject.toml only bounds them).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# Dependencies first, from pyproject.toml alone, so a code change rebuilds only the last layers.
WORKDIR /home/ray/mmray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users mmray ./mmray
RUN pip install --no-cache-dir . && python -c "import mmray.cli, ray; assert ray.__version__ == '${RAY_VERSION}'"

# Entrypoints and example configs at the absolute paths the KubeRay manifests name.
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users cluster ./cluster

ENV TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1
