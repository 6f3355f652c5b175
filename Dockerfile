# pagemesh: one multi-stage build, one image for every service (gateway, tokenizer, scheduler,
# executor, detokenizer; the command picks which).
#
#   docker build -t pagemesh:cpu .                       # the CPU image (the last stage)
#   docker build --target cuda -t pagemesh:cuda .        # executors on NVIDIA GPUs
#   docker run --rm pagemesh:cpu --help
#
# docker-compose.yml builds the CPU image; docker-compose.gpu.yml the CUDA one for executors.

ARG RUST_IMAGE=rust:1-bookworm
ARG CPU_IMAGE=debian:bookworm-slim
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pagemesh \
    && install -m 0755 target/release/pagemesh /usr/local/bin/pagemesh \
    && rm -rf target

# The CUDA runtime (cuBLAS, NVRTC); the driver comes from the NVIDIA Container Toolkit at run
# time. Run executors from it with `executor --device cuda`.
FROM ${CUDA_IMAGE} AS cuda
# curl: healthchecks; ca-certificates: downloads from the Hugging Face Hub; cuda-cudart-dev:
# cuda_fp16.h / cuda_bf16.h, which NVRTC needs to compile the kernels at start-up (runtime
# images carry the libraries but no headers). CUDA_VERSION is set by the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
       "cuda-cudart-dev-$(echo "${CUDA_VERSION}" | cut -d. -f1,2 | tr . -)" \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /home/pagemesh --uid 10001 pagemesh \
    && mkdir -p /data/huggingface /models \
    && chown pagemesh /data/huggingface
COPY --from=build /usr/local/bin/pagemesh /usr/local/bin/pagemesh
# The Hugging Face cache (a volume in docker-compose.yml) and the metrics port of every service.
ENV HF_HOME=/data/huggingface \
    PAGEMESH_METRICS_PORT=9100 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER pagemesh
WORKDIR /home/pagemesh
EXPOSE 9100
ENTRYPOINT ["pagemesh"]
CMD ["executor", "--help"]

FROM ${CPU_IMAGE} AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /home/pagemesh --uid 10001 pagemesh \
    && mkdir -p /data/huggingface /models \
    && chown pagemesh /data/huggingface
COPY --from=build /usr/local/bin/pagemesh /usr/local/bin/pagemesh
ENV HF_HOME=/data/huggingface \
    PAGEMESH_METRICS_PORT=9100
USER pagemesh
WORKDIR /home/pagemesh
EXPOSE 8000 9100
ENTRYPOINT ["pagemesh"]
CMD ["--help"]
