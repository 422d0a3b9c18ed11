# The zimage-stream image: the `zimage` command (worker, processors, topics, submit, tail).
# A GPU worker needs the NVIDIA container runtime; the default model source ("tiny") renders on CPU.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Point this at PyTorch's CPU-only wheel index to leave the CUDA libraries out of a CPU image.
ARG TORCH_INDEX_URL=""

WORKDIR /opt/zimage-stream
COPY pyproject.toml README* ./
COPY schemas ./schemas
COPY processors ./processors
COPY connectors ./connectors
COPY streams ./streams
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
    && useradd --create-home --uid 10001 zimage

USER zimage
WORKDIR /home/zimage
# Model weights and the tiny model's cache live under ~/.cache (a volume in docker-compose.yml); the crash journal
# under ~/state must outlive a restart of the process, as the container's own filesystem does.
ENV HF_HOME=/home/zimage/.cache/huggingface \
    ZIMAGE_TINY_CACHE_DIR=/home/zimage/.cache/zimage/tiny \
    ZIMAGE_STATE_DIR=/home/zimage/state
RUN mkdir -p /home/zimage/.cache /home/zimage/state

CMD ["zimage", "worker"]
